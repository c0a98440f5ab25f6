"""
experiments/lab.py -- what every experiment script shares: the record store (one JSON object per
measurement in a JSONL file, the only state), training runs (train.py in a subprocess, reused or
resumed from RUNS_DIR), lock files (processes side by side split the work), and the FID machinery
(cached Inception features of reference sets, class-balanced subsets, seeded class-balanced sampling).
Each script (table1.py, recipe.py, curve.py, ...) defines its own runs and measurements on top.

Conventions every script follows:
  * Records: a measurement is done when a record with its key is in the JSONL; keys hold the checkpoint's
    step and a digest of its weights (checkpoint_key), so a run retrained from scratch is measured again
    instead of being pooled with the old weights. Tables are regenerated from the JSONL alone.
  * Runs: a run already in RUNS_DIR counts as done when its checkpoint's step is the run's total and its
    arguments match (train.MUST_MATCH), so runs started by hand with the same arguments are reused; an
    unfinished one is resumed, unless a live train.py holds its train.lock and its files changed in the
    last RUNNING_S seconds (a train.py started by hand, or the orphan of a killed script: it is waited for).
  * Locks: a pid in a file (train.take_lock): a training run, a cached file, each measurement. A dead
    holder's lock is taken over. One process per core with OMP_NUM_THREADS=1 is the fastest use of a
    small CPU: two shells running the same command share the work.
  * Sampling: EMA weights, batches of args.batch images, labels class-balanced (image i has class i % 10),
    batch b drawn from a generator seeded with (args.seed, b), as sample.py does.
  * FID: fid.py with the FID Inception weights; reference features computed once and cached in
    RUNS_DIR/t1_cache (the cache's name is Table 1's, kept so that existing caches stay valid).
"""
import contextlib
import datetime
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
from sample import clip_to_token_range, generate  # noqa: E402

LOGGING = ["--log_every", "25", "--ckpt_every", "200", "--sample_every", "0"]   # no effect on the numbers
RUNNING_S = 600         # a run whose live train.py wrote its files this recently is left to it


def cache_dir(runs_dir):
    return os.path.join(runs_dir, "t1_cache")


# ------------------------------------------------------------------------------------------------
# Records: the JSONL is the only state; a measurement is done when its key is in it
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
    return tk.weights_digest(model)


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



def append_record(path, record, who="lab"):
    record = dict(record, time=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{who}:", json.dumps(record), flush=True)
    return record



def fmt(x, digits=2):
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def measurement_lock(args, **key):
    return os.path.join(cache_dir(args.runs_dir), "measuring",
                        "_".join(f"{k}-{v}" for k, v in sorted(key.items())) + ".lock")


@contextlib.contextmanager
def claim(args, **key):
    """Yields whether this process takes the measurement `key`: not if the JSONL has it, nor while another
    process measures it (a lock file per measurement). So processes started side by side with
    the same --rows share the work: each takes the next measurement nobody has taken."""
    lock = measurement_lock(args, **key)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    if find(read_records(args.out), **key):
        yield False
    elif not take_lock(lock):
        print(f"lab: {os.path.basename(lock)[:-5]}: another process is measuring it, skipped", flush=True)
        yield False
    else:
        try:
            yield not find(read_records(args.out), **key)     # (it may have finished just before we locked)
        finally:
            release_lock(lock)



# ------------------------------------------------------------------------------------------------
# A table row (Table 1's protocol): FID w/o CFG, w/ the CFG scale of a sweep, w/ a joint CFG and
# temperature sweep; the sweeps against the training images, the finals against the test set
# ------------------------------------------------------------------------------------------------
def best_cfg(args, records, row, **key):
    """The sweep's choice: the grid scale with the lowest FID against the training images (None while
    the sweep is incomplete). The latest record of a scale counts (records are in time order)."""
    sweep = {r["cfg"]: r["fid"]
             for r in find(records, row=row, kind="sweep", n=args.num_sweep, **setting(args), **key)
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


def load_row_model(args, ckpt_path):
    """A train.py checkpoint -> (model with args.num_sampling_steps, checkpoint, its tokenizer). An
    autoencoder's weights come from the --vae the run trained with."""
    model, ckpt = mar.load_checkpoint(ckpt_path)
    model.diffloss.set_sampling_steps(args.num_sampling_steps)
    vae = ckpt["args"].get("vae") if isinstance(ckpt.get("args"), dict) else None
    tokenizer = tk.build_tokenizer(ckpt["tokenizer"], vae)
    return clip_to_token_range(model, tokenizer), ckpt, tokenizer


def measure_row(args, ev, row, model, tokenizer, ckpt, num_iter, common, temperatures, on_record, who):
    """Every measurement of a row that the JSONL (args.out) lacks and no other process is taking: the CFG
    sweep (--num_sweep samples vs the training images), then, if `temperatures` (Diffusion Loss rows), the
    joint sweep around the chosen scale, then the finals (--num_fid vs the test set) w/o CFG and at the
    choices. A sitting cut short keeps the choices; a process beside this one takes the next point.
    common: the fields every record of the row holds; on_record() runs after each record (the table)."""
    ckpt_key = checkpoint_key(model, ckpt)

    def measure(kind, cfg, n, ref, temperature=1.0):   # other weights (trained further, or retrained) are
        tau = {} if temperature == 1.0 else dict(temperature=temperature)          # measured again
        with claim(args, row=row, kind=kind, cfg=cfg, n=n, **ckpt_key, **tau, **setting(args)) as mine:
            if mine:
                images, s_per_image = ev.sample(model, tokenizer, n, num_iter, cfg, temperature=temperature)
                append_record(args.out, dict(common, row=row, **ckpt_key, kind=kind, cfg=cfg, n=n, ref=ref,
                                             fid=ev.fid(images, ref), s_per_image=round(s_per_image, 4), **tau),
                              who=who)
                on_record()

    best = joint = None
    if not args.no_cfg:
        for cfg in args.cfg_grid:
            measure("sweep", cfg, args.num_sweep, "train")
        best = best_cfg(args, read_records(args.out), row, **ckpt_key)
        if best is None:
            print(f"{who}: {row}: the CFG sweep is still being measured by another process; that process (or "
                  f"a later call) measures the FID w/ CFG", flush=True)
        elif temperatures and args.temperature_grid:
            for cfg, temperature in joint_grid(args, best):
                measure("sweep", cfg, args.num_sweep, "train", temperature)
            joint = best_setting(args, read_records(args.out), row, **ckpt_key)
            if joint is None:
                print(f"{who}: {row}: the joint CFG / temperature sweep is still being measured by another "
                      f"process", flush=True)
    measure("final", 1.0, args.num_fid, "test")
    if best is not None:
        measure("final", best, args.num_fid, "test")
    if joint is not None:
        measure("final", joint[0], args.num_fid, "test", joint[1])


def row_results(args, records, row):
    """A row's finals at its latest measured checkpoint: dict(plain (w/o CFG), guided (at the sweep's
    scale), tuned (at the joint sweep's setting), edge (the scale is at the grid's edge), latest record),
    each None until measured; None if the row has no final."""
    finals = find(records, row=row, kind="final", n=args.num_fid, **setting(args))
    if not finals:
        return None
    key = latest_key(finals)                          # the latest checkpoint measured
    finals = list(reversed(find(finals, **key)))      # latest first
    at = lambda cfg, temperature=1.0: next((r for r in finals if (r["cfg"], r.get("temperature", 1.0))
                                             == (cfg, temperature)), None)
    guided, joint = at(best_cfg(args, records, row, **key)), best_setting(args, records, row, **key)
    return dict(plain=at(1.0), guided=guided, tuned=joint and at(*joint), latest=finals[0],
                edge=guided is not None and guided["cfg"] in (min(args.cfg_grid), max(args.cfg_grid)))


def fid_cells(res):
    """Table 1's three FID cells of row_results(...): w/o CFG, w/ CFG (scale), tuned (scale, temperature)."""
    plain, guided, tuned = (res or {}).get("plain"), (res or {}).get("guided"), (res or {}).get("tuned")
    return [fmt(plain and plain["fid"]),
            "-" if guided is None else f"{guided['fid']:.2f} ({guided['cfg']:g}{', edge of grid' if res['edge'] else ''})",
            "-" if tuned is None else f"{tuned['fid']:.2f} ({tuned['cfg']:g}, {tuned.get('temperature', 1.0):g})"]


# ------------------------------------------------------------------------------------------------
# Training: train.py in a subprocess, reusing / resuming what RUNS_DIR holds
# ------------------------------------------------------------------------------------------------
def flag_suffix(flags):
    """A run directory's suffix for extra train.py flags, e.g. _mask_ratio_min_0."""
    return "".join("_" + f.lstrip("-") for f in flags)



def total_steps(train_args, n_train):
    """The step train.py stops at for these arguments (one process, no accumulation)."""
    total = max(1, round(train_args.epochs * n_train / train_args.batch_size))
    return min(total, train_args.max_steps) if train_args.max_steps else total


def ensure_trained(run_dir, argv, n_train):
    """Train (or resume) train.py with arguments `argv` in `run_dir` until its checkpoint holds the last
    step; returns the checkpoint, or None while another process trains it (a script holding its lock, or
    a train.py writing its files). n_train: the training set's size (for the run's last step)."""
    ckpt_path, log, lock = os.path.join(run_dir, "checkpoint-last.pth"), run_dir + ".log", run_dir + ".lock"
    os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
    if not take_lock(lock):
        return None
    try:
        argv = list(argv) + LOGGING + ["--output_dir", run_dir]
        want = train.get_args(argv)
        if os.path.exists(ckpt_path):
            ckpt = tk.torch_load(ckpt_path)
            have = train.checkpoint_args(ckpt)
            diff = [f"{k}: {have.get(k)!r} vs {getattr(want, k)!r}" for k in train.MUST_MATCH
                    if k != "shards" and have.get(k) != getattr(want, k)]
            if diff:
                raise ValueError(f"{ckpt_path} was trained with other settings than this experiment's "
                                 f"({', '.join(diff)}); move it away or pass another --runs_dir")
            age = time.time() - max(os.path.getmtime(p) for p in (ckpt_path, os.path.join(run_dir, "metrics.jsonl"))
                                    if os.path.exists(p))
            writer = os.path.join(run_dir, "train.lock")                # held by the train.py writing there
            alive = not take_lock(writer)
            if not alive:
                release_lock(writer)
            if alive and age < RUNNING_S:
                # A train.py started by hand, or the orphan of a killed script (even at its last step, it may
                # still be adding the latent scale): wait for it as for a locked run. A run whose train.py is
                # gone is resumed at once. A lock naming a live pid on files unchanged for RUNNING_S (a pid
                # reused after a restart) is tried too: train.py then says which lock file to delete if it is
                # in use.
                print(f"lab: {run_dir} is at step {ckpt['step']}, written {age:.0f} s ago by a running train.py: "
                      f"left to it", flush=True)
                return None
            if ckpt["step"] >= total_steps(want, n_train):
                return ckpt_path
            argv += ["--resume", ckpt_path]
        print(f"lab: training: train.py {' '.join(argv)} (log: {log})", flush=True)
        with open(log, "a") as f:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv, cwd=ROOT,
                                  stdout=f, stderr=subprocess.STDOUT)
    finally:
        release_lock(lock)
    if proc.returncode != 0:
        raise RuntimeError(f"training {run_dir} failed (exit {proc.returncode}); see {log}")
    return ckpt_path


def train_all(runs, n_train):
    """runs: {key: (run_dir, argv)} (ensure_trained's arguments) -> {key: checkpoint} once every run is
    trained. Processes side by side each train a run that no other process is training, then wait."""
    ckpts = {}
    while True:
        for key, run in runs.items():
            if key not in ckpts and (path := ensure_trained(*run, n_train)) is not None:
                ckpts[key] = path
        if len(ckpts) == len(runs):
            return ckpts
        print(f"lab: waiting for {', '.join(str(k) for k in runs if k not in ckpts)}: another process trains "
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
release_lock = train.release_lock


def once(path, make):
    """make() writes `path` (atomically) unless it exists. Several processes may need the same
    file at once: the first makes it under a lock file, the others wait for it."""
    while not os.path.exists(path):
        if not take_lock(path + ".lock"):
            time.sleep(5)
            continue
        try:
            if not os.path.exists(path):
                make()
        finally:
            release_lock(path + ".lock")


def cached_features(args, name, make_images, inception):
    """Inception pool features (n, 2048) float32 of a reference image set, cached as .npy (made once)."""
    path = os.path.join(cache_dir(args.runs_dir), f"features_{name}.npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def make():
        feats = fid.extract_features(inception(), make_images(), args.fid_batch)[0]
        np.save(path + ".tmp.npy", feats.astype(np.float32))
        os.replace(path + ".tmp.npy", path)
    once(path, make)
    return np.load(path)


def stats(features):
    return fid.feature_statistics(np.asarray(features, np.float64))


def check_inception(path):
    """Before any work starts: a run that trains for hours must not stop at its first FID."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception {path!r} not found: pass the FID Inception weights "
                                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")


class Evaluator:
    def __init__(self, args, inception=None, measures=True):
        """measures: whether this process will measure FID (False: --train_only), so that a missing
        --inception is found now rather than after the training."""
        if inception is None and measures:
            check_inception(args.inception)
        self.args = args
        self.train_set = tk.load_fashion_mnist(args.data_path or tk.FASHION_MNIST_DIR, "train")
        self.test_set = tk.load_fashion_mnist(args.data_path or tk.FASHION_MNIST_DIR, "test")
        self._inception, self._refs = inception, {}

    def inception(self):
        if self._inception is None:
            check_inception(self.args.inception)
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
            out.append(generate(model, tokenizer, labels[start:start + self.args.batch], g, num_iter or model.seq_len,
                                cfg, cfg_schedule, temperature, precision or self.args.precision))
        return torch.cat(out).numpy(), (time.time() - t0) / n



def unit_images(images):
    """uint8 (n, H, W, C) -> float (n, C, H, W) in [-1, 1], as the models take them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def token_quality(tokenizer, images):
    """MSE (in [-1, 1] units) and PSNR (dB, images in [0, 1]; None for an exact round trip) of
    encode -> decode, and the decoded uint8 images."""
    x = unit_images(images)
    rec = tokenizer.decode(tokenizer.encode(x))
    mse = ((rec - x) ** 2).mean().item()
    psnr = 10 * math.log10(4 / mse) if mse > 0 else None
    return mse, psnr, ((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------
# Plots (Pillow, imported only here: the experiments' one optional dependency)
# ------------------------------------------------------------------------------------------------
def nice_ticks(lo, hi, n=5):
    """Round-number ticks (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    step = 10 ** math.floor(math.log10((hi - lo) / n or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def line_plot(path, series, title, xlabel, ylabel, logx=False, data_ticks=True, hline=None):
    """series: [(label, [(x, y, point label), ...]) or (label, points, style)] -> PNG: framed axes with
    ticks and grid, the axis labels, a legend above the frame (in as many rows as its entries need), a
    dashed reference line hline = (label, y). Each series' line joins its points in the order given (the
    speed plot's x, seconds, need not grow with its setting). style: {"color": "#rrggbb", "dashed": True}
    (default: the next color of the palette, solid)."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, L, R, B = 760, 500, 70, 30, 55                       # image size; margins left, right, bottom
    img, font = Image.new("RGB", (W, H), "white"), ImageFont.load_default(size=14)
    d = ImageDraw.Draw(img)
    legend, lx, row = [], L, 0                                 # each entry's (x, row): a row wraps at the edge
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
    series = [(s[0], s[1], {"color": palette[i % len(palette)], **(s[2] if len(s) > 2 else {})})
              for i, s in enumerate(series)]
    for label, _, _ in series:
        width = 30 + d.textlength(label, font=font)
        if lx > L and lx + width > W - R:
            lx, row = L, row + 1
        legend.append((lx, row))
        lx += width + 20
    T = 60 + 20 * (row + 1)                                    # top margin: title, legend rows
    f = math.log10 if logx else float
    xs = sorted({p[0] for _, pts, _ in series for p in pts})
    ys = [p[1] for _, pts, _ in series for p in pts] + ([hline[1]] if hline else [])
    yt = nice_ticks(min(ys), max(ys))
    xt = xs if data_ticks else nice_ticks(min(xs), max(xs))
    pad = 0.05 * (f(xs[-1]) - f(xs[0]) or 1)
    x0, x1 = min(f(xs[0]), f(xt[0])) - pad, max(f(xs[-1]), f(xt[-1])) + pad
    X = lambda x: L + (f(x) - x0) / (x1 - x0) * (W - L - R)
    Y = lambda y: H - B - (y - yt[0]) / (yt[-1] - yt[0] or 1) * (H - T - B)
    for t in xt:
        d.line((X(t), T, X(t), H - B), fill="#e5e5e5")
        d.text((X(t), H - B + 6), f"{t:g}", fill="black", font=font, anchor="mt")
    for t in yt:
        d.line((L, Y(t), W - R, Y(t)), fill="#e5e5e5")
        d.text((L - 6, Y(t)), f"{t:g}", fill="black", font=font, anchor="rm")
    d.rectangle((L, T, W - R, H - B), outline="black")
    d.text(((L + W - R) / 2, H - 8), xlabel, fill="black", font=font, anchor="ms")
    d.text((8, T - 8), ylabel, fill="black", font=font, anchor="ls")
    d.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    if hline:
        for x in range(L, W - R, 12):
            d.line((x, Y(hline[1]), min(x + 6, W - R), Y(hline[1])), fill="gray")
        d.text((W - R - 4, Y(hline[1]) - 3), hline[0], fill="gray", font=font, anchor="rb")
    def line(xy, color, width, dashed):
        for (ax, ay), (bx, by) in zip(xy, xy[1:]):
            n = max(1, int(math.hypot(bx - ax, by - ay) / 8)) if dashed else 1      # 8-pixel dashes
            for k in range(0, n, 2 if dashed else 1):
                d.line((ax + (bx - ax) * k / n, ay + (by - ay) * k / n,
                        ax + (bx - ax) * (k + 1) / n, ay + (by - ay) * (k + 1) / n), fill=color, width=width)

    for (label, pts, style), (lx, row) in zip(series, legend):
        color, dashed = style["color"], style.get("dashed", False)
        xy = [(X(x), Y(y)) for x, y, _ in pts]
        line(xy, color, 2, dashed)
        for (px, py), (_, _, tag) in zip(xy, pts):
            d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
            d.text((px + 5, py - 4), tag, fill=color, font=font, anchor="ld")
        line([(lx, 40 + 20 * row), (lx + 24, 40 + 20 * row)], color, 3, dashed)
        d.text((lx + 30, 40 + 20 * row), label, fill="black", font=font, anchor="lm")
    img.save(path)
