"""
The tests of the core files: `python -m pytest -n 2` at the repository root (CPU; a few minutes on 2 cores).
That command also runs experiments/test_experiments.py, the tests of the experiment and benchmark
scripts (pytest.ini names both files); `python -m pytest test_all.py` runs this file alone.

Tests check math that can be derived (closed-form schedules and distributions), round trips
(save/load, resume) and invariants (masking, causality, names of the released tensors). They are
grouped by the file they test, in reading order: diffloss.py, mar.py, tokenizer.py, fid.py, then
train.py and sample.py together (a checkpoint of one is the input of the other). The reference
name/shape lists of the released weights are kept as data in testdata/.
"""
import argparse
import gzip
import inspect
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

# One thread: the models under test are small, and on a 2-core machine torch's thread pool costs
# more in synchronisation than it gains.
# numpy's BLAS too (set before numpy loads it): after torch has run, its two threads made a 128-d FID
# take seconds instead of milliseconds.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diffloss  # noqa: E402
import fid  # noqa: E402
import mar  # noqa: E402
import sample  # noqa: E402
import tokenizer as T  # noqa: E402
import train  # noqa: E402
from diffloss import DiffLoss  # noqa: E402
from experiments import shapes_judge  # noqa: E402
from mar import AR, MAR, CEHead, L2Head, build_model, cfg_scale, guess_model, load_checkpoint, mar_schedule, param_groups  # noqa: E402,E501

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))


def reference_list(name):
    """[(tensor name, shape tuple)] in file order from a testdata/*.txt list ("name<TAB>[d0, d1]")."""
    with open(os.path.join(HERE, "testdata", name)) as f:
        rows = [line.split("\t") for line in f.read().splitlines() if line and not line.startswith("#")]
    return [(k, tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())) for k, shape in rows]


def reference_param_count(name):
    """The parameter count in a list's header line ("# mar_base: 364 tensors, 207924768 parameters")."""
    with open(os.path.join(HERE, "testdata", name)) as f:
        return int(f.readline().split(",")[1].split()[0])


# ==============================================================================================
# Diffusion Loss (diffloss.py)

def test_cosine_schedule_matches_closed_form():
    # abar(t) after steps 0..t is f((t+1)/T) / f(0), f(u) = cos^2((u + 0.008) / 1.008 * pi / 2),
    # for every step whose beta is not capped at 0.999 (only the last one is).
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = np.cumprod(1.0 - diffloss.cosine_betas())
    for t in [0, 1, 10, 250, 500, 900, 998]:
        assert abar[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-10)
    assert diffloss.cosine_betas()[-1] == 0.999


@pytest.mark.parametrize("n", [100, 50, 25])
def test_respacing_indices_and_betas(n):
    betas = diffloss.cosine_betas()
    kept, new_betas = diffloss.respace(betas, n)
    # round(i * 999 / (n-1)) with exact rational arithmetic (Python rounds half to even, as the
    # released code does; n = 25 has exact ties such as 166.5).
    expected = [round(Fraction(i * 999, n - 1)) for i in range(n)]
    assert kept.tolist() == expected
    assert kept[0] == 0 and kept[-1] == 999 and len(set(kept.tolist())) == n
    if n == 100:
        assert kept[:6].tolist() == [0, 10, 20, 30, 40, 50] and kept[-2] == 989
    # The respaced chain reaches exactly the original abar at every kept step.
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[kept], rtol=1e-10)


def test_sampler_feeds_original_step_indices():
    head = DiffLoss(2, 3, depth=1, width=8)
    head.set_sampling_steps("25")  # respacing is a sampling-time choice
    seen = []
    head.net.time_embed.register_forward_hook(lambda mod, args, out: seen.append(int(args[0][0])))
    head.sample(torch.zeros(4, 3))
    assert seen == [round(Fraction(i * 999, 24)) for i in reversed(range(25))]


def test_diffloss_names_and_shapes_match_released_mar_base_head():
    head = DiffLoss(target_channels=16, z_channels=768, depth=6, width=1024)
    ref = [(k[len("diffloss."):], shape) for k, shape in reference_list("mar_base.txt")
           if k.startswith("diffloss.")]
    assert [(k, tuple(v.shape)) for k, v in head.state_dict().items()] == ref  # names, shapes, order
    assert callable(head.net) and head.net(torch.zeros(3, 16), torch.tensor([0, 5, 999]),
                                           torch.zeros(3, 768)).shape == (3, 32)


def test_vb_term_vanishes_for_the_true_posterior():
    # With eps_hat = the true noise and v = -1 (variance = the posterior's), the model posterior
    # equals q(x_{t-1} | x_t, x_0): the KL term must be 0 for every t >= 1.
    head = DiffLoss(4, 3, depth=1, width=8)
    x0, noise = torch.randn(64, 4), torch.randn(64, 4)
    t = torch.randint(1, 1000, (64,))
    x_t = head.train_sqrt_abar[t][:, None] * x0 + head.train_sqrt_one_minus_abar[t][:, None] * noise
    vb = head.vb_bits(x0, x_t, t, noise, -torch.ones(64, 4))
    assert vb.abs().max() < 1e-3
    # A wrong variance (v = +1: beta_t instead of the posterior variance) costs a positive KL
    # (clearly so at small t, where beta_t and the posterior variance differ most).
    wrong = head.vb_bits(x0, x_t, t, noise, torch.ones(64, 4))
    assert (wrong > -1e-6).all() and (wrong[t < 100] > 1e-5).all()


class PointMassNet(torch.nn.Module):
    """The exact denoiser of data that is one known point x0 per row: eps = (x_t - sqrt(abar) x0) /
    sqrt(1 - abar), with v = -1 (the true posterior's variance)."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.abar = x0, torch.tensor(np.cumprod(1 - diffloss.cosine_betas()), dtype=torch.float32)

    def forward(self, x_t, t, z):
        a = self.abar[t][:, None]
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=-1)


def test_bound_bits_of_a_point_mass_is_its_prior_and_decoder_terms():
    # Data = one known 8-bit point, denoised exactly: every KL term of t >= 1 is 0, the decoder at t = 0
    # is N(x0, posterior variance of t = 1) integrated over x0's bin of width 2/255, and the prior term is
    # KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)). The bound is their sum, in closed form.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(1, 255, (6, 4), generator=g).float() / 127.5 - 1          # interior 8-bit values
    head = DiffLoss(4, 3, depth=1, width=8)
    head.net = PointMassNet(x0)
    bits, var = head.bound_bits(x0, torch.zeros(6, 3), strata=10, generator=g)
    betas = diffloss.cosine_betas()
    abar = np.cumprod(1 - betas)
    post_var_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    sigma = math.sqrt(post_var_1)
    decoder = -math.log2(math.erf(1 / 255 / sigma / math.sqrt(2)))           # P(|N(0, sigma^2)| < 1/255)
    x = x0.double()
    prior = 0.5 * (-1 - math.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x ** 2) / math.log(2)
    expected = decoder + prior.mean(dim=1)
    assert torch.allclose(bits.double(), expected, rtol=2e-3), (bits, expected)
    assert var.max() < 1e-6                          # no randomness left: every draw gives the same terms


def test_bound_bits_stratified_estimate_is_unbiased_and_knows_its_error():
    # A real (randomly initialised) head: the stratified estimate over 25 bins, repeated on 400 copies
    # of 3 tokens, must average to the sum of all 1000 terms (each estimated on the same 400 copies),
    # and its own variance estimate must match the spread of the repeats.
    torch.manual_seed(0)
    head = DiffLoss(4, 3, depth=2, width=16)
    R, g = 400, torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (3, 4), generator=g).float() / 127.5 - 1).repeat(R, 1)
    z = torch.randn(3, 3, generator=g).repeat(R, 1)
    bits, var = head.bound_bits(x0, z, strata=25, generator=g)
    every, every_var = head.bound_bits(x0, z, strata=999, generator=g)     # 999 bins of one step each
    bits, var, every = bits.view(R, 3).double(), var.view(R, 3).double(), every.view(R, 3).double()
    spread = bits.var(dim=0)                                                 # across the repeats, per token
    assert ((var.mean(dim=0) / spread) - 1).abs().max() < 0.35, (var.mean(dim=0), spread)
    se = ((spread + every.var(dim=0)) / R).sqrt()
    assert ((bits.mean(dim=0) - every.mean(dim=0)).abs() < 4 * se).all(), (bits.mean(0), every.mean(0), se)
    assert (every.var(dim=0) < spread).all()           # all terms: less Monte Carlo error than 25 bins


class GaussianMixtures:
    """A known conditional distribution: z (one-hot of 3 classes; all-zero = no class) selects a
    2-D Gaussian mixture. Its Bayes-optimal denoiser eps*(x_t, t, z) = -sqrt(1 - abar) * grad log p_t
    is closed form, which makes it both the target of training and an exact `net` for the sampler."""
    means = torch.tensor([[-0.5, 0.25], [0.5, 0.25], [-0.25, -0.5], [0.25, -0.5]], dtype=torch.float64)
    covs = torch.tensor([[[0.09, 0.06], [0.06, 0.09]], [[0.16, 0.0], [0.0, 0.04]],
                         [[0.02, 0.0], [0.0, 0.02]], [[0.02, 0.0], [0.0, 0.02]]], dtype=torch.float64)
    # component weights per class (rows) and for the unconditional distribution (last row)
    weights = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, .5, .5], [1 / 3, 1 / 3, 1 / 6, 1 / 6]],
                           dtype=torch.float64)

    def draw(self, cls, g):
        comp = torch.multinomial(self.weights[cls].float(), 1, generator=g)[:, 0]
        L = torch.linalg.cholesky(self.covs[comp]).float()
        return self.means[comp].float() + (L @ torch.randn(len(cls), 2, 1, generator=g))[..., 0]

    def stats(self, row):
        w = self.weights[row]
        mean = (w[:, None] * self.means).sum(0)
        d = self.means - mean
        return mean, (w[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)

    def _components(self, x, abar):
        """For x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps: per component, x - mean, cov^-1 (x - mean)
        and log det cov (closed-form 2x2 inverse, so that the oracle is cheap)."""
        a2 = abar[:, None, None, None]                                  # (N, 1, 1, 1)
        cov = a2 * self.covs + (1 - a2) * torch.eye(2, dtype=torch.float64)  # (N, K, 2, 2)
        det = cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] * cov[..., 1, 0]
        inv = torch.stack([torch.stack([cov[..., 1, 1], -cov[..., 0, 1]], -1),
                           torch.stack([-cov[..., 1, 0], cov[..., 0, 0]], -1)], -2) / det[..., None, None]
        diff = x.double()[:, None, :] - abar.sqrt()[:, None, None] * self.means  # (N, K, 2)
        return diff, (inv @ diff[..., None])[..., 0], torch.log(det)

    def _log_joint(self, x, abar, row):  # (N, K): log w_k + log N(x; component k at noise level abar)
        diff, sol, logdet = self._components(x, abar)
        return (torch.log(self.weights[row].clamp(min=1e-30)) - 0.5 * (diff * sol).sum(-1)
                - 0.5 * logdet - math.log(2 * math.pi))

    def log_prob(self, x, row):
        """log p(x) of the clean distribution of `row` (a class, or 3 = unconditional)."""
        rows = torch.full((len(x),), row, dtype=torch.long)
        return torch.logsumexp(self._log_joint(x, torch.ones(len(x), dtype=torch.float64), rows), dim=1)

    def optimal_eps(self, x_t, abar, z):
        row = torch.where(z.sum(1) > 0, z.argmax(1), torch.full_like(z[:, 0], 3, dtype=torch.long))
        resp = torch.softmax(self._log_joint(x_t, abar, row), dim=1)   # (N, K) responsibilities
        score = -(resp[..., None] * self._components(x_t, abar)[1]).sum(1)  # grad log p_t(x_t)
        return (-(1 - abar[:, None]).sqrt() * score).float()


class OptimalNet(torch.nn.Module):
    """The exact denoiser of GaussianMixtures in the shape of DiffLoss.net: (x_t, t, z) -> [eps, v]."""

    def __init__(self, mixtures, v):
        super().__init__()
        self.mixtures, self.v = mixtures, v
        self.abar = torch.tensor(np.cumprod(1 - diffloss.cosine_betas()))

    def forward(self, x, t, c):
        eps = self.mixtures.optimal_eps(x, self.abar[t], c)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=-1)

    # DiffLoss.sample embeds t and z apart and adds them, net.time_embed(t) + net.cond_embed(z), then
    # calls net.forward_embedded: here the two "embeddings" fill disjoint columns, [t, 0, 0, 0] and
    # [0, z], so forward_embedded gets both back exactly.
    def time_embed(self, t):
        return F.pad(t.float()[:, None], (0, 3))                       # (1, 4)

    def cond_embed(self, c):
        return F.pad(c, (1, 0))                                         # (N, 4)

    def forward_embedded(self, x, y):
        return self.forward(x, y[:, 0].long(), y[:, 1:])


def test_sampler_draws_the_known_distribution_with_cfg_and_temperature():
    # The sampler under test is the real one; the network is the exact Bayes-optimal denoiser, so any
    # error in the schedule, respacing, posterior or variance formulas shows up in the moments.
    mix = GaussianMixtures()
    head = DiffLoss(2, 3, depth=1, width=8, num_sampling_steps="100")
    head.net = OptimalNet(mix, v=0.0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    for k in range(3):
        z = torch.nn.functional.one_hot(torch.full((n,), k), 3).float()
        x = head.sample(z, generator=g)
        mean, cov = mix.stats(k)
        # 4000 samples: the standard error of the mean is <= 0.01, of a (co)variance <= 0.005.
        assert (x.mean(0).double() - mean).abs().max() < 0.04, k
        assert (torch.cov(x.T).double() - cov).abs().max() < 0.03, k
        cold = head.sample(z, temperature=0.5, generator=g)
        assert (cold.std(0) < 0.85 * x.std(0)).all(), k
        # Guidance targets p_c(x) (p_c(x) / p_u(x))^(w-1): it must raise the average log-ratio
        # log p_c - log p_u, i.e. move samples away from the unconditional distribution. The ratio
        # is at most 1 / P(class) = 3; at w = 3 the gap to that bound must at least halve.
        guided = head.sample(torch.cat([z, torch.zeros_like(z)]), cfg=3.0, generator=g)
        assert torch.equal(guided[:n], guided[n:])
        log_ratio = lambda s: (mix.log_prob(s, k) - mix.log_prob(s, 3)).mean().item()
        assert math.log(3) - log_ratio(guided[:n]) < 0.5 * (math.log(3) - log_ratio(x)), k


def test_diffloss_learns_the_known_distribution():
    # Train a small head on the known distribution (10% of the conditions dropped to z = 0, as MAR's
    # label drop does, so that it also learns the unconditional distribution for CFG). Then:
    # (1) its eps approaches the closed-form optimum E[eps | x_t, z], and the loss its floor;
    # (2) its samples have each class's mean and covariance, temperature narrows them, CFG sharpens.
    torch.manual_seed(0)
    mix, g = GaussianMixtures(), torch.Generator().manual_seed(0)
    head = DiffLoss(2, 3, depth=2, width=64)
    oracle = OptimalNet(mix, v=0.0)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0)

    def eval_gap():  # mean squared distance to the optimal eps over t in [50, 950)
        gen = torch.Generator().manual_seed(1)
        cls = torch.randint(0, 3, (4000,), generator=gen)
        z = torch.nn.functional.one_hot(cls, 3).float()
        x0, noise = mix.draw(cls, gen), torch.randn(4000, 2, generator=gen)
        t = torch.randint(50, 950, (4000,), generator=gen)
        x_t = head.train_sqrt_abar[t][:, None] * x0 + head.train_sqrt_one_minus_abar[t][:, None] * noise
        with torch.no_grad():
            eps_hat = head.net(x_t, t, z)[:, :2]
            best = oracle(x_t, t, z)[:, :2]
        return ((eps_hat - best) ** 2).mean().item(), ((noise - best) ** 2).mean().item()

    gap0, floor = eval_gap()
    steps = 400
    for step in range(steps):
        cls = torch.randint(0, 3, (512,), generator=g)
        keep = (torch.rand(512, 1, generator=g) > 0.1).float()
        loss = head(mix.draw(cls, g), torch.nn.functional.one_hot(cls, 3).float() * keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - (step + 1) / steps)
    gap, _ = eval_gap()
    assert gap < 0.1 * gap0 and gap < 0.2 * floor, (gap0, gap, floor)   # measured: 0.84 -> 0.002, floor 0.16

    # The data lie well inside [-3, 3]. Clamping each step's x0 estimate there never touches a good
    # estimate; it only stops the first step from multiplying the small head's eps error at t = 999
    # by 1 / sqrt(alpha) ~ 350-630 (see DiffLoss.clip_x0). A well-trained large head needs no clamp.
    head.clip_x0 = 3.0
    head.set_sampling_steps(50)
    n, gen = 2000, torch.Generator().manual_seed(2)
    for k in range(3):
        z = torch.nn.functional.one_hot(torch.full((n,), k), 3).float()
        x = head.sample(z, generator=gen)
        mean, cov = mix.stats(k)
        # 2000 samples: standard error of the mean <= 0.014, of a (co)variance <= 0.007.
        assert (x.mean(0).double() - mean).abs().max() < 0.06, (k, x.mean(0), mean)
        assert (torch.cov(x.T).double() - cov).abs().max() < 0.04, (k, torch.cov(x.T), cov)
        assert (head.sample(z, temperature=0.5, generator=gen).std(0) < 0.85 * x.std(0)).all(), k
        guided = head.sample(torch.cat([z, torch.zeros_like(z)]), cfg=3.0, generator=gen)[:n]
        log_ratio = lambda s: (mix.log_prob(s, k) - mix.log_prob(s, 3)).mean().item()
        assert math.log(3) - log_ratio(guided) < 0.5 * (math.log(3) - log_ratio(x)), k


def test_clip_x0_bounds_samples_of_bounded_tokens():
    # A head that predicts eps = 0 (the zero init) makes the first step's x0 estimate
    # x_T / sqrt(abar(999)) ~ 2e4 x_T: unclipped, samples land far out of range; with clip_x0 = 1
    # (pixel tokens) every step's x0 estimate, and so the final sample (x0 at t = 0), is in [-1, 1].
    z = torch.zeros(64, 3)
    wild = DiffLoss(2, 3, depth=1, width=8).sample(z, generator=torch.Generator().manual_seed(0))
    tame = DiffLoss(2, 3, depth=1, width=8, clip_x0=1.0).sample(z, generator=torch.Generator().manual_seed(0))
    assert wild.abs().max() > 100 and tame.abs().max() <= 1.0 + 1e-6


def test_masked_tokens_give_no_gradient():
    torch.manual_seed(0)
    head = DiffLoss(4, 6, depth=2, width=16)
    for p in head.parameters():  # leave the zero init, which would make every gradient w.r.t. z zero
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(10, 6, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.float32)
    head(torch.randn(10, 4), z, mask).backward()
    row_grad = z.grad.abs().sum(1)
    assert torch.all(row_grad[mask == 0] == 0)
    assert torch.all(row_grad[mask == 1] > 0)


def test_loss_on_the_masked_rows_only():
    """forward(num_masked=n) runs the MLP on the n masked rows only: the same seed gives the same
    (t, noise) draws, so the loss and every gradient equal the full computation's masked mean (up to
    float summation order), at n/N of the matrix-product FLOPs. MAR.forward passes its count; the
    CE / L2 heads take it too."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    head = DiffLoss(4, 6, depth=2, width=16)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, z = torch.randn(12, 4), torch.randn(12, 6)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0], dtype=torch.float32)

    def run(**kw):
        zz = z.clone().requires_grad_()
        head.zero_grad()
        torch.manual_seed(1)
        with FlopCounterMode(display=False) as flops:
            loss = head(x, zz, mask, **kw)
        loss.backward()
        return loss, [zz.grad] + [p.grad.clone() for p in head.parameters()], flops.get_total_flops()
    (full, g_full, f_full), (fast, g_fast, f_fast) = run(), run(num_masked=5)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=0)
    for a, b in zip(g_fast, g_full):
        # the subset's matmuls sum in another order: fp32 rounding, relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert f_fast * 12 == f_full * 5
    for name, kw in (("mar_tiny", {}), ("mar_tiny", dict(head="l2"))):
        model = tiny(name, **kw).train()
        tokens, labels = torch.randn(3, SEQ, DIM), torch.tensor([0, 1, 2])
        torch.manual_seed(2)
        fast = model(tokens, labels)
        torch.manual_seed(2)                       # MAR.forward's steps, the head on every row
        n = model.mask_count()
        mask = model.random_mask(3, "cpu", n)
        full = model.forward_loss(model.forward_z(tokens, mask, labels, n), tokens, mask)
        torch.testing.assert_close(fast, full, rtol=1e-6, atol=0)


def test_diffloss_bad_inputs_say_what_was_expected():
    head = DiffLoss(4, 6, depth=1, width=8)
    with pytest.raises(ValueError, match=r"target has 5 rows but z has 4"):
        head(torch.randn(5, 4), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"target must have shape \(N, 4\)"):
        head(torch.randn(4, 3), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 6\)"):
        head.sample(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\)"):
        head(torch.randn(4, 4), torch.randn(4, 6), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"even number of rows"):
        head.sample(torch.randn(5, 6), cfg=2.0)
    with pytest.raises(ValueError, match=r"num_sampling_steps must be in 1..1000"):
        DiffLoss(4, 6, depth=1, width=8, num_sampling_steps="0")

# ==============================================================================================
# MAR and causal AR (mar.py)

SEQ, DIM, NCLS = 16, 4, 5
TINY = dict(seq_len=SEQ, token_dim=DIM, num_classes=NCLS, num_sampling_steps="5")


def tiny(name, seed=0, live_head=True, **kw):
    """A tiny model in eval mode. The Diffusion Loss head starts with zero output layers, so its
    samples would not depend on z at all; live_head re-draws its weights so that they do."""
    torch.manual_seed(seed)
    model = build_model(name, **{**TINY, **kw}).eval()
    if live_head:
        for p in model.diffloss.parameters():
            if not p.any():                      # the zero-initialised adaLN / output layers
                torch.nn.init.normal_(p, std=0.05)
    return model


# -- released names and shapes ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["mar_base", "mar_large", "mar_huge"])
def test_state_dict_matches_release(name):
    num_params, entries = reference_param_count(name + ".txt"), reference_list(name + ".txt")
    with torch.device("meta"):
        model = build_model(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == entries
    assert sum(p.numel() for p in model.parameters()) == num_params


def test_guess_model_recognises_release_sizes():
    for name in ("mar_base", "mar_large", "mar_huge"):
        with torch.device("meta"):
            sd = build_model(name).state_dict()
        assert guess_model(sd) == (name, dict(seq_len=256, token_dim=16, num_classes=1000), 0)


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="valid names: .*mar_base"):
        build_model("mar_gigantic")


# -- MAR: masking -------------------------------------------------------------------------------

def test_masked_tokens_cannot_leak():
    model = tiny("mar_tiny")
    tokens, labels = torch.randn(3, SEQ, DIM), torch.tensor([0, 1, 2])
    mask = torch.zeros(3, SEQ)
    for b in range(3):
        mask[b, torch.randperm(SEQ)[:10]] = 1
    z = model.forward_z(tokens, mask, labels)
    changed = torch.where(mask[..., None].bool(), torch.randn_like(tokens) * 100, tokens)
    assert torch.equal(model.forward_z(changed, mask, labels), z)
    # control: a known token does change z (everywhere, attention is bidirectional)
    known = tokens.clone()
    known[0, (mask[0] == 0).nonzero()[0, 0]] += 1.0
    assert not torch.allclose(model.forward_z(known, mask, labels)[0], z[0])


def test_mask_rows_must_hide_same_count():
    model = tiny("mar_tiny")
    mask = torch.zeros(2, SEQ)
    mask[0, :3] = 1
    with pytest.raises(ValueError, match="same number"):
        model.forward_z(torch.randn(2, SEQ, DIM), mask, None)


def boolean_forward_z(model, tokens, mask, labels):
    """The masking of forward_z written with boolean indexing (data-dependent shapes): the reference
    that the static-shape gather/scatter path must reproduce exactly."""
    B = tokens.shape[0]
    cls = model.class_embedding(labels, B)
    x = model.z_proj(tokens)
    x = torch.cat([cls[:, None].expand(B, model.buffer_size, -1), x], dim=1) + model.encoder_pos_embed_learned
    keep = torch.cat([torch.ones(B, model.buffer_size, dtype=torch.bool), mask == 0], dim=1)
    x = model.z_proj_ln(x)[keep].reshape(B, -1, x.shape[-1])
    x = model.decoder_embed(model.encoder_norm(train.mar.run_blocks(model.encoder_blocks, x, False)))
    full = model.mask_token.repeat(B, keep.shape[1], 1)
    full[keep] = x.reshape(-1, x.shape[-1])
    x = model.decoder_norm(train.mar.run_blocks(model.decoder_blocks, full + model.decoder_pos_embed_learned, False))
    return x[:, model.buffer_size:] + model.diffusion_pos_embed_learned


@pytest.mark.parametrize("num_masked", [0, 1, 7, SEQ - 1, SEQ])
def test_static_shape_masking_equals_boolean_indexing(num_masked):
    model, B = tiny("mar_tiny"), 3
    tokens, labels = torch.randn(B, SEQ, DIM), torch.tensor([0, 1, 2])
    mask = model.random_mask(B, "cpu", num_masked)
    assert (mask.sum(1) == num_masked).all()
    ref = boolean_forward_z(model, tokens, mask, labels)
    assert torch.equal(model.forward_z(tokens, mask, labels, num_masked), ref)
    assert torch.equal(model.forward_z(tokens, mask, labels), ref)        # count read off the mask
    flags = torch.rand(B, SEQ).argsort(1) < num_masked                   # masked_rows: positions, ascending
    assert torch.equal(train.mar.masked_rows(flags, num_masked), flags.nonzero()[:, 1].reshape(B, num_masked))


def mask_count_law(law, L, mask_ratio_min=0.7):
    """P(count = m), m = 1..L, of MAR.mask_count's law in closed form: count = max(1, ceil(L ratio))."""
    if law == "uniform":                              # ratio ~ U[0, 1): count uniform on 1..L
        return np.full(L, 1 / L)
    if law == "cosine":                               # P(ratio <= r) = 1 - (2/pi) arccos(r)
        cdf = lambda m: 1 - 2 / math.pi * math.acos(min(1.0, m / L))
    else:                                             # N(1, 0.25) truncated to [mask_ratio_min, 1]
        Phi = lambda v: 0.5 * (1 + math.erf((v - 1) / (0.25 * math.sqrt(2))))
        cdf = lambda m: (Phi(max(mask_ratio_min, min(1.0, m / L))) - Phi(mask_ratio_min)) / (Phi(1) - Phi(mask_ratio_min))
    return np.array([cdf(m) - (cdf(m - 1) if m > 1 else 0.0) for m in range(1, L + 1)])


@pytest.mark.parametrize("law,mask_ratio_min", [("truncnorm", 0.7), ("truncnorm", 0.0), ("uniform", 0.7),
                                                ("cosine", 0.7)])
def test_mask_ratio_laws_match_closed_form(law, mask_ratio_min):
    """The frequencies of 10,000 mask counts (seq 16) against the law's closed form, within 4.5 standard
    errors per count; the default law is the paper's truncated normal."""
    L, n = 16, 10_000
    m = MAR(seq_len=L, token_dim=4, num_classes=2, encoder_embed_dim=8, encoder_depth=1, encoder_num_heads=2,
            decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, buffer_size=1, diffloss_d=1,
            diffloss_w=8, mask_ratio_law=law, mask_ratio_min=mask_ratio_min)
    torch.manual_seed(0)
    counts = np.bincount([m.mask_count() for _ in range(n)], minlength=L + 1)
    torch.manual_seed(1)
    first = m.mask_count()
    torch.manual_seed(1)
    assert (m.random_mask(2, "cpu").sum(1) == first).all()              # training masks draw their count so
    assert counts[0] == 0
    p = mask_count_law(law, L, mask_ratio_min)
    freq = counts[1:] / n
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12), (freq.round(4), p.round(4))
    with pytest.raises(ValueError, match="mask_ratio_law must be one of"):
        MAR(seq_len=L, mask_ratio_law="beta")


def test_mask_ratio_law_and_pos_embed_defaults_are_the_papers():
    assert inspect.signature(MAR).parameters["mask_ratio_law"].default == "truncnorm"
    assert inspect.signature(MAR).parameters["pos_embed_init"].default == "normal"
    assert inspect.signature(AR).parameters["pos_embed_init"].default == "normal"


# -- position embeddings: the 2D sin-cos initialisation (pos_embed_init) --------------------

def test_sincos_2d_values_and_offset_invariance():
    """sincos_2d against its closed form: channel i < D/4 of position (r, c) is sin(r w_i), then cos(r w_i),
    then the same of c; so the inner product of two positions is sum_i cos(w_i dr) + cos(w_i dc)."""
    side, D = 5, 16
    e = mar.sincos_2d(side * side, D).double()
    w = 10000.0 ** (-torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    r, c = 3, 1                                                       # position 3 * 5 + 1 = 16
    expect = torch.cat([(r * w).sin(), (r * w).cos(), (c * w).sin(), (c * w).cos()])
    torch.testing.assert_close(e[16], expect, rtol=0, atol=1e-6)
    rc = torch.stack([torch.arange(25) // side, torch.arange(25) % side], 1).double()
    d = rc[:, None, :] - rc[None, :, :]                               # (25, 25, 2) offsets
    gram = (torch.cos(d[..., :1] * w) + torch.cos(d[..., 1:] * w)).sum(-1)
    torch.testing.assert_close(e @ e.T, gram, rtol=0, atol=1e-5)
    for bad in ((24, 16), (25, 18)):                                   # not a square grid; width not 4k
        with pytest.raises(ValueError, match="square token grid and a width divisible by 4"):
            mar.sincos_2d(*bad)


@pytest.mark.parametrize("name", ["mar_tiny", "ar_tiny"])
def test_sincos_pos_embed_init_same_names_and_loads(name):
    """pos_embed_init="sincos" changes the initial values only: the token positions of every learned
    position embedding start at sincos_2d (MAR's buffer positions at N(0, 0.02)), the names and shapes
    are those of the normal init, and either model loads the other's weights with strict=True."""
    kw = dict(seq_len=16, token_dim=4, num_classes=3)
    torch.manual_seed(0)
    plain = build_model(name, **kw)
    torch.manual_seed(0)
    sincos = build_model(name, pos_embed_init="sincos", **kw)
    a, b = plain.state_dict(), sincos.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    pos = [k for k in a if "pos_embed" in k]
    assert len(pos) == (3 if name == "mar_tiny" else 2)
    skip = {k: (plain.buffer_size if name == "mar_tiny" and k != "diffusion_pos_embed_learned" else 0) for k in pos}
    for k in pos:
        torch.testing.assert_close(b[k][0, skip[k]:], mar.sincos_2d(16, 128), rtol=0, atol=0)
        if skip[k]:
            assert 0.01 < b[k][0, :skip[k]].std() < 0.03
    others = [k for k in a if k not in pos]
    assert all(torch.equal(a[k], b[k]) for k in others)                # the rest: the same draws
    sincos.load_state_dict(a, strict=True)
    plain.eval(), sincos.eval()
    x, y = torch.randn(2, 16, 4), torch.tensor([0, 2])
    z = lambda m: m.forward_z(x, torch.ones(2, 16), y, 16) if name == "mar_tiny" else m.forward_z(x, y)
    assert torch.equal(z(plain), z(sincos))                            # loaded: the same function


def test_sincos_init_on_released_shapes():
    """MAR-B with sincos positions still has the released names and shapes (built on the meta device)."""
    with torch.device("meta"):
        m = build_model("mar_base", pos_embed_init="sincos")
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == reference_list("mar_base.txt")


# -- MAR: generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("seq,K", [(256, 64), (256, 256), (256, 1), (16, 4), (10, 3), (7, 7)])
def test_schedule_cosine_rule(seq, K):
    steps = mar_schedule(seq, K)
    assert sum(n for _, n in steps) == seq and all(n >= 1 for _, n in steps)
    still = seq
    for k, (mask_len, n) in enumerate(steps):
        expect = max(1, min(still - 1, math.floor(seq * math.cos(math.pi / 2 * (k + 1) / K))))
        assert mask_len == expect
        assert n == (still if k == K - 1 else still - expect)
        still -= n
    if K == seq:                                   # bidirectional AR: one token per step
        assert all(n == 1 for _, n in steps)
    assert mar_schedule(256, 64)[0] == (255, 1)    # floor(256 cos(pi/128)) = 255


def test_cfg_scale_rule():
    assert cfg_scale(3.0, "linear", 192, 256) == 1 + 2.0 * 64 / 256
    assert cfg_scale(3.0, "linear", 256, 256) == 1.0
    assert cfg_scale(3.0, "constant", 200, 256) == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale(3.0, "cosine", 1, 2)
    with pytest.raises(ValueError, match="num_iter"):
        mar_schedule(16, 17)


@pytest.mark.parametrize("cfg,schedule", [(1.0, "linear"), (2.5, "linear"), (2.5, "constant")])
def test_sampler_predicts_each_token_once(cfg, schedule):
    """Replace the head's sampler by one that records its calls and writes the step number."""
    model, bsz, K = tiny("mar_tiny"), 3, 5
    calls = []

    def fake_sample(z, temperature, w, generator):
        calls.append((z.shape[0], w))
        return torch.full((z.shape[0], DIM), float(len(calls)))

    model.diffloss.sample = fake_sample
    out = model.sample_tokens(bsz, num_iter=K, cfg=cfg, cfg_schedule=schedule)
    steps = mar_schedule(SEQ, K)
    mul = 1 if cfg == 1.0 else 2                   # [cond; uncond] rows under CFG
    assert [rows for rows, _ in calls] == [mul * bsz * n for _, n in steps]
    expect_w = [1.0 if cfg == 1.0 else cfg_scale(cfg, schedule, m, SEQ) for m, _ in steps]
    assert [w for _, w in calls] == pytest.approx(expect_w)
    # every position was written, each step wrote exactly its count (so none twice)
    step_of = out[..., 0]
    assert (step_of >= 1).all()
    for k, (_, n) in enumerate(steps):
        assert ((step_of == k + 1).sum(1) == n).all()


def test_mar_sampling_reproducible():
    model = tiny("mar_tiny")
    run = lambda seed, cfg: model.sample_tokens(2, num_iter=4, cfg=cfg, generator=torch.Generator().manual_seed(seed))
    a = run(1, 2.0)
    assert a.shape == (2, SEQ, DIM) and torch.isfinite(a).all()
    assert torch.equal(a, run(1, 2.0))
    assert not torch.allclose(a, run(2, 2.0))
    assert torch.equal(run(3, 1.0), run(3, 1.0))


def test_compiled_sampler_equals_eager():
    """torch.compile'd Diffusion Loss sampler (one graph for every step, dynamic row count, CFG as a
    graph input) draws the same samples as eager, up to float rounding, in MAR's generation loop.
    clip_x0 bounds the tokens: unclipped, the first step multiplies rounding by ~2e4 (diffloss.py)."""
    model = tiny("mar_tiny", diffloss_w=32, diffloss_d=1, clip_x0=1.0)
    run = lambda: model.sample_tokens(2, num_iter=3, cfg=2.5, generator=torch.Generator().manual_seed(0))
    eager = run()
    torch._dynamo.reset()
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    before = graphs()
    model.diffloss.compile_sampler()
    compiled = run()
    assert graphs() - before == 1                  # 3 row counts x 5 steps x 3 CFG scales: one graph
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=0), (compiled - eager).abs().max()
    assert not torch.allclose(eager, model.sample_tokens(2, num_iter=3, cfg=2.5, generator=torch.Generator().manual_seed(1)))
    assert list(model.state_dict()) == list(tiny("mar_tiny", diffloss_w=32, diffloss_d=1).state_dict())


# -- training -----------------------------------------------------------------------------------

def overfit(model, steps, lr):
    """Train on 4 fixed sequences; return the loss before/after on fixed masks, t and noise."""
    data, labels = torch.randn(4, SEQ, DIM), torch.arange(4)

    def fixed_loss():
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model(data, labels).item() for _ in range(4)) / 4

    start = fixed_loss()
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(data, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, fixed_loss()


@pytest.mark.parametrize("name", ["mar_tiny", "ar_tiny"])
def test_tiny_model_overfits(name):
    model = tiny(name, live_head=False, diffloss_w=64)  # the real init
    start, end = overfit(model, steps=80, lr=5e-3)
    # measured: MAR 1.00 -> 0.46 (0.30 after 250 steps), AR 1.03 -> 0.34
    assert end < 0.6 * start, (start, end)


def test_param_groups():
    model = tiny("mar_tiny")
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    named = dict(model.named_parameters())
    assert id(named["encoder_blocks.0.attn.qkv.weight"]) in ids(decay["params"])
    assert id(named["fake_latent"]) in ids(decay["params"])                      # a (1, D) matrix
    for k in ("encoder_blocks.0.attn.qkv.bias", "z_proj_ln.weight", "diffloss.net.input_proj.weight"):
        assert id(named[k]) in ids(no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


# -- AR -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ar_kv_cache_equals_recompute(order, cfg):
    model = tiny("ar_tiny", order=order)
    head_sample = model.diffloss.sample

    def run(use_cache):
        zs = []
        def recording_sample(z, *args):             # keep every step's z, then sample as usual
            zs.append(z)
            return head_sample(z, *args)
        model.diffloss.sample = recording_sample
        out = model.sample_tokens(2, cfg=cfg, labels=torch.tensor([1, 3]), use_cache=use_cache,
                                  generator=torch.Generator().manual_seed(7))
        return out, torch.stack(zs)

    (a, za), (b, zb) = run(True), run(False)
    assert za.shape == (SEQ, 2 if cfg == 1.0 else 4, model.blocks[0].norm1.normalized_shape[0])
    torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-4)
    # the random head amplifies float differences; compare the tokens relative to their scale
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * a.abs().max().item())


def test_ar_raster_is_causal():
    model = tiny("ar_tiny")
    tokens = torch.randn(2, SEQ, DIM, requires_grad=True)
    z = model.forward_z(tokens, torch.tensor([0, 1]))              # z[:, i] conditions token i
    for i in (0, 5, SEQ - 1):
        # a random projection: z[:, i].sum() is constant (LayerNorm output sums to zero at init)
        (grad,) = torch.autograd.grad((z[:, i] * torch.randn_like(z[:, i])).sum(), tokens, retain_graph=True)
        used = grad.abs().sum(dim=(0, 2)) > 0                      # (SEQ,) which tokens z_i depends on
        assert not used[i:].any()
        assert used[:i].all()


def test_ar_random_order_uses_the_order():
    """Random order: z for the i-th generated token depends only on the tokens before it in the order."""
    model = tiny("ar_tiny", order="random")
    tokens = torch.randn(1, SEQ, DIM, requires_grad=True)
    orders = torch.randperm(SEQ)[None]
    z = model.forward_z(tokens, None, orders)
    (grad,) = torch.autograd.grad((z[:, 6] * torch.randn_like(z[:, 6])).sum(), tokens)
    used = grad.abs().sum(dim=(0, 2)) > 0
    assert set(used.nonzero().flatten().tolist()) == set(orders[0, :6].tolist())


# -- the cross-entropy and L2 heads (Table 1's baselines) ---------------------------------------

def live_point_head(cls, *args):
    torch.manual_seed(0)
    head = cls(*args)
    torch.nn.init.normal_(head.net.linear.weight, std=0.5)       # the zero-initialised output layer
    return head


def test_ce_head_loss_sampling_and_cfg():
    K, C, Z = 5, 3, 8
    head = live_point_head(CEHead, C, Z, 2, 16, K)
    head.codebook.copy_(torch.randn(K, C, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    idx, z, mask = torch.randint(K, (40,), generator=g), torch.randn(40, Z, generator=g), (torch.rand(40, generator=g) > 0.5).float()
    logits = head.logits(z)
    expected = (F.cross_entropy(logits, idx, reduction="none") * mask).sum() / mask.sum()
    assert torch.allclose(head(head.codebook[idx], z, mask), expected, atol=1e-6)
    assert torch.allclose(head(head.codebook[idx], z), F.cross_entropy(logits, idx), atol=1e-6)
    # temperature -> 0 gives the argmax code
    assert torch.equal(head.sample(z, temperature=1e-6), head.codebook[logits.argmax(1)])
    # CFG on the logits: z = [z_c; z_u], guided logits l_u + w (l_c - l_u), rows repeated twice
    zc, zu, w = z[:20], z[20:], 3.0
    guided = head.logits(zu) + w * (head.logits(zc) - head.logits(zu))
    out = head.sample(z, temperature=1e-6, cfg=w)
    assert torch.equal(out[:20], head.codebook[guided.argmax(1)]) and torch.equal(out[:20], out[20:])
    # at temperature T the codes follow softmax(guided / T): frequencies of 20000 draws
    n, T_ = 20000, 0.7
    draws = head.sample(torch.cat([zc[:1].expand(n, -1), zu[:1].expand(n, -1)]), T_, w, torch.Generator().manual_seed(3))[:n]
    freq = torch.bincount(brute_force_nearest(draws, head.codebook), minlength=K).float() / n
    assert torch.allclose(freq, torch.softmax(guided[0] / T_, 0), atol=0.015)    # std <= 0.0036
    head.set_sampling_steps(10)                                                  # a no-op, as sample.py calls it


def test_l2_head_loss_sampling_and_cfg():
    C, Z = 3, 8
    head = live_point_head(L2Head, C, Z, 2, 16)
    g = torch.Generator().manual_seed(0)
    x, z, mask = torch.randn(30, C, generator=g), torch.randn(30, Z, generator=g), (torch.rand(30, generator=g) > 0.5).float()
    pred = head.net(z)
    assert torch.allclose(head(x, z, mask), (((pred - x) ** 2).mean(1) * mask).sum() / mask.sum(), atol=1e-6)
    assert torch.equal(head.sample(z), pred) and torch.equal(head.sample(z, temperature=0.1), pred)
    out = head.sample(z, cfg=2.5)
    assert torch.allclose(out[:15], pred[15:] + 2.5 * (pred[:15] - pred[15:]), atol=1e-6)
    assert torch.equal(out[:15], out[15:])


@pytest.mark.parametrize("name", ["mar_tiny", "ar_tiny"])
def test_point_heads_in_models_need_no_batch_repeat(name):
    torch.manual_seed(0)
    model = build_model(name, **TINY, head="l2")
    assert model.diffusion_batch_mul == 1 and isinstance(model.diffloss, L2Head)
    assert build_model(name, **TINY).diffusion_batch_mul == 4
    with pytest.raises(ValueError, match="num_codes"):
        build_model(name, **TINY, head="ce")
    with pytest.raises(ValueError, match="head must be one of"):
        build_model(name, **TINY, head="mse")


# -- checkpoints --------------------------------------------------------------------------------

def test_load_train_format_roundtrip(tmp_path):
    model = tiny("mar_tiny")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "config": model.config,
                "args": {"lr": 1e-4}, "step": 3}, path)
    loaded, ckpt = load_checkpoint(str(path))
    assert isinstance(loaded, MAR) and not loaded.training and ckpt["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_load_released_format_infers_size(tmp_path):
    """Released files: no config, an argparse.Namespace under "args"; the size comes from shapes."""
    model = tiny("ar_tiny", order="random")
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 1,
                "args": argparse.Namespace(model="ar_tiny", lr=1e-4)}, path)
    loaded, _ = load_checkpoint(str(path), key="model")
    assert isinstance(loaded, AR) and (loaded.seq_len, loaded.token_dim, loaded.num_classes) == (SEQ, DIM, NCLS)


def test_load_mismatch_names_keys(tmp_path):
    model = tiny("mar_tiny")
    sd = model.state_dict()
    sd["renamed.weight"] = sd.pop("z_proj.weight")
    sd["decoder_norm.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save({"model_ema": sd, "config": model.config}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(path))
    msg = str(err.value)
    assert "missing keys: z_proj.weight" in msg and "unexpected keys: renamed.weight" in msg
    assert "decoder_norm.bias" in msg and "look most like 'mar_tiny'" in msg
    torch.save({"model_ema": sd}, path)          # no config: the closest size is named
    with pytest.raises(ValueError, match="closest: 'mar_tiny'"):
        load_checkpoint(str(path))


def test_load_missing_entry(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"model": tiny("mar_tiny").state_dict()}, path)
    with pytest.raises(ValueError, match=r"no state dict under 'model_ema' \(found: \['model'\]\)"):
        load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pth"))

# ==============================================================================================
# Tokenizers (tokenizer.py)

def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return T.AutoencoderKL(**T.VAE_CONFIGS["tiny"]).eval()


# ---------------------------------------------------------------- autoencoder

def test_kl16_names_and_shapes_match_reference():
    with torch.device("meta"):  # no memory, no init cost
        vae = T.AutoencoderKL(**T.VAE_CONFIGS["kl16"])
    ours = [(k, tuple(v.shape)) for k, v in vae.state_dict().items()]
    assert ours == reference_list("kl16_vae.txt")  # same names, shapes and order
    assert sum(p.numel() for p in vae.parameters()) == 66456019  # count in the reference header


@pytest.mark.parametrize("size", [256, 64])
def test_kl16_encode_decode_shapes(size):
    with torch.device("meta"):  # the full model on CPU takes ~10 s per image: shapes via meta tensors
        vae = T.AutoencoderKL(**T.VAE_CONFIGS["kl16"])
        post = vae.encode(torch.empty(2, 3, size, size))
        out = vae.decode(post.sample())
    assert post.mean.shape == post.logvar.shape == (2, 16, size // 16, size // 16)
    assert out.shape == (2, 3, size, size)


def test_kl8_config_shapes():
    with torch.device("meta"):
        vae = T.AutoencoderKL(**T.VAE_CONFIGS["kl8"])
        post = vae.encode(torch.empty(1, 3, 256, 256))
    assert post.mean.shape == (1, 4, 32, 32)
    assert vae.quant_conv.weight.shape == (8, 8, 1, 1) and not any(".attn." in k for k in vae.state_dict())
    tok = T.KLTokenizer(vae, 256, patch_size=2)
    assert (tok.seq_len, tok.token_dim) == (256, 16)  # paper Table 2: KL-8 with 2x2 grouping


@pytest.mark.parametrize("size", [64, 32])
def test_tiny_vae_runs_on_cpu(size):
    vae = tiny_vae()
    x = torch.rand(2, 3, size, size) * 2 - 1
    t0 = time.time()
    with torch.no_grad():
        post = vae.encode(x)
        out = vae.decode(post.sample(torch.Generator().manual_seed(0)))
    assert time.time() - t0 < 20
    assert post.mean.shape == (2, 4, size // 2, size // 2) and out.shape == x.shape
    assert torch.isfinite(out).all()


def test_attention_block_math():
    """LDM's attention: softmax over keys of q.k / sqrt(C), then proj_out, plus the residual."""
    torch.manual_seed(0)
    blk = T.AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    y = blk.norm(x)
    q, k, v = (m(y).flatten(2) for m in (blk.q, blk.k, blk.v))                  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32 ** 0.5, dim=-1)   # (B, HW, HW)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 3, 5)
    assert torch.allclose(blk(x), x + blk.proj_out(out), atol=1e-5)


def test_posterior_logvar_clamp_and_sampling():
    mean = torch.randn(1, 3, 2, 2)
    logvar = torch.tensor([-100.0, 100.0, 0.5]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    post = T.DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert torch.equal(post.logvar[0, :, 0, 0], torch.tensor([-30.0, 20.0, 0.5]))
    assert torch.isfinite(post.std).all() and torch.equal(post.mode(), mean)
    assert torch.equal(post.moments, torch.cat([mean, post.logvar], 1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(post.sample(g1), post.sample(g2))  # the generator drives the draw
    # sample = mean + std * eps: empirical std over many draws matches exp(logvar / 2)
    wide = T.DiagonalGaussian(torch.tensor([[1.0, 2 * np.log(0.5)]]).view(1, 2, 1, 1).expand(4000, 2, 1, 1))
    s = wide.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 1.0) < 0.05 and abs(s.std().item() - 0.5) < 0.05


def test_vae_checkpoint_round_trip_and_mismatch(tmp_path):
    vae = tiny_vae(seed=1)
    path = str(tmp_path / "vae.ckpt")
    torch.save({"model": vae.state_dict()}, path)
    loaded = T.load_vae(path, "tiny")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x).mode()), vae.decode(vae.encode(x).mode()))
    with pytest.raises(ValueError, match=r"shape mismatches.*quant_conv"):
        T.load_vae(path, "tiny", embed_dim=8)
    with pytest.raises(ValueError, match=r"missing keys"):
        T.load_vae(path, "tiny", num_res_blocks=2)
    torch.save(vae.state_dict(), str(tmp_path / "raw.ckpt"))
    with pytest.raises(ValueError, match="'model'"):
        T.load_vae(str(tmp_path / "raw.ckpt"), "tiny")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        T.load_vae(str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match="unknown VAE config"):
        T.load_vae(path, "kl32")


# ---------------------------------------------------------------- training a tokenizer (train.py --model kl_f4 / vq_f4)

def test_autoencoder_kl_term_is_the_closed_form():
    # forward = L1 + kl_weight * KL / pixels with KL(N(mean, std^2) || N(0, 1)) summed over latent elements:
    # the difference of two losses from the same posterior draw, kl_weight 1 and 0, is that KL exactly.
    vae = T.build_autoencoder("kl_f4", ch=32, in_channels=1, kl_weight=1.0)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.manual_seed(0)
    with_kl = vae(x)
    vae.kl_weight = 0.0
    torch.manual_seed(0)
    l1 = vae(x)
    post = vae.encode(x)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                           torch.distributions.Normal(0.0, 1.0)).sum()
    assert torch.allclose(with_kl - l1, kl / x.numel(), rtol=1e-4)
    torch.manual_seed(0)
    rec = vae.decode(vae.encode(x).sample())
    assert torch.allclose(l1, (rec - x).abs().mean(), rtol=1e-5)        # the same draw: the L1 of its decoding


def test_vector_quantizer_straight_through_and_losses():
    # z_q holds the nearest codes; the gradient reaches z unchanged through z_q (straight-through); the
    # loss is ||sg[z] - e||^2 + 0.25 ||z - sg[e]||^2 (means), so d loss / d z = 0.25 * 2 (z - e) / n and
    # d loss / d e_k = 2 sum over z assigned to k of (e_k - z) / n.
    torch.manual_seed(0)
    vq = T.VectorQuantizer(num_codes=5, dim=3).eval()
    vq.embedding.weight.data = torch.randn(5, 3)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    zq, loss, idx = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    codes = vq.embedding.weight.detach()
    assert torch.equal(idx.flatten(), torch.cdist(flat, codes).argmin(dim=1))
    assert torch.allclose(zq.detach().permute(0, 2, 3, 1).reshape(-1, 3), codes[idx.flatten()])
    n = flat.numel()
    assert torch.allclose(loss, 1.25 * ((codes[idx.flatten()] - flat) ** 2).sum() / n)
    g = torch.randn_like(z)
    (grad_through,) = torch.autograd.grad((zq * g).sum(), z, retain_graph=True)
    assert torch.equal(grad_through, g)                                  # straight-through: unchanged
    grad_z, grad_e = torch.autograd.grad(loss, [z, vq.embedding.weight])
    want_z = 0.25 * 2 * (flat - codes[idx.flatten()]) / n
    assert torch.allclose(grad_z.permute(0, 2, 3, 1).reshape(-1, 3), want_z, atol=1e-7)
    want_e = torch.zeros(5, 3).index_add_(0, idx.flatten(), 2 * (codes[idx.flatten()] - flat) / n)
    assert torch.allclose(grad_e, want_e, atol=1e-7)


def test_vector_quantizer_restarts_idle_codes_and_counts_use():
    torch.manual_seed(0)
    vq = T.VectorQuantizer(num_codes=4, dim=2, restart_after=3)
    vq.embedding.weight.data = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [0.1, 0.0]])
    z = torch.randn(8, 2, 1, 1) * 0.01                                   # every encoding nearest code 0 or 3
    for step in range(3):
        before = vq.embedding.weight.detach().clone()
        vq(z)
        if step < 2:
            assert torch.equal(vq.embedding.weight, before)             # idle for 1, 2 steps: kept
    moved = vq.embedding.weight.detach()
    encodings = z.reshape(8, 2)
    for k in (1, 2):                                                    # idle 3 steps: now an encoding
        assert (moved[k] - encodings).abs().sum(dim=1).min() < 1e-6
    used, perplexity = vq.usage()
    assert 0.25 <= used <= 0.5 and 1 <= perplexity <= 2 and vq.usage()[0] == 0.0   # counts reset


def test_latent_stats_of_a_known_std_and_range():
    # latents with std 0.5 (images uniform on [-1, 1] have std 1/sqrt(3); a 1x1 conv scales them): 1/std;
    # their range: the largest |image| (1.0: pixel 0 is -1) times the same factor
    class Halve(torch.nn.Module):
        def latents(self, images):
            return images * (0.5 * math.sqrt(3))
    data = T.ArrayDataset(np.random.default_rng(0).integers(0, 256, (500, 8, 8), dtype=np.uint8))
    scale, bound = T.latent_stats(Halve(), data, batch_size=64)
    assert abs(scale - 2.0) < 0.02 and bound == pytest.approx(0.5 * math.sqrt(3))
    assert T.latent_stats(Halve(), data, max_images=100)[0] != scale                 # the cap is honoured


def test_autoencoder_training_reduces_the_loss():
    torch.manual_seed(0)
    x = train.make_shapes(1, 8)[0][:, None].float() / 127.5 - 1          # the 10 shapes, 8x8 grayscale
    for name in ("kl_f4", "vq_f4"):
        vae = T.build_autoencoder(name, ch=32, in_channels=1, **({"num_codes": 16} if name == "vq_f4" else {}))
        opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
        losses = []
        for _ in range(20):
            loss = vae(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (name, losses[0], losses[-1])


def test_adversarial_term_hinge_loss_adaptive_weight_and_patch_discriminator():
    # hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake)) on hand-picked logits
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert torch.isclose(T.hinge_d_loss(real, fake), torch.tensor(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)))
    # adaptive weight at W for rec = sum((W x)^2) (gradient 2 (W x) x^T) and g = 3 sum(W) (gradient 3)
    torch.manual_seed(0)
    w, x = torch.randn(3, 4, requires_grad=True), torch.randn(4)
    rec, g = ((w @ x) ** 2).sum(), 3.0 * w.sum()
    want = (2 * (w @ x).detach()[:, None] * x[None, :]).norm() / (torch.full((3, 4), 3.0).norm() + 1e-4)
    got = T.adaptive_weight(rec, g, w)
    assert torch.isclose(got, want) and not got.requires_grad
    assert T.adaptive_weight(1e6 * rec, 0.0 * w.sum(), w) == 1e4                   # clamped
    # the PatchGAN: one logit per patch (28x28 -> 5x5), and no coupling between the images of a batch
    d = T.PatchDiscriminator(1)
    a, b = torch.rand(2, 1, 28, 28), torch.rand(3, 1, 28, 28)
    both = d(torch.cat([a, b]))
    assert both.shape == (5, 1, 5, 5) and torch.allclose(both, torch.cat([d(a), d(b)]), atol=1e-5)
    assert [d.patches(n) for n in (28, 16, 12, 11)] == [5, 2, 1, 0]
    for n in (16, 12):
        assert d(torch.rand(1, 1, n, n)).shape[-1] == d.patches(n)


def test_autoencoder_loss_with_an_adversary():
    """Off: the loss is the one without it and nothing is kept. On: it adds disc_weight * adaptive weight *
    -mean D(reconstruction) of the same posterior draw; the generator's backward leaves D's weights alone;
    the discriminator's own steps on (real, reconstruction) lower its hinge loss."""
    torch.manual_seed(0)
    vae, cpu = T.build_autoencoder("kl_f4", ch=32, in_channels=1), torch.device("cpu")
    adv = train.Adversary(1, 16, 0.5, cpu, 1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    base = vae(x)
    torch.manual_seed(1)
    assert torch.equal(vae(x, adversary=adv), base) and not adv.pairs
    adv.on = True
    torch.manual_seed(1)
    loss = vae(x, adversary=adv)
    torch.manual_seed(1)
    rec = vae.decode(vae.encode(x).sample())
    g = -adv.disc(rec).mean()
    lam = T.adaptive_weight((rec - x).abs().mean(), g, vae.decoder.conv_out.weight)
    assert torch.allclose(loss - base, 0.5 * lam * g, atol=1e-6) and lam > 0
    loss.backward()
    assert all(p.grad is None for p in adv.disc.parameters())
    assert len(adv.pairs) == 1 and torch.equal(adv.pairs[0][0], x) and not adv.pairs[0][1].requires_grad
    fake = adv.pairs[0][1]
    d_loss = lambda: T.hinge_d_loss(*adv.disc(torch.cat([x, fake])).chunk(2)).item()
    first = d_loss()
    for _ in range(10):
        adv.pairs = [(x, fake)]
        adv.step(1e-3, cpu, "fp32")
    assert d_loss() < first and not adv.pairs
    stats = adv.log_stats()                                                     # means since the last log
    assert 0 < stats["disc_loss"] and stats["gen_loss"] == round(g.item(), 4) and \
        stats["adv_weight"] == round(0.5 * lam.item(), 4) and adv.log_stats() == {}


# ---------------------------------------------------------------- tokens

def test_patchify_token_order_matches_the_released_code():
    b, c, h, w, p = 2, 3, 8, 12, 2
    x = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    tok = T.patchify(x, p)
    assert tok.shape == (b, (h // p) * (w // p), c * p * p)
    for n in range(b):
        for i in range(h // p):
            for j in range(w // p):
                for ci in range(c):
                    for r in range(p):
                        for q in range(p):
                            # sequence row-major over the grid; features in (c, p_row, p_col) order
                            assert tok[n, i * (w // p) + j, ci * p * p + r * p + q] == x[n, ci, i * p + r, j * p + q]
    assert torch.equal(T.unpatchify(tok, p, c, h, w), x)
    with pytest.raises(ValueError, match="divisible"):
        T.patchify(x, 5)


@pytest.mark.parametrize("channels,size,p", [(1, 28, 2), (3, 32, 4), (3, 16, 1)])
def test_pixel_tokenizer_round_trip_exact(channels, size, p):
    tok = T.PixelTokenizer(size, channels, p)
    u8 = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8)
    images = u8.float() / 127.5 - 1
    tokens = tok.encode(images)
    assert tokens.shape == (3, tok.seq_len, tok.token_dim) == (3, (size // p) ** 2, channels * p * p)
    back = tok.decode(tokens)
    assert torch.equal(back, images)
    assert torch.equal(((back + 1) * 127.5).round().to(torch.uint8), u8)
    assert T.build_tokenizer(tok.config()).config() == tok.config()
    with pytest.raises(ValueError, match="expects images"):
        tok.encode(images[:, :, :-1])


def brute_force_nearest(x, codebook):
    return ((x.double()[:, None] - codebook.double()[None]) ** 2).sum(-1).argmin(1)


def test_nearest_code_is_brute_force_nearest():
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(3000, 4, generator=g), torch.randn(37, 4, generator=g)
    assert torch.equal(T.nearest_code(x, codebook, chunk=512), brute_force_nearest(x, codebook))
    assert T.nearest_code(x.view(30, 100, 4), codebook).shape == (30, 100)


def shapes_dataset(size=8, per_class=20):
    images, labels = train.make_shapes(per_class, size)
    return T.ArrayDataset(images.numpy(), labels.numpy(), num_classes=10)


def test_vq_tokenizer_fit_assignment_round_trip_and_determinism():
    data = shapes_dataset()
    vq = T.VQTokenizer.fit(data, 16, 2, seed=0, iters=100)
    assert vq.codebook.shape == (16, 4) and len(vq.codebook.unique(dim=0)) == 16   # distinct codes
    images = torch.stack([data[i][0] for i in range(len(data))])
    patches = T.patchify(images, 2).reshape(-1, 4)
    idx = vq.indices(images)                                                      # (N, 16)
    assert torch.equal(idx.reshape(-1), brute_force_nearest(patches, vq.codebook))
    assert torch.equal(vq.encode(images), vq.codebook[idx])
    # Lloyd's fixed point: every code is the mean of the patches assigned to it
    for k in range(16):
        assert torch.allclose(vq.codebook[k], patches[idx.reshape(-1) == k].mean(0), atol=1e-5)
    # codebook vectors round-trip exactly through decode -> encode; the config rebuilds the tokenizer
    tokens = vq.codebook[torch.randint(16, (5, 16), generator=torch.Generator().manual_seed(1))]
    assert torch.equal(vq.encode(vq.decode(tokens)), tokens)
    again = T.build_tokenizer(vq.config())
    assert torch.equal(again.codebook, vq.codebook) and (again.seq_len, again.token_dim) == (16, 4)
    assert torch.equal(T.VQTokenizer.fit(data, 16, 2, seed=0, iters=100).codebook, vq.codebook)  # same seed
    assert not torch.equal(T.VQTokenizer.fit(data, 16, 2, seed=1, iters=100).codebook, vq.codebook)
    with pytest.raises(ValueError, match="codebook must be"):
        T.VQTokenizer(torch.zeros(4, 3), 8, 1, 2)


def test_kl_tokenizer_scale_and_config(tmp_path):
    vae = tiny_vae()
    tok = T.KLTokenizer(vae, 32, patch_size=2)
    assert (tok.seq_len, tok.token_dim, tok.scale) == (64, 16, 0.2325)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    tokens = tok.encode(x, generator=g)
    assert tokens.shape == (2, 64, 16)
    with torch.no_grad():
        post = vae.encode(x)
        expect = T.patchify(post.sample(torch.Generator().manual_seed(0)) * 0.2325, 2)
        assert torch.allclose(tokens, expect, atol=1e-6)  # training tokens: a posterior *sample* x 0.2325
        images = tok.decode(tokens)
        raw = vae.decode(T.unpatchify(tokens / 0.2325, 2, 4, 16, 16))  # decoding divides by the scale first
    assert images.shape == x.shape and torch.equal(images, raw.clamp(-1, 1))
    # config round trip: the weights come from the VAE file
    path = str(tmp_path / "vae.ckpt")
    torch.save({"model": vae.state_dict()}, path)
    rebuilt = T.build_tokenizer(tok.config(), vae_path=path)
    assert rebuilt.config() == tok.config()
    assert torch.equal(rebuilt.decode(tokens), images)
    with pytest.raises(ValueError, match="vae_path"):
        T.build_tokenizer(tok.config())
    with pytest.raises(ValueError, match="divisible"):
        T.KLTokenizer(vae, 30, patch_size=2)


# ---------------------------------------------------------------- image data and the latent cache

def write_png(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def make_folder(root, per_class=3, seed=0):
    """root/<class>/img_k.png, sizes differ (exercise the center crop); returns the sorted paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for cls in ("cat", "dog"):
        os.makedirs(os.path.join(root, cls))
        for k in range(per_class):
            path = os.path.join(root, cls, f"img_{k}.png")
            write_png(path, rng.integers(0, 256, (40 + 7 * k, 36 + 5 * k, 3), dtype=np.uint8))
            paths.append(path)
    return paths


def test_adm_center_crop():
    from PIL import Image
    arr = np.zeros((120, 300, 3), dtype=np.uint8)
    arr[:, :150] = (200, 10, 10)  # left half red, right half blue
    arr[:, 150:] = (10, 10, 200)
    out = T.center_crop_adm(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # 300x120 -> BOX halve once (min side 120 >= 64) -> 150x60 -> bicubic to 80x32 -> central 32 columns
    assert (out[:, 2, 0] > 150).all() and (out[:, -3, 2] > 150).all()
    flat = T.center_crop_adm(Image.fromarray(np.full((50, 70, 3), 77, np.uint8)), 16)
    assert (flat == 77).all()


def test_image_folder_and_errors(tmp_path):
    paths = make_folder(str(tmp_path / "data"))
    ds = T.ImageFolder(str(tmp_path / "data"), 32)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and not ds.skipped
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert -1 <= x.min() and x.max() <= 1
    assert [p for p, _ in ds.samples] == paths and ds.smallest == 36           # the shortest side of any image
    args = train.get_args(["--data", "folder", "--data_path", str(tmp_path / "data")])
    with pytest.raises(ValueError, match="images as small as 36 pixels a side, under the default --image_size 256"):
        train.load_data(args)                                    # the default would upsample them: say so
    assert train.load_data(train.get_args(["--data", "folder", "--data_path", str(tmp_path / "data"),
                                           "--image_size", "256"])).image_size == 256      # asked for: upsampled
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        T.ImageFolder(str(tmp_path / "missing_dir"), 32)
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()          # hidden: not a class, labels unchanged
    assert T.ImageFolder(str(tmp_path / "data"), 32).classes == ["cat", "dog"]
    (tmp_path / "data" / "ant").mkdir()                         # empty: would shift cat and dog to 1 and 2
    with pytest.raises(ValueError, match=r"class folder\(s\) \['ant'\] .* hold no readable images"):
        T.ImageFolder(str(tmp_path / "data"), 32)


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (0..65535) is read as value >> 8, by the training loader and by fid.py; Pillow's
    own convert("RGB") would clip it, turning 99% of this gradient white."""
    from PIL import Image
    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)          # 0 .. 65520
    os.makedirs(tmp_path / "data" / "a")
    Image.fromarray(gradient).save(tmp_path / "data" / "a" / "x.png")
    want = (gradient >> 8).astype(np.uint8)
    got = next(fid.iter_images(str(tmp_path / "data")))[0]                           # (64, 64, 3)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    x, _ = T.ImageFolder(str(tmp_path / "data"), 64)[0]                              # (3, 64, 64) in [-1, 1]
    assert torch.equal(((x[0] + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(want))


def test_corrupt_image_reported_and_skipped(tmp_path, capsys):
    from PIL import Image
    root = str(tmp_path / "data")
    good = make_folder(root)
    garbage = os.path.join(root, "cat", "garbage.jpg")
    open(garbage, "wb").write(os.urandom(500))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "PNG")
    truncated_png = os.path.join(root, "dog", "half.png")
    open(truncated_png, "wb").write(buf.getvalue()[: len(buf.getvalue()) // 2])
    open(os.path.join(root, "dog", "notes.txt"), "w").write("not an image")  # ignored: not an image name
    ds = T.ImageFolder(root, 32)
    out = capsys.readouterr().out
    assert garbage in out and truncated_png in out and "skipped 2" in out
    assert sorted(p for p, _ in ds.skipped) == sorted([garbage, truncated_png])
    assert sorted(p for p, _ in ds.samples) == sorted(good)  # nothing else lost
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))

    # a JPEG whose header is fine but whose body is cut passes the up-front check; reading it reports
    # the file and gives the next image instead of killing the run
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut_jpeg = os.path.join(root, "cat", "img_0a.jpg")  # sorts right after img_0.png
    open(cut_jpeg, "wb").write(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds = T.ImageFolder(root, 32)
    i = [p for p, _ in ds.samples].index(cut_jpeg)
    x, y = ds[i]
    assert cut_jpeg in capsys.readouterr().out and ds.skipped[-1][0] == cut_jpeg
    assert torch.equal(x, ds[i + 1][0]) and y == ds[i + 1][1]


def test_cache_latents_and_cached_reads(tmp_path):
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    make_folder(root)
    ds = T.ImageFolder(root, 32)
    vae = tiny_vae()
    assert T.cache_latents(ds, vae, cache, batch_size=4) == 6  # 4 + a partial batch of 2
    with pytest.raises(ValueError, match="a VQ one"):             # no posterior to cache
        T.cache_latents(ds, T.build_autoencoder("vq_f4", ch=32, num_codes=8), str(tmp_path / "vq"))
    moments = np.load(os.path.join(cache, "moments.npy"), mmap_mode="r")
    labels = np.load(os.path.join(cache, "labels.npy"))
    assert moments.shape == (6, 2, 8, 16, 16) and moments.dtype == np.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert not os.path.exists(os.path.join(cache, "moments.partial.npy"))
    assert T.CachedLatents(cache).weights_sha == T.weights_digest(vae)          # which weights made it
    with torch.no_grad():
        for i in range(6):
            x = ds[i][0][None]
            assert np.allclose(moments[i, 0], vae.encode(x).moments[0].numpy(), atol=1e-5)
            assert np.allclose(moments[i, 1], vae.encode(x.flip(-1)).moments[0].numpy(), atol=1e-5)

    cached = T.CachedLatents(cache, generator=torch.Generator().manual_seed(0))
    assert len(cached) == 6 and cached.num_classes == 2
    m, y = cached[5]
    assert m.shape == (8, 16, 16) and m.dtype == torch.float32 and y == 1
    flips = []
    for _ in range(400):
        for i in range(6):
            m, _ = cached[i]
            is_flip = np.array_equal(m.numpy(), moments[i, 1])
            assert is_flip or np.array_equal(m.numpy(), moments[i, 0])
            flips.append(is_flip)
    assert 0.45 < np.mean(flips) < 0.55  # 2400 draws: ~50% flips
    # the same generator seed gives the same flips (torch RNG, not numpy's global state)
    a = T.CachedLatents(cache, generator=torch.Generator().manual_seed(7))
    b = T.CachedLatents(cache, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a[i % 6][0], b[i % 6][0]) for i in range(30))
    # training step: a batch of moments -> sampled, scaled tokens
    batch, _ = next(iter(torch.utils.data.DataLoader(cached, batch_size=4)))
    tokens = T.KLTokenizer(vae, 32).tokens_from_moments(batch)
    assert tokens.shape == (4, 256, 4)
    with pytest.raises(FileNotFoundError, match="moments.npy"):
        T.CachedLatents(str(tmp_path / "nocache"))


# ---------------------------------------------------------------- arrays and Fashion-MNIST

def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 1], dtype=np.uint8)
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), images)  # gzipped
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), labels)      # plain
    ds = T.load_fashion_mnist(str(tmp_path), "test")
    assert len(ds) == 5 and ds.num_classes == 10 and (ds.image_size, ds.channels) == (28, 1)
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and y == 9
    assert torch.equal(x[0], torch.from_numpy(images[2]).float() / 127.5 - 1)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        T.load_fashion_mnist(str(tmp_path), "train")
    open(tmp_path / "bad-idx", "wb").write(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4)
    with pytest.raises(ValueError, match="not a uint8 idx"):
        T.read_idx(str(tmp_path / "bad-idx"))
    write_idx(str(tmp_path / "short-idx"), labels)
    open(tmp_path / "short-idx", "ab").write(b"\x01")
    with pytest.raises(ValueError, match="truncated"):
        T.read_idx(str(tmp_path / "short-idx"))


def test_array_dataset():
    gray = np.array([[[0, 255], [128, 0]]], dtype=np.uint8)  # (1, 2, 2)
    x, y = T.ArrayDataset(gray)[0]
    assert x.shape == (1, 2, 2) and y == 0
    assert x[0, 0, 0] == -1 and x[0, 0, 1] == 1
    rgb = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ds = T.ArrayDataset(rgb, [0, 1, 2, 1])
    assert ds[1][0].shape == (3, 8, 8) and ds[2][1] == 2 and ds.num_classes == 3
    assert torch.equal(ds[3][0], torch.from_numpy(rgb[3]).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="uint8"):
        T.ArrayDataset(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        T.ArrayDataset(rgb, [0, 1])
    for labels, message in (([0, 10**6, 0, 1], "map them to class indices 0..K-1"), ([0.0, 1.7, 2.0, 1.0], "integer"),
                            ([0, -1, 1, 2], ">= 0"), ([[0], [1], [2], [1]], "1-D")):
        with pytest.raises(ValueError, match=message):
            T.ArrayDataset(rgb, labels)
    with pytest.raises(ValueError, match="< num_classes = 2"):
        T.ArrayDataset(rgb, [0, 1, 2, 1], num_classes=2)
    with pytest.raises(ValueError, match="no images"):
        T.ArrayDataset(rgb[:0], [])

# ==============================================================================================
# FID and Inception Score (fid.py)

# ---------------------------------------------------------------- Frechet distance / matrix sqrt
def random_spd(rng, d, cond):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.logspace(0, -math.log10(cond), d)) @ q.T


def test_fid_two_gaussians_closed_form():
    rng = np.random.default_rng(0)
    # Commuting covariances (shared eigenvectors): FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    # Non-commuting 2x2: eigenvalues l1, l2 of S1 S2 give Tr sqrt = sqrt(l1 + l2 + 2 sqrt(l1 l2)).
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 1.0 ** 2 + 2.0 ** 2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance([0, 0], s1, [1, 2], s2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", [500, 50])  # full-rank and rank-deficient covariance (N < D)
def test_fid_of_a_set_with_itself_is_zero(n):
    d = 128
    feats = np.random.default_rng(1).standard_normal((n, d)) * 3 + 1
    mu, sigma = fid.feature_statistics(feats)
    centered = feats - feats.mean(0)
    np.testing.assert_allclose(sigma, centered.T @ centered / (n - 1), rtol=1e-12, atol=1e-12)  # unbiased
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert fid.frechet_distance(mu, sigma, mu + 0.1, sigma) == pytest.approx(d * 0.01, rel=1e-6)


@pytest.mark.parametrize("cond", [10.0, 1e6, 1e12])
def test_matrix_sqrt_against_eigendecomposition(cond):
    rng = np.random.default_rng(int(math.log10(cond)))
    d = 64
    s1, s2 = random_spd(rng, d, cond), random_spd(rng, d, cond)
    f = fid.psd_factor(s1)
    np.testing.assert_allclose(f @ f.T, s1, atol=1e-12)
    rel = 1e-9 if cond < 1e8 else 1e-6  # sqrt of eigenvalues near 1e-12 * |S| carry ~1e-4 relative error
    # Reference: the eigenvalues of the (non-symmetric) product from a general eigensolver.
    reference = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    assert fid.trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=rel)
    # Shared eigenvectors: the square root is known exactly.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = np.logspace(0, -math.log10(cond), d), rng.permutation(np.logspace(0, -math.log10(cond), d))
    assert fid.trace_sqrt_product((q * a) @ q.T, (q * b) @ q.T) == pytest.approx(np.sqrt(a * b).sum(), rel=rel)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="statistics do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- TF-1.x resize
def tf1_resize_loop(img, out_h, out_w):
    """Direct TF-1.x bilinear (align_corners=False, no half-pixel centers), one pixel at a time."""
    h, w = img.shape
    sy, sx = np.float32(h / out_h), np.float32(w / out_w)  # TF computes the scale in float32
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = np.float32(i) * sy
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, h - 1), float(y) - y0
        for j in range(out_w):
            x = np.float32(j) * sx
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, w - 1), float(x) - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("in_hw,size", [((7, 11), 13), ((40, 33), 9), ((20, 13), 299), ((301, 300), 299)])
def test_resize_matches_tf1_rule(in_hw, size):
    img = torch.randint(0, 256, (1, 1) + in_hw).float()
    got = fid.tf1_resize(img, size)[0, 0].numpy()
    np.testing.assert_allclose(got, tf1_resize_loop(img[0, 0].double().numpy(), size, size), atol=1e-3)


def test_resize_is_identity_at_299():
    img = torch.randint(0, 256, (2, 3, 299, 299)).float()
    assert torch.equal(fid.tf1_resize(img, 299), img)
    lo, hi, frac = fid.tf1_sample_points(50, 50)  # the rule itself gives the identity too
    assert torch.equal(lo, torch.arange(50)) and not frac.any()


# ---------------------------------------------------------------- Inception Score
def test_inception_score_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(0).standard_normal(1008), (100, 1))
    mean, std = fid.inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_uniform_confident_is_num_classes():
    k = 8
    logits = 60.0 * np.eye(k)[np.arange(10 * k) % k]  # every class equally often, each near one-hot
    mean, _ = fid.inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-9)


def test_inception_score_shuffle_and_splits():
    # Confident predictions, first half class 0, second half class 1. Within a split, IS = exp(H(q))
    # with q the class frequencies of the split, which the fixed RandomState(2020) shuffle decides.
    n, splits = 100, 10
    labels = (np.arange(n) >= n // 2).astype(int)
    logits = 60.0 * np.eye(3)[labels]
    shuffled = labels[np.random.RandomState(2020).permutation(n)]
    expected = []
    for k in range(splits):
        q = shuffled[k * n // splits:(k + 1) * n // splits].mean()
        expected.append(math.exp(-sum(p * math.log(p) for p in (q, 1 - q) if p > 0)))
    mean, std = fid.inception_score(logits, splits)
    assert mean == pytest.approx(np.mean(expected), rel=1e-9)
    assert std == pytest.approx(np.std(expected), rel=1e-6)
    assert std > 0  # the splits really differ


def test_inception_score_without_classifier_raises():
    with pytest.raises(ValueError, match="classifier"):
        fid.inception_score(None)


# ---------------------------------------------------------------- Inception network
def random_inception(classifier=True):
    torch.manual_seed(0)
    model = fid.FIDInceptionV3(classifier)
    for m in model.modules():  # He init + varied BN statistics, so activations keep a useful scale
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="session")
def inception(tmp_path_factory):
    """Random-weight Inception saved in torch-fidelity's layout and reloaded strictly, with its
    outputs on two 32x32 images (the second one gray)."""
    path = str(tmp_path_factory.mktemp("inception") / "inception.pth")
    state = random_inception().state_dict()
    torch.save(state, path)
    model = fid.load_inception(path, "cpu")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    images[1] = images[1, :1]  # gray image stored as RGB
    seen = {}
    hook = model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.update(net_input=args[0].clone()))
    features, logits = model(images)
    hook.remove()
    return dict(path=path, state=state, model=model, images=images, features=features, logits=logits, **seen)


def test_inception_names_shapes_and_outputs(inception):
    names = [(k, str(list(v.shape))) for k, v in inception["state"].items()]
    assert names == [(k, str(list(s))) for k, s in reference_list("inception_fid_torch_fidelity.txt")]  # same names, shapes and order as torch-fidelity's file
    assert inception["features"].shape == (2, 2048) and inception["logits"].shape == (2, 1008)
    assert torch.isfinite(inception["features"]).all() and inception["features"].std() > 1e-3
    # logits are bias-free (torch-fidelity's "logits_unbiased", what IS uses)
    fc = inception["model"].fc
    torch.testing.assert_close(inception["logits"], inception["features"] @ fc.weight.T)
    assert fc.bias.abs().sum() > 0


def test_preprocessing_and_tf_graph_details(inception):
    """What the weights file cannot check: the network input is (TF-1.x resize(x) - 128) / 128, BN eps
    is TF's 1e-3, and the pool branches use TF's pools (average ignoring padding; max in Mixed_7c)."""
    expected = (fid.tf1_resize(inception["images"].float(), 299) - 128) / 128
    torch.testing.assert_close(inception["net_input"], expected)
    model = inception["model"]
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert fid.pool3x3(x, "avg")[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4  # corner: mean of 4 real cells, not /9
    assert fid.pool3x3(x, "max")[0, 0, 0, 0] == 5


def test_batching_grayscale_and_file_without_classifier(inception, tmp_path):
    """A file without fc.* loads (FID only) and gives the same features in batches of 1, with the
    gray image passed as one channel; IS then raises the clear error."""
    path = str(tmp_path / "no_fc.pth")
    torch.save({k: v for k, v in inception["state"].items() if not k.startswith("fc.")}, path)
    model = fid.load_inception(path, "cpu")
    assert model.fc is None
    nhwc = inception["images"].permute(0, 2, 3, 1).numpy()
    batches = [nhwc[:1], nhwc[1:, :, :, :1]]  # (1, 32, 32, 3), then (1, 32, 32, 1)
    features, logits = fid.extract_features(model, batches, progress=False)
    assert features.dtype == np.float64 and logits is None
    np.testing.assert_allclose(features, inception["features"].double().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="classifier"):
        fid.inception_score(logits)


def test_wrong_checkpoint_gives_clear_error(inception, tmp_path):
    state = dict(inception["state"])
    state["Mixed_5b.branch1x1.conv.weights"] = state.pop("Mixed_5b.branch1x1.conv.weight")
    state["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(128, 128, 7, 1)  # transposed kernel
    path = str(tmp_path / "bad.pth")
    torch.save(state, path)
    with pytest.raises(ValueError, match="FID Inception") as err:
        fid.load_inception(path, "cpu")
    for part in ("missing", "unexpected", "shape", "Mixed_5b.branch1x1.conv.weight", "Mixed_6b.branch7x7_2"):
        assert part in str(err.value)
    with pytest.raises(FileNotFoundError):
        fid.load_inception(str(tmp_path / "nope.pth"), "cpu")


def test_inception_rejects_float_input(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception["model"](torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- the fused network (FIDInceptionV3.fused)
@pytest.fixture(scope="session")
def gray28(inception):
    """Six 28x28 grayscale uint8 images (Fashion-MNIST's shape) and their reference features / logits."""
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return (images,) + inception["model"](images)


def assert_fp32_close(got, ref):
    """The fused network's tolerance: 1e-5 of the largest value, ~80 fp32 eps. The fused path only
    reorders roundings (s * w rounded once instead of s * (w . x); oneDNN's blocked summation order):
    measured 5e-7 of the scale with these random weights, 1.6e-6 with the real ones. A change in the
    math is far above it: BN's eps at torch's 1e-5 instead of TF's 1e-3, for instance, moves these
    features by 1e-2 of the scale."""
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fused_inception_equals_reference(inception, gray28):
    """BN folded into the convs, ReLU fused (oneDNN on CPU), channels-last: the same features and
    logits up to fp32 rounding, and the same FID."""
    model, (images, features, logits) = inception["model"], gray28
    fast = model.fused()
    units = [m for m in fast.modules() if isinstance(m, fid.FusedConv2d)]
    assert len(units) == 94 and not any(isinstance(m, fid.BasicConv2d) for m in fast.modules())
    assert all(u.onednn == torch.backends.mkldnn.is_available() for u in units)
    assert list(model.state_dict()) == list(inception["state"])  # the loaded model is left as it was
    assert isinstance(model.Conv2d_1a_3x3, fid.BasicConv2d) and model.memory_format == torch.contiguous_format
    f, lg = fast(images)
    assert_fp32_close(f, features)
    assert_fp32_close(lg, logits)
    # the gray image passed as one channel is the same network input as its RGB copy: equal bit for bit
    assert torch.equal(fast(images[:1].expand(-1, 3, -1, -1))[0], f[:1])
    # FID of two halves (3 images each), on the first 256 feature dimensions: the full 2048-d matrix
    # square root costs a minute on 2 busy cores, and the bound does not depend on the dimension
    fid_of = lambda x: fid.frechet_distance(*fid.feature_statistics(x[:3, :256].double().numpy()),
                                            *fid.feature_statistics(x[3:, :256].double().numpy()))
    assert fid_of(f) == pytest.approx(fid_of(features), rel=1e-3)


def test_fused_inception_portable_path(inception, gray28, monkeypatch):
    """Without oneDNN (another device, or torch.backends.mkldnn disabled) the fused units run
    F.conv2d + ReLU on the folded weights: the same features up to fp32 rounding too."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    fast = inception["model"].fused()
    monkeypatch.undo()
    assert not any(u.onednn for u in fast.modules() if isinstance(u, fid.FusedConv2d))
    images, features, _ = gray28
    assert_fp32_close(fast(images[:2])[0], features[:2])


def test_extract_features_fused_and_unfused(inception, gray28):
    """extract_features runs the fused network by default (fused=False: the op-by-op one), in batches."""
    images, features, _ = gray28
    nhw = images[:3, 0].numpy()  # (3, 28, 28) grayscale array, as the Fashion-MNIST .npz files hold
    fused, _ = fid.extract_features(inception["model"], nhw, batch_size=2, progress=False)
    unfused, _ = fid.extract_features(inception["model"], nhw, batch_size=2, progress=False, fused=False)
    for got in (fused, unfused):
        assert_fp32_close(torch.from_numpy(got), features[:3].double())
    assert not np.array_equal(fused, unfused)  # the default really is the other path


# ---------------------------------------------------------------- inputs and statistics files
def test_image_sources_npz_folder_array(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    images[3] = images[3, :, :, :1]  # a gray one
    np.savez(tmp_path / "a.npz", images)
    np.savez_compressed(tmp_path / "b.npz", arr_0=images)
    os.makedirs(tmp_path / "png")
    for i, im in enumerate(images):
        (Image.fromarray(im[:, :, 0], "L") if i == 3 else Image.fromarray(im)).save(tmp_path / "png" / f"{i:03d}.png")
    for source in (images, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), str(tmp_path / "png")):
        batches = list(fid.iter_images(source, batch_size=2))
        assert [len(b) for b in batches] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)
    gray = list(fid.iter_images(images[:, :, :, 0], 5))[0]  # (N, H, W) -> (N, H, W, 1)
    assert gray.shape == (5, 6, 7, 1)


def test_bad_image_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        list(fid.iter_images(np.zeros((2, 8, 8, 3), np.float32)))
    with pytest.raises(ValueError, match="NCHW"):
        list(fid.iter_images(np.zeros((2, 3, 8, 8), np.uint8)))
    with pytest.raises(FileNotFoundError):
        list(fid.iter_images(str(tmp_path / "missing.npz")))
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        list(fid.iter_images(str(tmp_path / "f.npz")))
    np.savez(tmp_path / "s.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="arr_0"):
        list(fid.iter_images(str(tmp_path / "s.npz")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no .png"):
        list(fid.iter_images(str(tmp_path / "empty")))
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="needs both 'mu' and 'sigma'"):
        list(fid.iter_images(str(tmp_path / "mu_only.npz")))
    np.savez(tmp_path / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:100])     # truncated mid-write
    assert not fid.is_statistics_file(str(tmp_path / "cut.npz"))
    with pytest.raises(ValueError, match="not a readable .npz"):
        list(fid.iter_images(str(tmp_path / "cut.npz")))
    os.makedirs(tmp_path / "mixed")
    write_png(tmp_path / "mixed" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "mixed" / "b.png", np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):                     # also one image per batch
        list(fid.iter_images(str(tmp_path / "mixed"), batch_size=1))
    os.remove(tmp_path / "mixed" / "b.png")
    (tmp_path / "mixed" / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="c.png: not a readable image"):
        list(fid.iter_images(str(tmp_path / "mixed")))


def test_fid_refuses_statistics_that_are_not_gaussian_statistics(monkeypatch, tmp_path):
    """NaN, a negative eigenvalue or an asymmetric sigma give a number (or nan) with exit 0 otherwise."""
    rng = np.random.default_rng(0)
    mu, sigma = fid.feature_statistics(rng.standard_normal((50, 6)))
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    for bad, message in ((np.full_like(sigma, np.nan), "NaN or inf"), (sigma - 5 * np.eye(6), "not a covariance"),
                         (sigma + np.triu(np.ones((6, 6)), 1), "not symmetric")):
        with pytest.raises(ValueError, match=message):
            fid.frechet_distance(mu, sigma, mu, bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["fid.py", str(tmp_path / "x.npz"), "--device", "cuda"])
    with pytest.raises(SystemExit):                                      # argparse's one line, before any work
        fid.main()


def test_statistics_files_and_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = random_spd(rng, 8, 10), random_spd(rng, 8, 100)
    fid.save_statistics(str(tmp_path / "a.npz"), mu1, s1)
    fid.save_statistics(str(tmp_path / "b.npz"), mu2, s2)
    mu, sigma = fid.load_statistics(str(tmp_path / "a.npz"))
    assert mu.dtype == np.float64 and np.array_equal(mu, mu1) and np.array_equal(sigma, s1)
    result = fid.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), progress=False)
    assert result["fid"] == pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-12)
    assert result["is_mean"] is None
    with pytest.raises(ValueError, match="Inception weights"):
        fid.evaluate(np.zeros((4, 8, 8, 3), np.uint8), str(tmp_path / "b.npz"))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        np.savez(tmp_path / "c.npz", mean=mu1)
        fid.load_statistics(str(tmp_path / "c.npz"))


def test_evaluate_end_to_end_with_stub_network(tmp_path):
    """The plumbing train.py / sample.py use: arrays in, statistics file out, FID and IS back.
    A tiny stand-in network keeps it fast; the real one is tested above."""
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):  # uint8 (N, C, H, W) -> features (N, 6), logits (N, 4)
            f = x.float().mean((2, 3)) @ self.w
            return f, f[:, :4]

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (30, 5, 5, 3), dtype=np.uint8)
    b = rng.integers(0, 200, (20, 7, 7, 3), dtype=np.uint8)
    model = Stub()
    result = fid.evaluate(a, b, model, batch_size=7, save_stats=str(tmp_path / "a_stats"), progress=False)
    fa, la = model(torch.from_numpy(a).permute(0, 3, 1, 2))
    fb, _ = model(torch.from_numpy(b).permute(0, 3, 1, 2))
    mu_a, s_a = fid.feature_statistics(fa.double().detach().numpy())
    mu_b, s_b = fid.feature_statistics(fb.double().detach().numpy())
    assert result["fid"] == pytest.approx(fid.frechet_distance(mu_a, s_a, mu_b, s_b), rel=1e-6)
    assert result["is_mean"] == pytest.approx(fid.inception_score(la.double().detach().numpy())[0], rel=1e-6)
    assert result["stats_path"] == str(tmp_path / "a_stats.npz")
    again = fid.evaluate(a, result["stats_path"], model, progress=False)
    assert abs(again["fid"]) < 1e-6


# ==============================================================================================
# Training and sampling (train.py, sample.py)

# A tiny run: 8x8 shapes, 2x2 patches -> 16 tokens of 4 values; no previews. Runs go in-process
# (train.main / sample.main) unless the test is about processes (torchrun, the command lines' error
# output); those get fixed threads, so that two processes compute bit-identical numbers to one.
# fp32 whatever the CPU: the exactness tests compare float sums; bf16 has its own tests (precision, below)
TRAIN_TINY = ["--image_size", "8", "--patch_size", "2", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0.01",
        "--blr", "1e-2", "--log_every", "1", "--ckpt_every", "1000", "--sample_every", "0", "--precision", "fp32"]
TRAIN_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
# Same seed, same shard layout: the weights agree to float summation order; in practice they are equal.
TOL = 1e-6
# The learning run (built-in 16x16 shapes, default model and tokens): see test_learns_builtin_shapes.
# Batch 32 at base lr 8e-3 is the default run's lr (1e-3 = blr * batch / 256) at half its cost per step.
# It trains and samples at the default --precision auto: bf16 on a CPU with bf16 instructions, as the demo does.
LEARN = ["--max_steps", "300", "--batch_size", "32", "--blr", "8e-3", "--warmup_epochs", "0.5", "--sample_every", "0",
         "--log_every", "100"]
LEARN_MIN_ACC = 0.2   # chance is 0.10; with 200 samples its std is 0.021, so 0.2 is > 4 sigma above it


def torchrun(script, args):
    """`torchrun --nproc_per_node=2 --standalone script args` in fresh processes; fails with their output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, script)] + args
    out = subprocess.run(cmd, env=TRAIN_ENV, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], atol=TOL, rtol=0), f"{key}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[i][k], sb[i][k], atol=TOL, rtol=0), f"optimizer state {i}.{k} differs"


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """8 uninterrupted steps: the reference for the resume tests and the checkpoint that the sampling
    tests read (every test that needs a trained tiny model uses this one; none writes to it)."""
    d = tmp_path_factory.mktemp("full")
    train.main(TRAIN_TINY + ["--max_steps", "8", "--output_dir", str(d)])
    return d / "checkpoint-last.pth"


def sample_npz(ckpt, out_dir, seed, extra=()):
    npz, png = out_dir / f"s{seed}.npz", out_dir / f"s{seed}.png"
    sample.main(["--ckpt", str(ckpt), "--num_images", "20", "--batch_size", "8", "--num_iter", "4",
                 "--num_sampling_steps", "5", "--seed", str(seed), "--npz", str(npz), "--out", str(png),
                 "--precision", "fp32", *extra])
    return np.load(npz)["arr_0"], png


# -- runs: DDP, resume, signals, non-finite losses, progress ------------------------------------

def test_ddp_two_processes_match_one(tmp_path):
    # 2 ranks x 1 shard of 4 == 1 process x 2 accumulated shards of 4 (global batch 8, same seed)
    torchrun("train.py", TRAIN_TINY + ["--max_steps", "3", "--output_dir", str(tmp_path / "ddp")])
    train.main(TRAIN_TINY + ["--max_steps", "3", "--accum_iter", "2", "--output_dir", str(tmp_path / "one")])
    a, b = T.torch_load(tmp_path / "ddp" / "checkpoint-last.pth"), T.torch_load(tmp_path / "one" / "checkpoint-last.pth")
    assert a["args"]["world_size"] == 2 and b["args"]["world_size"] == 1
    assert_same_state(a, b)
    torch.manual_seed(0)   # and it did train: the weights moved away from the initialisation
    init = train.mar.build_model("mar_tiny", **{k: v for k, v in a["config"].items() if k != "model"}).state_dict()
    assert max((a["model"][k] - init[k]).abs().max().item() for k in init) > 1e-4
    # an autoencoder with the adversarial term: its discriminator too (each rank's D loss is the mean over
    # its shard, DDP averages the gradients: the same as one process's mean over both shards)
    gan = [a for a in TRAIN_TINY if a not in ("--patch_size", "2")]
    gan = [a if a != "8" else "16" for a in gan] + ["--model", "kl_f4", "--disc_weight", "0.5", "--max_steps", "2"]
    torchrun("train.py", gan + ["--output_dir", str(tmp_path / "gan_ddp")])
    train.main(gan + ["--accum_iter", "2", "--output_dir", str(tmp_path / "gan_one")])
    a, b = (T.torch_load(tmp_path / d / "checkpoint-last.pth") for d in ("gan_ddp", "gan_one"))
    assert_same_state(a, b)
    # (Adam's first steps divide tiny gradients by their own size: summation order shows at ~3e-6 here)
    assert all(torch.allclose(a["adversary"]["disc"][k], b["adversary"]["disc"][k], atol=1e-5, rtol=0)
               for k in a["adversary"]["disc"])


def test_resume_after_max_steps_is_exact(full_run, tmp_path):
    train.main(TRAIN_TINY + ["--max_steps", "4", "--output_dir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint-last.pth"
    assert T.torch_load(ckpt)["step"] == 4
    metrics = tmp_path / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good.replace('{"step": 2,', '{"step": 2, "lo'))             # a bad line inside: not a crash
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        train.main(TRAIN_TINY + ["--max_steps", "8", "--output_dir", str(tmp_path), "--resume", str(ckpt)])
    metrics.write_text(good + '{"step": 5, "epoch": 0.0')                          # torn by a crash mid-write
    train.main(TRAIN_TINY + ["--max_steps", "8", "--output_dir", str(tmp_path), "--resume", str(ckpt)])
    assert_same_state(T.torch_load(ckpt), T.torch_load(full_run))
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(metrics)]
    assert steps == list(range(1, 9))   # the metrics log continues without gaps or repeats


def test_sigterm_saves_and_resume_is_exact(full_run, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) in the middle of step 3: train.py finishes the step, saves and
    returns; resuming reaches the uninterrupted run's state exactly. The signal is a real one, sent to this
    process from the model's forward, once train.py's handler is in place (a missing handler fails the
    test instead of ending the test run)."""
    forward, handler = train.mar.MAR.forward, signal.getsignal(signal.SIGTERM)

    def signalled(self, tokens, labels=None):
        signalled.calls += 1
        if signalled.calls == 3:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, tokens, labels)
    signalled.calls = 0
    monkeypatch.setattr(train.mar.MAR, "forward", signalled)
    train.main(TRAIN_TINY + ["--max_steps", "8", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "SIGTERM: finishing this step" in out and "stopped by signal" in out
    assert signal.getsignal(signal.SIGTERM) == handler                          # and its handler is gone again
    ckpt = tmp_path / "checkpoint-last.pth"
    stopped = T.torch_load(ckpt)["step"]
    assert 2 <= stopped < 8, out
    monkeypatch.undo()
    train.main(TRAIN_TINY + ["--max_steps", "8", "--output_dir", str(tmp_path), "--resume", str(ckpt)])
    assert_same_state(T.torch_load(ckpt), T.torch_load(full_run))


def test_failed_checkpoint_write_keeps_the_last_one(tmp_path, monkeypatch):
    """A full disk (torch.save raises RuntimeError "file write failed") at the second checkpoint: the run
    stops with one line, the first checkpoint is intact and resumable, no temp file is left. --output_dir
    under a file is refused with one line."""
    real_save, calls = torch.save, []

    def full_disk_on_second_call(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(train.torch, "save", full_disk_on_second_call)
    with pytest.raises(OSError, match="file write failed.*the previous checkpoint is intact; free disk space"):
        train.main(TRAIN_TINY + ["--max_steps", "4", "--ckpt_every", "2", "--output_dir", str(tmp_path / "o")])
    monkeypatch.undo()
    assert T.torch_load(str(tmp_path / "o" / "checkpoint-last.pth"))["step"] == 2
    assert not (tmp_path / "o" / "checkpoint-last.pth.tmp").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="cannot make the directory"):
        train.main(TRAIN_TINY + ["--output_dir", str(tmp_path / "f" / "run")])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    forward = train.mar.MAR.forward

    def poisoned(self, tokens, labels=None):   # the loss turns NaN from step 3 on
        loss = forward(self, tokens, labels)
        poisoned.calls += 1
        return loss * float("nan") if poisoned.calls > 2 else loss
    poisoned.calls = 0
    monkeypatch.setattr(train.mar.MAR, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss/gradient at step 2"):
        train.main(TRAIN_TINY + ["--ckpt_every", "2", "--max_steps", "6", "--output_dir", str(tmp_path)])
    ckpt = T.torch_load(tmp_path / "checkpoint-last.pth")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_loss_found_between_checks(tmp_path, monkeypatch):
    """The finiteness flag stays on the device and is read at log/checkpoint steps only: a NaN at
    step 2 is found at the step-4 checkpoint, named as step 2, and the step-2 checkpoint survives."""
    forward = train.mar.MAR.forward

    def poisoned(self, tokens, labels=None):
        poisoned.calls += 1
        loss = forward(self, tokens, labels)
        return loss * float("nan") if poisoned.calls == 3 else loss     # only step 2; later steps finite
    poisoned.calls = 0
    monkeypatch.setattr(train.mar.MAR, "forward", poisoned)
    args = TRAIN_TINY + ["--log_every", "100", "--ckpt_every", "2", "--max_steps", "6", "--output_dir", str(tmp_path)]
    with pytest.raises(FloatingPointError, match="non-finite loss/gradient at step 2"):
        train.main(args)
    assert poisoned.calls == 4                                            # it ran on to the check
    assert T.torch_load(tmp_path / "checkpoint-last.pth")["step"] == 2


def test_first_step_feedback_and_running_average_eta(tmp_path, monkeypatch, capsys):
    # A clock that only moves in the model's forward: the first step takes 10 s (start-up), later ones 1 s.
    clock = [0.0]
    forward = train.mar.MAR.forward

    def timed(self, tokens, labels=None):
        clock[0] += 10.0 if clock[0] == 0 else 1.0
        return forward(self, tokens, labels)
    monkeypatch.setattr(train.mar.MAR, "forward", timed)
    monkeypatch.setattr(train, "time", argparse.Namespace(time=lambda: clock[0]))
    train.main(TRAIN_TINY + ["--max_steps", "5", "--log_every", "3", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "5 steps (--max_steps; the schedule has 2500)" in out              # the steps that will run
    # step 1 at once, with its time; its ETA is 4 steps x 10 s
    assert "step 1/5 | first step 10.0 s (includes start-up) | ETA 0m40s" in out, out
    # step 3: the mean of steps 2..3 (1 s), not a window that holds the start-up: 2 steps left -> 2 s
    assert "step 3/5" in out and out.split("step 3/5")[1].split("\n")[0].endswith("ETA 0m02s"), out
    assert (train.duration(3725.2), train.duration(65), train.duration(0)) == ("1h02m05s", "1m05s", "0m00s")


# -- sampling a train.py checkpoint -------------------------------------------------------------

def test_sample_reads_train_checkpoint(full_run, tmp_path):
    from PIL import Image
    a, png = sample_npz(full_run, tmp_path, seed=1, extra=["--png_dir", str(tmp_path / "pngs"), "--cfg", "2.0"])
    assert a.dtype == np.uint8 and a.shape == (20, 8, 8, 1)
    assert len(os.listdir(tmp_path / "pngs")) == 20
    grid = Image.open(png)
    assert grid.size[0] > 8 * 2 and grid.size[1] > 8 * 10        # 10 class rows of 2 images
    b, _ = sample_npz(full_run, tmp_path, seed=1, extra=["--cfg", "2.0"])
    c, _ = sample_npz(full_run, tmp_path, seed=2, extra=["--cfg", "2.0"])
    assert np.array_equal(a, b)                                   # same seed -> same images
    assert not np.array_equal(a, c)
    d, _ = sample_npz(full_run, tmp_path, seed=1, extra=["--cfg", "2.0", "--weights", "model"])
    assert not np.array_equal(a, d)                               # raw weights differ from the EMA


def test_sample_torchrun_gathers_the_same_images(full_run, tmp_path):
    # 2 ranks share 3 batches (the last one partial) and rank 0 writes one file: the single-process images
    common = ["--ckpt", str(full_run), "--num_images", "10", "--batch_size", "4", "--num_iter", "4",
              "--num_sampling_steps", "5"]
    torchrun("sample.py", common + ["--npz", str(tmp_path / "ddp.npz"), "--out", str(tmp_path / "d.png")])
    sample.main(common + ["--npz", str(tmp_path / "one.npz"), "--out", str(tmp_path / "o.png")])
    a, b = np.load(tmp_path / "ddp.npz")["arr_0"], np.load(tmp_path / "one.npz")["arr_0"]
    assert a.shape == (10, 8, 8, 1) and np.array_equal(a, b)
    assert not os.path.exists(str(tmp_path / "ddp.npz") + ".parts")


def test_sample_flags_cfg_and_labels(tmp_path, full_run):
    common = ["--ckpt", str(full_run), "--num_images", "10", "--num_iter", "2", "--num_sampling_steps", "2"]
    with pytest.raises(ValueError, match=r"--cfg must be a finite number >= 0, got -1.0"):
        sample.main(common + ["--cfg", "-1", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match=r"--labels 'abc': expected comma-separated class indices"):
        sample.main(common + ["--labels", "abc", "--out", str(tmp_path / "x.png")])
    sample.main(common + ["--cfg", "0.5", "--out", str(tmp_path / "half.png")])   # 0..1: towards unconditional
    assert (tmp_path / "half.png").exists()


def test_sample_writes_next_to_its_checkpoint(tmp_path, full_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run `python train.py` first"):
        sample.main([])                                                       # no output/checkpoint-last.pth here
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-last.pth").write_bytes(full_run.read_bytes())
    sample.main(["--ckpt", str(run / "checkpoint-last.pth"), "--num_images", "10", "--num_iter", "2",
                 "--num_sampling_steps", "2"])
    assert (run / "samples.png").exists() and not (tmp_path / "samples.png").exists()


# -- flags: heads, tokens, widths, mask ratios ---------------------------------------------------

def test_ce_and_l2_train_save_and_sample(tmp_path):
    book = tmp_path / "book.pth"
    train.main(TRAIN_TINY + ["--max_steps", "3", "--vq", "8", "--head", "ce", "--codebook", str(book),
                             "--output_dir", str(tmp_path / "ce")])
    train.main(TRAIN_TINY + ["--max_steps", "3", "--model", "ar_tiny", "--order", "random", "--head", "l2",
                             "--output_dir", str(tmp_path / "l2")])
    ckpt = tmp_path / "ce" / "checkpoint-last.pth"
    model, c = load_checkpoint(str(ckpt))
    assert c["args"]["head"] == "ce" and c["config"]["num_codes"] == 8
    assert torch.equal(model.diffloss.codebook, c["tokenizer"]["codebook"])
    assert torch.equal(T.torch_load(str(book))["codebook"], c["tokenizer"]["codebook"])   # the shared file
    tokens = model.sample_tokens(4, num_iter=3, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.diffloss.codebook[T.nearest_code(tokens, model.diffloss.codebook)], tokens)  # all codes
    a, _ = sample_npz(ckpt, tmp_path, seed=1, extra=["--cfg", "2.0"])
    b, _ = sample_npz(ckpt, tmp_path, seed=1, extra=["--cfg", "2.0"])
    assert a.shape == (20, 8, 8, 1) and np.array_equal(a, b)
    l2, c2 = load_checkpoint(str(tmp_path / "l2" / "checkpoint-last.pth"))
    assert isinstance(l2.diffloss, L2Head) and l2.order == "random" and c2["args"]["order"] == "random"
    a, _ = sample_npz(tmp_path / "l2" / "checkpoint-last.pth", tmp_path, seed=1)
    assert a.shape == (20, 8, 8, 1)
    # the same codebook file with another K, and CE without codes, are refused with a clear message
    with pytest.raises(ValueError, match="does not fit this run"):
        train.main(TRAIN_TINY + ["--max_steps", "1", "--vq", "4", "--head", "ce", "--codebook", str(book),
                                 "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="add --vq K"):
        train.main(TRAIN_TINY + ["--max_steps", "1", "--head", "ce", "--output_dir", str(tmp_path / "y")])


def test_diffloss_w_and_mask_ratio_min_flags(tmp_path):
    """train.py --diffloss_w sets the head MLP's width (Table 4's ablation), --mask_ratio_min the lower
    end of MAR's training mask ratio: both are stored in the model config, so the checkpoint rebuilds
    with them. Resuming with another value of either, a width < 1, a ratio outside [0, 1] or a ratio
    for an ar_* model is refused with a message."""
    train.main(TRAIN_TINY + ["--max_steps", "2", "--diffloss_w", "24", "--mask_ratio_min", "0.5",
                             "--output_dir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint-last.pth"
    model, c = load_checkpoint(str(ckpt))
    assert c["config"]["diffloss_w"] == 24 and model.diffloss.net.input_proj.out_features == 24
    assert c["config"]["mask_ratio_min"] == 0.5 and model.mask_ratio_min == 0.5
    resume = TRAIN_TINY + ["--max_steps", "3", "--output_dir", str(tmp_path), "--resume", str(ckpt)]
    with pytest.raises(ValueError, match="diffloss_w: checkpoint 24 vs now 32"):
        train.main(resume + ["--diffloss_w", "32", "--mask_ratio_min", "0.5"])
    with pytest.raises(ValueError, match="mask_ratio_min: checkpoint 0.5 vs now 0.25"):
        train.main(resume + ["--diffloss_w", "24", "--mask_ratio_min", "0.25"])
    with pytest.raises(ValueError, match="--diffloss_w must be >= 1"):
        train.main(TRAIN_TINY + ["--diffloss_w", "0", "--output_dir", str(tmp_path / "x")])
    for bad in (["--mask_ratio_min", "1.5"], ["--mask_ratio_min", "0.5", "--model", "ar_tiny"]):
        with pytest.raises(ValueError, match="--mask_ratio_min"):
            train.main(TRAIN_TINY + bad + ["--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_mask_ratio_law_and_pos_embed_init_flags(tmp_path):
    """train.py --mask_ratio_law and --pos_embed_init reach the model and its config, so the checkpoint
    rebuilds with them; resuming with another value is refused, and so are a law for an ar_* model and a
    --mask_ratio_min beside a law that has no lower bound."""
    train.main(TRAIN_TINY + ["--max_steps", "2", "--mask_ratio_law", "uniform", "--pos_embed_init", "sincos",
                             "--output_dir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint-last.pth"
    model, c = load_checkpoint(str(ckpt))
    assert (c["config"]["mask_ratio_law"], c["config"]["pos_embed_init"]) == ("uniform", "sincos")
    assert (model.mask_ratio_law, model.pos_embed_init) == ("uniform", "sincos")
    resume = TRAIN_TINY + ["--max_steps", "3", "--output_dir", str(tmp_path), "--resume", str(ckpt)]
    with pytest.raises(ValueError, match="mask_ratio_law: checkpoint 'uniform' vs now 'truncnorm'"):
        train.main(resume + ["--pos_embed_init", "sincos", "--mask_ratio_law", "truncnorm"])
    with pytest.raises(ValueError, match="pos_embed_init: checkpoint 'sincos' vs now 'normal'"):
        train.main(resume + ["--mask_ratio_law", "uniform"])
    for bad in (["--mask_ratio_law", "cosine", "--model", "ar_tiny"], ["--mask_ratio_law", "cosine", "--mask_ratio_min", "0.5"]):
        with pytest.raises(ValueError, match="--mask_ratio_law cosine: needs a mar_\\* model and no --mask_ratio_min"):
            train.main(TRAIN_TINY + bad + ["--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_dropout_flag(tmp_path):
    """train.py --dropout reaches every Transformer dropout of the model (attention and projections, not
    the head) and its config; resuming with another value is refused, and a value outside [0, 1) too."""
    default = build_model("mar_tiny")
    assert {m.attn_drop for m in default.modules() if hasattr(m, "attn_drop")} == {0.1}        # the released value
    train.main(TRAIN_TINY + ["--max_steps", "2", "--dropout", "0", "--output_dir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint-last.pth"
    model, c = load_checkpoint(str(ckpt))
    assert (c["config"]["attn_dropout"], c["config"]["proj_dropout"]) == (0.0, 0.0)
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 * (len(model.encoder_blocks) + len(model.decoder_blocks)) and set(drops) == {0.0}
    assert {m.attn_drop for m in model.modules() if hasattr(m, "attn_drop")} == {0.0}
    resume = TRAIN_TINY + ["--max_steps", "3", "--output_dir", str(tmp_path), "--resume", str(ckpt)]
    with pytest.raises(ValueError, match="dropout: checkpoint 0.0 vs now None"):
        train.main(resume)
    with pytest.raises(ValueError, match="--dropout must be in"):
        train.main(TRAIN_TINY + ["--dropout", "1", "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_encoder_decoder_depth_flags(tmp_path):
    """train.py --encoder_depth / --decoder_depth build a mar_* model with those blocks (1 + 3: the same
    parameters as mar_tiny's 2 + 2, one block moved onto the unknown tokens' path), store them in the
    config, so the checkpoint rebuilds and loads strictly; resuming without them is refused; ar_* models
    and depths < 1 are refused before anything is written."""
    train.main(TRAIN_TINY + ["--max_steps", "2", "--encoder_depth", "1", "--decoder_depth", "3",
                             "--output_dir", str(tmp_path)])
    ckpt = tmp_path / "checkpoint-last.pth"
    model, c = load_checkpoint(str(ckpt))
    assert (c["config"]["encoder_depth"], c["config"]["decoder_depth"]) == (1, 3)
    assert (len(model.encoder_blocks), len(model.decoder_blocks)) == (1, 3)
    default = build_model("mar_tiny", **{k: v for k, v in c["config"].items() if k not in ("model", "encoder_depth",
                                                                                           "decoder_depth")})
    assert (len(default.encoder_blocks), len(default.decoder_blocks)) == (2, 2)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in default.parameters())
    resume = TRAIN_TINY + ["--max_steps", "3", "--output_dir", str(tmp_path), "--resume", str(ckpt)]
    with pytest.raises(ValueError, match="encoder_depth: checkpoint 1 vs now None"):
        train.main(resume)
    for bad in (["--model", "ar_tiny", "--decoder_depth", "3"], ["--encoder_depth", "0"]):
        with pytest.raises(ValueError, match="needs a mar_\\* model .* and a value >= 1"):
            train.main(TRAIN_TINY + bad + ["--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_train_rejects_impossible_run_lengths(tmp_path):
    for flags, message in ((["--epochs", "0"], "--epochs must be > 0"), (["--epochs", "-1"], "--epochs must be > 0"),
                           (["--max_steps", "0"], "--max_steps must be >= 1"),
                           (["--max_steps", "-2"], "--max_steps must be >= 1"),
                           (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0"),
                           (["--epochs", "inf"], "--epochs must be > 0 and finite"),
                           (["--patch_size", "0"], "--patch_size must be >= 1"), (["--patch_size", "-1"], "--patch_size"),
                           (["--image_size", "-16"], "--image_size must be >= 1"), (["--image_size", "0"], "--image_size")):
        with pytest.raises(ValueError, match=message):
            train.main(TRAIN_TINY + flags + ["--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()                                      # and nothing was trained or written


def test_train_names_the_real_cause(tmp_path):
    (tmp_path / "notes.npz").write_text("not an array file\n")
    with pytest.raises(ValueError, match="is not a numpy .npz / .npy file"):
        train.load_array_file(str(tmp_path / "notes.npz"))
    with pytest.raises(ValueError, match=r"--seed must be in \[0, 2\^63\)"):
        train.get_args(["--seed", str(10**20)])


def test_train_rejects_flags_it_would_ignore():
    with pytest.raises(ValueError, match="--data builtin draws its shapes in code"):
        train.get_args(["--data_path", "somewhere"])
    with pytest.raises(ValueError, match="cached latents fix the image size"):
        train.get_args(["--data", "latents", "--data_path", "cache", "--vae", "kl16.ckpt", "--image_size", "256"])


def test_train_rejects_optimizer_settings_that_would_train_wrongly(tmp_path):
    """A negative clip norm flips the gradients (clip_grad_norm_ scales them by max_norm / norm), a negative
    lr or decay inverts the update, an EMA decay outside [0, 1] diverges: refused before any work."""
    for flag, value, message in (("--grad_clip", "-1", "--grad_clip must be > 0"), ("--grad_clip", "nan", "--grad_clip"),
                                 ("--blr", "-1", "--blr must be a finite number > 0"), ("--blr", "inf", "--blr"),
                                 ("--weight_decay", "-5", "--weight_decay must be a finite number >= 0"),
                                 ("--ema_decay", "2", r"--ema_decay must be in \[0, 1\]"), ("--ema_decay", "-1", "--ema_decay")):
        with pytest.raises(ValueError, match=message):
            train.main(TRAIN_TINY + [flag, value, "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    assert train.get_args(["--grad_clip", "inf", "--ema_decay", "0"]).grad_clip == math.inf   # inf: no clipping


def test_sample_checks_its_inputs_and_outputs_before_sampling(tmp_path, full_run):
    """Non-finite --temperature / --cfg would give black images with exit 0; a bad output path found after
    sampling would lose the images: each is refused first, before the checkpoint is even read (a missing
    one would be reported otherwise)."""
    missing = ["--ckpt", str(tmp_path / "none.pth")]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.png").mkdir()
    for flags, message in ((["--temperature", "nan"], "--temperature must be a finite number > 0"),
                           (["--temperature", "inf"], "--temperature"), (["--cfg", "inf"], "--cfg must be a finite number"),
                           (["--out", str(tmp_path / "g.txt")], "the grid is an image; name it .png"),
                           (["--npz", str(tmp_path / "imgs")], "name the file with .npz"),
                           (["--out", str(tmp_path / "a_file" / "x.png")], "--out: cannot make directory"),
                           (["--npz", str(tmp_path / "a_file" / "a.npz")], "--npz: cannot make directory"),
                           (["--png_dir", str(tmp_path / "a_file")], "--png_dir: cannot make directory"),
                           (["--out", str(tmp_path / "a_dir.png")], "is a directory")):
        with pytest.raises(ValueError, match=message):
            sample.main(missing + ["--out", str(tmp_path / "g.png")] + flags)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):       # the library call too
        tiny("mar_tiny").sample_tokens(2, num_iter=2, temperature=float("nan"))
    sample_npz(full_run, tmp_path / "new" / "dir", seed=1)        # a directory that does not exist yet is made
    assert (tmp_path / "new" / "dir" / "s1.npz").exists()


# -- a tokenizer trained here (train.py --model kl_f4 / vq_f4), then MAR on its latents -------------

def test_train_a_tokenizer_then_mar_on_its_latents(tmp_path):
    """train.py trains an autoencoder and stores its latent scale, measured at the end; load_vae loads the
    checkpoint strictly with the same reconstructions; train.py --vae trains MAR on its latents with no
    other flag and sample.py decodes them (it finds the autoencoder in the run's arguments). The VQ twin
    gives codes for --head ce and its continuous z for the Diffusion Loss."""
    ae = ["--data", "builtin", "--image_size", "8", "--batch_size", "8", "--epochs", "1", "--max_steps", "2",
          "--log_every", "1", "--sample_every", "2", "--precision", "fp32"]
    kl, vq = tmp_path / "kl", tmp_path / "vq"
    train.main(ae + ["--model", "kl_f4", "--output_dir", str(kl), "--max_steps", "1"])
    unfinished = T.torch_load(str(kl / "checkpoint-last.pth"))
    del unfinished["scale"]                                            # as if stopped before its end
    torch.save(unfinished, tmp_path / "unfinished.pth")
    with pytest.raises(ValueError, match="has not finished"):
        T.load_vae(str(tmp_path / "unfinished.pth"))
    train.main(ae + ["--model", "kl_f4", "--output_dir", str(kl), "--resume", str(kl / "checkpoint-last.pth")])
    ckpt = T.torch_load(str(kl / "checkpoint-last.pth"))
    assert ckpt["step"] == 2 and (kl / "reconstructions_0000002.png").exists()
    vae = T.load_vae(str(kl / "checkpoint-last.pth"))
    ema = T.build_autoencoder("kl_f4", in_channels=1)
    ema.load_state_dict(ckpt["model_ema"])
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(vae.reconstruct(x), ema.eval().reconstruct(x)) and vae.scale == ckpt["scale"]
    data = train.load_data(train.get_args(ae))
    assert abs(ckpt["scale"] / T.latent_stats(ema, data)[0] - 1) < 0.02      # (posterior draws differ)
    assert ckpt["latent_bound"] > 0 and vae.latent_bound == ckpt["latent_bound"]
    mar_flags = ["--data", "builtin", "--image_size", "8", "--batch_size", "4", "--max_steps", "1",
                 "--sample_every", "0", "--precision", "fp32"]
    train.main(mar_flags + ["--vae", str(kl / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "m")])
    m = T.torch_load(str(tmp_path / "m" / "checkpoint-last.pth"))
    assert (m["tokenizer"]["kind"], m["tokenizer"]["scale"], m["config"]["seq_len"], m["config"]["token_dim"]) == \
        ("kl", ckpt["scale"], 4, 16)                                     # 8x8 / 4 = 2x2 latents of 16 channels
    # The sampler clips x_0 to the latents' range (scaled as the tokens), also for a run whose config lacks it
    assert m["config"]["clip_x0"] == pytest.approx(ckpt["latent_bound"] * ckpt["scale"])
    model, _ = mar.load_checkpoint(str(tmp_path / "m" / "checkpoint-last.pth"))
    model.diffloss.clip_x0 = None
    tok = T.build_tokenizer(m["tokenizer"], str(kl / "checkpoint-last.pth"))
    assert sample.clip_to_token_range(model, tok).diffloss.clip_x0 == tok.token_bound == m["config"]["clip_x0"]
    sample.main(["--ckpt", str(tmp_path / "m" / "checkpoint-last.pth"), "--num_images", "10", "--num_iter", "2",
                 "--num_sampling_steps", "3", "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.png")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (10, 8, 8, 1)

    train.main(ae + ["--model", "vq_f4", "--vq", "16", "--output_dir", str(vq)])
    assert "codes_used" in open(vq / "metrics.jsonl").readline()
    for head, kind in (("ce", True), ("diffusion", False)):
        out = tmp_path / f"m_{head}"
        train.main(mar_flags + ["--vae", str(vq / "checkpoint-last.pth"), "--head", head, "--output_dir", str(out)])
        tok = T.torch_load(str(out / "checkpoint-last.pth"))["tokenizer"]
        assert (tok["kind"], tok["discrete"]) == ("vqae", kind)
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"reads images of 1 channel\(s\); the array images have 3"):
        train.main(["--data", "array", "--data_path", str(tmp_path / "rgb.npz"), "--vae", str(kl / "checkpoint-last.pth"),
                    "--output_dir", str(tmp_path / "bad_rgb")])
    with pytest.raises(ValueError, match=r"holds an autoencoder \(kl_f4\), a tokenizer: pass it as --vae"):
        sample.main(["--ckpt", str(kl / "checkpoint-last.pth"), "--out", str(tmp_path / "x.png")])
    # The run's tokens are those of one autoencoder: another file of the same shapes would decode them wrong.
    other = dict(ckpt, model_ema={k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model_ema"].items()})
    torch.save(other, tmp_path / "other_kl.pth")                      # e.g. the same run trained further
    m_ckpt = str(tmp_path / "m" / "checkpoint-last.pth")
    for vae_file, message in ((tmp_path / "other_kl.pth", r"holds other weights \(digest [0-9a-f]{12}\) than"),
                              (vq / "checkpoint-last.pth", "is a VQ autoencoder; these tokens are a KL one's"),
                              (m_ckpt, "is a train.py checkpoint of a 'mar_tiny' model, not of an autoencoder")):
        with pytest.raises(ValueError, match=message):
            sample.main(["--ckpt", m_ckpt, "--vae", str(vae_file), "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="other autoencoder weights: pass the --vae the run started with"):
        train.main(mar_flags + ["--vae", str(tmp_path / "other_kl.pth"), "--output_dir", str(tmp_path / "m"),
                                "--resume", m_ckpt, "--max_steps", "2"])
    old = T.torch_load(m_ckpt)
    del old["tokenizer"]["vae_sha"]                                   # a run from before the digest resumes
    torch.save(old, tmp_path / "old.pth")
    train.main(mar_flags + ["--vae", str(kl / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "m_old"),
                            "--resume", str(tmp_path / "old.pth"), "--max_steps", "2"])
    with pytest.raises(ValueError, match=r"was trained on 8x8 images; the builtin images are 16x16: pass --image_size 8"):
        train.main([f for f in mar_flags if f not in ("--image_size", "8")] + ["--vae", str(kl / "checkpoint-last.pth"),
                                                                            "--output_dir", str(tmp_path / "bad16")])
    T.cache_latents(torch.utils.data.Subset(data, range(8)), vae, str(tmp_path / "cache"))   # the KL one's
    latents = ["--data", "latents", "--data_path", str(tmp_path / "cache"), "--vae", str(kl / "checkpoint-last.pth"),
               "--batch_size", "4", "--max_steps", "1", "--sample_every", "0", "--precision", "fp32"]
    train.main(latents + ["--output_dir", str(tmp_path / "m_latents")])         # its own autoencoder: trains
    (tmp_path / "cache" / "autoencoder.json").write_text('{"weights_sha": "0123456789ab"}')
    with pytest.raises(ValueError, match="holds the latents of another autoencoder"):
        train.main(latents + ["--output_dir", str(tmp_path / "bad_latents")])
    with pytest.raises(ValueError, match="holds a KL autoencoder's posteriors; --vae .* is a VQ one"):
        train.main(["--data", "latents", "--data_path", str(tmp_path / "cache"), "--vae", str(vq / "checkpoint-last.pth"),
                    "--output_dir", str(tmp_path / "bad0")])
    codes = T.VQAETokenizer(T.load_vae(str(vq / "checkpoint-last.pth")), 8, discrete=True)
    assert torch.equal(codes.encode(x), codes.codebook[codes.indices(x)]) and codes.num_codes == 16

    for head in ("l2", "ce"):                                  # (ce: not "add --vq", which it would then refuse)
        with pytest.raises(ValueError, match="trains an autoencoder: drop --head"):
            train.get_args(["--model", "kl_f4", "--head", head])
    with pytest.raises(ValueError, match="trains an autoencoder on images: --data latents"):
        train.get_args(["--model", "kl_f4", "--data", "latents", "--data_path", str(tmp_path / "cache")])
    with pytest.raises(ValueError, match=r"--disc_start 0.9999 is step 1250 of 1250"):     # rounds to the end
        train.main(ae + ["--model", "kl_f4", "--disc_weight", "0.5", "--disc_start", "0.9999", "--output_dir",
                         str(tmp_path / "bad_disc")])
    with pytest.raises(ValueError, match="--kl_weight, --disc_weight and --disc_start are for the autoencoders"):
        train.get_args(["--disc_weight", "0.5"])
    with pytest.raises(ValueError, match="must be finite numbers >= 0"):
        train.get_args(["--model", "kl_f4", "--disc_start", "-1"])
    with pytest.raises(ValueError, match="--disc_start without --disc_weight"):
        train.get_args(["--model", "kl_f4", "--disc_start", "1"])
    with pytest.raises(ValueError, match="would never start"):
        train.get_args(["--model", "kl_f4", "--disc_weight", "0.5", "--disc_start", "2", "--epochs", "2"])
    with pytest.raises(ValueError, match="needs discrete tokens"):
        train.main(mar_flags + ["--vae", str(kl / "checkpoint-last.pth"), "--head", "ce", "--output_dir",
                                str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="multiple of it"):
        train.main(ae + ["--model", "kl_f4", "--image_size", "10", "--output_dir", str(tmp_path / "bad2")])


def test_autoencoder_with_the_adversarial_term_trains_from_its_start_and_resumes_exactly(tmp_path):
    """--disc_weight: no discriminator loss before --disc_start (here: step 1), one after; the checkpoint
    holds the discriminator and its optimizer, so 2 steps + a resumed 1 give the 3 steps' weights exactly."""
    ae = ["--data", "builtin", "--image_size", "16", "--batch_size", "8", "--epochs", "1", "--log_every", "1",
          "--sample_every", "0", "--precision", "fp32", "--model", "kl_f4", "--disc_weight", "0.5",
          "--disc_start", "0.0008"]                                       # 1,250 steps an epoch: step 1
    with pytest.raises(ValueError, match="too small for the PatchGAN"):
        train.main([a if a != "16" else "8" for a in ae] + ["--output_dir", str(tmp_path / "small")])
    train.main(ae + ["--max_steps", "3", "--output_dir", str(tmp_path / "a")])
    rows = [json.loads(line) for line in train.metric_rows(tmp_path / "a" / "metrics.jsonl")]
    assert "disc_loss" not in rows[0] and all(r["disc_loss"] > 0 and r["adv_weight"] > 0 for r in rows[1:])
    train.main(ae + ["--max_steps", "2", "--output_dir", str(tmp_path / "b")])
    train.main(ae + ["--max_steps", "3", "--output_dir", str(tmp_path / "b"), "--resume",
                     str(tmp_path / "b" / "checkpoint-last.pth")])
    a, b = (T.torch_load(str(tmp_path / d / "checkpoint-last.pth")) for d in ("a", "b"))
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["adversary"]["disc"][k], b["adversary"]["disc"][k]) for k in a["adversary"]["disc"])


# -- precision: bf16 autocast (train.py / sample.py --precision) --------------------------------

def losses_of_a_short_run(precision, steps=12):
    """The losses of `steps` train.py steps of a tiny MAR from the same initial weights and draws."""
    model = tiny("mar_tiny", live_head=False, diffloss_w=64).train()
    data, labels = torch.rand(8, SEQ, DIM) * 2 - 1, torch.arange(8) % NCLS
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        torch.manual_seed(step)                                         # train.py: every draw seeded by the step
        with sample.autocast(torch.device("cpu"), precision):
            loss = model(data, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return np.array(losses), model


def test_bf16_training_follows_fp32_and_keeps_fp32_state():
    """bf16 autocast trains the same run as fp32 up to bf16 rounding (8 significant bits, 0.4%): the
    loss of every step within 3% of fp32's over 12 steps (measured: 1.4% at most), the same trend; and
    what must stay fp32 does (weights and so the optimizer state and EMA; the loss)."""
    fp32, _ = losses_of_a_short_run("fp32")
    bf16, model = losses_of_a_short_run("bf16")
    assert not np.array_equal(fp32, bf16)                               # bf16 really ran
    assert np.abs(bf16 / fp32 - 1).max() < 0.03, (fp32, bf16)
    assert bf16[-4:].mean() < 0.8 * bf16[:4].mean()                     # and it learns, as fp32 does
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with sample.autocast(torch.device("cpu"), "bf16"):
        x = torch.randn(3, SEQ, DIM)
        assert model.diffloss.net.input_proj(x[:, 0]).dtype == torch.bfloat16    # the matrix products: bf16
        assert model(x, torch.arange(3)).dtype == torch.float32               # the loss: fp32


def test_auto_precision_follows_what_torch_reports(monkeypatch):
    """--precision auto: bf16 where torch reports bf16 instructions (AVX512-BF16 or AMX), fp32 where it
    reports neither (simulated by patching torch's probes); an explicit choice is taken as asked."""
    monkeypatch.setattr(train, "default_device_type", lambda: "cpu")         # also on a machine with a GPU
    for has_bf16, want in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert sample.fast_bf16("cpu") is has_bf16
        assert sample.resolve_precision("auto", "cpu") == want == train.get_args([]).precision
        assert ("reports fast bf16" in sample.describe_precision(want, "cpu")) is has_bf16
        for explicit in ("fp32", "bf16"):
            assert train.get_args(["--precision", explicit]).precision == explicit
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)      # AMX alone: bf16 too
    assert sample.resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(SystemExit):                                             # argparse: one line, exit 2
        train.get_args(["--precision", "fp16"])


def test_checkpoints_cross_precisions(full_run, tmp_path):
    """A checkpoint trained in bf16 holds fp32 weights: it samples in fp32 and in bf16, as an fp32 one
    does; both precisions give images of the same run (mean pixel difference small against the range).
    A resume keeps the precision it started with (it is part of the run's numbers)."""
    train.main(TRAIN_TINY + ["--max_steps", "8", "--precision", "bf16", "--output_dir", str(tmp_path / "bf16")])
    bf16_ckpt = tmp_path / "bf16" / "checkpoint-last.pth"
    ckpt = T.torch_load(str(bf16_ckpt))
    assert ckpt["args"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in ckpt["model_ema"].values() if v.is_floating_point())
    images = {}
    for name, path in (("fp32-trained", full_run), ("bf16-trained", bf16_ckpt)):
        for precision in ("fp32", "bf16"):
            images[name, precision] = sample_npz(path, tmp_path, seed=1, extra=["--precision", precision])[0]
    for name in ("fp32-trained", "bf16-trained"):
        a, b = (images[name, p].astype(float) for p in ("fp32", "bf16"))
        assert a.shape == b.shape == (20, 8, 8, 1) and not np.array_equal(a, b)     # bf16 really sampled
        # of 255: the same images up to rounding (measured 0.002; another seed's images differ by ~110)
        assert np.abs(a - b).mean() < 5, np.abs(a - b).mean()
    with pytest.raises(ValueError, match="precision: checkpoint 'bf16' vs now 'fp32'"):
        train.main(TRAIN_TINY + ["--max_steps", "9", "--precision", "fp32", "--resume", str(bf16_ckpt),
                                 "--output_dir", str(tmp_path / "bf16")])


# -- defaults derived from other flags, and the arguments a checkpoint holds ---------------------
# (train.resolve_defaults, train.checkpoint_args)

def test_derived_defaults():
    """--patch_size: 1 for VAE latents, 4 for pixels, 8 on the built-in shapes (the demo). The mask ratio:
    the uniform law on the built-in shapes (few tokens), the paper's truncnorm law with min 0.7 elsewhere
    (MAR's own defaults); on the shapes a --mask_ratio_min or the truncnorm law by name gives truncnorm
    (min 0 there); ar_* models record truncnorm and no min."""
    get = train.get_args
    assert get([]).patch_size == 8 and get(["--data", "fashion_mnist"]).patch_size == 4
    assert get(["--data", "latents", "--vae", "kl16.ckpt"]).patch_size == 1 and get(["--patch_size", "2"]).patch_size == 2
    with torch.device("meta"):                                     # no init cost
        mar_default = MAR(seq_len=4)
    law = lambda argv: (get(argv).mask_ratio_law, get(argv).mask_ratio_min)
    assert law([]) == ("uniform", 0.0) and law(["--mask_ratio_law", "cosine"]) == ("cosine", 0.0)  # min: unused
    assert law(["--data", "fashion_mnist"]) == (mar_default.mask_ratio_law, mar_default.mask_ratio_min) == ("truncnorm", 0.7)
    assert law(["--mask_ratio_min", "0.5"]) == ("truncnorm", 0.5) and law(["--mask_ratio_law", "truncnorm"]) == ("truncnorm", 0.0)
    assert law(["--model", "ar_tiny"]) == ("truncnorm", None)


def test_checkpoint_args_resolved_and_filled_in(full_run, tmp_path):
    """train.checkpoint_args: a checkpoint stores its arguments resolved (the derived defaults above
    included), and the parser's defaults fill in any flag it does not name, so a checkpoint written
    before the head flags existed resumes as the diffusion head it was, and refuses another head."""
    ckpt = T.torch_load(str(full_run))
    assert ckpt["args"]["mask_ratio_law"] == "uniform" == train.checkpoint_args(ckpt)["mask_ratio_law"]  # derived, stored
    for key in ("head", "vq", "codebook", "order", "diffloss_w"):
        del ckpt["args"][key]
    old = train.checkpoint_args(ckpt)
    assert (old["head"], old["vq"], old["order"], old["diffloss_w"]) == ("diffusion", None, None, None)
    del ckpt["args"]["mask_ratio_law"]                     # from before the law flag: the truncnorm law it trained
    assert train.checkpoint_args(ckpt)["mask_ratio_law"] == "truncnorm"
    ckpt["args"]["mask_ratio_law"] = "uniform"
    del ckpt["args"]["precision"]                          # from before --precision: fp32 (CPU) or bf16 (GPU),
    ckpt["step"] = 6                                       # so either continues it; as if it had stopped early
    path = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, path)
    train.main(TRAIN_TINY + ["--max_steps", "7", "--output_dir", str(tmp_path), "--resume", str(path),
                             "--precision", "bf16"])
    assert T.torch_load(str(path))["step"] == 7 and T.torch_load(str(path))["args"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="head: checkpoint 'diffusion' vs now 'l2'"):
        train.main(TRAIN_TINY + ["--max_steps", "8", "--output_dir", str(tmp_path), "--resume", str(path),
                                 "--head", "l2"])


# -- learning: after a short CPU run, each class's samples are recognised as that class ----------

def test_learns_builtin_shapes(tmp_path):
    judge, real_acc = shapes_judge.train_judge(16)       # experiments/shapes_judge.py, tested in experiments/
    assert real_acc > 0.95, f"the judge itself is unreliable: {real_acc:.2f} on unseen real shapes"
    train.main(LEARN + ["--output_dir", str(tmp_path)])
    npz = tmp_path / "gen.npz"
    sample.main(["--ckpt", str(tmp_path / "checkpoint-last.pth"), "--num_images", "200", "--batch_size", "200",
                 "--npz", str(npz), "--out", str(tmp_path / "gen.png")])
    y = torch.arange(10).repeat_interleave(20)                                            # class-major labels
    acc, per_class = shapes_judge.accuracy(judge, np.load(npz)["arr_0"], y)               # (200, 16, 16, 1)
    # chance is 0.10; a model that ignored its label would score ~0.10 whatever its image quality
    assert acc > LEARN_MIN_ACC, f"accuracy {acc:.2f}, per class {per_class}"
    assert sum(a > 0.1 for a in per_class) >= 5, f"fewer than half the classes above chance: {per_class}"


# -- clear errors -------------------------------------------------------------------------------

def test_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(["--data", "array", "--data_path", str(tmp_path / "nope.npz"), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="needs --data_path"):
        train.main(["--data", "folder", "--output_dir", str(tmp_path)])


def test_unknown_model(tmp_path, capsys, full_run):
    with pytest.raises(SystemExit):
        train.main(["--model", "mar_giant", "--output_dir", str(tmp_path)])
    assert "invalid choice: 'mar_giant'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown --model 'mar_giant'"):
        sample.main(["--ckpt", str(full_run), "--model", "mar_giant", "--out", str(tmp_path / "x.png")])


def test_checkpoint_of_another_size(tmp_path, full_run):
    with pytest.raises(ValueError, match="holds a 'mar_tiny'"):
        sample.main(["--ckpt", str(full_run), "--model", "mar_base", "--out", str(tmp_path / "x.png")])
    ckpt = T.torch_load(full_run)
    ckpt["config"]["model"] = "mar_small"            # weights of mar_tiny, config of another size
    torch.save(ckpt, tmp_path / "lying.pth")
    with pytest.raises(ValueError, match="checkpoint does not match"):
        sample.main(["--ckpt", str(tmp_path / "lying.pth"), "--out", str(tmp_path / "x.png")])


def test_bad_num_images_and_labels(tmp_path, full_run):
    with pytest.raises(ValueError, match="not a positive multiple of the 10 classes"):
        sample.main(["--ckpt", str(full_run), "--num_images", "15", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="out of range"):
        sample.main(["--ckpt", str(full_run), "--labels", "3,12", "--out", str(tmp_path / "x.png")])


def test_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        sample.main(["--ckpt", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="never means 'start from scratch'"):
        train.main(["--resume", str(tmp_path / "none.pth"), "--output_dir", str(tmp_path)])


def test_resume_refuses_other_settings_and_overwrite(tmp_path, full_run, capsys):
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs now 1"):
        train.main(TRAIN_TINY + ["--seed", "1", "--resume", str(full_run), "--output_dir", str(tmp_path)])
    # another data set size changes the steps of every epoch-based setting: not the same run
    rng = np.random.default_rng(0)
    for n in (40, 80):
        np.savez(tmp_path / f"d{n}.npz", images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), labels=np.arange(n) % 2)
    array = lambda n: ["--data", "array", "--data_path", str(tmp_path / f"d{n}.npz")]
    train.main(TRAIN_TINY + array(40) + ["--max_steps", "1", "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="data_size: checkpoint 40 vs now 80"):
        train.main(TRAIN_TINY + array(80) + ["--max_steps", "2", "--output_dir", str(tmp_path / "a"),
                                             "--resume", str(tmp_path / "a" / "checkpoint-last.pth")])
    os.replace(tmp_path / "d40.npz", tmp_path / "moved.npz")              # the same data elsewhere: allowed, said
    train.main(TRAIN_TINY + ["--data", "array", "--data_path", str(tmp_path / "moved.npz"), "--max_steps", "2",
                             "--output_dir", str(tmp_path / "a"), "--resume", str(tmp_path / "a" / "checkpoint-last.pth")])
    assert "allowed, the data set has the same size (40 images)" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(TRAIN_TINY + ["--output_dir", str(full_run.parent)])
    # resuming run A into run B's directory would overwrite B's checkpoint
    train.main(TRAIN_TINY + ["--max_steps", "1", "--output_dir", str(tmp_path / "b")])
    before = (tmp_path / "b" / "checkpoint-last.pth").read_bytes()
    with pytest.raises(FileExistsError, match="holds another run's checkpoint"):
        train.main(TRAIN_TINY + ["--max_steps", "9", "--resume", str(full_run), "--output_dir", str(tmp_path / "b")])
    assert (tmp_path / "b" / "checkpoint-last.pth").read_bytes() == before
    assert not (tmp_path / "b" / "train.lock").exists()                     # released on every exit


def test_one_train_py_per_output_dir_and_sigterm_exit_code(tmp_path):
    """A second train.py into a directory a running one writes to stops at once with one line; the first,
    stopped by SIGTERM, saves and exits 128 + 15 (a scheduler tells a preempted run from a finished one,
    exit 0) and releases its lock; a lock left by a process that is gone is taken over."""
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")] + TRAIN_TINY +
                             ["--max_steps", "100000", "--output_dir", str(tmp_path / "run")], env=TRAIN_ENV,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step "):
                break
        second = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--output_dir", str(tmp_path / "run")],
                                env=TRAIN_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr
        assert f"is in use by another train.py (pid {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal" in out and T.torch_load(str(tmp_path / "run" / "checkpoint-last.pth"))["step"] >= 1
    assert not (tmp_path / "run" / "train.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "train.lock").write_text(dead.stdout.strip())         # a pid that has exited
    assert train.lock_output_dir(str(tmp_path / "stale")) == str(tmp_path / "stale" / "train.lock")
    assert (tmp_path / "stale" / "train.lock").read_text() == str(os.getpid())


def bad_checkpoints(tmp_path):
    """{name: path} of files torch.load cannot take safely, and a directory that must stay uncreated."""
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}, "step": 1}, good)
    data = good.read_bytes()
    (tmp_path / "text.pth").write_text("not a checkpoint\n")                # KeyError inside the unpickler
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])          # zip without its central directory
    marker = tmp_path / "code-ran"

    class RunsCode:                     # unpickling calls os.mkdir(marker): a blocked global
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    torch.save({"model": RunsCode()}, tmp_path / "blocked.pth")
    return {k: tmp_path / f"{k}.pth" for k in ("text", "truncated", "blocked")}, marker


def test_unreadable_checkpoints_give_one_line(tmp_path):
    files, marker = bad_checkpoints(tmp_path)
    for kind, path in files.items():
        for load in (lambda p: load_checkpoint(str(p)),                     # sample.py's loader
                     lambda p: train.main(TRAIN_TINY + ["--resume", str(p), "--output_dir", str(tmp_path / "o")])):
            with pytest.raises(ValueError) as err:
                load(path)
            msg = str(err.value)
            assert "\n" not in msg and str(path) in msg and "weights_only" not in msg, msg
            if kind == "blocked":
                assert "safe loading refuses (posix.mkdir)" in msg and "will not be loaded" in msg, msg
            else:
                assert "is not a PyTorch checkpoint" in msg and "re-download it or pass another file" in msg, msg
    assert not marker.exists()                                                # nothing in the file ran
    # a loadable file that is not a train.py checkpoint cannot be resumed either
    with pytest.raises(ValueError, match="is not a train.py checkpoint"):
        train.main(TRAIN_TINY + ["--resume", str(tmp_path / "good.pth"), "--output_dir", str(tmp_path / "o")])


def test_unreadable_checkpoint_end_to_end_has_no_traceback(tmp_path):
    """The command lines' error path: a ValueError / FileNotFoundError (a bad file here, a bad flag
    elsewhere; the other tests call main() and catch it) ends the process with one line on stderr."""
    files, _ = bad_checkpoints(tmp_path)
    for script, args in (("sample.py", ["--ckpt", str(files["truncated"])]),
                         ("train.py", ["--resume", str(files["text"]), "--output_dir", str(tmp_path / "o")])):
        out = subprocess.run([sys.executable, os.path.join(HERE, script)] + args, env=TRAIN_ENV, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), out.stderr


# -- the README's commands ----------------------------------------------------------------------

def test_readme_install_and_laptop_commands():
    readme = open(os.path.join(HERE, "README.md")).read()
    install = readme.split("## Install")[1].split("\n## ")[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install     # the CPU build, not GBs of CUDA
    # every `python train.py ...` line of the README parses; the Fashion-MNIST one for a laptop is 49 tokens
    lines = [line.split("#")[0].split() for line in readme.splitlines()
             if line.startswith("python train.py") and "--resume" not in line]      # --resume needs its file
    for words in lines:
        train.get_args(words[2:])
    fashion = [train.get_args(w[2:]) for w in lines if "fashion_mnist" in w and "mar_tiny" in w]
    assert fashion, "no Fashion-MNIST command with mar_tiny"
    images = T.ArrayDataset(np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int64))
    tok = train.make_tokenizer(fashion[0], images)
    assert (tok.seq_len, tok.token_dim) == (49, 16)


# -- the READMEs' links --------------------------------------------------------------------------

def test_readme_links_resolve():
    """Every relative link and image of the three READMEs names a file or folder that exists, so a moved
    write-up or a renamed figure fails here instead of on the page. Web links and pure #anchors are not
    checked; a #fragment is stripped; fenced code is skipped (its brackets are Python, not links)."""
    import re
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")      # [text](target) and ![alt](path "title")
    bad, checked = [], 0
    for readme in ("README.md", "experiments/README.md", "benchmarks/README.md"):
        text = re.sub(r"```.*?```", "", open(os.path.join(HERE, readme)).read(), flags=re.S)
        folder = os.path.dirname(os.path.join(HERE, readme))
        for target in link.findall(text):
            path = target.split("#")[0]
            if target.startswith(("http://", "https://", "mailto:")) or not path:
                continue
            checked += 1
            if not os.path.exists(os.path.join(folder, path)):
                bad.append(f"{readme}: {target}")
    assert checked >= 20, f"only {checked} relative links found: has the link pattern stopped matching?"
    assert not bad, bad
