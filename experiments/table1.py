"""
experiments/table1.py -- the paper's Table 1 (Sec. 5.1, and the L2 row of App. D, "L2 Loss vs. Diff
Loss") at CPU scale on Fashion-MNIST: Diffusion Loss on continuous tokens vs cross-entropy on discrete
(VQ) tokens, for AR raster, AR random order, MAR one token per step and MAR several tokens per step;
plus a MAR with an L2 (MSE) head. Every training run is train.py; sampling is sample.py's `generate`;
FID is fid.py.

Run (from the repository root; everything finished is kept in the JSONL and skipped):
  python experiments/table1.py --runs_dir runs                        # the whole table, hours on 2 cores
  python experiments/table1.py --rows mar16_diffusion,mar16_ce,floor  # some rows (ROWS below)
  python experiments/table1.py --train_only                           # only the 10 training runs
  python experiments/table1.py --rows mar16_ce --no_cfg               # only the FID w/o CFG, for now
  python experiments/table1.py --table-only                           # Markdown from the JSONL
On a small CPU, one process per core with one thread each is the fastest: e.g. the same command in
two shells with OMP_NUM_THREADS=1. They share the work through lock files in RUNS_DIR: a training run,
a cached feature set (one process computes it, the other waits) and each measurement (a process skips
what another is measuring and takes the next one), and the JSONL (the table is rebuilt from the file).
Outputs: experiments/table1.jsonl (one JSON object per measurement), experiments/table1.md (the
table, regenerated from the JSONL after every measurement), RUNS_DIR/t1_* (checkpoints, train logs),
RUNS_DIR/t1_cache (codebook, Inception features of the reference images).

Protocol (every choice):
  * Data: Fashion-MNIST 28x28, the 60,000 training images for training, the 10,000 test images as the
    FID reference. No flips (--no-hflip: clothes are not all left-right symmetric in the data set).
  * Continuous tokens: 4x4 pixel patches -> 49 tokens of 16 values (KL-16's token width), exact
    round trip. Discrete tokens: the same patches snapped to the nearest of K = 1024 codes of a k-means
    codebook (tokenizer.VQTokenizer.fit: k-means++ init, 25 Lloyd steps, 200,000 training patches,
    seed 0), fitted once and shared by every CE run. K = 1024 was chosen by reconstruction of the 10k
    test images (MSE in [-1, 1] units / PSNR on [0, 1]): K=64 0.0434 / 19.65 dB, K=256 0.0284 /
    21.49 dB, K=1024 0.0201 / 22.99 dB (fits of 28 s, 54 s, 210 s on one busy core): the best of the
    three, at a cost (3.5 minutes, once) that does not matter.
  * Training: every run is train.py with exactly COMMON below (2 epochs = 1,875 steps of 64 images,
    lr 1e-3 = 4e-3 * 64/256, 0.2 epochs warmup, then constant; AdamW, EMA, seed 0) plus the model
    (mar_tiny, or ar_tiny with --order raster|random: the same Transformer size, 4 blocks of width
    128) and the head: --head diffusion (pixel tokens), --head ce --vq 1024 (VQ tokens), --head l2.
    The CE and L2 heads are an MLP of the Diffusion Loss MLP's width and depth (mar.TokenMLP). The two
    MAR rows of one loss share one trained model (they differ only at inference): 7 runs.
  * One row the paper does not have, "mar16_diffusion_mr0": the MAR Diffusion Loss run trained with the
    mask ratio min 0 (train.py --mask_ratio_min 0: N(1, 0.25) truncated to [0, 1], so only ~4% of its
    steps know more than 24 tokens) instead of the paper's [0.7, 1], an 8th run. The
    paper's range never shows the model more than 14 known tokens in training, while the 16-step
    generation predicts 34 of the 49 tokens with more known (15 to 45); the row measures what that
    costs at this scale.
  * A second one, "mar16_diffusion_recipe": MAR trained with the small-data recipe that
    experiments/recipe.py chose by FID against the training images (--mask_ratio_law uniform
    --pos_embed_init sincos --dropout 0: every known-token count covered in training, the grid's
    geometry in the position embeddings from step 0, no dropout), a 9th run.
  * A third, "ar_raster_diffusion_dropout0": AR raster with --dropout 0, the one part of that recipe
    that is not about MAR's masks or order, so that the recipe's MAR meets an AR given the same
    change (a 10th run).
  * Sampling: EMA weights, --precision (fp32; training too), batches of --batch (250) images, temperature 1.0, the linear CFG
    schedule (the paper's), 100 diffusion steps per token (the paper's), labels class-balanced
    (image i has class i % 10), batch b drawn from a generator seeded with (--seed, b) as sample.py.
    MAR: num_iter 49 ("one token per step") or 16 ("MAR default", ~3 tokens per step); AR: 49 steps.
  * CFG: each row is measured without CFG (cfg 1.0) and with the scale that gives the lowest FID in a
    sweep over --cfg_grid with --num_sweep (1,000) samples against the TRAINING-set reference (never
    the test set); the chosen scale is then evaluated at the full N (the sweeps are measured before
    the finals). A chosen scale at the edge of the grid is flagged in the table. A Diffusion Loss row
    then sweeps the temperature too, as the paper tunes both per model: --temperature_grid (0.6, 0.8)
    at the chosen scale and its grid neighbours, the same 1,000 samples vs training images; the joint
    choice is measured at the full N as a third column, beside the temperature-1.0 ones.
  * FID: fid.py with the FID Inception weights (--inception), N = --num_fid (5,000) samples against
    the statistics of all 10,000 test images. The training-set reference is a class-balanced subset
    (seeded permutation) of N training images; its FID against the test set is the "floor" row.
    Inception features of the reference images are computed once and cached in t1_cache.
  * Tokenizer quality ("tokens" row): MSE / PSNR of the 10k test images through each tokenizer and
    rFID of the reconstructions of a class-balanced subset of N test images vs the 10k statistics
    (for pixel tokens the reconstruction is exact, so that number is the small-N bias alone).
  * Also recorded per row: sampling seconds per image (fp32, this machine, batch and threads stated,
    generation only: no Inception), parameters (all, and the head's), training time (the sum over
    train.py's sessions of metrics.jsonl's elapsed_s) and steps.
Cost, measured on the shared 2-core machine while busy (1 thread, fp32, random weights; timing
does not depend on them): generation 0.37 s/image (MAR, 16 steps, Diffusion Loss, batch 100; 0.47 at
batch 20), 0.71 (MAR, 49 steps), 0.55 (AR), 0.05 (CE head, MAR 16 steps), x1.7 with CFG; the Inception
0.35 s/image. A Diffusion Loss row (2 x 5,000 + 4 x 1,000 samples) is thus ~3-4 hours, a CE row under
one; --cfg_grid (fewer points), --num_sweep and --num_sampling_steps are the knobs if that is too much.
A run already in RUNS_DIR counts as done when its checkpoint's step is the run's total and its
arguments match COMMON + its own (so runs started by hand with the same arguments are reused); an
unfinished one is resumed, unless its files changed in the last 10 minutes (it is probably still
running: it is waited for, and resumed once they are 10 minutes old). A measurement is keyed on its
checkpoint's step and a digest of its weights (weights_sha): a run retrained from scratch (its
checkpoint lost, say) is not bitwise the run before it, so its points are measured again instead of
being pooled with the old weights' in one sweep or row.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid  # noqa: E402
import mar  # noqa: E402
import tokenizer as tk  # noqa: E402
import train  # noqa: E402
from sample import PRECISIONS, generate  # noqa: E402

COMMON = ["--data", "fashion_mnist", "--patch_size", "4", "--no-hflip", "--batch_size", "64", "--epochs", "2",
          "--warmup_epochs", "0.2", "--blr", "4e-3", "--seed", "0"]
LOGGING = ["--log_every", "25", "--ckpt_every", "200", "--sample_every", "0"]   # no effect on the numbers
NUM_CODES = 1024
SEQ_LEN = 49            # 28x28 images, 4x4 patches
RUNNING_S = 600         # a run whose files changed this recently is taken to be still training

# training runs: name -> (model, order or None, head, more train.py flags). The last run is not the
# paper's: MAR with the training mask ratio min 0 instead of 0.7 (see ROWS).
RUNS = {
    "mar_diffusion": ("mar_tiny", None, "diffusion", ()),
    "ar_diffusion": ("ar_tiny", "raster", "diffusion", ()),
    "ar_random_diffusion": ("ar_tiny", "random", "diffusion", ()),
    "mar_ce": ("mar_tiny", None, "ce", ()),
    "ar_ce": ("ar_tiny", "raster", "ce", ()),
    "ar_random_ce": ("ar_tiny", "random", "ce", ()),
    "mar_l2": ("mar_tiny", None, "l2", ()),
    "mar_diffusion_mr0": ("mar_tiny", None, "diffusion", ("--mask_ratio_min", "0")),
    # experiments/recipe.py's chosen candidate (recipe.CHOSEN; a test checks that the flags agree)
    "mar_diffusion_recipe": ("mar_tiny", None, "diffusion",
                             ("--mask_ratio_law", "uniform", "--pos_embed_init", "sincos", "--dropout", "0")),
    # the control for the recipe's dropout 0, which is not specific to MAR (see ROWS)
    "ar_diffusion_dropout0": ("ar_tiny", "raster", "diffusion", ("--dropout", "0")),
}
# table rows, in the paper's order: id -> (training run, num_iter (MAR) or None (AR), label columns)
ROWS = {
    "ar_raster_ce": ("ar_ce", None, ("AR", "raster", "causal", "1", "CrossEnt (VQ)")),
    "ar_raster_diffusion": ("ar_diffusion", None, ("AR", "raster", "causal", "1", "Diff Loss")),
    "ar_random_ce": ("ar_random_ce", None, ("AR", "random", "causal", "1", "CrossEnt (VQ)")),
    "ar_random_diffusion": ("ar_random_diffusion", None, ("AR", "random", "causal", "1", "Diff Loss")),
    "mar1_ce": ("mar_ce", SEQ_LEN, ("MAR", "random", "bidirect", "1", "CrossEnt (VQ)")),
    "mar1_diffusion": ("mar_diffusion", SEQ_LEN, ("MAR", "random", "bidirect", "1", "Diff Loss")),
    "mar16_ce": ("mar_ce", 16, ("MAR", "random", "bidirect", ">1 (16 steps)", "CrossEnt (VQ)")),
    "mar16_diffusion": ("mar_diffusion", 16, ("MAR", "random", "bidirect", ">1 (16 steps)", "Diff Loss")),
    "mar16_l2": ("mar_l2", 16, ("MAR", "random", "bidirect", ">1 (16 steps)", "L2 (MSE)")),
    # Not in the paper: its MAR trains with a mask ratio in [0.7, 1] (chosen for 256 tokens), so it never
    # sees more than 14 of 49 tokens known, while its 16-step generation conditions on up to 45.
    # This row asks how much of the MAR rows' gap to AR that mismatch explains (experiments/README.md).
    "mar16_diffusion_mr0": ("mar_diffusion_mr0", 16,
                            ("MAR, mask ratio min 0", "random", "bidirect", ">1 (16 steps)", "Diff Loss")),
    # Not in the paper: MAR with the small-data recipe of experiments/recipe.py (chosen there by FID
    # against the training images), confirmed here against the test set like every row.
    "mar16_diffusion_recipe": ("mar_diffusion_recipe", 16,
                               ("MAR, small-data recipe", "random", "bidirect", ">1 (16 steps)", "Diff Loss")),
    # Not in the paper: AR raster with the recipe's one change that applies to any model, dropout 0, so
    # that MAR's recipe is compared with an AR raster given the same chance (experiments/README.md).
    "ar_raster_diffusion_dropout0": ("ar_diffusion_dropout0", None,
                                     ("AR, dropout 0", "raster", "causal", "1", "Diff Loss")),
}
EXTRA_ROWS = ("floor", "tokens")
# The paper's Table 1 (ImageNet 256, MAR-L / AR-L ~400M parameters, 400 epochs, VQ-16 tokens for CrossEnt,
# KL-16 for Diff Loss): FID w/o CFG, w/ CFG. Its "AR random order" row is labelled "MAR, random, causal".
# The L2 row is App. D of the paper (D.2 or D.3 by version): "a disastrous FID score (>100)", no other number.
PAPER = {
    "ar_raster_ce": ("19.58", "4.92"), "ar_raster_diffusion": ("19.23", "4.69"),
    "ar_random_ce": ("16.22", "4.36"), "ar_random_diffusion": ("13.07", "4.07"),
    "mar1_ce": ("8.75", "3.50"), "mar1_diffusion": ("3.43", "1.84"),
    "mar16_ce": ("8.79", "3.69"), "mar16_diffusion": ("3.50", "1.98"),
    "mar16_l2": (">100", "-"), "mar16_diffusion_mr0": ("-", "-"), "mar16_diffusion_recipe": ("-", "-"),
    "ar_raster_diffusion_dropout0": ("-", "-"),
}


# ------------------------------------------------------------------------------------------------
# Bookkeeping: the JSONL is the only state; a measurement is done when its key is in it
# ------------------------------------------------------------------------------------------------
def read_records(path):
    """The JSONL's records, oldest first. Records from before --precision were all made in fp32."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{"precision": "fp32", **json.loads(line)} for line in f if line.strip()]


def find(records, **key):
    return [r for r in records if all(r.get(k) == v for k, v in key.items())]


def weights_sha(model):
    """12 hex digits of a SHA-256 over the weights a measurement samples with (state_dict order): which
    checkpoint a record measured. A run retrained from scratch is not bitwise the run before it (a code
    change that reorders one float sum changes every later step), so records are pooled (a skipped
    measurement, a sweep's choice, the columns of one table row) only among the same weights, not only
    the same step. Records written before this field have none (None)."""
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def checkpoint_key(model, ckpt):
    """What identifies a measured checkpoint in the records: its step and its weights."""
    return dict(train_steps=ckpt["step"], weights_sha=weights_sha(model))


def latest_key(records, **match):
    """checkpoint_key of the latest record matching `match` (None if none): the checkpoint a table shows."""
    found = find(records, **match)
    return found and {k: found[-1].get(k) for k in ("train_steps", "weights_sha")} or None


def setting(args):
    """What a measurement depends on besides its row and cfg: records of other settings are kept in the
    JSONL but neither reused nor shown."""
    return dict(seed=args.seed, num_sampling_steps=args.num_sampling_steps, precision=args.precision)


def best_cfg(args, records, row, **key):
    """The sweep's choice: the grid scale with the lowest FID against the training images (None while
    the sweep is incomplete). The latest record of a scale counts (records are in time order)."""
    sweep = {r["cfg"]: r["fid"] for r in find(records, row=row, kind="sweep", n=args.num_sweep, **setting(args), **key)
             if r.get("temperature", 1.0) == 1.0}
    if not all(c in sweep for c in args.cfg_grid):
        return None
    return min(args.cfg_grid, key=lambda c: sweep[c])


def joint_grid(args, cfg):
    """The (CFG scale, temperature) points of the joint sweep around the chosen scale `cfg`: its grid
    neighbours and itself, each at temperature 1.0 (the CFG sweep's points) and --temperature_grid."""
    i = args.cfg_grid.index(cfg)
    return [(c, t) for c in args.cfg_grid[max(0, i - 1):i + 2] for t in [1.0] + args.temperature_grid]


def best_setting(args, records, row, **key):
    """The joint sweep's choice (scale, temperature) with the lowest FID against the training images, as
    the paper tunes both per model (None while the sweep is incomplete, and with an empty
    --temperature_grid: temperature 1.0 alone is the CFG sweep, not a joint one)."""
    cfg = best_cfg(args, records, row, **key)
    if cfg is None or not args.temperature_grid:
        return None
    sweep = {(r["cfg"], r.get("temperature", 1.0)): r["fid"]
             for r in find(records, row=row, kind="sweep", n=args.num_sweep, **setting(args), **key)}
    grid = joint_grid(args, cfg)
    return min(grid, key=lambda p: sweep[p]) if all(p in sweep for p in grid) else None


def append_record(path, record, who="table1"):
    record = dict(record, time=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{who}:", json.dumps(record), flush=True)
    return record


# ------------------------------------------------------------------------------------------------
# Training: train.py in a subprocess, reusing / resuming what RUNS_DIR holds
# ------------------------------------------------------------------------------------------------
def flag_suffix(flags):
    """A run directory's suffix for extra train.py flags, e.g. _mask_ratio_min_0."""
    return "".join("_" + f.lstrip("-") for f in flags)


def run_dir(args, name, suffix=""):
    """RUNS_DIR/t1_<model>_<head><flags><suffix>, and _bf16 for a --precision bf16 run (another run than fp32's)."""
    model, order, head, flags = RUNS[name]
    return os.path.join(args.runs_dir, f"t1_{model}{'_random' if order == 'random' else ''}_{head}"
                                       f"{flag_suffix(flags)}{suffix}{'' if args.precision == 'fp32' else '_bf16'}")


def codebook_path(args):
    return os.path.join(args.runs_dir, "t1_cache", f"codebook_k{args.vq}.pth")


def train_argv(args, name):
    model, order, head, flags = RUNS[name]
    argv = COMMON + ["--model", model] + (["--order", order] if order else []) + ["--head", head] + list(flags)
    if head == "ce":
        argv += ["--vq", str(args.vq), "--codebook", codebook_path(args)]
    if args.data_path:
        argv += ["--data_path", args.data_path]
    argv += ["--precision", args.precision]
    return argv + (["--max_steps", str(args.max_steps)] if args.max_steps else [])


def total_steps(train_args, n_train):
    """The step train.py stops at for these arguments (one process, no accumulation)."""
    total = max(1, round(train_args.epochs * n_train / train_args.batch_size))
    return min(total, train_args.max_steps) if train_args.max_steps else total


def ensure_trained(args, name, n_train, extra=(), suffix=""):
    """Train (or resume) run `name` until its checkpoint holds the last step; returns the checkpoint, or
    None while another process trains it (a table1.py holding its lock, or a train.py writing its files).
    extra: more train.py arguments (the ablations' variants of a run), trained in run_dir + suffix."""
    d = run_dir(args, name, suffix)
    ckpt_path, log, lock = os.path.join(d, "checkpoint-last.pth"), d + ".log", d + ".lock"
    os.makedirs(args.runs_dir, exist_ok=True)
    if not take_lock(lock):
        return None
    try:
        argv = train_argv(args, name) + list(extra) + LOGGING + ["--output_dir", d]
        want = train.get_args(argv)
        if os.path.exists(ckpt_path):
            ckpt = tk.torch_load(ckpt_path)
            have = train.checkpoint_args(ckpt)
            diff = [f"{k}: {have.get(k)!r} vs {getattr(want, k)!r}" for k in train.MUST_MATCH
                    if k != "shards" and have.get(k) != getattr(want, k)]
            if diff:
                raise ValueError(f"{ckpt_path} was trained with other settings than this table's "
                                 f"({', '.join(diff)}); move it away or pass another --runs_dir")
            if ckpt["step"] >= total_steps(want, n_train):
                return ckpt_path
            age = time.time() - max(os.path.getmtime(p) for p in (ckpt_path, os.path.join(d, "metrics.jsonl"))
                                    if os.path.exists(p))
            finished = ckpt["step"] >= total_steps(argparse.Namespace(**have), n_train)  # ran to its own end
            if age < RUNNING_S and not finished:
                # Its files are still being written: a train.py started by hand, or the orphan of a killed
                # table1.py. Wait for it as for a locked run; a dead run is resumed RUNNING_S after its
                # last write.
                print(f"table1: {d} is at step {ckpt['step']} and changed {age:.0f} s ago: probably still "
                      f"training; left for {RUNNING_S - age:.0f} s more", flush=True)
                return None
            argv += ["--resume", ckpt_path]
        print(f"table1: training {name}: train.py {' '.join(argv)} (log: {log})", flush=True)
        with open(log, "a") as f:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv, cwd=ROOT,
                                  stdout=f, stderr=subprocess.STDOUT)
    finally:
        os.remove(lock)
    if proc.returncode != 0:
        raise RuntimeError(f"training {name} failed (exit {proc.returncode}); see {log}")
    return ckpt_path


def train_all(args, runs, n_train):
    """runs: {key: (name, extra, suffix)} (ensure_trained's arguments) -> {key: checkpoint} once every run
    is trained. Processes side by side each train a run that no other process is training, then wait."""
    ckpts = {}
    while True:
        for key, run in runs.items():
            if key not in ckpts and (path := ensure_trained(args, run[0], n_train, *run[1:])) is not None:
                ckpts[key] = path
        if len(ckpts) == len(runs):
            return ckpts
        print(f"table1: waiting for {', '.join(str(k) for k in runs if k not in ckpts)}: another process trains "
              f"them", flush=True)
        time.sleep(30)


def training_time(run_path):
    """Seconds of training: train.py's elapsed_s restarts with every session (resume), so sum the
    last value of each session."""
    rows = [json.loads(line) for line in open(os.path.join(run_path, "metrics.jsonl")) if line.strip()]
    total, last = 0.0, 0.0
    for r in rows:
        if r["elapsed_s"] < last:
            total += last
        last = r["elapsed_s"]
    return round(total + last, 1)


# ------------------------------------------------------------------------------------------------
# FID: reference features cached once; samples generated in big batches
# ------------------------------------------------------------------------------------------------
def balanced_subset(labels, n, seed):
    """Indices of n images, class-balanced (n/10 per class, or as close as n allows), chosen by a
    seeded permutation: the first ones of each class in that order, interleaved by class."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = [perm[labels[perm] == c] for c in range(10)]
    picked = [by_class[i % 10][i // 10] for i in range(n)]
    return torch.stack(picked)


def uint8_images(dataset, index):
    return dataset.images[index].numpy()                               # (n, 28, 28, 1) uint8


take_lock = train.take_lock     # lock files holding a pid: False while a live process holds one


def once(path, make):
    """make() writes `path` (atomically) unless it exists. Several table1.py processes may need the same
    file at once: the first makes it under a lock file, the others wait for it."""
    while not os.path.exists(path):
        if not take_lock(path + ".lock"):
            time.sleep(5)
            continue
        try:
            if not os.path.exists(path):
                make()
        finally:
            os.remove(path + ".lock")


def cached_features(args, name, make_images, inception):
    """Inception pool features (n, 2048) float32 of a reference image set, cached as .npy (made once)."""
    path = os.path.join(args.runs_dir, "t1_cache", f"features_{name}.npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def make():
        feats = fid.extract_features(inception(), make_images(), args.fid_batch)[0]
        np.save(path + ".tmp.npy", feats.astype(np.float32))
        os.replace(path + ".tmp.npy", path)
    once(path, make)
    return np.load(path)


def stats(features):
    return fid.feature_statistics(np.asarray(features, np.float64))


class Evaluator:
    def __init__(self, args, inception=None):
        self.args = args
        self.train_set = tk.load_fashion_mnist(args.data_path or tk.FASHION_MNIST_DIR, "train")
        self.test_set = tk.load_fashion_mnist(args.data_path or tk.FASHION_MNIST_DIR, "test")
        self._inception, self._refs = inception, {}

    def inception(self):
        if self._inception is None:
            if not os.path.isfile(self.args.inception):
                raise FileNotFoundError(f"--inception {self.args.inception!r} not found: pass the FID Inception "
                                        "weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
            self._inception = fid.load_inception(self.args.inception)
        return self._inception

    def test_index(self):
        return balanced_subset(self.test_set.labels, min(self.args.num_fid, len(self.test_set)), self.args.seed)

    def features(self, which):
        """Inception features of "test" (all test images) or "train" (the class-balanced N training
        images), computed once and cached."""
        if which == "test":
            everything = torch.arange(len(self.test_set))
            return cached_features(self.args, f"test{len(self.test_set)}",
                                   lambda: uint8_images(self.test_set, everything), self.inception)
        idx = balanced_subset(self.train_set.labels, self.args.num_fid, self.args.seed)
        return cached_features(self.args, f"train{self.args.num_fid}_seed{self.args.seed}",
                               lambda: uint8_images(self.train_set, idx), self.inception)

    def ref(self, which):
        """(mu, sigma) of self.features(which)."""
        if which not in self._refs:
            self._refs[which] = stats(self.features(which))
        return self._refs[which]

    def fid(self, images, which):
        feats = fid.extract_features(self.inception(), images, self.args.fid_batch)[0]
        return fid.frechet_distance(*stats(feats), *self.ref(which))

    def sample(self, model, tokenizer, n, num_iter, cfg, cfg_schedule="linear", temperature=1.0, precision=None):
        """n class-balanced samples -> (uint8 (n, 28, 28, 1), seconds per image of the generation).
        The protocol's temperature is 1.0 (not sample.py's per-tokenizer default); the ablations vary it.
        precision: "fp32" / "bf16" autocast (default: --precision)."""
        labels = torch.arange(n) % model.num_classes
        out, t0 = [], time.time()
        for b, start in enumerate(range(0, n, self.args.batch)):
            g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + b)
            out.append(generate(model, tokenizer, labels[start:start + self.args.batch], g, num_iter or SEQ_LEN, cfg,
                                cfg_schedule, temperature, precision or self.args.precision))
        return torch.cat(out).numpy(), (time.time() - t0) / n


def vq_tokenizer(args, train_set):
    """The codebook every CE run uses (train.py --codebook reads the same file): fitted once, as
    train.py would fit it (VQTokenizer.fit, seed 0)."""
    path = codebook_path(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def make():
        print(f"table1: fitting the {args.vq}-code codebook -> {path}", flush=True)
        train.save_checkpoint(path, tk.VQTokenizer.fit(train_set, args.vq, 4, seed=0).config())
    once(path, make)
    return tk.build_tokenizer(tk.torch_load(path))


def token_quality(tokenizer, images):
    """MSE (in [-1, 1] units) and PSNR (dB, images in [0, 1]; None for an exact round trip) of
    encode -> decode, and the decoded uint8 images."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = tokenizer.decode(tokenizer.encode(x))
    mse = ((rec - x) ** 2).mean().item()
    psnr = 10 * math.log10(4 / mse) if mse > 0 else None
    return mse, psnr, ((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def measurement_lock(args, **key):
    return os.path.join(args.runs_dir, "t1_cache", "measuring",
                        "_".join(f"{k}-{v}" for k, v in sorted(key.items())) + ".lock")


@contextlib.contextmanager
def claim(args, **key):
    """Yields whether this process takes the measurement `key`: not if the JSONL has it, nor while another
    table1.py process measures it (a lock file per measurement). So processes started side by side with
    the same --rows share the work: each takes the next measurement nobody has taken."""
    lock = measurement_lock(args, **key)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    if find(read_records(args.out), **key):
        yield False
    elif not take_lock(lock):
        print(f"table1: {os.path.basename(lock)[:-5]}: another process is measuring it, skipped", flush=True)
        yield False
    else:
        try:
            yield not find(read_records(args.out), **key)     # (it may have finished just before we locked)
        finally:
            os.remove(lock)


def evaluate_row(args, ev, row, ckpt_path):
    run, num_iter, _ = ROWS[row]
    model, ckpt = mar.load_checkpoint(ckpt_path)
    model.diffloss.set_sampling_steps(args.num_sampling_steps)
    tokenizer = tk.build_tokenizer(ckpt["tokenizer"])
    recon_mse, recon_psnr, _ = token_quality(tokenizer, uint8_images(ev.test_set, torch.arange(len(ev.test_set))))
    ckpt_key = checkpoint_key(model, ckpt)
    common = dict(row=row, run=run, num_iter=num_iter or SEQ_LEN, **ckpt_key,
                  recon_mse=recon_mse, recon_psnr_db=recon_psnr,       # the tokenizer on the test images
                  train_time_s=training_time(os.path.dirname(ckpt_path)),
                  params=sum(p.numel() for p in model.parameters()),
                  head_params=sum(p.numel() for p in model.diffloss.parameters()),
                  batch=args.batch, threads=torch.get_num_threads(), **setting(args),
                  tokens=f"vq{tokenizer.num_codes}" if isinstance(tokenizer, tk.VQTokenizer) else "pixel")

    def measure(kind, cfg, n, ref, temperature=1.0):   # other weights (trained further, or retrained) are
        tau = {} if temperature == 1.0 else dict(temperature=temperature)          # measured again
        with claim(args, row=row, kind=kind, cfg=cfg, n=n, **ckpt_key, **tau, **setting(args)) as mine:
            if mine:
                images, s_per_image = ev.sample(model, tokenizer, n, num_iter, cfg, temperature=temperature)
                append_record(args.out, dict(common, kind=kind, cfg=cfg, n=n, ref=ref, fid=ev.fid(images, ref),
                                             s_per_image=round(s_per_image, 4), **tau))
                write_table(args)

    # The sweeps first (N = --num_sweep each, cheap), then the finals at the chosen settings (N = --num_fid):
    # a sitting cut short keeps the choices, and a process beside this one can take a sweep point meanwhile.
    best = joint = None
    if not args.no_cfg:
        for cfg in args.cfg_grid:
            measure("sweep", cfg, args.num_sweep, "train")
        best = best_cfg(args, read_records(args.out), row, **ckpt_key)
        if best is None:
            print(f"table1: {row}: the CFG sweep is still being measured by another process; that process (or "
                  f"a later call) measures the FID w/ CFG", flush=True)
        elif RUNS[run][2] == "diffusion" and args.temperature_grid:
            for cfg, temperature in joint_grid(args, best):
                measure("sweep", cfg, args.num_sweep, "train", temperature)
            joint = best_setting(args, read_records(args.out), row, **ckpt_key)
            if joint is None:
                print(f"table1: {row}: the joint CFG / temperature sweep is still being measured by another "
                      f"process", flush=True)
    measure("final", 1.0, args.num_fid, "test")
    if best is not None:
        measure("final", best, args.num_fid, "test")
    if joint is not None:
        measure("final", joint[0], args.num_fid, "test", joint[1])


def evaluate_floor(args, ev):
    with claim(args, row="floor", n=args.num_fid) as mine:
        if mine:
            append_record(args.out, dict(row="floor", kind="floor", n=args.num_fid, ref="test",
                                         fid=fid.frechet_distance(*ev.ref("train"), *ev.ref("test"))))


def evaluate_tokens(args, ev):
    idx = ev.test_index()
    all_test = uint8_images(ev.test_set, torch.arange(len(ev.test_set)))
    for name, tokenizer in (("pixel", tk.PixelTokenizer(28, 1, 4)), (f"vq{args.vq}", vq_tokenizer(args, ev.train_set))):
        with claim(args, row="tokens", tokens=name, n=len(idx)) as mine:
            if not mine:
                continue
            mse, psnr, _ = token_quality(tokenizer, all_test)
            if mse == 0:    # an exact round trip: the reconstructions are the images, whose features are cached
                rfid = fid.frechet_distance(*stats(ev.features("test")[idx.numpy()]), *ev.ref("test"))
            else:
                rfid = ev.fid(token_quality(tokenizer, all_test[idx.numpy()])[2], "test")
            append_record(args.out, dict(row="tokens", kind="tokens", tokens=name, n=len(idx), ref="test",
                                         mse=mse, psnr_db=psnr, rfid=rfid))


# ------------------------------------------------------------------------------------------------
# The Markdown table, from the JSONL only
# ------------------------------------------------------------------------------------------------
def fmt(x, digits=2):
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def write_table(args):
    """experiments/table1.md from the JSONL as it is on disk (other table1.py processes may have added rows)."""
    records = read_records(args.out)
    lines = ["| variant | order | direction | tokens / step | loss | FID w/o CFG | FID w/ CFG (scale) | "
             "FID w/ CFG, temperature tuned (scale, temperature) | "
             "paper FID w/o, w/ CFG | s / image w/o, w/ CFG | params (head) | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (run, num_iter, labels) in ROWS.items():
        finals = find(records, row=row, kind="final", n=args.num_fid, **setting(args))
        if not finals:
            lines.append("| " + " | ".join(list(labels) + ["not measured yet", "-", "-", ", ".join(PAPER[row])]
                                           + ["-"] * 3) + " |")
            continue
        key = latest_key(finals)                          # the latest checkpoint measured
        finals = list(reversed(find(finals, **key)))      # latest first
        at = lambda cfg, temperature=1.0: next((r for r in finals if (r["cfg"], r.get("temperature", 1.0))
                                                 == (cfg, temperature)), None)
        plain, guided = at(1.0), at(best_cfg(args, records, row, **key))
        joint = best_setting(args, records, row, **key)
        tuned = joint and at(*joint)
        edge = guided is not None and guided["cfg"] in (min(args.cfg_grid), max(args.cfg_grid))
        r = finals[0]
        cells = list(labels) + [
            fmt(plain and plain["fid"]),
            "-" if guided is None else f"{guided['fid']:.2f} ({guided['cfg']:g}{', edge of grid' if edge else ''})",
            "-" if tuned is None else f"{tuned['fid']:.2f} ({tuned['cfg']:g}, {tuned.get('temperature', 1.0):g})",
            ", ".join(PAPER[row]),
            f"{fmt(plain and plain['s_per_image'], 3)}, {fmt(guided and guided['s_per_image'], 3)}",
            f"{r['params'] / 1e6:.2f}M ({r['head_params'] / 1e6:.2f}M)",
            f"{r['train_time_s'] / 60:.0f} min ({r['train_steps']} steps)"]
        lines.append("| " + " | ".join(cells) + " |")
    n = args.num_fid
    floor = find(records, row="floor", n=n)
    first = find(records, kind="final", n=n, **setting(args))
    notes = [f"FID of N = {n} samples vs the 10,000 test images; CFG scale chosen by FID of {args.num_sweep} "
             "samples vs training images. Paper: ImageNet 256, AR/MAR-L, 400 epochs, VQ-16 (CrossEnt) and KL-16 "
             "(Diff Loss) tokens, its Table 1 (L2: App. D, 'a disastrous FID score (>100)')."]
    if first:
        notes.append(f"Sampling: {first[0]['precision']}, batch {first[0]['batch']}, {first[0]['threads']} thread(s), "
                     f"{first[0]['num_sampling_steps']} diffusion steps per token, torch {first[0]['torch']}.")
    if floor:
        notes.append(f"Floor (N = {n} training images vs the test set): FID {floor[-1]['fid']:.2f}.")
    tokens = {t["tokens"]: t for t in find(records, row="tokens")}                # the latest of each
    if tokens:
        notes.append("")
        notes.append("| tokens | MSE ([-1, 1]), 10k test images | PSNR (dB) | rFID (N reconstructions vs 10k test) |")
        notes.append("|---|---|---|---|")
        for t in tokens.values():
            psnr = "exact" if t["psnr_db"] is None else f"{t['psnr_db']:.2f}"
            notes.append(f"| {t['tokens']} | {t['mse']:.4f} | {psnr} | {t['rfid']:.2f} (N = {t['n']}) |")
    sweeps = find(records, kind="sweep", n=args.num_sweep, **setting(args))
    # Each row's sweep is shown for the checkpoint its finals come from (the row above); the sweeps of a
    # later training of the row that has no finals yet (retrained after its checkpoint was lost, and
    # being measured, or lost again) are listed apart, never pooled with them.
    shown, later = {}, []
    for row in ROWS:
        mine = [r for r in sweeps if r["row"] == row]
        finals = find(records, row=row, kind="final", n=n, **setting(args))
        key = latest_key(finals or mine)
        if key is None:
            continue
        shown[row] = find(mine, **key)
        newest = latest_key(mine)
        if newest is not None and newest != key:
            later.append((row, find(mine, **newest)))
    for title, groups in [("", list(shown.items())), (" of later trainings, other weights than the rows', with "
                                                          "no finals yet", later)]:
        plain = [(row, pts) for row, pts in groups if any("temperature" not in r for r in pts)]
        joint = [(row, pts) for row, pts in groups if any("temperature" in r for r in pts)]
        if plain:
            notes.append("")
            notes.append(f"CFG sweep{title} (FID of {args.num_sweep} samples vs {n} training images):")
            for row, pts in plain:                                                       # latest per scale
                pts = sorted({r["cfg"]: r["fid"] for r in pts if "temperature" not in r}.items())
                notes.append(f"- {row}: " + ", ".join(f"{c:g}: {f:.2f}" for c, f in pts))
        if joint:
            notes.append("")
            notes.append(f"Joint CFG / temperature sweep{title} around each Diffusion Loss row's scale (FID of "
                         f"{args.num_sweep} samples vs {n} training images; temperature 1.0 is the CFG sweep above):")
            for row, pts in joint:
                pts = sorted({(r["cfg"], r["temperature"]): r["fid"] for r in pts if "temperature" in r}.items())
                notes.append(f"- {row}: " + ", ".join(f"({c:g}, {t:g}): {f:.2f}" for (c, t), f in pts))
    tmp = f"{args.table}.{os.getpid()}.tmp"          # several table1.py processes may share the table
    with open(tmp, "w") as f:
        f.write("\n".join(lines + [""] + notes) + "\n")
    os.replace(tmp, args.table)


# ------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--rows", default=",".join(list(ROWS) + list(EXTRA_ROWS)),
      help=f"comma-separated, from: {', '.join(list(ROWS) + list(EXTRA_ROWS))} (default: all)")
    a("--runs_dir", default="runs", help="training runs (t1_*) and the cache (t1_cache)")
    a("--out", default=os.path.join(ROOT, "experiments", "table1.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "table1.md"), help="the Markdown table")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--train_only", action="store_true", help="only the training runs the selected rows need")
    a("--no_cfg", action="store_true",
      help="only the FIDs w/o CFG (the sweep and the guided FID come in a later call without this flag)")
    a("--inception", default=os.path.join(ROOT, "..", "shared", "weights", "inception_fid_no_fc.pth"),
      help="FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or the fc-less file)")
    a("--data_path", default=None, help=f"Fashion-MNIST idx directory (default {tk.FASHION_MNIST_DIR})")
    a("--num_fid", type=int, default=5000, help="N: samples per reported FID (and training images of the floor)")
    a("--num_sweep", type=int, default=1000, help="samples per point of the CFG sweep")
    a("--cfg_grid", default="1.5,2,3,4,6,8", help="CFG scales of the sweep (a tiny model wants strong guidance: "
                                                 "4 was the best of 1.5..4 for the MAR Diffusion Loss row)")
    a("--temperature_grid", default="0.6,0.8",
      help="temperatures of the joint sweep (Diffusion Loss rows): each with the chosen CFG scale and its grid "
           "neighbours, the paper's per-model tuning of both; empty: none")
    a("--batch", type=int, default=250, help="images per generation batch")
    a("--fid_batch", type=int, default=50, help="images per Inception batch")
    a("--num_sampling_steps", type=int, default=100, help="diffusion steps per token (paper: 100)")
    a("--vq", type=int, default=NUM_CODES, help="K of the VQ codebook (CE rows)")
    a("--seed", type=int, default=0, help="sampling and reference-subset seed")
    a("--max_steps", type=int, default=None, help="cap every training run (smoke tests only: not the protocol)")
    a("--precision", choices=PRECISIONS[1:], default="fp32",
      help="train.py's and the sampler's precision (bf16: runs in RUNS_DIR/t1_*_bf16). fp32: every table here "
           "was measured so; bf16: faster on CPUs with bf16 instructions (experiments/precision.py)")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in args.rows if r not in ROWS and r not in EXTRA_ROWS]
    if bad:
        raise ValueError(f"unknown --rows {bad}; valid: {', '.join(list(ROWS) + list(EXTRA_ROWS))}")
    args.cfg_grid = [float(c) for c in args.cfg_grid.split(",")]
    args.temperature_grid = [float(t) for t in args.temperature_grid.split(",") if t]
    if any(c == 1.0 for c in args.cfg_grid) or args.num_fid < 2 or args.num_sweep < 2 or args.batch < 1:
        raise ValueError("--cfg_grid must not contain 1.0 (the w/o CFG row), --num_fid / --num_sweep must be >= 2, "
                         "--batch >= 1")
    return args


def main(argv=None, inception=None):
    """inception: an already built feature network (model(uint8 (N, C, H, W)) -> (features, logits)) to
    use instead of loading --inception; the tests pass a small stand-in."""
    args = get_args(argv)
    if args.table_only:
        write_table(args)
        print(open(args.table).read())
        return
    ev = Evaluator(args, inception)
    runs = list(dict.fromkeys(ROWS[r][0] for r in args.rows if r in ROWS))
    if any(RUNS[r][2] == "ce" for r in runs):
        vq_tokenizer(args, ev.train_set)            # before any CE run, so that they all read this file
    ckpts = train_all(args, {run: (run, (), "") for run in runs}, len(ev.train_set))
    if args.train_only:
        return
    if "floor" in args.rows:
        evaluate_floor(args, ev)
    if "tokens" in args.rows:
        evaluate_tokens(args, ev)
    for row in args.rows:
        if row in ROWS:
            evaluate_row(args, ev, row, ckpts[ROWS[row][0]])
    write_table(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"table1.py: error: {e}")
