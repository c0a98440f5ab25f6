"""Tokenizers: the continuous tokens MAR models, and the data that feeds them.

MAR (paper Sec. 3-5) models a sequence of continuous tokens; the model only ever sees a
(seq_len, token_dim) pair. This file turns images into such sequences and back:

  * `patchify` / `unpatchify`: the released MAR code's token layout: a (B, C, H, W) map becomes
    (B, (H/p)(W/p), C*p*p), each token flattened in (c, p_row, p_col) order, row-major over the grid.
  * `AutoencoderKL`: LDM's KL-regularised autoencoder, written from scratch; with `VAE_CONFIGS["kl16"]`
    its state dict has exactly the names and shapes of the released `kl16.ckpt` (testdata/kl16_vae.txt);
    `VAE_CONFIGS["kl8"]` describes LDM's f8 model (4 channels), used with patch_size=2 (paper Table 2).
  * `KLTokenizer` (tokens = posterior sample * 0.2325) and `PixelTokenizer` (raw p x p patches, no
    weights, for small images) share one duck-typed interface: `.seq_len`, `.token_dim`, `.token_bound`,
    `.encode(images in [-1, 1]) -> (B, seq, token_dim)`, `.decode(tokens) -> images in [-1, 1]`,
    `.config()` -> plain dict, rebuilt by `build_tokenizer(cfg, vae_path)`.
  * Training a tokenizer on one's own images (train.py --model kl_f4 | kl_f2 | vq_f4 | vq_f2, `AUTOENCODERS`):
    `AutoencoderKL.forward` is LDM's loss without its perceptual term (L1 + 1e-6 KL; with train.py
    --disc_weight, its adversarial term: `PatchDiscriminator`, `hinge_d_loss`, `adaptive_weight`),
    `AutoencoderVQ` its twin with a `VectorQuantizer` bottleneck (codes for cross-entropy, the continuous
    z before quantisation for the Diffusion Loss: `VQAETokenizer`), and `latent_stats` measures the
    1 / std that KL-16's 0.2325 is for ImageNet and the latents' range (the sampler's clip), stored in
    the checkpoint that `load_vae` reads.
  * `VQTokenizer`: discrete tokens for Table 1's cross-entropy baseline, the pixel patches snapped to
    the nearest of K codes of a seeded k-means codebook (`kmeans`, `nearest_code`); the codebook
    travels in `.config()`.
  * `cache_latents` / `CachedLatents`: the released code's cache step (encode every image and its
    horizontal flip once, keep the posterior moments in a memory-mapped .npy).
  * Data: `ImageFolder` (ImageNet-style class folders, ADM center crop), `ArrayDataset`, and
    `load_fashion_mnist` (idx files, e.g. from Debian's `dataset-fashion-mnist`).
  * `torch_load` / `load_state_dict_strict`: the one safe, strict checkpoint loader shared with mar.py
    and fid.py.

Runtime dependencies: torch and numpy; Pillow is imported only inside the functions that read images.
Used by train.py (data, tokenizers, cached latents), sample.py (decode), mar.py and fid.py (checkpoint
loading). Tests: `python -m pytest`, run at the repository root.
Example, the cache step for ImageNet 256 (then train from `CachedLatents("cache/in256")`):

    vae = load_vae("kl16.ckpt")
    cache_latents(ImageFolder("imagenet/train", 256), vae, "cache/in256", batch_size=128, device="cuda")
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# 1 / std of the KL-16 latents over ImageNet (no mean shift, as in the released MAR code): makes tokens
# ~unit variance, the scale the Diffusion Loss noise schedule assumes. Other tokenizers need their own value.
KL16_SCALE = 0.2325
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------
# Checkpoint loading shared by every file (contract: one helper, strict, weights_only)
# ------------------------------------------------------------------------------------------------
def torch_load(path):
    """Load a checkpoint file safely (weights_only=True): tensors and plain containers only.

    The original MAR training checkpoints pickle an `argparse.Namespace` under "args"; it is
    allow-listed so that those files load without trusting arbitrary pickled code. A file that is
    not a checkpoint, or that pickles anything else, raises a one-line ValueError.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (check the path or download the file first)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:                      # unreadable (permissions, I/O): the OS says why in one line
        raise ValueError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from None
    except Exception as e:
        # torch.load raises a different type for each kind of damage (KeyError from a text file,
        # RuntimeError from a truncated zip, EOFError, UnicodeDecodeError, struct.error, ...), each with
        # a deep traceback. A pickled class or function outside the allow-list is refused: its text
        # would suggest weights_only=False, which runs the file's code, so it is never passed on.
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if blocked:
            raise ValueError(f"{path!r} contains pickled objects that safe loading refuses ({blocked.group(1)}): "
                             "it will not be loaded (a checkpoint needs only tensors and plain containers): pass another file") from None
        raise ValueError(f"{path!r} is not a PyTorch checkpoint ({type(e).__name__} while reading it: damaged, "
                         "truncated or another kind of file): re-download it or pass another file") from None


def load_state_dict_strict(module, state_dict, what):
    """`module.load_state_dict(state_dict, strict=True)`, but on a mismatch raise one readable error
    that lists missing keys, unexpected keys and shape differences (first 10 of each, then a count)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def show(name, items):
            if not items:
                return ""
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            return f"\n  {len(items)} {name}: " + ", ".join(items[:10]) + more
        raise ValueError(f"checkpoint does not match {what}:" + show("missing keys", missing)
                         + show("unexpected keys", unexpected) + show("shape mismatches", shapes)
                         + "\n  (wrong file, or a model config that differs from the one that wrote it)")
    module.load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------------------------------------
# Token layout (the released MAR code's patchify / unpatchify)
# ------------------------------------------------------------------------------------------------
def patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p); token (i, j) of the grid is sequence index i*(W/p)+j,
    and its features run over (c, p_row, p_col) with p_col fastest."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: spatial size {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)                    # (B, C, h, p_row, w, p_col)
    x = x.permute(0, 2, 4, 1, 3, 5)                              # (B, h, w, C, p_row, p_col)
    return x.reshape(b, (h // p) * (w // p), c * p * p)          # (B, L, C*p*p)


def unpatchify(tokens, p, channels, h, w):
    """Exact inverse of `patchify`: (B, (h/p)(w/p), C*p*p) -> (B, C, h, w)."""
    b, length, dim = tokens.shape
    if h % p or w % p or length != (h // p) * (w // p) or dim != channels * p * p:
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit a {channels}x{h}x{w} "
                         f"map with patch size {p}")
    x = tokens.reshape(b, h // p, w // p, channels, p, p)        # (B, h, w, C, p_row, p_col)
    x = x.permute(0, 3, 1, 4, 2, 5)                              # (B, C, h, p_row, w, p_col)
    return x.reshape(b, channels, h, w)


# ------------------------------------------------------------------------------------------------
# LDM's KL autoencoder (Rombach et al. 2022) in the configuration of MAR's released kl16.ckpt; module
# names match its state dict
# ------------------------------------------------------------------------------------------------
def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice plus a skip (1x1 `nin_shortcut` when the width changes)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        # 1x1 conv skip only where the width changes (Identity has no weights, so no state-dict entry)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, q/k/v/proj as 1x1 convs (softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        y = F.scaled_dot_product_attention(q, k, v)                                                  # (B,1,HW,C)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads only right/bottom, so H/2 exactly


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (res blocks), `attn` (one per block, or none), then an optional
    `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, c_in, c_out, n_blocks, attn, down=False, up=False):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks)])
        self.attn = nn.ModuleList([AttnBlock(c_out) for _ in range(n_blocks)] if attn else [])
        if down:
            self.downsample = Downsample(c_out)
        if up:
            self.upsample = Upsample(c_out)

    def forward(self, x):
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """conv_in, one `Level` per entry of ch_mult (downsampling after all but the last), mid block,
    GroupNorm-swish-conv_out to 2 * z_channels (mean and log-variance)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_levels, in_channels, z_channels, double_z=True):
        super().__init__()
        n = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList([Level(ch if i == 0 else widths[i - 1], widths[i], num_res_blocks,
                                         attn=i in attn_levels, down=i < n - 1) for i in range(n)])
        self.mid = MidBlock(widths[-1])
        out = 2 * z_channels if double_z else z_channels         # mean and log-variance (KL) or z (VQ)
        self.norm_out, self.conv_out = group_norm(widths[-1]), nn.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)                                      # (B, ch, H, W)
        for level in self.down:
            x = level(x)                                         # (B, ch*m_i, H/2^i, W/2^i)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))          # (B, 2 z (KL) or z (VQ), H/f, W/f)


class Decoder(nn.Module):
    """Mirror of the encoder: conv_in, mid block, `up` levels (num_res_blocks + 1 blocks each; `up[i]`
    works at the resolution of encoder level i and runs from i = n-1 down to 0), norm, conv_out."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_levels, out_channels, z_channels):
        super().__init__()
        n = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList([Level(widths[min(i + 1, n - 1)], widths[i], num_res_blocks + 1,
                                       attn=i in attn_levels, up=i > 0) for i in range(n)])
        self.norm_out, self.conv_out = group_norm(widths[0]), nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))                            # (B, ch*m_last, h, w)
        for level in reversed(self.up):
            x = level(x)                                         # (B, ch*m_i, 2h, 2w) (no upsample at i=0)
        return self.conv_out(F.silu(self.norm_out(x)))          # (B, 3, H, W)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); built from the "moments" (B, 2E, h, w) = [mean, logvar]."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)              # (B, E, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)                  # LDM's clamp: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """mean + std * eps; `generator` (on the tensors' device) makes the draw reproducible."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    @property
    def moments(self):
        return torch.cat([self.mean, self.logvar], dim=1)       # (B, 2E, h, w)


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder. Downsampling factor f = 2^(len(ch_mult)-1); latents have `embed_dim` channels.

    attn_levels: encoder levels with attention after each res block (negative = from the lowest, so
    (-1,) is KL-16's 16x16 level); decoder_attn_levels the same for the decoder (KL-16: none).
    Both mid blocks always have attention. Defaults are KL-16 (VAE_CONFIGS["kl16"])."""

    def __init__(self, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ch=128, num_res_blocks=2, z_channels=None,
                 attn_levels=(-1,), decoder_attn_levels=(), in_channels=3):
        super().__init__()
        ch_mult, z_channels = tuple(ch_mult), z_channels or embed_dim
        if ch % 32:
            raise ValueError(f"AutoencoderKL: ch={ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        n = len(ch_mult)
        enc_attn = {lvl % n for lvl in attn_levels}
        dec_attn = {lvl % n for lvl in decoder_attn_levels}
        self.config = dict(embed_dim=embed_dim, ch_mult=ch_mult, ch=ch, num_res_blocks=num_res_blocks,
                           z_channels=z_channels, attn_levels=tuple(attn_levels),
                           decoder_attn_levels=tuple(decoder_attn_levels), in_channels=in_channels)
        self.embed_dim, self.in_channels, self.downsample_factor = embed_dim, in_channels, 2 ** (n - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, enc_attn, in_channels, z_channels, self.double_z)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, dec_attn, in_channels, z_channels)
        two = 2 if self.double_z else 1                          # mean and log-variance, or z alone
        self.quant_conv = nn.Conv2d(two * z_channels, two * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    double_z = True     # the encoder gives a mean and a log-variance per latent (the VQ twin: z alone)
    # The weight of the KL term when training (train.py --kl_weight): LDM's 1e-6 (see forward). Not
    # part of the config or the weights: a training setting, like the learning rate.
    kl_weight = 1e-6
    # 1 / std of the latents (KLTokenizer multiplies by it): KL-16's value for the released weights;
    # load_vae reads a trained autoencoder's own from its checkpoint (latent_stats computes it).
    scale = KL16_SCALE
    latent_bound = None         # max |latent| over training images (latent_stats; None: unknown, KL-16)
    trained_image_size = None   # the image size it was trained on, where known (load_vae: one trained here)

    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents):
        """latents (B, embed_dim, h, w) (unscaled) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def latents(self, images):
        """The latents a tokenizer reads (a posterior sample), unscaled: what latent_stats measures."""
        return self.encode(images).sample()

    @torch.no_grad()
    def reconstruct(self, images):
        """images -> their reconstructions through the posterior's mean, in [-1, 1]."""
        return self.decode(self.encode(images).mode()).clamp(-1.0, 1.0)

    def forward(self, images, labels=None, adversary=None):
        """The training loss of LDM's autoencoder without its perceptual term: L1 reconstruction of a
        posterior sample + kl_weight * KL(posterior || N(0, I)) (+ the adversarial term with an adversary).
        LDM sums both over the pixels / latent elements; here both are divided by the number of pixels
        (the same objective up to the learning rate's scale), so kl_weight is LDM's. labels: unused
        (train.py's interface)."""
        posterior = self.encode(images)
        rec = self.decode(posterior.sample()).float()
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).float().sum()
        l1 = (rec - images).abs().mean()
        return l1 + self.kl_weight * kl / images.numel() + self.adversarial(l1, images, rec, adversary)

    def adversarial(self, rec_loss, images, rec, adversary):
        """LDM's adversarial term, when train.py passes an adversary (--disc_weight > 0; train.Adversary):
        0 before it starts; it sees the real images and their reconstructions for its own step."""
        if adversary is None:
            return 0.0
        return adversary.generator_term(rec_loss, images, rec, self.decoder.conv_out.weight)


class VectorQuantizer(nn.Module):
    """K code vectors (VQ-VAE, van den Oord et al. 2017; `embedding` is LDM's name). Each latent vector z
    is replaced by its nearest code e; the straight-through estimator z + sg[e - z] hands the decoder's
    gradient to the encoder unchanged; the codebook term ||sg[z] - e||^2 pulls the codes to the encodings
    and the commitment term beta ||z - sg[e]||^2 (beta = 0.25) the encodings to their codes.
    A code that no encoding has picked for `restart_after` training steps is moved onto a random encoding
    of the current batch (Jukebox's random restarts), so the codebook does not collapse onto a few codes."""

    def __init__(self, num_codes, dim, beta=0.25, restart_after=100):
        super().__init__()
        self.beta, self.restart_after = beta, restart_after
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)     # LDM's init
        self.register_buffer("idle", torch.zeros(num_codes, dtype=torch.long))        # steps since last picked
        self.register_buffer("picked", torch.zeros(num_codes), persistent=False)      # counts since usage()

    def forward(self, z):
        """z (B, E, h, w) -> (z_q with the straight-through gradient (B, E, h, w), codebook + commitment
        loss, code indices (B, h, w))."""
        b, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e).float()                           # (B h w, E)
        idx = nearest_code(flat.detach(), self.embedding.weight.detach().float())
        code = self.embedding(idx).float()
        loss = F.mse_loss(code, flat.detach()) + self.beta * F.mse_loss(flat, code.detach())
        if self.training:
            self.restart(flat.detach(), idx)
        zq = flat + (code - flat).detach()
        return zq.reshape(b, h, w, e).permute(0, 3, 1, 2).to(z.dtype), loss, idx.reshape(b, h, w)

    @torch.no_grad()
    def restart(self, flat, idx):
        """Count the picks; move every code idle for restart_after steps onto a random encoding. No host
        sync (torch.where, not a branch). Under DDP the ranks agree: picks are summed over the ranks and
        rank 0's replacements are broadcast."""
        picks = torch.bincount(idx, minlength=len(self.idle)).float()
        new = flat[torch.randint(len(flat), (len(self.idle),), device=flat.device)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(picks)
            torch.distributed.broadcast(new, 0)
        self.picked += picks
        self.idle.copy_(torch.where(picks > 0, 0, self.idle + 1))
        dead = self.idle >= self.restart_after
        self.embedding.weight.copy_(torch.where(dead[:, None], new.to(self.embedding.weight.dtype),
                                                self.embedding.weight))
        self.idle.masked_fill_(dead, 0)

    def usage(self):
        """Codebook use since the last call (code_usage of the picks). Resets the counts."""
        used_perplexity = code_usage(self.picked)
        self.picked.zero_()
        return used_perplexity


def code_usage(counts):
    """Per-code pick counts (K,) -> (fraction of codes picked, perplexity exp(H) of the picks, at most K)."""
    p = counts.float() / counts.sum().clamp(min=1)
    return (p > 0).float().mean().item(), torch.exp(-(p * p.clamp(min=1e-12).log()).sum()).item()


class AutoencoderVQ(AutoencoderKL):
    """The KL autoencoder's twin with a vector-quantised bottleneck (LDM's VQModel without its perceptual
    term): the same encoder and decoder; the encoder's output goes through quant_conv to
    z (embed_dim channels), which is snapped to the nearest of `num_codes` codes before the decoder. It
    tokenizes an image in two ways, as the paper's Table 2 does with VQ-16: the discrete codes (for
    cross-entropy) and the continuous z before quantisation (for the Diffusion Loss)."""

    double_z = False

    def __init__(self, num_codes=1024, **kwargs):
        super().__init__(**kwargs)
        self.quantize = VectorQuantizer(num_codes, self.embed_dim)
        self.config["num_codes"] = num_codes

    def encode(self, images):
        """images (B, C, H, W) in [-1, 1] -> z (B, embed_dim, H/f, W/f), continuous (before quantisation)."""
        return self.quant_conv(self.encoder(images))

    def latents(self, images):
        return self.encode(images)

    @torch.no_grad()
    def reconstruct(self, images):
        """images -> their reconstructions through the codes, in [-1, 1]."""
        return self.decode(self.quantize(self.encode(images))[0]).clamp(-1.0, 1.0)

    def forward(self, images, labels=None, adversary=None):
        """L1 reconstruction through the quantised bottleneck + the codebook and commitment terms (+ the
        adversarial term with an adversary)."""
        zq, vq_loss, _ = self.quantize(self.encode(images))
        rec = self.decode(zq).float()
        l1 = (rec - images).abs().mean()
        return l1 + vq_loss + self.adversarial(l1, images, rec, adversary)

    def log_stats(self):
        """What train.py logs beside the loss: the codebook's use since the last log."""
        used, perplexity = self.quantize.usage()
        return dict(codes_used=round(used, 4), code_perplexity=round(perplexity, 1))


class PatchDiscriminator(nn.Module):
    """The adversary of LDM's autoencoder loss: pix2pix's PatchGAN (Isola et al. 2017; taming-transformers'
    NLayerDiscriminator): 4x4 convolutions, n_layers of stride 2 then one of stride 1, LeakyReLU(0.2), a
    logit per overlapping patch (each from a 34x34 window: 28x28 images give 5x5 logits that each see
    nearly all of it). GroupNorm where taming has BatchNorm: a real and a fake batch can then share one
    forward pass with the same result as two, and DDP ranks share no batch statistics."""

    def __init__(self, in_channels=3, ch=64, n_layers=2):
        super().__init__()
        layers, width = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(width, out, 4, 2 if i < n_layers else 1, 1, bias=False), group_norm(out),
                       nn.LeakyReLU(0.2)]
            width = out
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)            # taming's weights_init
        self.config = dict(in_channels=in_channels, ch=ch, n_layers=n_layers)

    def forward(self, images):
        """images (B, C, H, W) in [-1, 1] -> logits (B, 1, h, w), one per patch: > 0 reads "real"."""
        return self.net(images)

    def patches(self, size):
        """h = w of the logits for images of side `size`; 0 if they are too small (here: below 12)."""
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                if size + 2 * m.padding[0] < m.kernel_size[0]:
                    return 0
                size = (size + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        return size


def hinge_d_loss(real_logits, fake_logits):
    """The discriminator's hinge loss (taming's, LDM's default): real logits pushed above 1, fake below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss, g_loss, last_layer, max_weight=1e4):
    """VQGAN's balance (Esser et al. 2021, eq. 7; LDM keeps it): ||grad of rec_loss|| / (||grad of g_loss||
    + 1e-4) at the decoder's last weights, clamped to [0, 1e4], no gradient through it, so the adversarial
    gradient reaching the decoder starts at the scale of the reconstruction's."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


VAE_CONFIGS = {
    "kl16": dict(embed_dim=16, ch_mult=(1, 1, 2, 2, 4), attn_levels=(-1,)),  # MAR's released kl16.ckpt
    "kl8": dict(embed_dim=4, ch_mult=(1, 2, 4, 4), attn_levels=()),          # LDM kl-f8 (paper Table 2, p=2)
    "tiny": dict(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1),      # random weights: CPU plumbing tests
}


# Autoencoders to train on one's own small images (train.py --model NAME; 28x28 to 64x64): LDM's
# architecture, narrower and shallower. kl_f4: stride 4, 16 channels (28x28 -> 7x7 x 16: Table 1's 49
# tokens of 16 with patch 1); kl_f2: stride 2, 4 channels (14x14 x 4: the same token shape with patch 2);
# vq_f4 / vq_f2: their twins with 1024 codes.
AUTOENCODERS = {
    "kl_f4": (AutoencoderKL, dict(embed_dim=16, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=())),
    "kl_f2": (AutoencoderKL, dict(embed_dim=4, ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_levels=())),
}
AUTOENCODERS.update({"vq" + name[2:]: (AutoencoderVQ, dict(cfg, num_codes=1024))
                     for name, (_, cfg) in AUTOENCODERS.items()})


def build_autoencoder(name, **overrides):
    """AUTOENCODERS[name] with overrides (in_channels, num_codes, kl_weight, ...)."""
    if name not in AUTOENCODERS:
        raise ValueError(f"unknown autoencoder {name!r}; valid names: {', '.join(AUTOENCODERS)}")
    cls, cfg = AUTOENCODERS[name]
    kl_weight = overrides.pop("kl_weight", None)
    vae = cls(**{**cfg, **overrides})
    if kl_weight is not None:
        vae.kl_weight = kl_weight
    return vae


@torch.no_grad()
def latent_stats(vae, dataset, max_images=2_000, batch_size=100, device="cpu"):
    """(scale, bound) of the latents a tokenizer reads (posterior samples, or the VQ twin's z) over the
    first max_images images of `dataset` (items (image in [-1, 1], label)).

    scale: 1 / std, all elements pooled and no mean subtracted: the released MAR code's 0.2325 for KL-16
    is this over ImageNet. It makes the tokens ~unit variance, the scale the Diffusion Loss's noise
    schedule assumes.
    bound: max |latent| (unscaled). The Diffusion Loss sampler clips each step's x_0 estimate to the
    tokens' range (DiffLoss clip_x0, DDPM's clip_denoised): its first step multiplies the error of the
    noise prediction by ~2e4, which a model trained for 400 epochs (KL-16's) keeps small but one
    trained briefly does not: unclipped, its latents diverge to 1e3 (measured, experiments/table2.py)."""
    n, s, s2, bound = 0, 0.0, 0.0, 0.0
    for start in range(0, min(len(dataset), max_images), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset), max_images))])
        z = vae.latents(images.to(device)).double()
        n, s, s2 = n + z.numel(), s + z.sum().item(), s2 + (z * z).sum().item()
        bound = max(bound, z.abs().max().item())
    return 1.0 / math.sqrt(s2 / n - (s / n) ** 2), bound


def load_vae(path, name="kl16", **overrides):
    """An autoencoder in eval mode on the CPU, from either file: a released `{"model": state_dict}` file
    (e.g. kl16.ckpt: `VAE_CONFIGS[name]` updated by `overrides`, loaded strictly), or a train.py
    checkpoint of an AUTOENCODERS model (its own config, EMA weights and latent scale; `overrides`, if
    given, must agree with the file)."""
    ckpt = torch_load(path)
    trained = isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) \
        and ckpt["config"].get("model") in AUTOENCODERS
    if trained:
        cfg = {k: v for k, v in ckpt["config"].items() if k != "model"}
        vae = AUTOENCODERS[ckpt["config"]["model"]][0](**cfg)
        differ = {k: (v, vae.config.get(k)) for k, v in overrides.items() if vae.config.get(k) != v}
        if differ:
            raise ValueError(f"{path!r} is another autoencoder than the one expected ({differ}: expected vs file)")
        if "scale" not in ckpt:
            raise ValueError(f"{path!r}: its training has not finished (the latent scale is measured at the end): "
                             "finish it with train.py --resume, then pass it")
        load_state_dict_strict(vae, ckpt["model_ema"], f"{ckpt['config']['model']} (EMA weights)")
        vae.scale, vae.latent_bound = ckpt["scale"], ckpt.get("latent_bound")
        vae.trained_image_size = (ckpt.get("tokenizer") or {}).get("image_size")   # what it was trained on
        return vae.eval()
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "model_ema" in ckpt:
        raise ValueError(f"{path!r} is a train.py checkpoint of a {ckpt['config'].get('model')!r} model, not of an "
                         "autoencoder: pass the autoencoder's file (kl16.ckpt, or a train.py --model kl_f4 / kl_f2 / "
                         "vq_f4 / vq_f2 run's checkpoint)")
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; choose from {sorted(VAE_CONFIGS)}")
    vae = AutoencoderKL(**{**VAE_CONFIGS[name], **overrides})
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path!r} is not a VAE checkpoint: expected a dict with a 'model' state dict "
                         f"(like kl16.ckpt), found a {type(ckpt).__name__}")
    what = "AutoencoderKL(" + ", ".join(f"{k}={v}" for k, v in vae.config.items()) + ")"
    load_state_dict_strict(vae, ckpt["model"], what)
    return vae.eval()


# ------------------------------------------------------------------------------------------------
# Tokenizers: one duck-typed interface (seq_len, token_dim, token_bound, encode, decode, config, to)
# ------------------------------------------------------------------------------------------------
def _check_images(images, channels, size, who):
    if images.ndim != 4 or images.shape[1] != channels or images.shape[2] != size or images.shape[3] != size:
        raise ValueError(f"{who}.encode expects images (B, {channels}, {size}, {size}) in [-1, 1], "
                         f"got {tuple(images.shape)}")


class PixelTokenizer:
    """Tokens are raw p x p patches of the image in [-1, 1]: no weights, exact round trip. Lets MAR train
    on small images (28x28 to 64x64) with nothing to download."""

    def __init__(self, image_size, channels=3, patch_size=1):
        if image_size % patch_size:
            raise ValueError(f"PixelTokenizer: image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        self.seq_len = (image_size // patch_size) ** 2
        self.token_dim = channels * patch_size ** 2
        self.token_bound = 1.0  # tokens are pixel values in [-1, 1] (DiffLoss's clip_x0 uses it)

    def encode(self, images, generator=None):
        """(B, C, S, S) -> (B, seq_len, token_dim). Deterministic: `generator` is accepted and unused."""
        _check_images(images, self.channels, self.image_size, "PixelTokenizer")
        return patchify(images, self.patch_size)

    def decode(self, tokens):
        s = self.image_size
        return unpatchify(tokens, self.patch_size, self.channels, s, s).clamp(-1.0, 1.0)  # model output may overshoot

    def config(self):
        return dict(kind="pixel", image_size=self.image_size, channels=self.channels, patch_size=self.patch_size)

    def to(self, device):
        return self


def nearest_code(x, codebook, chunk=65536):
    """Index of the nearest codebook row (squared Euclidean) for each vector: x (..., C), codebook
    (K, C) -> (...) long. |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for every c, so the
    argmin is over |c|^2 - 2 x.c: one matmul per chunk of rows (chunks bound the (rows, K) matrix)."""
    flat = x.reshape(-1, x.shape[-1])
    sq = (codebook * codebook).sum(dim=1)                                        # (K,)
    out = [(sq - 2 * part @ codebook.T).argmin(dim=1) for part in flat.split(chunk)]
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)).reshape(x.shape[:-1])


def kmeans(x, k, seed=0, iters=25):
    """k-means codebook (k, C) of the rows of x (N, C): k-means++ initialisation (each new center drawn
    with probability proportional to the squared distance to the nearest chosen one), then Lloyd
    iterations. A cluster that empties is re-seeded at the point farthest from its center, so the k
    codes stay distinct. All randomness comes from a generator seeded with `seed`."""
    x = x.float()
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= number of points, got k={k} for {n} points")
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (), generator=g)]]
    d2 = ((x - centers[0]) ** 2).sum(dim=1)                                      # (N,) to the nearest center
    for _ in range(1, k):
        if not d2.any():
            raise ValueError(f"kmeans: the data has fewer than k={k} distinct points")
        centers.append(x[torch.multinomial(d2, 1, generator=g)[0]])
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(dim=1))
    centers = torch.stack(centers)                                               # (k, C)
    for _ in range(iters):
        assign = nearest_code(x, centers)                                        # (N,)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            far = ((x - new[assign]) ** 2).sum(dim=1).argsort(descending=True)[:len(empty)]
            new[empty] = x[far]
        if torch.equal(new, centers):
            break
        centers = new
    return centers


class VQTokenizer(PixelTokenizer):
    """Discrete tokens over the same p x p pixel patches (Table 1's cross-entropy rows): each patch is
    replaced by the nearest of K code vectors, a k-means codebook of training patches (`fit`). Tokens
    stay vectors (the codes), so MAR / AR read them as any other tokens; `indices` gives the discrete
    codes, and the CE head (mar.CEHead) holds the same codebook. Decoding is the pixel tokenizer's."""

    def __init__(self, codebook, image_size, channels=3, patch_size=1):
        super().__init__(image_size, channels, patch_size)
        codebook = torch.as_tensor(codebook, dtype=torch.float32)
        if codebook.ndim != 2 or codebook.shape[1] != self.token_dim:
            raise ValueError(f"VQTokenizer: codebook must be (K, {self.token_dim}) for {patch_size}x{patch_size} "
                             f"patches of {channels} channel(s), got {tuple(codebook.shape)}")
        self.codebook, self.num_codes = codebook, len(codebook)
        self.token_bound = 1.0  # codes are means of patches in [-1, 1]

    @classmethod
    def fit(cls, dataset, num_codes, patch_size, seed=0, max_patches=200_000, iters=25):
        """k-means over the patches of `dataset` (items (image in [-1, 1], label)): a seeded random
        subset of at most max_patches patches, drawn from all images."""
        image = dataset[0][0]
        pixel = PixelTokenizer(image.shape[-1], image.shape[0], patch_size)
        patches = torch.cat([pixel.encode(torch.stack([dataset[i][0] for i in range(j, min(j + 1000, len(dataset)))]))
                             .reshape(-1, pixel.token_dim) for j in range(0, len(dataset), 1000)])  # (N L, C)
        g = torch.Generator().manual_seed(seed)
        patches = patches[torch.randperm(len(patches), generator=g)[:max_patches]]
        return cls(kmeans(patches, num_codes, seed, iters), pixel.image_size, pixel.channels, patch_size)

    def indices(self, images):
        """(B, C, S, S) -> (B, seq_len) long code indices."""
        return nearest_code(super().encode(images), self.codebook)

    def encode(self, images, generator=None):
        """(B, C, S, S) -> (B, seq_len, token_dim): the nearest code vector of every patch (deterministic)."""
        return self.codebook[self.indices(images)]

    def config(self):
        return dict(super().config(), kind="vq", codebook=self.codebook.cpu().clone())

    def to(self, device):
        self.codebook = self.codebook.to(device)
        return self


class KLTokenizer:
    """Tokens from a KL autoencoder, as the released MAR code makes them: a *sample* of the posterior
    times `scale`, grouped into p x p patches (p=1 for KL-16 -> 256 tokens of 16 dims at 256x256; p=2
    for KL-8). Decoding divides by `scale` first. `scale` defaults to the autoencoder's own (`vae.scale`:
    KL-16's 0.2325 for the released weights, the measured one for an autoencoder trained here). The
    config names the weights (`vae_sha`): a MAR run's tokens are those of one autoencoder, and another
    file with the same shapes (retrained, or trained further) would decode them silently wrong."""

    def __init__(self, vae, image_size, patch_size=1, scale=None):
        f = vae.downsample_factor
        if image_size % (f * patch_size):
            raise ValueError(f"KLTokenizer: image_size {image_size} must be divisible by VAE stride {f} "
                             f"x patch_size {patch_size}")
        self.vae = vae.eval().requires_grad_(False)  # frozen: MAR never trains the tokenizer
        self.image_size, self.patch_size, self.scale = image_size, patch_size, vae.scale if scale is None else scale
        self.latent_size = image_size // f
        self.seq_len = (self.latent_size // patch_size) ** 2
        self.token_dim = vae.embed_dim * patch_size ** 2
        # The tokens' range, where the autoencoder's file measured it (one trained here: latent_stats);
        # KL-16's latents have none on record, and the released sampler never clips them.
        self.token_bound = None if vae.latent_bound is None else vae.latent_bound * self.scale
        self._vae_sha = None

    @torch.no_grad()
    def encode(self, images, generator=None):
        """(B, 3, S, S) in [-1, 1] -> (B, seq_len, token_dim): a fresh posterior sample each call (training)."""
        _check_images(images, self.vae.in_channels, self.image_size, "KLTokenizer")
        return self.tokens_from_moments(self.vae.encode(images).moments, generator)

    def tokens_from_moments(self, moments, generator=None):
        """Cached moments (B, 2E, h, w) (see `CachedLatents`) -> sampled, scaled tokens (B, seq_len, token_dim)."""
        latents = DiagonalGaussian(moments).sample(generator) * self.scale      # (B, E, h, w)
        return patchify(latents, self.patch_size)

    @torch.no_grad()
    def decode(self, tokens):
        s = self.latent_size
        latents = unpatchify(tokens / self.scale, self.patch_size, self.vae.embed_dim, s, s)  # (B, E, h, w)
        return self.vae.decode(latents).clamp(-1.0, 1.0)

    @property
    def vae_sha(self):
        """weights_digest of the (frozen) autoencoder, taken once, when first needed."""
        if self._vae_sha is None:
            self._vae_sha = weights_digest(self.vae)
        return self._vae_sha

    def config(self):
        return dict(kind="kl", vae=dict(self.vae.config), image_size=self.image_size,
                    patch_size=self.patch_size, scale=self.scale, vae_sha=self.vae_sha)

    def to(self, device):
        self.vae.to(device)
        return self


class VQAETokenizer(KLTokenizer):
    """Tokens from the VQ twin (AutoencoderVQ), in one of two kinds, as the paper's Table 2 uses VQ-16:
    continuous (the encoder's z before quantisation, times `scale`, p x p patches: for the Diffusion
    Loss) or discrete (`discrete=True`: each latent vector snapped to its nearest code, times `scale`;
    `indices` gives the codes and `codebook` their vectors, for the cross-entropy head, which needs
    patch size 1). Decoding divides by `scale` and runs the decoder on what it is given, quantised or not."""

    def __init__(self, vae, image_size, patch_size=1, scale=None, discrete=False):
        super().__init__(vae, image_size, patch_size, scale)
        if discrete and patch_size != 1:
            raise ValueError("VQAETokenizer: discrete tokens are single codes (patch_size 1), got patch_size "
                             f"{patch_size}")
        self.discrete = discrete
        if discrete:
            self.codebook = vae.quantize.embedding.weight.detach().float() * self.scale       # (K, E)
            self.num_codes = len(self.codebook)

    @torch.no_grad()
    def indices(self, images):
        """(B, C, S, S) -> (B, seq_len) long code indices."""
        _check_images(images, self.vae.in_channels, self.image_size, "VQAETokenizer")
        return self.vae.quantize(self.vae.encode(images))[2].flatten(1)

    @torch.no_grad()
    def encode(self, images, generator=None):
        """(B, C, S, S) -> (B, seq_len, token_dim): z (or its codes) times scale; deterministic."""
        if self.discrete:
            return self.codebook[self.indices(images)]
        _check_images(images, self.vae.in_channels, self.image_size, "VQAETokenizer")
        return patchify(self.vae.encode(images) * self.scale, self.patch_size)

    def tokens_from_moments(self, moments, generator=None):
        raise ValueError("the VQ autoencoder has no cached posterior moments: train on images, not --data latents")

    def config(self):
        return dict(super().config(), kind="vqae", discrete=self.discrete)

    def to(self, device):
        super().to(device)
        if self.discrete:
            self.codebook = self.codebook.to(device)
        return self


def build_tokenizer(cfg, vae_path=None):
    """Rebuild a tokenizer from its `.config()` dict (stored in train.py checkpoints). A KL tokenizer's
    weights are not in that dict: pass the VAE file (e.g. kl16.ckpt) as `vae_path`; it must hold the
    autoencoder the config was made with (its kind, and its weights where the config names them)."""
    kind = cfg.get("kind")
    if kind == "pixel":
        return PixelTokenizer(cfg["image_size"], cfg["channels"], cfg["patch_size"])
    if kind == "vq":
        return VQTokenizer(cfg["codebook"], cfg["image_size"], cfg["channels"], cfg["patch_size"])
    if kind in ("kl", "vqae"):
        if vae_path is None:
            raise ValueError("this tokenizer is an autoencoder: pass vae_path (e.g. kl16.ckpt, or the train.py "
                             "checkpoint of the autoencoder) to load its weights")
        vae = load_vae(vae_path, **cfg["vae"])
        if isinstance(vae, AutoencoderVQ) != (kind == "vqae"):
            kinds = ("a VQ autoencoder", "a KL one") if kind == "kl" else ("a KL autoencoder", "a VQ one")
            raise ValueError(f"{vae_path!r} is {kinds[0]}; these tokens are {kinds[1]}'s: pass the autoencoder "
                             "the run was trained with")
        tok = KLTokenizer(vae, cfg["image_size"], cfg["patch_size"], cfg["scale"]) if kind == "kl" else \
            VQAETokenizer(vae, cfg["image_size"], cfg["patch_size"], cfg["scale"], cfg["discrete"])
        if cfg.get("vae_sha") not in (None, tok.vae_sha):       # (None: a config from before the digest)
            raise ValueError(f"{vae_path!r} holds other weights (digest {tok.vae_sha}) than the autoencoder these "
                             f"tokens come from ({cfg['vae_sha']}): pass that one. Retrained or trained further, "
                             "an autoencoder is another tokenizer: train the model on it again")
        return tok
    raise ValueError(f"unknown tokenizer kind {kind!r} in config {cfg!r}; expected 'pixel', 'vq', 'kl' or 'vqae'")


# ------------------------------------------------------------------------------------------------
# Latent cache (the released code's cache step): encode once, sample per training step
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def cache_latents(dataset, vae, path, batch_size=64, device=None, num_workers=0):
    """Encode every image of `dataset` ((image in [-1, 1], label) pairs) and its horizontal flip; write

        path/moments.npy  float32 (N, 2, 2E, h, w): [:, 0] the image, [:, 1] its flip; channels [mean, logvar]
        path/labels.npy   int64 (N,)

    Storing the posterior moments (not a sample) keeps training stochastic: `CachedLatents` picks a flip
    per read, and the training step draws a fresh posterior sample (`KLTokenizer.tokens_from_moments`),
    exactly what encoding a randomly flipped image would give, at none of the encoder's cost.
    Returns the number of images written."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cache_latents: the dataset is empty")
    if not vae.double_z:
        raise ValueError("cache_latents caches a KL autoencoder's posterior; a VQ one (vq_*) has none: train on "
                         "the images with --vae instead")
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae = vae.to(device).eval()
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "moments.partial.npy")  # renamed at the end: a crashed run leaves no valid cache
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    moments, labels, i = None, np.zeros(n, dtype=np.int64), 0
    for step, (images, y) in enumerate(loader):
        x = images.to(device)
        b = x.shape[0]
        m = vae.encode(torch.cat([x, x.flip(-1)])).moments.float().cpu().numpy()  # (2B, 2E, h, w)
        if moments is None:
            moments = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, 2) + m.shape[1:])
        moments[i:i + b, 0], moments[i:i + b, 1] = m[:b], m[b:]
        labels[i:i + b] = y.numpy()
        i += b
        if step % 100 == 0:
            print(f"cache_latents: {i}/{n} images")
    moments.flush()
    del moments
    os.replace(tmp, os.path.join(path, "moments.npy"))
    np.save(os.path.join(path, "labels.npy"), labels)
    with open(os.path.join(path, "autoencoder.json"), "w") as f:     # which weights made it (train.py checks)
        json.dump({"weights_sha": weights_digest(vae)}, f)
    return n


def weights_digest(module):
    """12 hex digits of a SHA-256 over a module's state dict (names and values, in order): which weights
    made a latent cache (and, in experiments/, which checkpoint a measurement used)."""
    h = hashlib.sha256()
    for name, v in module.state_dict().items():
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class CachedLatents(torch.utils.data.Dataset):
    """Reads a `cache_latents` directory: item i is (moments (2E, h, w) float32 of image i or of its flip,
    each with probability 1/2, label). The arrays are memory-mapped, so the cache need not fit in RAM.

    The flip is drawn from `generator` when given (use it only with num_workers=0: each DataLoader worker
    would copy the same generator state), otherwise from torch's global RNG, which DataLoader seeds
    per worker from the main process, so torch.manual_seed makes the epoch reproducible."""

    def __init__(self, path, generator=None):
        files = [os.path.join(path, f) for f in ("moments.npy", "labels.npy")]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"latent cache file not found: {f!r} "
                                        "(run cache_latents / the cache step first)")
        self.moments = np.load(files[0], mmap_mode="r")          # (N, 2, 2E, h, w)
        self.labels = np.load(files[1])                           # (N,)
        if self.moments.ndim != 5 or self.moments.shape[1] != 2 or len(self.labels) != len(self.moments):
            raise ValueError(f"latent cache in {path!r} is malformed: moments {self.moments.shape}, "
                             f"labels {self.labels.shape}; rebuild it with cache_latents")
        self.generator = generator
        self.num_classes = int(self.labels.max()) + 1
        made_by = os.path.join(path, "autoencoder.json")       # absent in caches written before it
        self.weights_sha = json.load(open(made_by))["weights_sha"] if os.path.isfile(made_by) else None

    def __len__(self):
        return len(self.moments)

    def __getitem__(self, i):
        return self.read(i, int(torch.randint(2, (), generator=self.generator)))

    def read(self, i, flip):
        """(moments of image i, or of its flip when flip is 1, label): for samplers that pick the flip."""
        return torch.from_numpy(np.array(self.moments[i, flip])), int(self.labels[i])


# ------------------------------------------------------------------------------------------------
# Image datasets: items are (image float (C, S, S) in [-1, 1], label int)
# ------------------------------------------------------------------------------------------------
def center_crop_adm(pil_image, image_size):
    """ADM's center crop (the ImageNet preprocessing of ADM / MAR): halve with a BOX filter while the short
    side is >= 2x the target (cheap anti-aliasing), BICUBIC-resize the short side to `image_size`, then
    crop the center. Returns uint8 (S, S, C)."""
    from PIL import Image
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # a writable copy
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_rgb8(im):
    """A PIL image -> RGB, 8 bits per channel. 16-bit grayscale (PNG modes "I;16" / "I") is scaled by 1/256:
    Pillow's convert("RGB") would clip every value above 255, turning almost the whole image white."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _to_tensor(arr):
    """uint8 (H, W, C) -> float (C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageFolder(torch.utils.data.Dataset):
    """ImageNet-style folder root/<class>/<images> (class index = sorted folder order), RGB, ADM center crop.

    Every file is checked up front (Pillow header + integrity check, cheap: no decoding); unreadable ones
    are reported by name, listed in `.skipped` ((path, reason) pairs) and left out. A file that passes the
    check but fails to decode later (e.g. a truncated JPEG body) is reported and replaced by the next
    readable image, so a long run is never killed by one file. `.smallest`: the shortest side of any
    image (the header's), so a caller can tell when image_size would upsample."""

    def __init__(self, root, image_size):
        from PIL import Image
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root!r} (expected root/<class name>/<image files>)")
        # Hidden folders (.ipynb_checkpoints, .git) are not classes: as one they would shift every label.
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d[0] != ".")
        if not self.classes:
            raise ValueError(f"no class subfolders in {root!r} (expected root/<class name>/<image files>)")
        self.image_size, self.channels, self.num_classes = image_size, 3, len(self.classes)
        self.samples, self.skipped, self.smallest = [], [], math.inf
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
                for name in sorted(files):
                    if not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        with Image.open(path) as im:
                            side = min(im.size)
                            im.verify()
                        self.samples.append((path, label))
                        self.smallest = min(self.smallest, side)
                    except Exception as e:  # Pillow raises several types (OSError, SyntaxError, ...)
                        self.skipped.append((path, f"{type(e).__name__}: {e}"))
                        print(f"ImageFolder: skipping unreadable image {path} ({type(e).__name__}: {e})")
        if self.skipped:
            print(f"ImageFolder: skipped {len(self.skipped)} unreadable file(s); kept {len(self.samples)}")
        if not self.samples:
            raise ValueError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        empty = sorted(set(self.classes) - {self.classes[label] for _, label in self.samples})
        if empty:    # it would still take a class index: the labels would not be what the user counts
            raise ValueError(f"class folder(s) {empty} under {root!r} hold no readable images: remove them or add "
                             "images (each folder is a class)")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        for j in range(len(self.samples)):
            path, label = self.samples[(i + j) % len(self.samples)]
            try:
                with Image.open(path) as im:
                    return _to_tensor(center_crop_adm(to_rgb8(im), self.image_size)), label
            except Exception as e:  # counted in .skipped of this process (DataLoader workers only print)
                self.skipped.append((path, f"{type(e).__name__}: {e}"))
                print(f"ImageFolder: cannot decode {path} ({type(e).__name__}: {e}); using the next image")
        raise RuntimeError("ImageFolder: none of the images could be decoded")


def check_labels(labels, num_classes=None):
    """Labels as class indices -> (N,) long: integers in [0, num_classes), num_classes = max + 1 when not
    given. Label ids that leave most of 0..max unused ({0, 10^6}) would build a class table of a million
    rows for two classes: refused, as are floats (truncating 2.7 to 2 is not a class) and negatives."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D array of integer class indices, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"labels must be class indices >= 0, got {labels.min()}")
    top = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is not None and top > num_classes:
        raise ValueError(f"labels must be < num_classes = {num_classes}, got {top - 1}")
    distinct = len(np.unique(labels))
    if num_classes is None and top > 2 * distinct:
        raise ValueError(f"labels use {distinct} distinct values but reach {top - 1}: map them to class indices "
                         "0..K-1 first")
    return torch.as_tensor(labels, dtype=torch.long)


class ArrayDataset(torch.utils.data.Dataset):
    """Images already in memory: uint8 (N, H, W, C) or (N, H, W) (grayscale), square; labels (N,) or None."""

    def __init__(self, images, labels=None, num_classes=None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[1] != images.shape[2]:
            raise ValueError(f"ArrayDataset expects square uint8 images (N, H, W[, C]), got {images.dtype} "
                             f"{images.shape}")
        if len(images) == 0:
            raise ValueError("ArrayDataset: no images (the array is empty)")
        self.images = torch.tensor(images if images.ndim == 4 else images[..., None])  # (N, S, S, C), a copy
        self.labels = torch.zeros(len(images), dtype=torch.long) if labels is None else check_labels(labels, num_classes)
        if len(self.labels) != len(self.images):
            raise ValueError(f"ArrayDataset: {len(self.images)} images but {len(self.labels)} labels")
        self.image_size, self.channels = self.images.shape[1], self.images.shape[3]
        self.num_classes = num_classes or int(self.labels.max()) + 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _to_tensor(self.images[i].numpy()), int(self.labels[i])


def read_idx(path):
    """Parse an idx file (MNIST format, optionally gzipped): 2 zero bytes, type code 0x08 (uint8), ndim,
    ndim big-endian int32 sizes, then the data."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path!r} is not a uint8 idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path!r}: header says {shape} but holds {body.size} values (truncated file?)")
    return body.reshape(shape).copy()  # writable (frombuffer views of bytes are read-only)


def load_fashion_mnist(directory=FASHION_MNIST_DIR, split="train"):
    """Fashion-MNIST (28x28 grayscale, 10 classes) as an `ArrayDataset`, from the idx files
    `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` (Debian: apt-get install dataset-fashion-mnist)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        found = [p for p in (os.path.join(directory, name), os.path.join(directory, name + ".gz")) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in {directory!r} "
                                    f"(apt-get install dataset-fashion-mnist puts it in {FASHION_MNIST_DIR})")
        arrays.append(read_idx(found[0]))
    return ArrayDataset(arrays[0], arrays[1], num_classes=10)
