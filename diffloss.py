"""
Diffusion Loss: a per-token denoising diffusion model p(x | z) (paper Sec. 3.1-3.3).

MAR's Transformer does not predict a token x directly. For every token it produces a vector z, and
this file models the distribution of the continuous token given z with a small diffusion model:

  training  (Sec. 3.2, Eq. 1-2): L(z, x) = E_{eps, t} || eps - eps_theta(x_t | t, z) ||^2
                                  plus the variational-bound term that trains the learned variance;
  sampling  (Sec. 3.3, Eq. 3):    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps_theta) + sigma_t * tau * noise,
                                  with temperature tau and classifier-free guidance.

Everything that must match the released weights is here: the cosine 1000-step schedule, respacing to
N sampling steps (the network always sees the ORIGINAL step index 0..999), the learned-range variance
of Improved DDPM, and the AdaLN residual MLP `net` whose parameter names equal the released
`diffloss.net.*` tensors. The file is self-contained (torch, numpy, math): copy it into your project.

    loss_fn = DiffLoss(target_channels=16, z_channels=768, depth=6, width=1024)   # MAR-B's head
    loss = loss_fn(target, z, mask)          # target (N, 16), z (N, 768), mask (N,)
    tokens = loss_fn.sample(z, temperature=1.0, cfg=1.0)
"""
import math

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

NUM_TRAIN_STEPS = 1000  # T of the cosine schedule; the network is conditioned on t in 0..T-1


# ----------------------------------------------------------------------------------------------
# The noise schedule (Improved DDPM, Nichol & Dhariwal 2021), computed in float64 once.

def cosine_betas(num_steps=NUM_TRAIN_STEPS):
    """beta_t = 1 - abar(t+1)/abar(t) with abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), s = 0.008,
    capped at 0.999 (the last step would otherwise be beta = 1, a singular posterior)."""
    f = lambda t: math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)], dtype=np.float64)


def respace(betas, num_steps):
    """Keep `num_steps` of the original steps, evenly spread from 0 to T-1, and recompute betas so
    that the kept steps have exactly the original abar (this is how a model trained with 1000 steps
    samples in 100). Returns (kept original indices, new betas)."""
    num_steps = int(num_steps)  # the released code passes the count as a string, "100"
    T = len(betas)
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_sampling_steps must be in 1..{T}, got {num_steps}")
    # round(i * (T-1) / (N-1)), half to even like the original's Python round(); N = 1 keeps step 0.
    kept = np.round(np.arange(num_steps) * ((T - 1) / max(num_steps - 1, 1))).astype(np.int64)
    abar = np.cumprod(1.0 - betas)[kept]
    new_betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    return kept, new_betas


def diffusion_coefficients(betas):
    """Every per-step coefficient the loss and the sampler use, as float64 arrays indexed by step."""
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # Variance of the true posterior q(x_{t-1} | x_t, x_0); at t = 0 it is 0, so its log is "clipped"
    # by reusing the t = 1 value (the learned variance interpolates towards it).
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return dict(
        sqrt_abar=np.sqrt(abar),
        sqrt_one_minus_abar=np.sqrt(1.0 - abar),
        sqrt_recip_abar=np.sqrt(1.0 / abar),
        sqrt_recipm1_abar=np.sqrt(1.0 / abar - 1.0),
        post_mean_coef_x0=betas * np.sqrt(abar_prev) / (1.0 - abar),
        post_mean_coef_xt=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        post_logvar_clipped=np.log(np.append(post_var[1], post_var[1:])),
        log_betas=np.log(betas),
    )


# ----------------------------------------------------------------------------------------------
# The denoising network: a residual MLP whose blocks are modulated by (t, z) through adaptive
# LayerNorm, as in DiT (paper Sec. 3.1: "a small MLP consisting of a few residual blocks").

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (original, 0..999) step index, then a 2-layer MLP."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]                        # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (N, width)


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) computed from y = t + z."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """net(x_t (N, C), t (N,), z (N, Z)) -> (N, 2C): epsilon and the variance interpolation v."""

    def __init__(self, in_channels, width, out_channels, z_channels, depth, grad_checkpointing=False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero every modulation output and the final projection: each block starts as the identity
        # and the network starts by predicting eps = 0, v = 0 (DiT's "adaLN-Zero").
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, c):
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(c))

    def forward_embedded(self, x, y):
        """The network after its conditioning: x (N, C), y = time_embed(t) + cond_embed(c) (N, width).
        The sampler calls it directly: cond_embed(z) is the same at every step and time_embed(t) the
        same for every row of a step, so each is computed once instead of once per step and row."""
        x = self.input_proj(x)                                  # (N, width)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)                           # (N, 2C)


# ----------------------------------------------------------------------------------------------
# Gaussian helpers for the variational-bound term (in nats; divided by ln 2 for bits).

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) of a Gaussian integrated over the 8-bit bin around x (DDPM's decoder at t = 0).
    The CDF is the tanh approximation of the released code, so the loss values match it."""
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255))
    log = lambda p: torch.log(p.clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log(cdf_plus),
                            torch.where(x > 0.999, log(1.0 - cdf_min), log(cdf_plus - cdf_min)))
    return -log_probs


def masked_rows(mask, n):
    """The positions of the n nonzero (or True) entries of mask along its last dimension, ascending;
    every row must hold exactly n. n is a host-side int, so the shape is static: the same elements in
    the same order as boolean indexing, which must read the count back from the device (a stable sort
    keeps the nonzero positions in their original order)."""
    return (mask == 0).to(torch.uint8).argsort(dim=-1, stable=True)[..., :n]


# ----------------------------------------------------------------------------------------------

class DiffLoss(nn.Module):
    """Diffusion Loss (paper Sec. 3): the training loss and the sampler of p(x | z) for one token."""

    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps="100",
                 grad_checkpointing=False, clip_x0=None):
        super().__init__()
        self.in_channels, self.z_channels = target_channels, z_channels
        # clip_x0: clamp each step's predicted x_0 to [-clip_x0, clip_x0] while sampling. For tokens
        # with a known range (pixels in [-1, 1]) this is DDPM's clip_denoised: it stops the first step,
        # whose x_0 estimate multiplies eps errors by sqrt(1/abar(999) - 1) = 2e4, from throwing samples
        # far out of range. None (the released setting for KL-16 latents, which have no fixed range)
        # never clips; a model trained briefly on latents needs the clip too, at their measured range.
        self.clip_x0 = clip_x0
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                                  grad_checkpointing)
        # Coefficients live in non-persistent float32 buffers: they follow .to(device), cost no host
        # work inside the loops, stay out of the state dict (whose names must match the release), and stay
        # fp32 under bf16 autocast, which casts only matrix-product inputs (bf16 would round each by up to 0.4%).
        for name, value in diffusion_coefficients(cosine_betas()).items():
            self.register_buffer("train_" + name, torch.tensor(value, dtype=torch.float32), persistent=False)
        self.set_sampling_steps(num_sampling_steps)

    def set_sampling_steps(self, num_sampling_steps):
        """Respace the sampler to N steps (a sampling-time choice: training always uses all 1000)."""
        kept, betas = respace(cosine_betas(), num_sampling_steps)
        device = self.train_log_betas.device
        self.num_sampling_steps = len(kept)
        for name, value in diffusion_coefficients(betas).items():
            self.register_buffer("sample_" + name, torch.tensor(value, dtype=torch.float32, device=device),
                                 persistent=False)
        self.register_buffer("sample_t", torch.tensor(kept, device=device), persistent=False)  # original index
        self.register_buffer("sample_index", torch.arange(len(kept), device=device), persistent=False)

    # -- training ------------------------------------------------------------------------------

    def forward(self, target, z, mask=None, num_masked=None):
        """target (N, C) tokens, z (N, Z) conditions, mask (N,) weights (1 = counts) -> scalar loss.
        num_masked: if the caller knows that mask is 0/1 with this many ones (a host-side int, as MAR
        does), only those rows go through the MLP: the same (t, noise) draws and the same loss up to
        float summation order, without the work on rows that do not count."""
        self._check(z, target=target, mask=mask)
        x0 = target.float()
        t = torch.randint(0, NUM_TRAIN_STEPS, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)                              # drawn for every row either way
        if mask is not None and num_masked is not None:
            rows = masked_rows(mask, num_masked)
            return self.loss_per_token(x0[rows], z[rows], t[rows], noise[rows]).mean()
        loss = self.loss_per_token(x0, z, t, noise)
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    def loss_per_token(self, x0, z, t, noise=None):
        """MSE on epsilon (Eq. 2) + the variational bound of Improved DDPM (trains only v)."""
        c = lambda name: getattr(self, "train_" + name)[t][:, None]   # (N, 1) coefficient at step t
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = c("sqrt_abar") * x0 + c("sqrt_one_minus_abar") * noise   # forward process q(x_t | x_0)
        # fp32 from here on under bf16 autocast: the loss, its bound and their mean are reductions
        eps_hat, v = self.net(x_t, t, z).float().chunk(2, dim=-1)
        mse = ((noise - eps_hat) ** 2).mean(dim=-1)
        # eps_hat is detached: the bound only teaches the variance, the mean is taught by the MSE.
        return mse + self.vb_bits(x0, x_t, t, eps_hat.detach(), v)

    def vb_bits(self, x0, x_t, t, eps_hat, v):
        """Per-token variational-bound term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t > 0, the discretized decoder NLL at t = 0; averaged over channels."""
        c = lambda name: getattr(self, "train_" + name)[t][:, None]
        true_mean = c("post_mean_coef_x0") * x0 + c("post_mean_coef_xt") * x_t
        model_mean, model_logvar = self._p_mean_logvar(x_t, eps_hat, v, c)
        kl = normal_kl(true_mean, c("post_logvar_clipped"), model_mean, model_logvar).mean(dim=-1)
        nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=-1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    # -- likelihood ----------------------------------------------------------------------------

    @torch.no_grad()
    def bound_bits(self, x0, z, strata=25, generator=None):
        """Upper bound on -log2 p(x0 | z) for 8-bit data scaled to [-1, 1], in bits per channel, per
        token: the prior term L_T + sum over t = 1..T-1 of the KL terms + the decoder's L_0 (Ho et al.
        2020, Eq. 5; Improved DDPM's bits/dim). A model that predicts tokens one after another (AR, or
        MAR one token per step) bounds -log p(image) by the sum of its tokens' bounds (the chain rule).

        L_T is exact. The 999 KL terms are estimated by stratified Monte Carlo: t = 1..T-1 in `strata`
        equal bins, two uniform draws in each (and two noise draws at t = 0), so that the estimate's own
        variance can be estimated from the pairs. x0 (N, C), z (N, Z) -> (bits (N,), its variance (N,))."""
        self._check(z, target=x0)
        x0 = x0.float()
        N, T = x0.shape[0], NUM_TRAIN_STEPS
        c = lambda name, t: getattr(self, "train_" + name)[t][:, None]

        def term(t):                                  # one draw of the t-th term, (N,) bits per channel
            t = torch.full((N,), t, device=x0.device) if isinstance(t, int) else t
            noise = torch.randn(x0.shape, device=x0.device, generator=generator)
            x_t = c("sqrt_abar", t) * x0 + c("sqrt_one_minus_abar", t) * noise
            eps_hat, v = self.net(x_t, t, z).float().chunk(2, dim=-1)
            return self.vb_bits(x0, x_t, t, eps_hat, v)

        last = torch.full((N,), T - 1, device=x0.device)   # L_T = KL(q(x_T | x_0) || N(0, I)), exact
        prior = normal_kl(c("sqrt_abar", last) * x0, 2 * torch.log(c("sqrt_one_minus_abar", last)),
                          torch.zeros_like(x0), torch.zeros_like(x0)).mean(dim=-1) / math.log(2.0)
        bits, var = prior, torch.zeros_like(prior)
        edges = np.linspace(1, T, strata + 1).round().astype(np.int64)      # bins [edges[k], edges[k+1])
        for lo, hi in [(0, 1)] + list(zip(edges[:-1], edges[1:])):
            draw = lambda: term(torch.randint(int(lo), int(hi), (N,), device=x0.device, generator=generator))
            a, b = draw(), draw()
            n = hi - lo                                     # the bin's terms: n * their mean
            bits = bits + n * (a + b) / 2
            var = var + n ** 2 * (a - b) ** 2 / 4           # n^2 * (sample variance (a-b)^2/2) / 2 draws
        return bits, var

    @staticmethod
    def _p_mean_logvar(x_t, eps_hat, v, c, clip_x0=None):
        """Mean and log-variance of the model's p(x_{t-1} | x_t); `c(name)` gives a coefficient at t.
        Learned range: log sigma^2 interpolates between the posterior variance and beta_t."""
        frac = (v + 1) / 2
        logvar = frac * c("log_betas") + (1 - frac) * c("post_logvar_clipped")
        x0_hat = c("sqrt_recip_abar") * x_t - c("sqrt_recipm1_abar") * eps_hat
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        return c("post_mean_coef_x0") * x0_hat + c("post_mean_coef_xt") * x_t, logvar

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, generator=None):
        """Draw one token per row of z (N, Z) -> (N, C).

        Classifier-free guidance (cfg other than the float 1.0): z stacks the conditional and the
        unconditional conditions, z = [z_c; z_u] with N = 2B. Both halves share x_T and every step's
        noise, so only B chains are run; eps = eps_u + cfg * (eps_c - eps_u) and the variance is the
        conditional half's. The result repeats the B guided samples twice (N rows), as the released
        code returns them; take the first half. `cfg` may be a float or a 0-dim tensor.
        Temperature scales only the noise added at each step, not x_T (paper Sec. 3.3)."""
        guided = not (isinstance(cfg, (int, float)) and cfg == 1.0)
        self._check(z, guided=guided)
        B = z.shape[0] // 2 if guided else z.shape[0]
        steps = self.num_sampling_steps
        # All randomness is drawn up front: one call, static shapes, no host work inside the loop.
        noise = torch.randn(steps + 1, B, self.in_channels, device=z.device, generator=generator)
        # Fresh tensors, not views, go into each step: a compiled step guards on a view's storage
        # offset (0, 1 or more) and would recompile for the last steps.
        x = noise[steps].clone()                                           # x_T, (B, C)
        cond = self.net.cond_embed(z)                                      # (N, width): once, not per step
        for i in reversed(range(steps)):
            x = self.sample_step(x, cond, self.sample_index[i:i + 1].clone(), noise[i].clone(),
                                 cfg if guided else None, temperature)
        return torch.cat([x, x]) if guided else x

    def sample_step(self, x, cond, i, noise, cfg, temperature):
        """One step of Eq. 3, x_t (B, C) -> x_{t-1}: cond = net.cond_embed(z), i the sampling step as a
        (1,) tensor (so one compiled graph serves every step), cfg None without guidance (then cond has
        B rows, else 2B)."""
        c = lambda name: getattr(self, "sample_" + name)[i]                # (1,) coefficient
        y = self.net.time_embed(self.sample_t[i]) + cond                   # ORIGINAL step index; (N, width)
        # The update in fp32 under bf16 autocast: the first of 100 steps scales eps errors by 1/sqrt(alpha) = 316
        out = self.net.forward_embedded(x if cfg is None else torch.cat([x, x]), y).float()
        eps_hat, v = out.chunk(2, dim=-1)
        if cfg is not None:
            (eps_c, eps_u), v = eps_hat.chunk(2), v[:x.shape[0]]
            eps_hat = eps_u + cfg * (eps_c - eps_u)
        mean, logvar = self._p_mean_logvar(x, eps_hat, v, c, self.clip_x0)
        return mean + (i > 0) * torch.exp(0.5 * logvar) * temperature * noise  # no noise at t = 0

    def compile_sampler(self):
        """torch.compile the sampler's step: the network and the update of Eq. 3 in one graph. The
        number of rows changes with every MAR generation step (dynamic=True); cfg and temperature are
        graph inputs, not constants, so the linear CFG schedule does not recompile."""
        self.sample_step = torch.compile(self.sample_step, dynamic=True, fullgraph=True)  # shadows the method

    # -- input checks --------------------------------------------------------------------------

    def _check(self, z, target=None, mask=None, guided=False):
        if z.dim() != 2 or z.shape[1] != self.z_channels:
            raise ValueError(f"DiffLoss: z must have shape (N, {self.z_channels}), got {tuple(z.shape)}")
        if target is not None:
            if target.dim() != 2 or target.shape[1] != self.in_channels:
                raise ValueError(f"DiffLoss: target must have shape (N, {self.in_channels}) "
                                 f"(one row per token), got {tuple(target.shape)}")
            if target.shape[0] != z.shape[0]:
                raise ValueError(f"DiffLoss: target has {target.shape[0]} rows but z has {z.shape[0]}; "
                                 "give one z per target token")
        if mask is not None and tuple(mask.shape) != (z.shape[0],):
            raise ValueError(f"DiffLoss: mask must have shape ({z.shape[0]},), got {tuple(mask.shape)}")
        if guided and z.shape[0] % 2:
            raise ValueError(f"DiffLoss.sample with cfg needs z = [conditional; unconditional] with an "
                             f"even number of rows, got {z.shape[0]}")
