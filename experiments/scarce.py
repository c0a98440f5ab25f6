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
        os.remove(run + ".stages.lock")


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
# The report, from the JSONL only
# ------------------------------------------------------------------------------------------------
def write_report(args):
    records = [r for r in lab.read_records(args.out) if r.get("kind") == "bpd" and r["precision"] == args.precision
               and r["strata"] == args.strata and r["orders"] == args.orders and r["seed"] == args.seed]
    sizes = sorted({r["size"] for r in records})
    lines = [f"Bits per dimension (bound on -log2 p(x | class) / 784; lower is better) of {args.num_bpd} "
             f"class-balanced images; {args.strata} strata over t, {args.orders} orders per image for the "
             f"random-order models; {args.precision}. Standard errors in the JSONL.", ""]
    for n in sizes:
        mine = [r for r in records if r["size"] == n]
        lines += [f"### {n} training images", "",
                  "| model | steps | epochs | test | train | val | gap (test - train) |",
                  "|---|---|---|---|---|---|---|"]
        for label in MODELS:
            for steps in sorted({r["train_steps"] for r in mine if r["model"] == label}):
                cell = {r["set"]: r for r in mine if r["model"] == label and r["train_steps"] == steps}  # the latest
                get = lambda s: cell[s]["bpd"] if s in cell else None
                gap = get("test") - get("train") if get("test") is not None and get("train") is not None else None
                epochs = next(iter(cell.values()))["epochs"]
                lines.append(f"| {label} | {steps} | {epochs:g} | {lab.fmt(get('test'), 4)} | "
                             f"{lab.fmt(get('train'), 4)} | {lab.fmt(get('val'), 4)} | {lab.fmt(gap, 4)} |")
        lines.append("")
    tmp = f"{args.table}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.table)


# ------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    ints = lambda s: [int(x) for x in s.split(",") if x]
    a("--sizes", type=ints, default="1000,3000", help="training-subset sizes")
    a("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    a("--runs_dir", default="runs", help="subsets, training runs (scarce_*) and the cache")
    a("--out", default=os.path.join(ROOT, "experiments", "scarce.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "scarce.md"), help="the Markdown report")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--train_only", action="store_true", help="only the training runs")
    a("--data_path", default=None, help=f"Fashion-MNIST idx directory (default {tk.FASHION_MNIST_DIR})")
    a("--num_val", type=int, default=1000, help="validation split: training images in no subset")
    a("--num_bpd", type=int, default=1000, help="images per bits/dim measurement (test, train, val)")
    a("--strata", type=int, default=25, help="Monte Carlo bins over the diffusion steps t = 1..999")
    a("--orders", type=int, default=2, help="random orders per image for the random-order models")
    a("--bpd_batch", type=int, default=50, help="images per bits/dim batch")
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
    return args


def main(argv=None):
    args = get_args(argv)
    if args.table_only:
        write_report(args)
        print(open(args.table).read())
        return
    path = args.data_path or tk.FASHION_MNIST_DIR
    args.train_set, args.test_set = tk.load_fashion_mnist(path, "train"), tk.load_fashion_mnist(path, "test")
    order = balanced_order(args.train_set.labels, args.seed)
    check_sizes(args.sizes, len(order), args.num_val)
    data = {n: subset_file(args, order, n) for n in args.sizes}
    # Breadth first: every run's first stage, then every run's second, ...: comparable curves early.
    todo = [(stage, n, label) for stage in range(STAGES) for n in args.sizes for label in args.models]
    while todo:
        for job in list(todo):
            stage, n, label = job
            snap = train_stage(args, data[n], n, label, stage)
            if snap is None:
                continue
            if not args.train_only:
                measure_bpd(args, order, n, label, stage, snap)
            todo.remove(job)
        if todo:
            print(f"scarce: waiting for {len(todo)} stages that another process trains", flush=True)
            time.sleep(30)
    write_report(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"scarce.py: error: {e}")
