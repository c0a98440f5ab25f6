"""
experiments/diagnose.py -- why MAR trails the causal AR at small scale: evaluation-only diagnostics of
trained checkpoints (no training, no sampling). Each diagnostic is a plot in docs/ and one JSON line
per (checkpoint, diagnostic) in experiments/diagnose.jsonl; experiments/diagnose.md is the table.

  known     The mean Diffusion Loss of one unknown token given k known ones, k = 0 .. seq-1, on test
            images. MAR: k random tokens known, the loss averaged over the seq - k masked ones (each is
            "one unknown token given k random known ones"); AR random order: slot k of a random order
            (its k predecessors are k random tokens), the same quantity; AR raster: position k given
            the raster prefix. Where MAR's curve departs from AR random's is where MAR fails. The
            (t, noise) draws of the head are common to all models (seeded by k, drawn per grid
            position), so the curves differ by the models, not by the draws.
  pos       How the learned position embeddings are organised: their norm against the norm of what
            they are added to (the content: z_proj of the tokens, the decoder's input, the decoder's
            output), and the mean cosine similarity of two positions' embeddings against their
            distance on the token grid (organised = similarity falls with distance).
  attention How much of a predicted token's attention falls on its known grid neighbours (the
            8-neighbourhood), as a multiple of what uniform attention over the same keys would give
            ("lift", 1 = no preference), per layer of the stack that computes z: MAR's decoder (the
            mask-token queries), AR's causal blocks (the query slot), at --attn_known tokens known.

Run (from the repository root; a (checkpoint, diagnostic, setting) already in the JSONL is skipped):
  python experiments/diagnose.py --runs_dir runs          # Table 1's Diffusion Loss runs found there
  python experiments/diagnose.py --ckpt mar=runs/x/checkpoint-last.pth --ckpt ar=...   # any checkpoints
  python experiments/diagnose.py --plots-only              # PNGs and Markdown from the JSONL
Cost: MAR computes z once per k (49 passes), AR once: with --num 500 test images and 4 draws per token,
about 10 minutes per MAR checkpoint and 1 per AR one on one core.
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import lab  # noqa: E402
import mar  # noqa: E402
import tokenizer as tk  # noqa: E402
from diffloss import NUM_TRAIN_STEPS  # noqa: E402


# Table 1's Diffusion Loss runs (experiments/table1.py's run directories), the default checkpoints
TABLE1_RUNS = {"MAR": "t1_mar_tiny_diffusion", "AR random": "t1_ar_tiny_random_diffusion",
               "AR raster": "t1_ar_tiny_diffusion"}
KINDS = ("known", "pos", "attention")


# ------------------------------------------------------------------------------------------------
# The loss of one unknown token given k known ones
# ------------------------------------------------------------------------------------------------
def head_draws(seed, k, chunk, shape, draws):
    """(t (R, B, L), noise (R, B, L, C)) for known-count k and image chunk: R draws per grid position,
    t stratified over the R quarters of 0..T-1 (less variance than R uniform draws, the same mean)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + k) * 10_007 + chunk)
    B, L, C = shape
    u = torch.rand(draws, B, L, generator=g, dtype=torch.float64)
    t = ((torch.arange(draws, dtype=torch.float64)[:, None, None] + u) * NUM_TRAIN_STEPS / draws).long()
    return t, torch.randn(draws, B, L, C, generator=g)


def known_order(seed, k, chunk, batch, seq_len):
    """(B, L) random permutations for known-count k and image chunk: MAR knows the first k positions of
    each; AR in random order generates in it (k = L + repeat, seeds no MAR count uses)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + k) * 10_007 + chunk + 5_000)
    return torch.rand(batch, seq_len, generator=g).argsort(dim=1)


def head_loss(model, x0, z, t, noise):
    """Per-token Diffusion Loss averaged over the R draws: x0 (N, C), z (N, D), t (R, N), noise (R, N, C)."""
    return torch.stack([model.diffloss.loss_per_token(x0, z, t[r], noise[r]) for r in range(len(t))]).mean(0)


@torch.no_grad()
def loss_vs_known(model, tokens, labels, seed=0, draws=4, chunk_size=100, ar_repeats=8):
    """[mean loss of one unknown token given k known ones for k = 0 .. seq-1] (see the header). MAR
    averages over the seq - k unknown tokens of each image; AR has one token per image and k, so it
    averages over ar_repeats passes (new orders for AR random, new draws for both) instead."""
    N, L, C = tokens.shape
    total = torch.zeros(L, dtype=torch.float64)
    for c, lo in enumerate(range(0, N, chunk_size)):
        x, y = tokens[lo:lo + chunk_size], labels[lo:lo + chunk_size]
        B = len(x)
        rows = torch.arange(B)[:, None]
        if isinstance(model, mar.MAR):
            for k in range(L):
                order = known_order(seed, k, c, B, L)                           # the first k are known
                mask = torch.ones(B, L).scatter_(1, order[:, :k], 0.0)          # (B, L) 1 = unknown
                z = model.forward_z(x, mask, y, L - k)                          # (B, L, D)
                pos = order[:, k:]                                              # (B, L-k) the unknown ones
                t, noise = head_draws(seed, k, c, (B, L, C), draws)
                loss = head_loss(model, x[rows, pos].reshape(-1, C), z[rows, pos].reshape(-1, z.shape[-1]),
                                 t[:, rows, pos].reshape(draws, -1), noise[:, rows, pos].reshape(draws, -1, C))
                total[k] += loss.double().sum() / (L - k)
        else:                                   # causal AR: slot k is predicted from its k predecessors
            for o in range(ar_repeats):
                orders = known_order(seed, L + o, c, B, L) if model.order == "random" else torch.arange(L).expand(B, -1)
                z = model.forward_z(x, y, orders)                               # (B, L, D), slot order
                for k in range(L):
                    pos = orders[:, k]                                          # (B,) the token of slot k
                    t, noise = head_draws(seed, k, c + o * 100_003, (B, L, C), draws)
                    loss = head_loss(model, x[torch.arange(B), pos], z[:, k], t[:, torch.arange(B), pos],
                                     noise[:, torch.arange(B), pos])
                    total[k] += loss.double().sum() / ar_repeats
    return (total / N).tolist()


# ------------------------------------------------------------------------------------------------
# Position embeddings
# ------------------------------------------------------------------------------------------------
def grid_distance(seq_len):
    """(L, L) Euclidean distances between the positions of a square row-major token grid."""
    side = math.isqrt(seq_len)
    rc = torch.stack([torch.arange(seq_len) // side, torch.arange(seq_len) % side], 1).double()
    return torch.cdist(rc, rc)


def similarity_by_distance(emb):
    """emb (L, D) -> [(grid distance, mean cosine similarity of the pairs at that distance)], and the
    Pearson correlation of the two over all pairs i < j."""
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    sim, dist = e @ e.T, grid_distance(len(emb))
    i, j = torch.triu_indices(len(emb), len(emb), 1)
    s, d = sim[i, j], dist[i, j].round(decimals=4)
    curve = [(float(v), float(s[d == v].mean())) for v in d.unique()]
    corr = float(torch.corrcoef(torch.stack([s, d]))[0, 1])
    return curve, corr


@torch.no_grad()
def pos_embed_report(model, tokens, labels):
    """{embedding name: {norm, content_norm, ratio, corr, curve}}: each position embedding's mean norm
    over the token positions against the mean norm of what it is added to (at half the tokens known)."""
    seen = {}
    hook = lambda name: (lambda mod, inp, out: seen.__setitem__(name, out.norm(dim=-1).mean().item()))
    content = model.z_proj(tokens).norm(dim=-1).mean().item()
    if isinstance(model, mar.MAR):
        b, L = model.buffer_size, model.seq_len
        hs = [model.decoder_embed.register_forward_hook(hook("decoder")),
              model.decoder_norm.register_forward_hook(hook("diffusion"))]
        mask = torch.ones(len(tokens), L)
        mask[:, : L // 2] = 0
        model.forward_z(tokens, mask, labels, L - L // 2)
        for h in hs:
            h.remove()
        # an unknown position's decoder input is mask_token + its position: the position is all that
        # tells the unknown positions apart, so its norm is compared with the mask token's too
        embs = {"encoder_pos": (model.encoder_pos_embed_learned[0, b:], content),
                "decoder_pos": (model.decoder_pos_embed_learned[0, b:], seen["decoder"]),
                "diffusion_pos": (model.diffusion_pos_embed_learned[0], seen["diffusion"])}
    else:
        embs = {"pos": (model.pos_embed_learned[0], content), "target_pos": (model.target_pos_embed_learned[0], content)}
    out = {}
    for name, (e, ref) in embs.items():
        curve, corr = similarity_by_distance(e)
        norm = e.norm(dim=-1).mean().item()
        out[name] = dict(norm=norm, content_norm=ref, ratio=norm / ref, corr=corr, curve=curve)
    if isinstance(model, mar.MAR):
        out["decoder_pos"]["mask_token_norm"] = model.mask_token.norm().item()
    return out


# ------------------------------------------------------------------------------------------------
# Attention on grid neighbours
# ------------------------------------------------------------------------------------------------
def attention_probs(attn, x, causal):
    """The (B, H, L, L) attention probabilities of an Attention module on its input x (B, L, D)."""
    B, L, D = x.shape
    q, k, _ = attn.qkv(x).view(B, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(D // attn.num_heads)
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(dim=-1)


@torch.no_grad()
def attention_lift(model, tokens, labels, known, seed=0):
    """[lift per layer] at `known` tokens known. For each predicted token (a query) with at least one
    known 8-neighbour: mass = its attention (mean over heads) on the keys holding those neighbours,
    uniform = their count / the number of keys it attends; lift = mean(mass) / mean(uniform)."""
    B, L, _ = tokens.shape
    near = (grid_distance(L) < 1.5) & ~torch.eye(L, dtype=torch.bool)             # (L, L) 8-neighbours
    g = torch.Generator().manual_seed(seed * 1_000_003 + known)
    captured = []
    is_mar = isinstance(model, mar.MAR)
    blocks = model.decoder_blocks if is_mar else model.blocks
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0]))) for blk in blocks]
    if is_mar:
        order = torch.rand(B, L, generator=g).argsort(dim=1)
        mask = torch.ones(B, L).scatter_(1, order[:, :known], 0.0)
        model.forward_z(tokens, mask, labels, L - known)
        # queries: the masked positions (after the buffer); key buffer + j holds position j
        query_pos, query_row = order[:, known:], order[:, known:] + model.buffer_size
        key_pos, key_known, first_key, n_keys = torch.arange(L).expand(B, -1), mask == 0, model.buffer_size, model.buffer_size + L
    else:
        orders = model.generation_order(B, tokens.device, g)
        model.forward_z(tokens, labels, orders)
        # query slot `known` predicts token orders[:, known]; key slot j >= 1 holds token orders[:, j - 1]
        query_pos, query_row = orders[:, known:known + 1], torch.full((B, 1), known)
        key_pos = torch.cat([orders[:, :1], orders[:, :-1]], 1)                   # slot 0 (the class): masked out below
        key_known = (torch.arange(L) >= 1) & (torch.arange(L) <= known)
        key_known, first_key, n_keys = key_known.expand(B, -1), 0, known + 1
    for h in hooks:
        h.remove()
    hit = near[query_pos[..., None], key_pos[:, None, :]] & key_known[:, None, :]  # (B, Q, L)
    ok = hit.any(-1)
    uniform = (hit.sum(-1).double() / n_keys)[ok]
    lifts = []
    for attn, x in captured:
        p = attention_probs(attn, x, causal=not is_mar).mean(1)                    # (B, Lq, Lk) heads averaged
        p = p.gather(1, query_row[..., None].expand(-1, -1, p.shape[-1]))[..., first_key:first_key + L]
        lifts.append(float((p * hit).sum(-1)[ok].double().mean() / uniform.mean()))
    return lifts


# ------------------------------------------------------------------------------------------------
# Bookkeeping (the JSONL is the only state), plots and the table
# ------------------------------------------------------------------------------------------------
def read_records(path):
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def test_tokens(args, tokenizer):
    """The first --num images of a class-balanced order of the test set (lab.balanced_subset) as tokens."""
    test = tk.load_fashion_mnist(args.data_path or tk.FASHION_MNIST_DIR, "test")
    idx = lab.balanced_subset(test.labels, args.num, args.seed)
    x = torch.from_numpy(test.images[idx].numpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    return tokenizer.encode(x), test.labels[idx].long()


def measure(args, label, path):
    """Every diagnostic of one checkpoint that the JSONL does not have yet at these settings."""
    model, ckpt = mar.load_checkpoint(path, args.key)
    key = dict(model=label, **lab.checkpoint_key(model, ckpt), weights=args.key, num=args.num, seed=args.seed)
    setting = {"known": {} if isinstance(model, mar.MAR) else dict(ar_repeats=args.ar_repeats), "pos": {},
               "attention": dict(attn_known=args.attn_known)}
    have = read_records(args.out)
    todo = [k for k in args.kinds if not [r for r in have if r["kind"] == k and
                                          all(r.get(a) == b for a, b in {**key, **setting[k]}.items())]]
    if not todo:
        return
    tokens, labels = test_tokens(args, tk.build_tokenizer(ckpt["tokenizer"]))
    for kind in todo:
        if kind == "known":
            out = dict(draws=args.draws, loss=loss_vs_known(model, tokens, labels, args.seed, args.draws,
                                                            ar_repeats=args.ar_repeats))
        elif kind == "pos":
            out = dict(embeddings=pos_embed_report(model, tokens[:200], labels[:200]))
        else:
            out = dict(lift={k: attention_lift(model, tokens[:200], labels[:200], k, args.seed) for k in args.attn_known})
        rec = dict(key, kind=kind, **setting[kind], ckpt=path, **out,
                   time=datetime.datetime.now().isoformat(timespec="seconds"))
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"diagnose: {label} ({ckpt['step']} steps): {kind} done", flush=True)


def latest(records, kind):
    """{model label: its latest record of `kind`} (records are in time order)."""
    return {r["model"]: r for r in records if r["kind"] == kind}


def write_report(args):
    records = read_records(args.out)
    known, pos, att = latest(records, "known"), latest(records, "pos"), latest(records, "attention")
    lines = [f"# Diagnostics (experiments/diagnose.py; {args.num} test images)", ""]
    if known:
        lab.line_plot(os.path.join(args.docs, "diagnose_known.png"),
                  [(m, [(k, v, "") for k, v in enumerate(r["loss"])]) for m, r in known.items()],
                  "Diffusion Loss of one unknown token given k known ones (test images)", "k known tokens",
                  "loss", data_ticks=False)
        ks = [k for k in (0, 1, 2, 4, 8, 14, 24, 36, 44, 48) if k < len(next(iter(known.values()))["loss"])]
        lines += ["Mean Diffusion Loss of one unknown token given k known ones (lower is better; "
                  "docs/diagnose_known.png):", "",
                  "| model (steps) | " + " | ".join(f"k={k}" for k in ks) + " | mean over k |",
                  "|---" * (len(ks) + 2) + "|"]
        for m, r in known.items():
            lines.append(f"| {m} ({r['train_steps']}) | " + " | ".join(f"{r['loss'][k]:.4f}" for k in ks)
                         + f" | {sum(r['loss']) / len(r['loss']):.4f} |")
        lines.append("")
    if pos:
        series = [(f"{m} {name}", [(d, s, "") for d, s in e["curve"]])
                  for m, r in pos.items() for name, e in r["embeddings"].items() if name in ("decoder_pos", "pos")]
        lab.line_plot(os.path.join(args.docs, "diagnose_pos.png"), series,
                  "Cosine similarity of two positions' embeddings vs their grid distance", "grid distance",
                  "mean cosine similarity", data_ticks=False)
        lines += ["Position embeddings (norm: mean over token positions; content: mean norm of what the embedding "
                  "is added to; corr: Pearson correlation of similarity and grid distance over all pairs, "
                  "-1 = perfectly organised; docs/diagnose_pos.png):", "",
                  "| model | embedding | norm | content norm | ratio | corr | sim at d=1 | sim at d=2 |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, r in pos.items():
            for name, e in r["embeddings"].items():
                c = dict(e["curve"])
                mask = f" (mask token {e['mask_token_norm']:.3f})" if "mask_token_norm" in e else ""
                lines.append(f"| {m} | {name} | {e['norm']:.3f} | {e['content_norm']:.3f}{mask} | {e['ratio']:.3f} | "
                             f"{e['corr']:.3f} | {c.get(1.0, float('nan')):.3f} | {c.get(2.0, float('nan')):.3f} |")
        lines.append("")
    if att:
        series = [(m, [(i, sum(v[i] for v in r["lift"].values()) / len(r["lift"]), "")
                       for i in range(len(next(iter(r["lift"].values()))))]) for m, r in att.items()]
        lab.line_plot(os.path.join(args.docs, "diagnose_attention.png"), series,
                  "Attention of a predicted token on its known 8-neighbours (lift over uniform)",
                  "layer of the stack that computes z", "lift (1 = uniform)")
        lines += ["Attention lift on known 8-neighbours per layer (MAR: decoder blocks; AR: causal blocks; "
                  "1 = no preference; docs/diagnose_attention.png):", "",
                  "| model | known | lift per layer |", "|---|---|---|"]
        for m, r in att.items():
            for k, v in r["lift"].items():
                lines.append(f"| {m} | {k} | {', '.join(f'{x:.2f}' for x in v)} |")
    with open(args.table, "w") as f:
        f.write("\n".join(lines) + "\n")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--runs_dir", default="runs", help="where table1.py's runs are (the default checkpoints)")
    a("--ckpt", action="append", default=[], metavar="LABEL=PATH",
      help="a checkpoint to diagnose (repeatable); default: Table 1's Diffusion Loss runs in --runs_dir")
    a("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    a("--key", default="model_ema", choices=("model_ema", "model"), help="EMA weights (sampling's) or raw")
    a("--num", type=int, default=500, help="test images")
    a("--draws", type=int, default=4, help="(t, noise) draws per token for the loss")
    a("--ar_repeats", type=int, default=8, help="AR: passes over the images (new orders / draws) for the loss")
    a("--attn_known", default="8,24,40", help="known-token counts of the attention diagnostic")
    a("--seed", type=int, default=0)
    a("--data_path", default=None, help=f"Fashion-MNIST idx directory (default {tk.FASHION_MNIST_DIR})")
    a("--out", default=os.path.join(ROOT, "experiments", "diagnose.jsonl"))
    a("--table", default=os.path.join(ROOT, "experiments", "diagnose.md"))
    a("--docs", default=os.path.join(ROOT, "docs"), help="where the PNGs go")
    a("--plots-only", dest="plots_only", action="store_true", help="only the PNGs and Markdown from --out")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not set(args.kinds) <= set(KINDS):
        raise ValueError(f"--kinds {args.kinds}: valid are {', '.join(KINDS)}")
    args.attn_known = [int(k) for k in args.attn_known.split(",") if k]
    ckpts = {}
    for item in args.ckpt:
        label, sep, path = item.partition("=")
        if not sep or not label:
            raise ValueError(f"--ckpt {item!r}: write LABEL=PATH, e.g. --ckpt MAR=runs/t1_mar_tiny_diffusion/checkpoint-last.pth")
        ckpts[label] = path
    if not args.ckpt:
        ckpts = {m: os.path.join(args.runs_dir, d, "checkpoint-last.pth") for m, d in TABLE1_RUNS.items()}
        ckpts = {m: p for m, p in ckpts.items() if os.path.exists(p)}
    missing = [p for p in ckpts.values() if not os.path.isfile(p)]
    if missing or not (ckpts or args.plots_only):
        raise FileNotFoundError(f"no checkpoint at {missing or args.runs_dir}: pass --ckpt LABEL=PATH or the "
                                "--runs_dir of experiments/table1.py's runs")
    args.ckpts = ckpts
    return args


def main(argv=None):
    args = get_args(argv)
    if not args.plots_only:
        for label, path in args.ckpts.items():
            measure(args, label, path)
    write_report(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"diagnose.py: error: {e}")
