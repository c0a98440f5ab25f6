"""
experiments/scarce.py -- does MAR overtake AR when data is scarce? The paper's ordering (MAR < AR random
order < AR raster in FID, its Table 1) was measured after 400-800 epochs of ImageNet, every image seen
hundreds of times. On full Fashion-MNIST, up to 16 epochs, AR raster leads (experiments/curve.py). In
language modelling a left-to-right model overfits once the same data is repeated many times while a
masked model keeps improving (Prabhudesai et al. 2025, "Diffusion Beats Autoregressive in
Data-Constrained Settings"). This trains the three models on small subsets for the compute of the
full-data curve's 16 epochs and compares them where they can be compared exactly: held-out bits/dim.

Run (from the repository root; finished points are skipped, a stopped run resumes from its last
checkpoint; two shells with OMP_NUM_THREADS=1 share the runs and points through lock files):
  python experiments/scarce.py --runs_dir runs                       # every size, model and stage
  python experiments/scarce.py --runs_dir runs --sizes 1000 --models MAR
  python experiments/scarce.py --table-only                          # Markdown and PNG from the JSONL
Outputs: experiments/scarce.jsonl (one JSON object per measurement), experiments/scarce.md,
docs/scarce.png; RUNS_DIR/scarce_* (subset files, checkpoints at every stage).

Protocol (every choice):
  * Data: class-balanced, seeded subsets of the 60,000 Fashion-MNIST training images (--sizes; a subset is
    a prefix of one balanced order, so the smaller sets are inside the larger ones). The last --num_val
    images of that order, never in a subset, are the validation split.
  * Models (MODELS): AR raster, AR random order and MAR with the small-data recipe's mask law and position
    init (--mask_ratio_law uniform --pos_embed_init sincos). Every one gets dropout 0.1 (the released
    code's) and otherwise Table 1's protocol (table1.COMMON: mar_tiny / ar_tiny, 4x4 pixel patches, the
    Diffusion Loss, batch 64, lr 1e-3 constant after a warmup of Table 1's 188 steps, EMA, seed 0), and
    --precision (bf16: experiments/precision.py found no FID cost on this CPU).
  * Length: STEPS = 15,000 steps of 64, the full-data curve's 16 epochs (320 epochs of 3,000 images),
    whatever the size; checkpoints at every doubling: STEPS/16, /8, /4, /2 and STEPS. With a constant lr
    the stages are one run (--epochs only says where it stops).
  * Bits per dimension: every model is an autoregressive factorisation of the same density of 8-bit
    images given their class, AR raster in raster order, AR random order and MAR (one token per step)
    in a random order. -log2 p(x | y) <= the sum over the 49 tokens, in the model's order, of the
    Diffusion Loss's variational bound (DiffLoss.bound_bits: its prior term, the KL terms of t = 1..999
    by stratified Monte Carlo with --strata bins, the discretised decoder at t = 0), divided by the
    784 pixels. Random-order models average --orders random orders per image. Reported on --num_bpd
    class-balanced test images, as many of the model's own training images (all of them below that)
    and the validation split, with two standard errors: over the images, and of the Monte Carlo alone.
    EMA weights, no CFG (the model's own conditional density), the true class label.
  * Samples: FID of --num_fid (1,000) class-balanced samples against the 10,000 test images at every
    checkpoint, at one CFG scale and temperature per model and size, chosen once at the checkpoint of
    STEPS / 4 (SWEEP_STAGE) by FID of --num_sweep samples against the validation split (never the test
    set): --cfg_grid at temperature 1.0, then --temperature_grid at the chosen scale. The same setting at
    every checkpoint, so that the curve measures the model, not a re-tuned sampler. Table 1's sampler
    otherwise: EMA weights, linear CFG, 100 diffusion steps, MAR 16 steps (--mar_steps), AR 49.
  * Copies: FID against the test set rewards copies of training images, so each FID also reports the
    copy rate: the fraction of samples whose nearest training image (pixel L2, the model's own subset)
    is nearer than the 1st percentile of the 10,000 test images' nearest-training distances (a sampler
    of the test distribution scores 1%), and the median nearest-training distance beside the test
    images' median.
  * Model selection as a user would do it: each run's checkpoint with the lowest validation bits/dim,
    then its FID of --num_final (5,000) samples against the test set and its copy rate.
"""
import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import fid  # noqa: E402
import lab  # noqa: E402
import mar  # noqa: E402
import table1  # noqa: E402
import tokenizer as tk  # noqa: E402
from sample import PRECISIONS, autocast  # noqa: E402

# label -> (model, generation order (AR) or None (MAR), more train.py flags)
MODELS = {
    "AR raster": ("ar_tiny", "raster", ()),
    "AR random": ("ar_tiny", "random", ()),
    "MAR": ("mar_tiny", None, ("--mask_ratio_law", "uniform", "--pos_embed_init", "sincos")),
}
STEPS = 15_000          # the full-data curve's 16 epochs: 16 * 60,000 / 64
STAGES = 5              # checkpoints at STEPS / 16, / 8, / 4, / 2, STEPS
SWEEP_STAGE = 2         # the sampler's setting is chosen at STEPS / 4
DROPOUT = "0.1"         # the released code's, for every model
WARMUP_IMAGES = 12_000  # Table 1's warmup: 0.2 epochs of 60,000 images (188 steps of 64)


# ------------------------------------------------------------------------------------------------
# Data: nested class-balanced subsets and a validation split outside all of them
# ------------------------------------------------------------------------------------------------
def balanced_order(labels, seed):
    """A class-balanced order of the whole set (as many images of each class as the rarest class has):
    subsets are its prefixes, the validation split its tail."""
    per_class = int(torch.bincount(labels).min())
    return lab.balanced_subset(labels, per_class * int(labels.max() + 1), seed)


def check_sizes(sizes, n_order, num_val):
    if num_val < 1 or any(n < 1 or n > n_order - num_val for n in sizes):
        raise ValueError(f"--sizes must be in 1..{n_order - num_val} (the balanced order holds {n_order} "
                         f"training images, the last --num_val {num_val} are the validation split), got {sizes}")


def subset_file(args, order, n):
    """RUNS_DIR/scarce_data/subset<n>_seed<s>.npz, train.py --data array's input (written once)."""
    path = os.path.join(args.runs_dir, "scarce_data", f"subset{n}_seed{args.seed}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def make():
        idx = order[:n]
        np.savez(path + ".tmp.npz", images=lab.uint8_images(args.train_set, idx),
                 labels=args.train_set.labels[idx].numpy())
        os.replace(path + ".tmp.npz", path)
    lab.once(path, make)
    return path


# ------------------------------------------------------------------------------------------------
# Training: one run per (size, model), in stages at doubling lengths
# ------------------------------------------------------------------------------------------------
def stage_steps(stage):
    return STEPS >> (STAGES - 1 - stage)            # 937 (STEPS/16 rounded down), 1875, 3750, 7500, 15000


def run_dir(args, n, label):
    return os.path.join(args.runs_dir, f"scarce_n{n}_{label.lower().replace(' ', '_')}_{args.precision}")


def snapshot(run, steps):
    return os.path.join(run, f"checkpoint-step{steps:05d}.pth")


def train_argv(args, data_path, n, label, steps):
    """Table 1's train.py arguments with this experiment's data, length, dropout and precision (argparse
    keeps the last of a repeated flag). The warmup is Table 1's in images, so the same 188 steps."""
    model, order, flags = MODELS[label]
    argv = table1.COMMON + ["--data", "array", "--data_path", data_path, "--model", model, "--head", "diffusion",
                            "--dropout", DROPOUT, "--precision", args.precision,
                            "--epochs", repr(steps * 64 / n), "--warmup_epochs", repr(WARMUP_IMAGES / n)]
    return argv + (["--order", order] if order else []) + list(flags) + \
        (["--max_steps", str(args.max_steps)] if args.max_steps else [])


def train_stage(args, data_path, n, label, stage):
    """The checkpoint of (n, label) at `stage` (training or resuming as needed), or None while another
    process trains the run. A run's stages are trained in order by the process holding its lock."""
    run, steps = run_dir(args, n, label), stage_steps(stage)
    snap = snapshot(run, min(steps, args.max_steps or steps))
    if os.path.exists(snap):
        return snap
    if stage > 0 and not os.path.exists(snapshot(run, min(stage_steps(stage - 1), args.max_steps or STEPS))):
        return None                                 # the earlier stage first
    if not lab.take_lock(run + ".stages.lock"):
        return None
    try:
        path = lab.ensure_trained(run, train_argv(args, data_path, n, label, steps), n)
        if path is None:
            return None
        have = tk.torch_load(path)["step"]
        if have != min(steps, args.max_steps or steps):
            raise RuntimeError(f"{run} stopped at step {have}, not {steps}: a stage was skipped; remove the run")
        shutil.copy2(path, snap + ".tmp")
        os.replace(snap + ".tmp", snap)
        return snap
    finally:
        lab.release_lock(run + ".stages.lock")


# ------------------------------------------------------------------------------------------------
# Bits per dimension: the chain rule over each model's order, the Diffusion Loss's bound per token
# ------------------------------------------------------------------------------------------------
def take(x, index):
    """x (B, L, D) rows picked per image: index (B, K) -> (B, K, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def chain_z(model, tokens, labels, orders):
    """The model's condition for each token when the tokens are drawn one at a time in `orders` (B, L):
    z[:, k] is computed from the label and tokens orders[:, :k] only (the chain rule's k-th factor).
    tokens (B, L, C) -> z (B, L, D), in generation order."""
    B, L, _ = tokens.shape
    if isinstance(model, mar.AR):
        return model.forward_z(tokens, labels, orders)                     # causal: one pass
    # MAR one token per step: at step k the tokens orders[:, :k] are known and orders[:, k] is drawn
    # from its z, as MAR's sampler does with num_iter = L (every unknown token gets a z; one is used).
    z = []
    for k in range(L):
        mask = torch.zeros(B, L, device=tokens.device).scatter_(1, orders[:, k:], 1.0)
        z.append(take(model.forward_z(tokens, mask, labels, num_masked=L - k), orders[:, k:k + 1]))
    return torch.cat(z, dim=1)


@torch.no_grad()
def image_bits(model, tokens, labels, orders, strata, generator):
    """Bound on -log2 p(image | label) / pixels for each image, and the variance of its Monte Carlo
    estimate: tokens (B, L, C) in [-1, 1], labels (B,), orders (B, L) the order in which the model
    predicts the tokens (AR raster: 0..L-1). -> (bits per dimension (B,), variance (B,))."""
    B, L, C = tokens.shape
    z = chain_z(model, tokens, labels, orders)
    bits, var = model.diffloss.bound_bits(take(tokens, orders).reshape(B * L, C), z.reshape(B * L, -1).float(),
                                          strata, generator)
    return bits.view(B, L).mean(dim=1), var.view(B, L).sum(dim=1) / L ** 2   # per pixel: tokens hold C each


def bits_per_dim(model, tokenizer, images, labels, args, seed):
    """Mean bits/dim of uint8 images (n, S, S, 1) -> (mean, standard error over the images, standard
    error of the Monte Carlo alone). Random-order models average args.orders orders per image."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    random_order = not (isinstance(model, mar.AR) and model.order == "raster")
    orders_per_image = args.orders if random_order else 1
    per_image, mc_var = [], []
    for start in range(0, len(images), args.bpd_batch):
        x = torch.from_numpy(images[start:start + args.bpd_batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.as_tensor(labels[start:start + args.bpd_batch])
        tokens = tokenizer.encode(x)
        b, v = 0, 0
        for _ in range(orders_per_image):
            orders = (torch.rand(len(x), model.seq_len, generator=g).argsort(dim=1) if random_order
                      else torch.arange(model.seq_len).expand(len(x), -1))
            with autocast(tokens.device, args.precision):
                bits, var = image_bits(model, tokens, y, orders, args.strata, g)
            b, v = b + bits / orders_per_image, v + var / orders_per_image ** 2
        per_image.append(b)
        mc_var.append(v)
    per_image, mc_var = torch.cat(per_image).double(), torch.cat(mc_var).double()
    n = len(per_image)
    image_se = per_image.std().item() / n ** 0.5 if n > 1 else float("nan")
    return per_image.mean().item(), image_se, mc_var.sum().sqrt().item() / n


def eval_sets(args, order, n):
    """name -> (uint8 images, labels) of the sets bits/dim is measured on."""
    train_idx = order[:min(n, args.num_bpd)]
    val_idx = order[len(order) - args.num_val:][:args.num_bpd]
    test_idx = lab.balanced_subset(args.test_set.labels, min(args.num_bpd, len(args.test_set)), args.seed)
    images = lambda ds, idx: (lab.uint8_images(ds, idx), ds.labels[idx].numpy())
    return {"test": images(args.test_set, test_idx), "train": images(args.train_set, train_idx),
            "val": images(args.train_set, val_idx)}


def measure_bpd(args, order, n, label, stage, path):
    model, ckpt = mar.load_checkpoint(path)
    tokenizer = tk.build_tokenizer(ckpt["tokenizer"])
    for name, (images, labels) in eval_sets(args, order, n).items():
        point = dict(kind="bpd", size=n, model=label, set=name, n=len(images), strata=args.strata, orders=args.orders,
                     seed=args.seed, precision=args.precision, **lab.checkpoint_key(model, ckpt))
        with lab.claim(args, **point) as mine:
            if mine:
                t0 = time.time()
                bpd, image_se, mc_se = bits_per_dim(model, tokenizer, images, labels, args, seed=args.seed)
                seconds = round(time.time() - t0, 1)
                lab.append_record(args.out, dict(point, stage=stage, epochs=round(ckpt["step"] * 64 / n, 2),
                                                 bpd=bpd, image_se=image_se, mc_se=mc_se, seconds=seconds,
                                                 threads=torch.get_num_threads()), who="scarce")
                write_report(args)


# ------------------------------------------------------------------------------------------------
# Samples: the sampler's setting from a sweep on the validation split; FID and copies per checkpoint
# ------------------------------------------------------------------------------------------------
def nearest_distances(queries, references, chunk=500):
    """Pixel L2 distance (0..255 units) of each uint8 image in `queries` to its nearest in `references`."""
    ref = torch.from_numpy(references).reshape(len(references), -1).float()
    out = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[start:start + chunk]).reshape(-1, ref.shape[1]).float()
        out.append(torch.cdist(q, ref).min(dim=1).values)
    return torch.cat(out).numpy()


def copy_stats(samples, train_images, test_nearest):
    """Copy rate (fraction of samples nearer to a training image than the 1st percentile of the test
    images' nearest-training distances), the samples' and the test images' median nearest distance."""
    d = nearest_distances(samples, train_images)
    return dict(copy_rate=float((d < np.percentile(test_nearest, 1)).mean()), median_nearest=float(np.median(d)),
                test_median_nearest=float(np.median(test_nearest)))


class Samples:
    """FID and copies of one run's checkpoints: the Evaluator (cached reference features), the run's own
    training images, the test images' nearest-training distances, the validation split's statistics."""

    def __init__(self, args, ev, order, n):
        self.args, self.ev, self.n = args, ev, n
        self.train_images = lab.uint8_images(args.train_set, order[:n])
        everything = lab.uint8_images(args.test_set, torch.arange(len(args.test_set)))
        self.test_nearest = nearest_distances(everything, self.train_images)
        val = order[len(order) - args.num_val:]
        feats = lab.cached_features(args, f"scarce_val{args.num_val}_seed{args.seed}",
                                    lambda: lab.uint8_images(args.train_set, val), ev.inception)
        self.val_ref = lab.stats(feats)

    def draw(self, model, tokenizer, num, cfg, temperature):
        num_iter = self.args.mar_steps if isinstance(model, mar.MAR) else None
        return self.ev.sample(model, tokenizer, num, num_iter, cfg, "linear", temperature)

    def val_fid(self, images):
        feats = fid.extract_features(self.ev.inception(), images, self.args.fid_batch)[0]
        return fid.frechet_distance(*lab.stats(feats), *self.val_ref)


def load(path, args):
    model, ckpt = mar.load_checkpoint(path)
    model.diffloss.set_sampling_steps(args.num_sampling_steps)
    return model.eval(), ckpt, tk.build_tokenizer(ckpt["tokenizer"])


def setting_key(args):
    """What a sample measurement depends on besides its checkpoint and setting."""
    return dict(seed=args.seed, precision=args.precision, num_sampling_steps=args.num_sampling_steps,
                mar_steps=args.mar_steps)


def sweep_choice(args, records, n, label):
    """(cfg, temperature) with the lowest FID against the validation split, or None while incomplete."""
    pts = {(r["cfg"], r["temperature"]): r["fid"] for r in lab.find(records, kind="sweep", size=n, model=label,
                                                                     n=args.num_sweep, **setting_key(args))}
    if not all((c, 1.0) in pts for c in args.cfg_grid):
        return None
    cfg = min(args.cfg_grid, key=lambda c: pts[c, 1.0])
    if not all((cfg, tau) in pts for tau in args.temperature_grid):
        return None
    return min([(cfg, 1.0)] + [(cfg, tau) for tau in args.temperature_grid], key=lambda p: pts[p])


def measure_sweep(args, samples, n, label, path):
    """The sweep at SWEEP_STAGE's checkpoint: the CFG scales at temperature 1.0, then the temperatures at
    the chosen scale; FID of --num_sweep samples against the validation split."""
    model, ckpt, tokenizer = load(path, args)
    key = lab.checkpoint_key(model, ckpt)

    def point(cfg, temperature):
        p = dict(kind="sweep", size=n, model=label, cfg=cfg, temperature=temperature, n=args.num_sweep,
                 **setting_key(args), **key)
        with lab.claim(args, **p) as mine:
            if mine:
                images, s_per_image = samples.draw(model, tokenizer, args.num_sweep, cfg, temperature)
                lab.append_record(args.out, dict(p, ref="val", fid=samples.val_fid(images),
                                                 s_per_image=round(s_per_image, 4)), who="scarce")
    for cfg in args.cfg_grid:
        point(cfg, 1.0)
    records = lab.find(lab.read_records(args.out), kind="sweep", size=n, model=label, **setting_key(args))
    if all(any(r["cfg"] == c and r["temperature"] == 1.0 for r in records) for c in args.cfg_grid):
        pts = {r["cfg"]: r["fid"] for r in records if r["temperature"] == 1.0 and r["n"] == args.num_sweep}
        for tau in args.temperature_grid:
            point(min(args.cfg_grid, key=lambda c: pts[c]), tau)


def measure_samples(args, samples, n, label, stage, path, kind, num):
    """FID of `num` samples against the test set and the copy statistics, at the sweep's choice."""
    choice = sweep_choice(args, lab.read_records(args.out), n, label)
    if choice is None:
        return False
    model, ckpt, tokenizer = load(path, args)
    p = dict(kind=kind, size=n, model=label, cfg=choice[0], temperature=choice[1], n=num, **setting_key(args),
             **lab.checkpoint_key(model, ckpt))
    with lab.claim(args, **p) as mine:
        if mine:
            images, s_per_image = samples.draw(model, tokenizer, num, *choice)
            lab.append_record(args.out, dict(p, stage=stage, epochs=round(ckpt["step"] * 64 / n, 2), ref="test",
                                             fid=samples.ev.fid(images, "test"), s_per_image=round(s_per_image, 4),
                                             **copy_stats(images, samples.train_images, samples.test_nearest)),
                              who="scarce")
            write_report(args)
    return True


def checkpoints(args):
    """The distinct checkpoint steps of a run (the stages coincide under --max_steps)."""
    return sorted({min(stage_steps(s), args.max_steps or STEPS) for s in range(STAGES)})


def bpd_records(args, records, **match):
    return lab.find(records, kind="bpd", strata=args.strata, orders=args.orders, seed=args.seed,
                    precision=args.precision, **match)


def best_steps(args, records, n, label):
    """The checkpoint (its step) with the lowest validation bits/dim, or None until every one has one."""
    val = {r["train_steps"]: r["bpd"] for r in bpd_records(args, records, size=n, model=label, set="val")}
    steps = checkpoints(args)
    return min(steps, key=lambda s: val[s]) if all(s in val for s in steps) else None


# ------------------------------------------------------------------------------------------------
# The report, from the JSONL only
# ------------------------------------------------------------------------------------------------
def write_report(args):
    """scarce.md (the bits/dim table, FID and copies per checkpoint, the selected checkpoints, the sweeps)
    and, with --docs, docs/scarce.png, from the JSONL alone."""
    records = lab.read_records(args.out)
    bpd = bpd_records(args, records)
    samples = [r for r in lab.find(records, **setting_key(args)) if r["kind"] in ("fid", "final", "sweep")]
    sizes = sorted({r["size"] for r in bpd + samples})
    lines = [f"Bits per dimension: a bound on -log2 p(x | class) / 784 (lower is better), on {args.num_bpd} "
             f"class-balanced images of each set (train: the run's own subset); {args.strata} strata over t, "
             f"{args.orders} orders per image for the random-order models; {args.precision}. FID: "
             f"{args.num_fid} samples vs the 10,000 test images at the sweep's setting (CFG scale, temperature); "
             "copies: the fraction of samples nearer to a training image than the 1st percentile of the test "
             "images' nearest-training distances (1% for the test set itself). Standard errors in the JSONL.", ""]
    for n in sizes:
        lines += [f"### {n} training images", "",
                  "| model | steps | epochs | bits/dim test | train | val | gap (test - train) | FID (setting) "
                  "| copies |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label in MODELS:
            fids = {r["train_steps"]: r for r in lab.find(samples, kind="fid", size=n, model=label, n=args.num_fid)}
            mine = bpd_records(args, bpd, size=n, model=label)
            for steps in sorted({r["train_steps"] for r in mine} | set(fids)):
                cell = {r["set"]: r["bpd"] for r in mine if r["train_steps"] == steps}         # the latest
                get = cell.get
                gap = get("test") - get("train") if "test" in cell and "train" in cell else None
                f = fids.get(steps)
                epochs = steps * 64 / n
                lines.append(f"| {label} | {steps} | {epochs:.0f} | {lab.fmt(get('test'), 4)} | "
                             f"{lab.fmt(get('train'), 4)} | {lab.fmt(get('val'), 4)} | {lab.fmt(gap, 4)} | "
                             + ("- | - |" if f is None else f"{f['fid']:.2f} ({f['cfg']:g}, {f['temperature']:g}) | "
                                                            f"{100 * f['copy_rate']:.1f}% |"))
        lines.append("")
        finals = [(label, r) for label in MODELS
                  for r in lab.find(samples, kind="final", size=n, model=label, n=args.num_final)[-1:]]
        if finals:
            lines += [f"Selected by validation bits/dim, FID of {args.num_final} samples vs test:", "",
                      "| model | steps | epochs | FID (setting) | copies | median nearest-training distance |",
                      "|---|---|---|---|---|---|"]
            for label, r in finals:
                lines.append(f"| {label} | {r['train_steps']} | {r['train_steps'] * 64 / n:.0f} | {r['fid']:.2f} "
                             f"({r['cfg']:g}, {r['temperature']:g}) | {100 * r['copy_rate']:.1f}% | "
                             f"{r['median_nearest']:.0f} (test images: {r['test_median_nearest']:.0f}) |")
            lines.append("")
        sweeps = [(label, lab.find(samples, kind="sweep", size=n, model=label, n=args.num_sweep)) for label in MODELS]
        if any(pts for _, pts in sweeps):
            lines.append(f"Sweeps (FID of {args.num_sweep} samples vs the {args.num_val} validation images, "
                         "(CFG scale, temperature): FID):")
            for label, pts in sweeps:
                if pts:
                    lines.append(f"- {label}, step {pts[0]['train_steps']}: " + ", ".join(
                        f"({r['cfg']:g}, {r['temperature']:g}): {r['fid']:.2f}" for r in pts))
            lines.append("")
    tmp = f"{args.table}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.table)
    if args.docs:
        plot(args, bpd, samples, sizes)


def plot(args, bpd, samples, sizes):
    """docs/scarce.png: per subset size (a column), bits/dim (test solid, train dashed in the legend's
    words) and FID against epochs, one line per model."""
    from PIL import Image
    panels = []
    for n in sizes:
        column = []
        series = []
        for label, color in zip(MODELS, ("#1f77b4", "#2ca02c", "#d62728")):      # a color per model
            for s, word in (("test", "held-out"), ("train", "train")):                # train: dashed
                pts = sorted((round(r["train_steps"] * 64 / n), r["bpd"], "")
                             for r in bpd_records(args, bpd, size=n, model=label, set=s))
                if pts:
                    series.append((f"{label}, {word}", pts, {"color": color, "dashed": s == "train"}))
        if series:
            path = os.path.join(args.docs, f".scarce_bpd_{n}.png")
            lab.line_plot(path, series, f"{n} training images: bits/dim", "epochs", "bits / dim", logx=True)
            column.append(path)
        series = [(label, sorted((round(r["train_steps"] * 64 / n), r["fid"], "") for r in
                                 lab.find(samples, kind="fid", size=n, model=label, n=args.num_fid)),
                   {"color": color}) for label, color in zip(MODELS, ("#1f77b4", "#2ca02c", "#d62728"))]
        series = [s for s in series if s[1]]
        if series:
            path = os.path.join(args.docs, f".scarce_fid_{n}.png")
            lab.line_plot(path, series, f"{n} training images: FID (N = {args.num_fid} vs test)", "epochs", "FID",
                          logx=True)
            column.append(path)
        if column:
            panels.append(column)
    if not panels:
        return
    images = [[Image.open(p) for p in column] for column in panels]
    w, h = images[0][0].size
    out = Image.new("RGB", (w * len(images), h * max(len(c) for c in images)), "white")
    for i, column in enumerate(images):
        for j, img in enumerate(column):
            out.paste(img, (i * w, j * h))
    out.save(os.path.join(args.docs, "scarce.png"))
    for column in panels:
        for p in column:
            os.remove(p)


# ------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    ints = lambda s: [int(x) for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in s.split(",") if x]
    a("--sizes", type=ints, default="1000,3000", help="training-subset sizes")
    a("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    a("--runs_dir", default="runs", help="subsets, training runs (scarce_*) and the cache")
    a("--out", default=os.path.join(ROOT, "experiments", "scarce.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "scarce.md"), help="the Markdown report")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--parts", default="train,bpd,samples",
      help="what this process does (comma-separated): train (the runs), bpd, samples (sweeps, FID, copies)")
    a("--docs", default=os.path.join(ROOT, "docs"), help="where scarce.png goes; empty: no plot")
    a("--data_path", default=None, help=f"Fashion-MNIST idx directory (default {tk.FASHION_MNIST_DIR})")
    a("--num_val", type=int, default=1000, help="validation split: training images in no subset")
    a("--num_bpd", type=int, default=1000, help="images per bits/dim measurement (test, train, val)")
    a("--strata", type=int, default=25, help="Monte Carlo bins over the diffusion steps t = 1..999")
    a("--orders", type=int, default=2, help="random orders per image for the random-order models")
    a("--bpd_batch", type=int, default=50, help="images per bits/dim batch")
    a("--inception", default=os.path.join(ROOT, "..", "shared", "weights", "inception_fid_no_fc.pth"),
      help="FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or the fc-less file)")
    a("--num_fid", type=int, default=1000, help="samples per checkpoint's FID")
    a("--num_final", type=int, default=5000, help="samples of the selected checkpoint's FID")
    a("--num_sweep", type=int, default=1000, help="samples per sweep point (vs the validation split)")
    a("--cfg_grid", type=floats, default="2,3,4,6", help="CFG scales of the sweep (at temperature 1.0)")
    a("--temperature_grid", type=floats, default="0.8", help="temperatures tried at the chosen scale")
    a("--mar_steps", type=int, default=16, help="MAR's generation steps (Table 1's 'MAR default')")
    a("--num_sampling_steps", type=int, default=100, help="diffusion steps per token (paper: 100)")
    a("--batch", type=int, default=250, help="images per generation batch")
    a("--fid_batch", type=int, default=50, help="images per Inception batch")
    a("--seed", type=int, default=0, help="subset and measurement seed")
    a("--precision", choices=PRECISIONS[1:], default="bf16", help="training and measurement precision")
    a("--max_steps", type=int, default=None, help="cap every run (smoke tests only: not the protocol)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown --models {bad}; valid: {', '.join(MODELS)}")
    if min(args.num_bpd, args.strata, args.orders, args.bpd_batch) < 1 or args.strata > 999:
        raise ValueError("--num_bpd, --orders, --bpd_batch must be >= 1 and --strata in 1..999")
    if min(args.num_fid, args.num_final, args.num_sweep) < 2 or not args.cfg_grid or 1.0 in args.temperature_grid:
        raise ValueError("--num_fid, --num_final, --num_sweep must be >= 2, --cfg_grid not empty, and "
                         "--temperature_grid without 1.0 (the CFG sweep's own points)")
    args.parts = set(args.parts.split(","))
    if not args.parts or args.parts - {"train", "bpd", "samples"}:
        raise ValueError(f"--parts: comma-separated from train, bpd, samples; got {','.join(args.parts)!r}")
    return args


def main(argv=None, inception=None):
    """inception: a feature network to use instead of --inception (the tests' stand-in)."""
    args = get_args(argv)
    args.inception_net = inception
    if args.table_only:
        write_report(args)
        print(open(args.table).read())
        return
    path = args.data_path or tk.FASHION_MNIST_DIR
    args.train_set, args.test_set = tk.load_fashion_mnist(path, "train"), tk.load_fashion_mnist(path, "test")
    order = balanced_order(args.train_set.labels, args.seed)
    check_sizes(args.sizes, len(order), args.num_val)
    if "samples" in args.parts and inception is None:
        lab.check_inception(args.inception)             # now, not after hours of training
    data = {n: subset_file(args, order, n) for n in args.sizes}
    runs = [(n, label) for n in args.sizes for label in args.models]
    # Stage by stage: every run's first stage, then every run's second, ...: comparable curves early. The
    # sweeps come once their stage is trained, each checkpoint's FID once its run's sweep has chosen.
    todo = []
    for stage in range(STAGES):
        if args.parts & {"train", "bpd"}:
            todo += [("train", stage, n, label) for n, label in runs]
        if "samples" in args.parts:
            todo += [("sweep", SWEEP_STAGE, n, label) for n, label in runs] if stage == SWEEP_STAGE else []
            todo += [("fid", s, n, label) for n, label in runs for s in range(stage + 1)
                     if s == stage or stage == SWEEP_STAGE]
    todo += [("final", None, n, label) for n, label in runs] if "samples" in args.parts else []
    ev, samples = None, {}
    while todo:
        done = 0
        for job in list(todo):
            kind, stage, n, label = job
            snap = snapshot(run_dir(args, n, label), min(stage_steps(stage), args.max_steps or STEPS)) \
                if stage is not None else None
            if kind == "train":
                snap = train_stage(args, data[n], n, label, stage) if "train" in args.parts else \
                    snap if os.path.exists(snap) else None
                if snap is None:
                    continue
                if "bpd" in args.parts:
                    measure_bpd(args, order, n, label, stage, snap)
            else:
                if kind == "final":
                    steps = best_steps(args, lab.read_records(args.out), n, label)
                    snap = steps and snapshot(run_dir(args, n, label), steps)
                if not snap or not os.path.exists(snap):
                    continue
                if ev is None:
                    ev = lab.Evaluator(args, args.inception_net)
                if n not in samples:
                    samples[n] = Samples(args, ev, order, n)
                if kind == "sweep":
                    measure_sweep(args, samples[n], n, label, snap)
                    if sweep_choice(args, lab.read_records(args.out), n, label) is None:
                        continue                                  # another process measures its last points
                elif not measure_samples(args, samples[n], n, label, stage, snap, kind,
                                         args.num_final if kind == "final" else args.num_fid):
                    continue                                      # the run's sweep is not complete yet
            todo.remove(job)
            done += 1
        if todo and not done:
            print(f"scarce: {len(todo)} jobs wait for runs or sweeps that another process does", flush=True)
            time.sleep(30)
    write_report(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"scarce.py: error: {e}")
