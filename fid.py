"""FID and Inception Score, computed the way the paper's numbers were (torch-fidelity, TF FID Inception).

Every FID/IS in the MAR paper comes from torch-fidelity: the TensorFlow "2015-12-05" Inception-v3 of
the original FID code, 50,000 samples, against the ADM ImageNet-256 reference statistics. This file
re-implements torch-fidelity's pipeline with torch and numpy only:
  uint8 images -> TF-1.x bilinear resize to 299 -> (x - 128) / 128 -> Inception-v3
  -> 2048-d pool features (FID) and 1008 bias-free logits (IS).
Parameter names and shapes are those of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`,
which loads strictly. A file without the classifier (no `fc.*`) also loads: FID works, and
`inception_score` then says that the classifier is missing.

Python API (used by experiments/table1.py and experiments/ablations.py; use it for FID of your own samples):
  model = load_inception(path, device)          # model(uint8 (N, C, H, W)) -> features (N, 2048), logits (N, 1008)
  evaluate(samples, ref, model)                 # {"fid", "is_mean", "is_std", ...}; inputs: see iter_images
  model.fused()                                 # extract_features' default: same to fp32 rounding, faster
  frechet_distance(mu1, sigma1, mu2, sigma2), inception_score(logits, splits=10)

Command line:
  python fid.py samples.npz --ref adm_in256_stats.npz --inception weights-inception-2015-12-05-6726825d.pth
  python fid.py my_dataset/ --inception WEIGHTS --save_stats my_ref.npz   # reference statistics for your data
SAMPLES / --ref: an .npz with uint8 NHWC images under `arr_0` (ADM's format), a folder of PNG/JPEG
images, or a statistics .npz with `mu` and `sigma`. Compute the statistics of a fixed reference set
once (--save_stats) and pass that file as --ref: its features are then never recomputed.
"""
import argparse
import copy
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import load_state_dict_strict, to_rgb8, torch_load

INCEPTION_SIZE = 299  # input resolution of the TF graph
NO_CLASSIFIER = ("Inception Score needs the Inception classifier (fc.weight), which this weights file "
                 "does not contain; use torch-fidelity's full weights-inception-2015-12-05-6726825d.pth "
                 "(FID works without it)")


# ----------------------------------------------------------------------------------------------
# Preprocessing: TF-1.x bilinear resize
# ----------------------------------------------------------------------------------------------
def tf1_sample_points(in_size, out_size):
    """Where TF 1.x's bilinear resize (align_corners=False) samples each output pixel along one axis.

    Output pixel i reads source coordinate s = i * (in / out): no half-pixel offset, unlike
    F.interpolate's s = (i + 0.5) * in / out - 0.5, which shifts the image by up to half a pixel
    and changes the features; hence this explicit version. It interpolates between floor(s) and
    floor(s) + 1, clamped to the last pixel. Computed in float32 as TF and torch-fidelity do.
    """
    src = torch.arange(out_size, dtype=torch.float32) * torch.tensor(in_size / out_size, dtype=torch.float32)
    lo = src.long()  # floor, src >= 0
    return lo, (lo + 1).clamp(max=in_size - 1), src - lo.float()  # (out,) x2 indices, (out,) weight of hi


def tf1_resize(x, size):
    """Resize float images (N, C, H, W) to (N, C, size, size) with TF-1.x bilinear semantics.

    Bilinear resizing is separable: interpolate along the width, then along the height, each as
    a + (b - a) * frac from the two neighbouring samples. This is the order and form of
    torch-fidelity's TF-compatible resize, so on CPU the result is bit-identical to it.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x  # the rule is the identity here
    lo, hi, frac = (t.to(x.device) for t in tf1_sample_points(w, size))
    x = x[..., lo] + (x[..., hi] - x[..., lo]) * frac  # (N, C, H, size)
    lo, hi, frac = (t.to(x.device) for t in tf1_sample_points(h, size))
    return x[..., lo, :] + (x[..., hi, :] - x[..., lo, :]) * frac[:, None]  # (N, C, size, size)


# ----------------------------------------------------------------------------------------------
# The TF "2015-12-05" Inception-v3 (module names = torch-fidelity's weight file)
# ----------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """The graph's unit: conv without bias -> BatchNorm (TF's eps 1e-3; weight is 1, TF has no gamma) -> ReLU."""

    def __init__(self, cin, cout, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def pool3x3(x, kind):
    """The 3x3 stride-1 pool in front of a block's pool branch. TF's average pool ignores padded
    cells (count_include_pad=False), unlike torchvision's; the last E block uses a max-pool."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(pool3x3(x, "avg"))], 1)  # (N, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):  # Mixed_6a, grid reduction 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)  # (N, 768, 17, 17)


class InceptionC(nn.Module):  # Mixed_6b..e, 17x17, 7x7 convs factored into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(pool3x3(x, "avg"))], 1)  # (N, 768, 17, 17)


class InceptionD(nn.Module):  # Mixed_7a, grid reduction 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                          F.max_pool2d(x, 3, stride=2)], 1)  # (N, 1280, 8, 8)


class InceptionE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool), 8x8
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pool3x3(x, self.pool))], 1)  # (N, 2048, 8, 8)


class FusedConv2d(nn.Module):
    """BasicConv2d for inference: BatchNorm folded into the conv, ReLU fused into it.

    In eval mode BN is a per-channel affine map, s * (x - mean) + beta with s = 1 / sqrt(var + eps), so
    BN(conv(x; w)) = conv(x; s * w) + (beta - s * mean): one pass over each activation instead of three
    (conv, BN, ReLU). Only the rounding differs from BasicConv2d (test_all.py bounds it). On CPU with
    oneDNN, the folded weight is reordered once into oneDNN's blocked layout and the ReLU runs as the
    conv's post-op; these are the ops torch.compile's CPU freezing pass emits, called directly, so
    there is no compile time. Elsewhere: F.conv2d + in-place ReLU. An inference-only copy: the packed
    weight is a plain attribute, not in any state dict.
    """

    def __init__(self, unit):
        super().__init__()
        conv, bn = unit.conv, unit.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (cout,)
        weight = (conv.weight * scale[:, None, None, None]).detach()  # (cout, cin, kh, kw)
        self.bias = (bn.bias - bn.running_mean * scale).detach()  # (cout,)
        self.args = conv.padding, conv.stride, conv.dilation, conv.groups
        self.onednn = (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
                       and torch.backends.mkldnn.enabled)
        if self.onednn:
            try:
                self.weight = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.args)
            except (AttributeError, RuntimeError):   # a torch build without these internal ops
                self.onednn = False
        if not self.onednn:
            self.weight = weight.contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        if self.onednn:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, "relu", [None], "")
        padding, stride, dilation, groups = self.args
        return F.relu(F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups), inplace=True)


class _ieee_fp32:
    """Temporarily force IEEE fp32 for cuDNN convs and CUDA matmuls (no effect on CPU)."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"

    def __exit__(self, *exc):
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = self.saved


class FIDInceptionV3(nn.Module):
    """uint8 images (N, 1 or 3, H, W), any H and W -> (pool features (N, 2048), bias-free logits (N, 1008)).

    The logits omit fc.bias because torch-fidelity's IS uses them so ("logits_unbiased"); they are
    None when built with classifier=False (weights file without fc.*).
    """

    def __init__(self, classifier=True):
        super().__init__()
        self.memory_format = torch.contiguous_format  # of the network input; channels_last in fused()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008) if classifier else None  # 1008 = TF's 1000 classes + 8 unused

    @torch.no_grad()
    def forward(self, images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"FID Inception expects uint8 images (N, 1 or 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}; convert [-1, 1] floats with "
                             "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")
        # Reference numbers come from full fp32: no autocast, no TF32 convs/matmuls (CUDA's default
        # for convs), whatever the caller has enabled.
        with torch.autocast(images.device.type, enabled=False), _ieee_fp32():
            x = tf1_resize(images.float(), INCEPTION_SIZE)  # (N, C, 299, 299)
            x = (x - 128) / 128  # the TF graph's input scaling
            # grayscale -> RGB by repetition; after the resize, which is per channel: same values, 1/3 the work
            x = x.expand(-1, 3, -1, -1).contiguous(memory_format=self.memory_format)  # (N, 3, 299, 299)
            x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (N, 32, 147, 147)
            x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)  # (N, 64, 73, 73)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
            x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
            x = self.Mixed_6a(x)  # (N, 768, 17, 17)
            x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
            features = x.mean(dim=(2, 3))  # (N, 2048) global average pool ("pool3")
            logits = None if self.fc is None else features @ self.fc.weight.T  # (N, 1008), no bias
        return features, logits

    def fused(self):
        """A copy for fast feature extraction (what extract_features runs by default): every BasicConv2d
        replaced by a FusedConv2d and the activations in channels-last (NHWC), the layout oneDNN's
        convs and pools are fastest in. Same features up to float rounding; build it on the model's
        device, in eval mode (the BN running statistics are folded)."""
        # deepcopy's memo maps each BasicConv2d to its fused unit, so the copy takes those in its place
        # instead of copying the unfused weights (only the classifier is copied)
        units = {id(unit): FusedConv2d(unit) for unit in self.modules() if isinstance(unit, BasicConv2d)}
        fast = copy.deepcopy(self, memo=units)
        fast.memory_format = torch.channels_last
        return fast


def load_inception(weights_path, device="cpu"):
    """Load torch-fidelity's FID Inception weights strictly; a file without fc.* gives a model whose
    logits are None (FID only). Returns the model in eval mode on `device`."""
    state = torch_load(weights_path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{weights_path!r} is not a plain state dict; expected torch-fidelity's "
                         "weights-inception-2015-12-05-6726825d.pth")
    model = FIDInceptionV3(classifier=any(k.startswith("fc.") for k in state))
    load_state_dict_strict(model, state, "the FID Inception-v3 (torch-fidelity's weights-inception-2015-12-05 layout)")
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def psd_factor(s):
    """A (D, r) with A A^T = S for a symmetric PSD S, dropping round-off eigenvalues (numerical rank r)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    tol = max(w.max(), 0) * len(w) * np.finfo(np.float64).eps  # numpy's matrix_rank tolerance
    if w.min() < -1e3 * tol - 1e-12:   # beyond round-off: not a covariance, and the FID would be a number anyway
        raise ValueError(f"sigma is not a covariance (eigenvalue {w.min():.3g} < 0): recompute the statistics")
    keep = w > tol
    return v[:, keep] * np.sqrt(w[keep])


def trace_sqrt_product(s1, s2):
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, without scipy.

    Write S1 = A A^T and S2 = B B^T (eigendecompositions, psd_factor). S1 S2 = A (A^T B B^T) has the
    same non-zero eigenvalues as A^T B B^T A = C C^T with C = A^T B, i.e. the squared singular
    values of C. The square root of S1 S2 whose eigenvalues are >= 0 (what scipy's sqrtm returns)
    therefore has trace sum(singular values of C). Singular values are computed to absolute
    accuracy, so no square root of a round-off-level eigenvalue enters; that matters for covariances
    of fewer samples than dimensions (rank-deficient), where sqrt(1e-13)-sized terms would add up.
    """
    c = psd_factor(s1).T @ psd_factor(s2)  # (r1, r2)
    return float(np.linalg.svd(c, compute_uv=False).sum()) if c.size else 0.0  # a zero covariance gives 0


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 as torch-fidelity computes it."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = len(mu1) if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape} (expected (D,) and (D, D))")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics hold NaN or inf (a broken statistics file or features): recompute them")
    for s in (sigma1, sigma2):
        if not np.allclose(s, s.T, rtol=1e-6, atol=1e-12 * max(1.0, np.abs(s).max())):
            raise ValueError("sigma is not symmetric, so not a covariance: recompute the statistics")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, from bias-free logits (N, K); returns (mean, std).

    As torch-fidelity: float64 softmax, samples shuffled with RandomState(2020).permutation(N) (fixed,
    so the score does not depend on the torch seed), `splits` equal chunks i*N//splits.
    """
    if logits is None:
        raise ValueError(NO_CLASSIFIER)
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if logits.ndim != 2 or n < splits:
        raise ValueError(f"inception_score needs logits (N, K) with N >= splits={splits}, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits[np.random.RandomState(2020).permutation(n)], dim=1)  # (N, K)
    scores = []
    for k in range(splits):
        lp = log_p[k * n // splits:(k + 1) * n // splits]  # (n_k, K) log p(y|x)
        log_marginal = torch.logsumexp(lp, 0) - math.log(lp.shape[0])  # (K,) log p(y) in this split
        scores.append(math.exp((lp.exp() * (lp - log_marginal)).sum(1).mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Inputs, features, statistics
# ----------------------------------------------------------------------------------------------
def _check_layout(dtype, shape, where):
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise ValueError(f"{where}: expected uint8 images (N, H, W, 3), (N, H, W, 1) or (N, H, W), got {dtype} "
                         f"{tuple(shape)} (NCHW arrays: a.transpose(0, 2, 3, 1); floats in [-1, 1]: "
                         "((a + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")


def _check_images(a, where):
    """uint8 NHWC (or NHW grayscale) array -> uint8 (N, H, W, C) with C in {1, 3}."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{where}: expected a numpy uint8 array (N, H, W, C), got {type(a).__name__}")
    _check_layout(a.dtype, a.shape, where)
    return a[..., None] if a.ndim == 3 else a


def _iter_npz(path, batch_size):
    """Stream `arr_0` of an .npz in batches, so a 50,000-image file never sits in memory at once."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a readable .npz (truncated or not a zip file): write it again") from None
    with zf:
        if len({"mu.npy", "sigma.npy"} & set(zf.namelist())) == 1:
            raise ValueError(f"{path}: a statistics file needs both 'mu' and 'sigma' (arrays: "
                             f"{[n[:-4] for n in zf.namelist()]}): compute it again with --save_stats")
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{path}: no images under 'arr_0' (arrays: {[n[:-4] for n in zf.namelist()]}); "
                             "a statistics file (mu, sigma) can only be used as a whole, not as images")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            _check_layout(dtype, shape, path)
            if fortran:
                raise ValueError(f"{path}: arr_0 is Fortran-ordered; save np.ascontiguousarray(images) instead")
            row = int(np.prod(shape[1:]))
            for i in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - i)
                yield np.frombuffer(bytearray(f.read(count * row)), np.uint8).reshape((count,) + shape[1:])


def _iter_folder(path, batch_size):
    from PIL import Image  # lazily: only image folders need Pillow

    files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                   if n.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise ValueError(f"{path}: no .png/.jpg/.jpeg images found")
    def read(f):
        try:
            with Image.open(f) as im:
                return np.asarray(to_rgb8(im))                      # gray and 16-bit -> 8-bit RGB
        except Exception as e:    # Pillow raises several types (UnidentifiedImageError, OSError, ...)
            raise ValueError(f"{f}: not a readable image ({type(e).__name__}): remove or replace it") from None

    shape = None                  # every image's, not only within a batch: one size for the whole set
    for i in range(0, len(files), batch_size):
        batch = [read(f) for f in files[i:i + batch_size]]
        shape = shape or (files[i], batch[0].shape)
        bad = next((f for f, b in zip(files[i:i + batch_size], batch) if b.shape != shape[1]), None)
        if bad is not None:
            raise ValueError(f"{path}: images have different sizes ({shape[0]} is {shape[1]}, {bad} is not); "
                             "resize or center-crop them to one size first")
        yield np.stack(batch)  # (B, H, W, 3)


def iter_images(source, batch_size=50):
    """Yield uint8 (B, H, W, C) batches from: an .npz path (ADM format, arr_0 uint8 NHWC), a folder of
    PNG/JPEG images (sorted, recursive), a uint8 array (N, H, W[, C]), or an iterable of such arrays."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f"images not found: {source!r}")
        if os.path.isdir(source):
            yield from _iter_folder(source, batch_size)
        elif str(source).endswith(".npz"):
            for batch in _iter_npz(source, batch_size):
                yield _check_images(batch, source)
        else:
            raise ValueError(f"{source}: expected an .npz file or a folder of images")
    elif isinstance(source, np.ndarray):
        source = _check_images(source, "images")
        for i in range(0, len(source), batch_size):
            yield source[i:i + batch_size]
    else:
        for batch in source:
            yield _check_images(batch, "image batch")


@torch.inference_mode()
def extract_features(model, source, batch_size=50, progress=True, fused=True):
    """Run the FID Inception over `source` (see iter_images) on the model's device.
    Returns float64 arrays: pool features (N, 2048) and logits (N, 1008), or None without classifier.
    fused: run model.fused() (BN folded, oneDNN conv + ReLU, channels-last: faster, benchmarks/fid_speed.py
    measures it; features equal up to fp32 rounding); False runs the network op by op, as torch-fidelity does."""
    device = next(model.parameters()).device
    if fused and isinstance(model, FIDInceptionV3):
        model = model.fused()
    features, logits, n, t0, last = [], [], 0, time.time(), time.time()
    for batch in iter_images(source, batch_size):
        x = torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2)  # (B, C, H, W)
        f, lg = model(x)
        features.append(f.double().cpu().numpy())
        if lg is not None:
            logits.append(lg.double().cpu().numpy())
        n += len(batch)
        if progress and time.time() - last > 10:
            print(f"fid: {n} images, {n / (time.time() - t0):.1f} images/s", flush=True)
            last = time.time()
    if not features:
        raise ValueError("no images to evaluate")
    if progress and time.time() - t0 > 10:
        print(f"fid: features of {n} images done in {time.time() - t0:.0f} s", flush=True)
    return np.concatenate(features), (np.concatenate(logits) if logits else None)


def feature_statistics(features):
    """float64 mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    if len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(features)}")
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def is_statistics_file(path):
    if not (isinstance(path, (str, os.PathLike)) and str(path).endswith(".npz") and os.path.isfile(path)):
        return False
    try:
        with np.load(path) as f:
            return "mu" in f.files and "sigma" in f.files
    except (zipfile.BadZipFile, ValueError, OSError):
        return False              # not a readable .npz: reading it as images says so


def load_statistics(path):
    """(mu, sigma) float64 from an .npz with arrays `mu` (D,) and `sigma` (D, D)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file not found: {path!r}")
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', found {f.files}")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def save_statistics(path, mu, sigma):
    """Write float64 `mu`, `sigma` to an .npz (the format --ref and load_statistics read)."""
    path = str(path) if str(path).endswith(".npz") else f"{path}.npz"  # np.savez would add it silently
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return path


def evaluate(samples, ref=None, inception=None, batch_size=50, device=None, save_stats=None, progress=True,
             fused=True):
    """FID of `samples` against `ref`, and IS of `samples` when the classifier is present.

    samples / ref: a statistics .npz (mu, sigma) or any image source of iter_images. inception: a
    loaded model or a weights path (loaded on `device`, default CUDA when available). ref=None skips
    FID (e.g. to only write `save_stats`). fused: see extract_features. Returns {"fid", "is_mean",
    "is_std", "stats_path"} (None where not computed / not saved).
    """
    model = inception

    def stats(source, name):
        nonlocal model
        if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
            raise FileNotFoundError(f"{name} not found: {source!r}")
        if is_statistics_file(source):
            return load_statistics(source) + (None,)
        if model is None:
            raise ValueError(f"computing features of the {name} needs the Inception weights (--inception)")
        if not isinstance(model, nn.Module):
            model = load_inception(model, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        features, logits = extract_features(model, source, batch_size, progress, fused)
        return feature_statistics(features) + (logits,)

    mu, sigma, logits = stats(samples, "samples")
    result = {"fid": None, "is_mean": None, "is_std": None, "stats_path": None}
    if save_stats:
        result["stats_path"] = save_statistics(save_stats, mu, sigma)
    if logits is not None:
        result["is_mean"], result["is_std"] = inception_score(logits)
    if ref is not None:
        result["fid"] = frechet_distance(mu, sigma, *stats(ref, "reference")[:2])
    return result


def main():
    p = argparse.ArgumentParser(description="FID / Inception Score with the TF FID Inception (torch-fidelity numbers)")
    p.add_argument("samples", help="images: .npz (uint8 NHWC under arr_0) or folder of PNG/JPEG; or a stats .npz (mu, sigma)")
    p.add_argument("--ref", help="reference statistics .npz (e.g. adm_in256_stats.npz) or images; omit to only compute IS / --save_stats")
    p.add_argument("--inception", help="weights-inception-2015-12-05-6726825d.pth (needed unless both inputs are statistics)")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save_stats", help="write mu/sigma of SAMPLES to this .npz (reference statistics for your own data)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu")
    try:
        r = evaluate(args.samples, args.ref, args.inception, args.batch_size, args.device, args.save_stats)
    except (FileNotFoundError, ValueError) as e:  # bad inputs: the message says what to fix
        p.error(str(e))
    if r["stats_path"]:
        print(f"saved statistics of {args.samples} to {r['stats_path']}")
    if r["fid"] is not None:
        print(f"FID: {r['fid']:.4f}")
    if r["is_mean"] is not None:
        print(f"IS: {r['is_mean']:.2f} +- {r['is_std']:.2f}")
    elif not is_statistics_file(args.samples):
        print("IS: not computed (the Inception weights file has no classifier fc.*)")


if __name__ == "__main__":
    main()
