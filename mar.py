"""
MAR and causal AR generators over continuous tokens (paper: "Autoregressive Image Generation without
Vector Quantization", Li et al. 2024).

Both models turn the tokens known so far into one condition vector z per token to predict, and a
per-token Diffusion Loss head (diffloss.py) models p(x | z) (Sec. 3). They differ only in how z is
computed, which is the paper's "generalized autoregressive" view (Sec. 3.4-3.5, Table 1):

  MAR  bidirectional attention, MAE-style encoder on the known tokens + decoder with mask tokens;
       predicts a *set* of random-order tokens per step (num_iter = seq_len: one token per step).
  AR   decoder-only causal Transformer, class token first, teacher forcing, one token per step,
       raster or random order, KV cache at inference.

Table 1's baselines swap the head (`build_model(..., head=...)`, HEADS): "ce", cross-entropy over the K
codes of a VQ tokenizer (tokenizer.VQTokenizer; `num_codes=K`), and "l2", MSE regression (App. D.2).
Every head has DiffLoss's interface and is registered as `diffloss`, so the models do not change.

`MAR` has exactly the parameter names and shapes of the released MAR-B/L/H checkpoints, so

    model, ckpt = load_checkpoint("checkpoint-last.pth")          # released or train.py file
    tokens = model.sample_tokens(bsz=8, num_iter=64, cfg=2.9, labels=torch.arange(8))

gives (8, 256, 16) KL-16 tokens for tokenizer.py to decode. Sizes live in one table, `MODELS`, built
with `build_model(name, **overrides)`; `param_groups` is the paper's weight-decay split for train.py.
Tests: `python -m pytest` (CPU, tiny configs).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from diffloss import DiffLoss, masked_rows   # masked_rows: boolean indexing's positions, static shape
from tokenizer import load_state_dict_strict, nearest_code, torch_load


# ----------------------------------------------------------------------------------------------
# Transformer block (ViT / timm layout, so the released `*_blocks.N.attn.qkv` names load).

class Attention(nn.Module):
    """Multi-head self-attention, optionally causal, optionally with a KV cache (AR inference)."""

    def __init__(self, dim, num_heads, attn_drop, proj_drop):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, causal=False, cache=None):
        """x (B, L, D). `cache` (AR inference only): a dict holding this layer's past keys/values,
        extended in place; the L new queries then sit after the P cached positions."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        mask, is_causal = None, causal                                 # q, k, v: (B, H, L, D/H)
        if cache is not None:
            if "k" in cache:
                P = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                # SDPA's is_causal aligns the mask top-left; with P cached keys query i may see
                # keys 0..P+i, i.e. a bottom-right aligned mask (all-True for a single query).
                if causal:
                    is_causal = False
                    mask = torch.ones(L, P + L, dtype=torch.bool, device=x.device).tril(P) if L > 1 else None
            cache["k"], cache["v"] = k, v
        # SDPA picks flash / memory-efficient kernels on GPUs.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, L, D)                         # (B, L, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)  # timm's Mlp applies proj_drop after the activation and after fc2

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))    # exact (erf) GELU


class Block(nn.Module):
    """Pre-LayerNorm ViT block (timm's, as in the released code): x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x, causal=False, cache=None):
        x = x + self.attn(self.norm1(x), causal, cache)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x, grad_checkpointing, causal=False, caches=None):
    """Apply a stack of blocks; with gradient checkpointing, activations are recomputed in the
    backward pass (saves memory for MAR-L/H; non-reentrant checkpointing replays dropout's RNG)."""
    for i, blk in enumerate(blocks):
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, causal, use_reentrant=False)
        else:
            x = blk(x, causal, None if caches is None else caches[i])
    return x


# ----------------------------------------------------------------------------------------------
# MAR (Sec. 3.5): bidirectional masked autoregressive model, MAE-style encoder / decoder.

MASK_RATIO_LAWS = ("truncnorm", "uniform", "cosine")


class MAR(nn.Module):
    """Masked autoregressive model. Defaults = MAR-B on KL-16 ImageNet-256 tokens (16x16 x 16)."""

    def __init__(self, seq_len=256, token_dim=16, num_classes=1000,
                 encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                 decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12, mlp_ratio=4.0,
                 buffer_size=64,           # extra encoder positions holding the class embedding: they
                                           # give the encoder capacity when few tokens are known
                 diffloss_d=6, diffloss_w=1024, num_sampling_steps="100",
                 diffusion_batch_mul=4,    # each z is trained on 4 (t, noise) draws: the head is cheap
                 label_drop_prob=0.1,      # classifier-free guidance training (class -> fake_latent)
                 mask_ratio_law="truncnorm",   # training mask ratio: N(1, 0.25) truncated to [0.7, 1]
                 mask_ratio_min=0.7,           # (see mask_count; uniform and cosine are options)
                 pos_embed_init="normal",      # N(0, 0.02), or "sincos" (init_pos_embed)
                 attn_dropout=0.1, proj_dropout=0.1, grad_checkpointing=False,
                 clip_x0=None,                # bound of the token values, if any (pixels: 1.0), see DiffLoss
                 head="diffusion",            # per-token head (HEADS): the Diffusion Loss, or a baseline
                 num_codes=None):             # K of the VQ codebook, head="ce" only
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (use 1 for an unconditional data set)")
        if mask_ratio_law not in MASK_RATIO_LAWS:
            raise ValueError(f"mask_ratio_law must be one of {MASK_RATIO_LAWS}, got {mask_ratio_law!r}")
        self.seq_len, self.token_dim, self.num_classes = seq_len, token_dim, num_classes
        self.mask_ratio_law, self.pos_embed_init = mask_ratio_law, pos_embed_init
        self.buffer_size, self.diffusion_batch_mul = buffer_size, _batch_mul(head, diffusion_batch_mul)
        self.label_drop_prob, self.mask_ratio_min = label_drop_prob, mask_ratio_min
        self.grad_checkpointing = grad_checkpointing
        E, D = encoder_embed_dim, decoder_embed_dim
        # Registration order = the released state dict's order.
        self.fake_latent = nn.Parameter(torch.zeros(1, E))          # the "no class" embedding
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, E))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, D))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, D))
        self.class_emb = nn.Embedding(num_classes, E)
        self.z_proj = nn.Linear(token_dim, E)
        self.z_proj_ln = nn.LayerNorm(E, eps=1e-6)
        self.encoder_blocks = nn.ModuleList([Block(E, encoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
                                             for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(E, eps=1e-6)
        self.decoder_embed = nn.Linear(E, D)
        self.decoder_blocks = nn.ModuleList([Block(D, decoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6)
        # The per-token head; named `diffloss` whatever its kind, as in the released weights.
        self.diffloss = make_head(head, token_dim, D, diffloss_d, diffloss_w, num_sampling_steps,
                                  grad_checkpointing, clip_x0, num_codes)
        self.initialize_weights()

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token):
            nn.init.normal_(p, std=0.02)
        init_pos_embed(self.encoder_pos_embed_learned, self.pos_embed_init, self.buffer_size)
        init_pos_embed(self.decoder_pos_embed_learned, self.pos_embed_init, self.buffer_size)
        init_pos_embed(self.diffusion_pos_embed_learned, self.pos_embed_init)
        init_transformer_weights(self)

    # -- the paper's steps ---------------------------------------------------------------------

    def class_embedding(self, labels, batch):
        """(B, E) class vectors; labels None -> fake_latent (unconditional). In training each label is
        replaced by fake_latent with p = label_drop_prob, so the model also learns p(x) for CFG."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        emb = self.class_emb(labels)
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(batch, device=emb.device) < self.label_drop_prob
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    def mask_count(self):
        """Tokens masked in one training batch: ceil(seq * ratio), one ratio per batch (as released),
        drawn from one uniform u by the mask_ratio_law:
          "truncnorm"  the paper's: N(1, 0.25) truncated to [mask_ratio_min, 1] (inverse CDF of u). With
                       0.7 the model never trains with more than 30% of the tokens known, though a
                       generation conditions on up to all but one.
          "uniform"    ratio = u: the count is uniform on 1..seq, every generation step's case as often.
          "cosine"     ratio = cos(pi/2 u): the distribution of the unknown fraction before a step of the
                       cosine generation schedule (mar_schedule) taken at a uniformly random point, as
                       MaskGIT trains.
        Drawn on the CPU as a Python int (torch RNG), so the masked/known split has a static shape with
        no device-to-host read."""
        u = torch.rand((), dtype=torch.float64)
        if self.mask_ratio_law == "uniform":
            ratio = float(u)
        elif self.mask_ratio_law == "cosine":
            ratio = math.cos(math.pi / 2 * float(u))
        else:
            mu, std = 1.0, 0.25
            cdf = lambda v: torch.special.ndtr(torch.tensor((v - mu) / std, dtype=torch.float64))
            lo, hi = cdf(self.mask_ratio_min), cdf(1.0)
            ratio = float((mu + std * torch.special.ndtri(lo + (hi - lo) * u)).clamp(self.mask_ratio_min, 1.0))
        # at least one token: a ratio near 0 (short sequences) must still leave a loss
        return max(1, math.ceil(self.seq_len * ratio))

    def random_mask(self, batch, device, num_masked=None):
        """Training mask (B, seq), 1 = unknown: the first num_masked positions (default: a fresh
        mask_count()) of a per-sample random permutation are masked."""
        num_masked = self.mask_count() if num_masked is None else num_masked
        order = torch.rand(batch, self.seq_len, device=device).argsort(dim=1)   # (B, seq) permutations
        mask = torch.zeros(batch, self.seq_len, device=device)
        return mask.scatter_(1, order[:, :num_masked], 1.0)

    def forward_encoder(self, tokens, keep, cls):
        """Known tokens -> encoder features. tokens (B, seq, C), keep (B, 64+known) = keep_index(),
        cls (B, E)."""
        B = tokens.shape[0]
        x = self.z_proj(tokens)                                                  # (B, seq, E)
        buffer = cls.to(x.dtype)[:, None].expand(B, self.buffer_size, -1)       # (B, 64, E)
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned      # (B, 64+seq, E)
        x = self.z_proj_ln(x)
        # Drop the unknown tokens (after the LayerNorm, as released): the encoder never sees them,
        # so masked values cannot leak into z. Every row keeps the same number of tokens.
        x = gather_rows(x, keep)                                                 # (B, 64+known, E)
        x = run_blocks(self.encoder_blocks, x, self.grad_checkpointing and self.training)
        return self.encoder_norm(x)

    def forward_decoder(self, x, keep):
        """Encoder features -> z. Unknown positions get mask_token; the buffer is dropped at the end."""
        x = self.decoder_embed(x)                                                # (B, 64+known, D)
        full = self.mask_token.to(x.dtype).repeat(x.shape[0], self.buffer_size + self.seq_len, 1)  # (B, 64+seq, D)
        full = full.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)
        x = full + self.decoder_pos_embed_learned
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing and self.training)
        x = self.decoder_norm(x)[:, self.buffer_size:]                           # (B, seq, D)
        # A position embedding for the head: z must say which token it is the condition for.
        return x + self.diffusion_pos_embed_learned

    def forward_z(self, tokens, mask, labels=None, num_masked=None):
        """z = f(known tokens): tokens (B, seq, C), mask (B, seq) 1 = unknown (same count per row),
        labels (B,) or None (unconditional, fake_latent) -> z (B, seq, D), one vector per token.
        num_masked: the count per row if the caller knows it (training, generation); None reads it
        off the mask and checks it, which waits for the device."""
        if num_masked is None:
            counts = mask.sum(dim=1)
            if (counts != counts[0]).any():
                raise ValueError("every row of the mask must hide the same number of tokens")
            num_masked = int(counts[0])
        return self._forward_z(tokens, mask, self.class_embedding(labels, tokens.shape[0]), num_masked)

    def _forward_z(self, tokens, mask, cls, num_masked):
        if tokens.shape[1:] != (self.seq_len, self.token_dim) or mask.shape != tokens.shape[:2]:
            raise ValueError(f"expected tokens (B, {self.seq_len}, {self.token_dim}) and mask (B, "
                             f"{self.seq_len}), got {tuple(tokens.shape)} and {tuple(mask.shape)}")
        keep = self.keep_index(mask, num_masked)                                 # (B, 64+known)
        return self.forward_decoder(self.forward_encoder(tokens, keep, cls), keep)

    def keep_index(self, mask, num_masked):
        """(B, buffer + seq - num_masked) positions in the (buffer + seq) sequence of the buffer and the
        known tokens, ascending: boolean indexing's elements in its order, with a shape fixed by the
        host-side count (no device-to-host read; one graph for torch.compile)."""
        buffer = torch.ones(mask.shape[0], self.buffer_size, dtype=torch.bool, device=mask.device)
        return masked_rows(torch.cat([buffer, mask == 0], dim=1), self.buffer_size + mask.shape[1] - num_masked)

    def forward_loss(self, z, target, mask, num_masked=None):
        """Diffusion Loss on the masked tokens, each repeated diffusion_batch_mul times (Sec. 3.2).
        num_masked (per row, if known): the head then runs on the masked rows only (DiffLoss.forward)."""
        B, L, C = target.shape
        m = self.diffusion_batch_mul
        return self.diffloss(target.reshape(B * L, C).repeat(m, 1), z.reshape(B * L, -1).repeat(m, 1),
                             mask.reshape(B * L).repeat(m), None if num_masked is None else B * num_masked * m)

    def forward(self, tokens, labels):
        """One training step's loss: random mask, z from the known tokens, loss on the unknown ones.
        tokens (B, seq, C); labels (B,) long (an unconditional data set: num_classes=1, all zeros, so
        that label drop still trains fake_latent and sampling with random labels stays consistent)."""
        num_masked = self.mask_count()
        mask = self.random_mask(tokens.shape[0], tokens.device, num_masked)     # (B, seq)
        return self.forward_loss(self.forward_z(tokens, mask, labels, num_masked), tokens, mask, num_masked)

    # -- generation (Sec. 3.5, Fig. 3) ---------------------------------------------------------

    def compile_sampler(self):
        """torch.compile the generation loop's two halves: z from the known tokens (the Transformer,
        one graph; the known count is a dynamic size) and the Diffusion Loss sampler's step. The
        loops stay in Python. Same samples as eager up to float rounding (test_all.py)."""
        self.diffloss.compile_sampler()
        self._forward_z = torch.compile(self._forward_z, dynamic=True, fullgraph=True)  # shadows the method

    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None,
                      temperature=1.0, generator=None):
        """Generate (bsz, seq, C) tokens in num_iter steps. Call model.eval() first.

        Each sample has its own random order; step k predicts the tokens between the schedule's
        mask lengths (mar_schedule). labels None -> random classes; cfg != 1 runs a conditional and
        an unconditional (fake_latent) pass per step. All randomness (labels, orders, diffusion
        noise) comes from `generator`, a torch.Generator on the model's device, if given."""
        _check_sampling_args(bsz, cfg_schedule, labels, temperature)
        device, L = self.fake_latent.device, self.seq_len
        labels = _labels_or_random(self, bsz, labels, generator, device)
        guided = cfg != 1.0
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)       # [cond; uncond] copies
        cls = self.class_emb(labels)                                             # (B, E)
        if guided:
            cls = torch.cat([cls, self.fake_latent.expand(bsz, -1)])             # (2B, E) [cond; uncond]
        orders = torch.rand(bsz, L, device=device, generator=generator).argsort(dim=1)  # (B, seq)
        rank = orders.argsort(dim=1)                            # rank[b, pos]: where pos is in b's order
        tokens = torch.zeros(bsz, L, self.token_dim, device=device)
        mask = torch.ones(bsz, L, device=device)                                 # 1 = unknown
        steps, still = mar_schedule(L, num_iter), L                            # still: unknown per row
        for k, (mask_len, num_pred) in enumerate(steps):
            z = self._forward_z(both(tokens), both(mask), cls, still)            # (B or 2B, seq, D)
            # Still unknown after this step: the first mask_len positions of each order.
            mask_next = rank < (mask_len if k < num_iter - 1 else 0)              # (B, seq) bool
            to_pred = mask.bool() & ~mask_next                                    # num_pred per row
            pred = masked_rows(to_pred, num_pred)                                 # (B, num_pred) ascending
            w = cfg_scale(cfg, cfg_schedule, mask_len, L) if guided else 1.0
            z = gather_rows(z, both(pred)).reshape(-1, z.shape[-1])               # rows [cond; uncond]
            new = self.diffloss.sample(z, temperature, w, generator)[:bsz * num_pred]  # cond half under CFG
            tokens.scatter_(1, pred[..., None].expand(-1, -1, self.token_dim),
                            new.reshape(bsz, num_pred, -1).to(tokens.dtype))
            mask, still = mask_next.float(), still - num_pred
        return tokens


# ----------------------------------------------------------------------------------------------
# MAR's own helpers: the generation schedule of sample_tokens and the row gather of the masking.

def mar_schedule(seq_len, num_iter):
    """The cosine masking schedule of generation (the paper's, after MaskGIT) as plain numbers.

    Returns one (mask_len, num_pred) pair per step k: after step k, mask_len = floor(seq *
    cos(pi/2 (k+1)/K)) tokens stay unknown, clamped to [1, still_masked - 1] so that every step
    predicts at least one token and one is left for later; the last step predicts all that remain.
    mask_len is the released value also at the last step (1), which is what linear CFG sees there.
    """
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must be in [1, seq_len={seq_len}], got {num_iter}")
    steps, still = [], seq_len
    for k in range(num_iter):
        mask_len = math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / num_iter))
        mask_len = max(1, min(still - 1, mask_len))
        num_pred = still if k == num_iter - 1 else still - mask_len
        steps.append((mask_len, num_pred))
        still -= num_pred
    return steps


def gather_rows(x, index):
    """x (B, L, D), index (B, n) -> (B, n, D): x[b, index[b, j]]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Shared with the causal AR below: initialisation, the sampling arguments, classifier-free guidance.

def init_transformer_weights(model):
    """The released code's init: xavier-uniform linears with zero bias, LayerNorm (1, 0). The per-token head is
    skipped: it keeps its own init (zero adaLN and output layers, so its blocks start as identity)."""
    for name, m in model.named_modules():
        if name.startswith("diffloss"):
            continue
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


POS_EMBED_INITS = ("normal", "sincos")


def init_pos_embed(p, kind, skip=0):
    """Initialise a learned position embedding p (1, skip + seq, D) in place. "normal": N(0, 0.02), the
    released code's. "sincos": the token positions start from sincos_2d (then train as usual) and the
    first `skip` (MAR's buffer) from N(0, 0.02): the grid's geometry is there from step 0 instead of
    having to be learned from embeddings an order of magnitude below the content."""
    if kind not in POS_EMBED_INITS:
        raise ValueError(f"pos_embed_init must be one of {POS_EMBED_INITS}, got {kind!r}")
    nn.init.normal_(p, std=0.02)
    if kind == "sincos":
        with torch.no_grad():
            p[0, skip:] = sincos_2d(p.shape[1] - skip, p.shape[2])


def sincos_2d(seq_len, dim):
    """(seq_len, dim) 2D sin-cos position embedding of a square grid, row-major (MAE's fixed
    embedding; Vaswani et al.'s 1D formula on each axis). The first dim/2 channels encode the row r,
    the last dim/2 the column c, each as [sin(p w_0 .. p w_F-1), cos(p w_0 .. p w_F-1)] with
    w_i = 10000^(-i/F), F = dim/4. The inner product of two positions' embeddings is
    sum_i cos(w_i dr) + cos(w_i dc): it depends only on their offset (dr, dc) and is largest at 0, so
    grid neighbours look alike from the first step on."""
    side = math.isqrt(seq_len)
    if side * side != seq_len or dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a square token grid and a width divisible by 4, "
                         f"got seq_len {seq_len} and width {dim}")
    w = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))      # (F,)
    pos = torch.arange(seq_len, dtype=torch.float64)
    axis = lambda p: torch.cat([(p[:, None] * w).sin(), (p[:, None] * w).cos()], dim=1)  # (seq, dim/2)
    return torch.cat([axis(torch.div(pos, side, rounding_mode="floor")), axis(pos % side)], dim=1).float()


def _check_sampling_args(bsz, cfg_schedule, labels, temperature):
    if bsz < 1:
        raise ValueError(f"bsz must be >= 1, got {bsz}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if not 0 < temperature < math.inf:        # also NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if labels is not None and tuple(labels.shape) != (bsz,):
        raise ValueError(f"labels must have shape ({bsz},), got {tuple(labels.shape)}")


def _labels_or_random(model, bsz, labels, generator, device):
    """labels=None samples classes uniformly from `generator`: class-conditional models always get a
    class (ImageNet FID uses 50 per class; pass them explicitly for that)."""
    if labels is None:
        return torch.randint(0, model.num_classes, (bsz,), device=device, generator=generator)
    return labels.to(device)


CFG_SCHEDULES = ("linear", "constant")


def cfg_scale(cfg, cfg_schedule, mask_len, seq_len):
    """Guidance scale of one generation step (the paper's linear schedule, after Muse). "linear" grows with the number of
    tokens known after the step: w_k = 1 + (w - 1) * (seq - mask_len) / seq, weak guidance while the
    image is mostly unknown; "constant" uses w at every step."""
    if cfg_schedule == "linear":
        return 1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len
    if cfg_schedule == "constant":
        return float(cfg)
    raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")


# ==============================================================================================
# The baselines of Table 1, not in the released code: the causal AR (rows "AR, raster" and "AR,
# random") and the per-token heads that replace the Diffusion Loss (CrossEnt over VQ codes, L2).
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Causal AR (Sec. 3.4): decoder-only Transformer, one token per step.

class AR(nn.Module):
    """Decoder-only causal Transformer with the same Diffusion Loss head.

    Slot i of the input predicts the i-th token of the generation order o (o = 0..seq-1 for
    "raster", a fresh permutation per sample for "random"):
        input_i = (class vector if i = 0 else z_proj(x[o_{i-1}]) + pos[o_{i-1}]) + target_pos[o_i]
    i.e. the input is shifted by one (class token first, teacher forcing in training), `pos` says
    where each known token lies and `target_pos` tells the model which position comes next, which a
    random order needs (for raster it is the usual absolute position embedding).
    """

    def __init__(self, seq_len=256, token_dim=16, num_classes=1000, embed_dim=768, depth=24, num_heads=12,
                 mlp_ratio=4.0, order="raster", diffloss_d=6, diffloss_w=1024, num_sampling_steps="100",
                 diffusion_batch_mul=4, label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
                 grad_checkpointing=False, clip_x0=None, head="diffusion", num_codes=None,
                 pos_embed_init="normal"):
        super().__init__()
        if order not in ("raster", "random"):
            raise ValueError(f"order must be 'raster' or 'random', got {order!r}")
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (use 1 for an unconditional data set)")
        self.seq_len, self.token_dim, self.num_classes, self.order = seq_len, token_dim, num_classes, order
        self.pos_embed_init = pos_embed_init
        self.diffusion_batch_mul, self.label_drop_prob = _batch_mul(head, diffusion_batch_mul), label_drop_prob
        self.grad_checkpointing = grad_checkpointing
        self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim))
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, embed_dim))
        self.target_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, embed_dim))
        self.class_emb = nn.Embedding(num_classes, embed_dim)
        self.z_proj = nn.Linear(token_dim, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, attn_dropout, proj_dropout)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # The per-token head (see MAR); named `diffloss` whatever its kind.
        self.diffloss = make_head(head, token_dim, embed_dim, diffloss_d, diffloss_w, num_sampling_steps,
                                  grad_checkpointing, clip_x0, num_codes)
        self.initialize_weights()

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent):
            nn.init.normal_(p, std=0.02)
        init_pos_embed(self.pos_embed_learned, self.pos_embed_init)
        init_pos_embed(self.target_pos_embed_learned, self.pos_embed_init)
        init_transformer_weights(self)

    class_embedding = MAR.class_embedding   # same label drop / fake_latent rule as MAR

    def generation_order(self, batch, device, generator=None):
        """(B, seq) order in which tokens are predicted."""
        if self.order == "raster":
            return torch.arange(self.seq_len, device=device).expand(batch, -1)
        return torch.rand(batch, self.seq_len, device=device, generator=generator).argsort(dim=1)

    def embed(self, cls, tokens_ord, orders, start, end):
        """Input embeddings of slots start..end-1. cls (B, D); tokens_ord (B, >= end-1, C) tokens in
        generation order; orders (B, seq)."""
        lo = max(start, 1) - 1                                     # first token needed (slot i uses i-1)
        x = self.z_proj(tokens_ord[:, lo:end - 1]) + self.pos_embed_learned[0][orders[:, lo:end - 1]]
        if start == 0:
            x = torch.cat([cls.to(x.dtype)[:, None], x], dim=1)                 # class token first
        return x + self.target_pos_embed_learned[0][orders[:, start:end]]     # (B, end-start, D)

    def forward_z(self, tokens, labels=None, orders=None):
        """Teacher forcing: tokens (B, seq, C) -> z (B, seq, D) in generation order, z[:, i] being the
        condition for token orders[:, i] and computed from the tokens before it in the order only."""
        if tokens.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"expected tokens (B, {self.seq_len}, {self.token_dim}), got {tuple(tokens.shape)}")
        B, L, C = tokens.shape
        orders = self.generation_order(B, tokens.device) if orders is None else orders
        tokens_ord = tokens.gather(1, orders[..., None].expand(-1, -1, C))      # (B, seq, C)
        x = self.embed(self.class_embedding(labels, B), tokens_ord, orders, 0, L)
        x = run_blocks(self.blocks, x, self.grad_checkpointing and self.training, causal=True)
        return self.norm(x)

    def forward(self, tokens, labels):
        """Training loss: every token predicted from its predecessors (average over all tokens)."""
        B, L, C = tokens.shape
        orders = self.generation_order(B, tokens.device)
        z = self.forward_z(tokens, labels, orders)                               # (B, seq, D)
        target = tokens.gather(1, orders[..., None].expand(-1, -1, C))           # same order as z
        m = self.diffusion_batch_mul
        return self.diffloss(target.reshape(B * L, C).repeat(m, 1), z.reshape(B * L, -1).repeat(m, 1))

    def compile_sampler(self):
        """torch.compile the Diffusion Loss sampler's step only: with the KV cache every step sees
        caches of a new length, a dict mutated in place, which torch.compile does not capture whole."""
        self.diffloss.compile_sampler()

    @torch.no_grad()
    def sample_tokens(self, bsz, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      generator=None, use_cache=True):
        """Generate (bsz, seq, C) tokens one at a time. Call model.eval() first.

        use_cache=True keeps each layer's keys/values so a step only processes the newest slot;
        use_cache=False recomputes the whole causal prefix each step (same result; for testing).
        Linear CFG: w = 1 + (cfg - 1) * (tokens known after the step) / seq, as MAR's rule."""
        _check_sampling_args(bsz, cfg_schedule, labels, temperature)
        device, L, C = self.fake_latent.device, self.seq_len, self.token_dim
        labels = _labels_or_random(self, bsz, labels, generator, device)
        guided = cfg != 1.0
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        cls = self.class_emb(labels)
        if guided:
            cls = torch.cat([cls, self.fake_latent.expand(bsz, -1)])             # (2B, D) [cond; uncond]
        orders = self.generation_order(bsz, device, generator)                   # (B, seq)
        tokens_ord = torch.zeros(bsz, L, C, device=device)
        caches = [{} for _ in self.blocks] if use_cache else None
        for k in range(L):
            start = k if use_cache else 0
            x = self.embed(cls, both(tokens_ord), both(orders), start, k + 1)   # (B or 2B, k+1-start, D)
            z = self.norm(run_blocks(self.blocks, x, False, causal=True, caches=caches)[:, -1])
            w = cfg_scale(cfg, cfg_schedule, L - k - 1, L) if guided else 1.0
            tokens_ord[:, k] = self.diffloss.sample(z, temperature, w, generator)[:bsz].to(tokens_ord.dtype)
        # back from generation order to raster positions
        return torch.zeros_like(tokens_ord).scatter_(1, orders[..., None].expand(-1, -1, C), tokens_ord)


# ----------------------------------------------------------------------------------------------
# Per-token heads: p(x | z) for one token. The Diffusion Loss is the paper's; the two others are
# its baselines of Table 1 (cross-entropy over K discrete VQ codes) and App. D.2 (L2 regression).

HEADS = ("diffusion", "ce", "l2")


def make_head(head, token_dim, z_channels, depth, width, num_sampling_steps, grad_checkpointing, clip_x0,
              num_codes):
    """The per-token head named `head` (HEADS), with the Diffusion Loss MLP's depth and width."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if (head == "ce") != (num_codes is not None):
        raise ValueError("num_codes (the VQ codebook size K) is needed by head='ce' and only by it, "
                         f"got head={head!r}, num_codes={num_codes!r}")
    if head == "diffusion":
        return DiffLoss(token_dim, z_channels, depth, width, num_sampling_steps, grad_checkpointing, clip_x0)
    if head == "ce":
        return CEHead(token_dim, z_channels, depth, width, num_codes)
    return L2Head(token_dim, z_channels, depth, width)


def _batch_mul(head, diffusion_batch_mul):
    """Rows are repeated diffusion_batch_mul times to give each z several (t, noise) draws; the CE and
    L2 losses are deterministic in z, so a repeat would only copy the same term: 1 for them."""
    return diffusion_batch_mul if head == "diffusion" else 1


class TokenMLP(nn.Module):
    """z (N, Z) -> (N, out): residual MLP with the Diffusion Loss MLP's width and depth (a fair
    comparison: the same head budget), minus what only a denoiser needs (no x_t or timestep input,
    hence no adaLN: blocks are plain pre-LN x + MLP(LN(x)))."""

    def __init__(self, z_channels, width, depth, out_channels):
        super().__init__()
        self.cond_embed = nn.Linear(z_channels, width)
        self.res_blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, width),
                                                       nn.SiLU(), nn.Linear(width, width)) for _ in range(depth)])
        self.norm_final = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero output layer, as the Diffusion Loss MLP: training starts from uniform logits (CE,
        # loss = log K) or from predicting 0, the middle of the token range (L2).
        nn.init.zeros_(self.linear.weight)

    def forward(self, z):
        x = self.cond_embed(z)                                  # (N, width)
        for block in self.res_blocks:
            x = x + block(x)
        return self.linear(self.norm_final(x))                  # (N, out)


class _PointHead(nn.Module):
    """What the CE and L2 heads share with DiffLoss's interface: forward(target (N, C), z (N, Z),
    mask (N,)) -> mask-weighted mean loss; sample(z, temperature, cfg, generator) -> (N, C) with z =
    [z_c; z_u] under CFG and the B guided rows returned twice; set_sampling_steps, compile_sampler, and
    `.net` (what train.py --compile compiles)."""

    def __init__(self, token_dim, z_channels, depth, width, out_channels):
        super().__init__()
        self.in_channels, self.z_channels = token_dim, z_channels      # the names DiffLoss._check reads
        self.net = TokenMLP(z_channels, width, depth, out_channels)

    def set_sampling_steps(self, num_sampling_steps):
        """No diffusion steps to respace: a no-op, so sample.py's --num_sampling_steps fits every head."""

    def compile_sampler(self):
        """torch.compile the MLP in place (DiffLoss compiles its whole sampler step); the number of rows
        changes with every MAR generation step, hence dynamic."""
        self.net.compile(dynamic=True)

    _check = DiffLoss._check        # the same shape contract and error messages

    def forward(self, target, z, mask=None, num_masked=None):
        self._check(z, target=target, mask=mask)
        if mask is not None and num_masked is not None:                     # as DiffLoss: the rows that count
            rows = masked_rows(mask, num_masked)
            target, z, mask = target[rows], z[rows], None
        loss = self.loss_per_token(target.float(), self.net(z).float())    # (N,)
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, generator=None):
        guided = not (isinstance(cfg, (int, float)) and cfg == 1.0)
        self._check(z, guided=guided)
        out = self.net(z).float()                                           # (N, out)
        if guided:                                                          # CFG on the head's output
            out_c, out_u = out.chunk(2)
            out = out_u + cfg * (out_c - out_u)
        x = self.draw(out, temperature, generator)                          # (B, C)
        return torch.cat([x, x]) if guided else x


class CEHead(_PointHead):
    """Cross-entropy over K discrete codes (Table 1's "CrossEnt" rows, on VQ tokens). Tokens stay
    vectors: they are codebook entries (tokenizer.VQTokenizer), so the head maps a target to its
    code index (exact nearest code), trains softmax over the K logits, and samples
    index ~ softmax((l_u + cfg (l_c - l_u)) / temperature), returning that code's vector."""

    def __init__(self, token_dim, z_channels, depth, width, num_codes):
        super().__init__(token_dim, z_channels, depth, width, num_codes)
        # The VQ tokenizer's codebook (K, C), saved with the weights so a checkpoint samples alone;
        # filled by train.py from the tokenizer (build_model only knows K).
        self.register_buffer("codebook", torch.zeros(num_codes, token_dim))

    def logits(self, z):
        return self.net(z).float()                                          # (N, K)

    def loss_per_token(self, target, out):
        return F.cross_entropy(out, nearest_code(target, self.codebook), reduction="none")

    def draw(self, logits, temperature, generator):
        probs = torch.softmax(logits / temperature, dim=-1)                 # (B, K)
        index = torch.multinomial(probs, 1, generator=generator)[:, 0]      # (B,)
        return self.codebook[index]                                         # (B, C)


class L2Head(_PointHead):
    """L2 regression (App. D.2): predict the token itself, loss = MSE. Sampling returns the
    prediction: the only randomness left is the generation order; temperature has no effect
    (there is no distribution to sharpen) and CFG extrapolates the predictions, x_u + cfg (x_c - x_u)."""

    def __init__(self, token_dim, z_channels, depth, width):
        super().__init__(token_dim, z_channels, depth, width, token_dim)

    def loss_per_token(self, target, out):
        return ((out - target) ** 2).mean(dim=-1)

    def draw(self, prediction, temperature, generator):
        return prediction


# ----------------------------------------------------------------------------------------------
# Model table (the paper's Table 3 / App. A sizes), construction, weight decay, checkpoint loading.

def _mar(width, depth, heads, dl_depth, dl_width, **kw):
    return dict(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=width,
                decoder_depth=depth, decoder_num_heads=heads, diffloss_d=dl_depth, diffloss_w=dl_width, **kw)


def _ar(width, depth, heads, dl_depth, dl_width, **kw):
    # twice the depth of one MAR half, so the Transformer has the same size as the MAR it mirrors
    return dict(embed_dim=width, depth=2 * depth, num_heads=heads, diffloss_d=dl_depth, diffloss_w=dl_width, **kw)


# name -> constructor kwargs; the prefix picks the class (mar_ -> MAR, ar_ -> AR). seq_len,
# token_dim and num_classes default to KL-16 ImageNet-256 and are overridden by the caller.
MODELS = {
    "mar_tiny": _mar(128, 2, 4, 2, 256, buffer_size=8),      # CPU tests / toy data
    "mar_small": _mar(384, 6, 6, 3, 512, buffer_size=16),    # small images on one GPU
    "mar_base": _mar(768, 12, 12, 6, 1024),                  # 207.9M, the released MAR-B
    "mar_large": _mar(1024, 16, 16, 8, 1280),                # 478.3M, MAR-L
    "mar_huge": _mar(1280, 20, 16, 12, 1536),                # 942.4M, MAR-H
    "ar_tiny": _ar(128, 2, 4, 2, 256),
    "ar_small": _ar(384, 6, 6, 3, 512),
    "ar_base": _ar(768, 12, 12, 6, 1024),
    "ar_large": _ar(1024, 16, 16, 8, 1280),
    "ar_huge": _ar(1280, 20, 16, 12, 1536),
}


def build_model(name, **overrides):
    """MODELS[name] with overrides (seq_len, token_dim, num_classes, order, ...). The returned model
    carries `.config = {"model": name, **overrides}`, which train.py stores to rebuild it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    cls = AR if name.startswith("ar_") else MAR
    model = cls(**{**MODELS[name], **overrides})
    model.config = {"model": name, **overrides}
    return model


def param_groups(model, weight_decay):
    """AdamW groups of the released code: decay on matrices only; no decay for biases,
    1-D parameters (LayerNorm) and the whole Diffusion Loss head (any per-token head). An autoencoder
    trained by train.py: none for the VQ codebook either (decay would pull the codes to 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.startswith(("diffloss.", "quantize."))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _data_kwargs(state_dict):
    """seq_len / token_dim / num_classes read off a state dict's shapes."""
    kw = {}
    if "z_proj.weight" in state_dict:
        kw["token_dim"] = state_dict["z_proj.weight"].shape[1]
    if "class_emb.weight" in state_dict:
        kw["num_classes"] = state_dict["class_emb.weight"].shape[0]
    for key in ("diffusion_pos_embed_learned", "pos_embed_learned"):
        if key in state_dict:
            kw["seq_len"] = state_dict[key].shape[1]
    return kw


def guess_model(state_dict):
    """(name, overrides, num_differences) of the MODELS entry whose names and shapes are closest to
    state_dict (built on the meta device, so even MAR-H costs no memory)."""
    overrides, best = _data_kwargs(state_dict), None
    for name in MODELS:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in build_model(name, **overrides).state_dict().items()}
        diff = len(own.keys() ^ state_dict.keys()) + sum(
            own[k] != tuple(state_dict[k].shape) for k in own.keys() & state_dict.keys())
        if best is None or diff < best[2]:
            best = (name, overrides, diff)
    return best


def load_checkpoint(path, key="model_ema"):
    """Load a MAR/AR checkpoint -> (model in eval mode on CPU, checkpoint dict).

    Accepts train.py files ({"model", "model_ema", "config": {"model": name, **kwargs}, ...}) and the
    released ones ({"model", "model_ema"} and, in training checkpoints, "args" as an
    argparse.Namespace), which carry no config: their size is inferred from the tensor shapes.
    key: "model_ema" (the weights to sample with, as the paper does) or "model"."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        found = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: no state dict under {key!r} (found: {found}); pass key='model' or "
                         "key='model_ema' to pick one of the entries present")
    state_dict = ckpt[key]
    if "config" in ckpt:
        overrides = dict(ckpt["config"])
        name = overrides.pop("model", None)
        if name is None:
            raise ValueError(f"{path}: 'config' has no 'model' entry; train.py writes "
                             "{'model': name, **build_model kwargs}")
        if name not in MODELS and "embed_dim" in overrides:          # an autoencoder trained by train.py
            raise ValueError(f"{path} holds an autoencoder ({name}), a tokenizer: pass it as --vae to train.py, "
                             "and sample from the MAR run trained on its latents")
    else:
        name, overrides, diff = guess_model(state_dict)
        if diff:
            with torch.device("meta"):
                ref = build_model(name, **overrides)
            load_state_dict_strict(ref, state_dict, f"any model in MODELS (closest: {name!r}, "
                                                    f"{diff} differences, listed below)")
    model = build_model(name, **overrides)
    try:
        load_state_dict_strict(model, state_dict, f"{name!r} built from its config {overrides}")
    except ValueError as e:
        guess = guess_model(state_dict)[0]
        raise ValueError(f"{e}\n  the file's tensors look most like {guess!r}") from None
    return model.eval(), ckpt
