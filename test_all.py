"""
The test suite: `python -m pytest test_all.py` (CPU, a few minutes on 2 cores).

Tests check math that can be derived (closed-form schedules and distributions), round trips
(save/load, resume) and invariants (masking, causality, names of the released tensors). The reference
name/shape lists of the released weights are kept as data in testdata/.
"""
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import diffloss
from diffloss import DiffLoss

# One thread: the models under test are small, and on a 2-core machine torch's thread pool costs
# more in synchronisation than it gains (measured: 19 s with 1 thread vs 287 s with 2 on the MAR tests).
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))


def reference_shapes(name, prefix=""):
    """{tensor name: shape} from a testdata/*.txt list (lines "name<TAB>[d0, d1]"), optionally only
    the names under `prefix` (with the prefix removed)."""
    out = {}
    with open(os.path.join(HERE, "testdata", name)) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            if key.startswith(prefix):
                out[key[len(prefix):]] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    return out


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
    head = DiffLoss(2, 3, depth=1, width=8, num_sampling_steps="25")
    seen = []
    head.net.register_forward_hook(lambda mod, args, out: seen.append(int(args[1][0])))
    head.sample(torch.zeros(4, 3))
    assert seen == [round(Fraction(i * 999, 24)) for i in reversed(range(25))]


def test_diffloss_names_and_shapes_match_released_mar_base_head():
    head = DiffLoss(target_channels=16, z_channels=768, depth=6, width=1024)
    ref = reference_shapes("mar_base.txt", prefix="diffloss.")
    assert {k: list(v.shape) for k, v in head.state_dict().items()} == ref
    assert list(head.state_dict()) == list(ref)  # same order as the released file, too
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


def test_diffloss_learns_the_bayes_optimal_denoiser():
    # Training on the known distribution must bring the network's eps towards the closed-form
    # optimum E[eps | x_t, z], and the loss towards its irreducible floor E|eps - eps*|^2.
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
        z = torch.nn.functional.one_hot(cls, 3).float()
        loss = head(mix.draw(cls, g), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - (step + 1) / steps)
    gap, _ = eval_gap()
    assert gap < 0.1 * gap0 and gap < 0.2 * floor, (gap0, gap, floor)


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
