"""
train.py -- train MAR (or the causal AR baseline) with the Diffusion Loss. One script for one CPU,
one GPU and many GPUs: under torchrun (RANK set) it runs DDP, otherwise it is rank 0 of 1.

How it fits: data (the built-in shapes below, or tokenizer.py's loaders) -> tokenizer.py turns images
into continuous tokens -> mar.py's model returns the Diffusion Loss (paper Sec. 3) -> AdamW + EMA,
the paper's recipe (Sec. 5, App. A) -> checkpoints that sample.py and mar.load_checkpoint read.

Run:
  python train.py                      # mar_tiny on the built-in 16x16 shapes, 12 epochs (1,875 steps) in
                                       # minutes on a 2-core CPU: output/checkpoint-last.pth,
                                       # metrics.jsonl and samples_0001875.png (8 per class, one row each)
  python sample.py --cfg 3.0           # sample from output/checkpoint-last.pth

  # ImageNet 256 with KL-16 tokens, MAR-B, the paper's recipe (global batch 2048, 800 epochs):
  # cache the VAE posteriors once (each image and its flip; the released code's cache step), then train:
  python -c "import tokenizer as tk; tk.cache_latents(tk.ImageFolder('imagenet/train', 256), \
      tk.load_vae('kl16.ckpt'), 'cache/in256', device='cuda')"
  torchrun --nproc_per_node=8 train.py --model mar_base --data latents --data_path cache/in256 \
      --vae kl16.ckpt --batch_size 128 --accum_iter 2 --blr 1e-4 --epochs 800 --warmup_epochs 100 \
      --num_workers 8 --output_dir out/mar_base
  # or read the JPEGs directly (encodes with the VAE every step): --data folder --data_path imagenet/train
  # several nodes: the same command on each, with torchrun's rendezvous flags, e.g.
  torchrun --nnodes=4 --node_rank=$NODE_RANK --master_addr=$HEAD_NODE --master_port=29500 \
      --nproc_per_node=8 train.py ...  (--batch_size 64 --accum_iter 1 keeps the global batch at 2048)
  # Table 1's baselines (experiments/table1.py runs them all): cross-entropy over 1024 k-means codes of
  # the same pixel patches, an L2 head, a causal AR in random order:
  python train.py --data fashion_mnist --no-hflip --vq 1024 --head ce --codebook runs/codebook.pth
  python train.py --data fashion_mnist --no-hflip --head l2
  python train.py --data fashion_mnist --no-hflip --model ar_tiny --order random
  # continue a run exactly where it stopped (Ctrl-C / SIGTERM saves a checkpoint first):
  python train.py --resume output/checkpoint-last.pth
  # a tokenizer for your own small images (LDM's autoencoder, tokenizer.AUTOENCODERS), then MAR on its
  # latents (the latent scale is measured at the end of the first run and read from its checkpoint):
  python train.py --model kl_f4 --data folder --data_path my_images --image_size 32 --output_dir out/kl
  #   (+ --disc_weight 0.5 --disc_start 1: LDM's adversarial term from epoch 1 on)
  python train.py --data folder --data_path my_images --image_size 32 --vae out/kl/checkpoint-last.pth

Reproducibility. The global batch of step s is cut into world_size * accum_iter shards of batch_size
images. Shard j of step s gets its images from a seeded per-epoch permutation, its flips and every
random draw of the model (mask ratio, orders, label drop, dropout, diffusion t and noise) from the
seed (seed, s, j). So training is a pure function of (seed, batch_size, world_size * accum_iter):
--resume continues the same loss curve, and 2 processes x 1 shard equal 1 process x 2 accumulated
shards (up to float summation order). No RNG state needs saving.
"""
import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import mar
import tokenizer as tk
from sample import (DEFAULT_OUTPUT_DIR, PRECISIONS, SAMPLE_PRECISION, autocast, default_device_type, describe_precision,
                    generate, grid_classes, print0, resolve_precision, save_grid, setup_distributed, to_uint8)

DATA_SOURCES = ("builtin", "folder", "latents", "array", "fashion_mnist")


# ------------------------------------------------------------------------------------------------
# The built-in data set: 10 classes of shapes drawn by code (deterministic, no files)
# ------------------------------------------------------------------------------------------------
SHAPES = ("disk", "ring", "square", "frame", "plus", "cross", "h-stripes", "v-stripes", "triangle", "checker")
BUILTIN_PER_CLASS = 1000


def make_shapes(n_per_class, image_size=16, seed=0):
    """-> (uint8 images (N, S, S), labels (N,)), N = 10 * n_per_class, classes interleaved.

    Each shape gets a random size, position and brightness (and stripes a random period and phase) from a
    seeded generator, so the set is the same on every machine. Shapes are drawn from a signed distance
    (positive inside) through a sigmoid: anti-aliased edges, no jaggies at 16x16. All ten are symmetric
    under a horizontal flip, so the paper's flip augmentation keeps every label valid."""
    g = torch.Generator().manual_seed(seed)
    n, s = n_per_class * len(SHAPES), image_size
    labels = torch.arange(len(SHAPES)).repeat(n_per_class)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)   # (N, 1, 1) uniform draws
    r = u(0.22, 0.38) * s                                                   # half-size in pixels
    cx, cy = (u(-1, 1) * (s / 2 - r - 0.5) + s / 2 for _ in range(2))      # keeps the shape inside
    period, phase, bright = u(0.2, 0.3) * s, u(0, 2 * math.pi), u(0.6, 1.0)
    grid = torch.arange(s, dtype=torch.float32) + 0.5
    x, y = grid.view(1, 1, s).expand(n, s, s), grid.view(1, s, 1).expand(n, s, s)
    dx, dy = x - cx, y - cy                                                  # (N, S, S)
    w = 0.09 * s                                                             # stroke half-width
    dist_, box = torch.hypot(dx, dy), torch.maximum(dx.abs(), dy.abs())     # circle / square distances
    wave = lambda v, p: torch.sin(2 * math.pi * v / p + phase) * s / 8
    sdf = torch.stack([
        r - dist_,                                                           # disk
        w - (dist_ - r).abs(),                                               # ring
        r - box,                                                             # square
        w - (box - r).abs(),                                                 # frame
        torch.minimum(torch.maximum(w - dx.abs(), w - dy.abs()), r - box),   # plus
        torch.minimum(w - (dx.abs() - dy.abs()).abs() / math.sqrt(2), r - box),  # cross (X)
        wave(y, period),                                                     # horizontal stripes
        wave(x, period),                                                     # vertical stripes
        torch.minimum(torch.minimum(r - dy, dy + r), 0.9 * ((dy + r) / 2 - dx.abs())),  # triangle
        torch.sin(math.pi * dx / period) * torch.sin(math.pi * dy / period) * s / 8,   # checkerboard
    ], 1)[torch.arange(n), labels]                                           # (N, S, S)
    return (torch.sigmoid(4 * sdf) * bright * 255).round().to(torch.uint8), labels


# ------------------------------------------------------------------------------------------------
# Data: every random choice belongs to the step sampler, so a batch is a function of (seed, step, shard)
# ------------------------------------------------------------------------------------------------
def shard_seed(seed, step, shard, stream=0):
    """One 63-bit seed per (run seed, step, shard, stream): stream 0 = the model's draws, 1 = data flips."""
    return (((seed * 1_000_003 + step) * 65_537 + shard) * 2 + stream) % 2**63


class StepSampler:
    """Batch sampler yielding, for steps start..stop-1 and this rank's shards, lists of (index, flip).

    The item at stream position q = step * global_batch + shard * batch_size + k is element q % N of
    epoch q // N's permutation (torch.randperm seeded by (seed, epoch)); flips come from shard_seed."""

    def __init__(self, n, batch_size, num_shards, shards, seed, hflip, start, stop):
        self.n, self.batch_size, self.num_shards, self.shards = n, batch_size, num_shards, shards
        self.seed, self.hflip, self.start, self.stop = seed, hflip, start, stop
        self._perms = {}

    def perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}  # keep memory flat
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self._perms[epoch]

    def batch(self, step, shard):
        q = step * self.batch_size * self.num_shards + shard * self.batch_size + torch.arange(self.batch_size)
        index = [int(self.perm(int(e))[int(i)]) for e, i in zip(q // self.n, q % self.n)]
        g = torch.Generator().manual_seed(shard_seed(self.seed, step, shard, stream=1))
        flip = torch.randint(2, (self.batch_size,), generator=g) if self.hflip else torch.zeros(self.batch_size, dtype=torch.long)
        return list(zip(index, flip.tolist()))

    def __iter__(self):
        for step in range(self.start, self.stop):
            for shard in self.shards:
                yield self.batch(step, shard)

    def __len__(self):
        return (self.stop - self.start) * len(self.shards)


class Flippable(torch.utils.data.Dataset):
    """Item (i, flip) -> (image or latent moments, label), mirrored horizontally when flip is 1.
    Cached latents already hold each image's flip (tokenizer.cache_latents): pick it, do not mirror."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, flip = key
        if isinstance(self.dataset, tk.CachedLatents):
            return self.dataset.read(i, flip)
        x, label = self.dataset[i]
        return (x.flip(-1) if flip else x), label


def load_array_file(path):
    """.npz (images under 'images' or 'arr_0', optional 'labels') or .npy (images, unlabelled)."""
    with open(path, "rb") as f:               # numpy's own error for a text file blames "pickled data"
        magic = f.read(6)
    if not (path.endswith(".npz") and magic[:4] == b"PK\x03\x04") and not (path.endswith(".npy") and magic == b"\x93NUMPY"):
        raise ValueError(f"--data_path {path!r} is not a numpy .npz / .npy file (np.savez / np.save write them)")
    data = np.load(path)
    if path.endswith(".npy"):
        return tk.ArrayDataset(data)
    key = "images" if "images" in data else "arr_0"
    if key not in data:
        raise ValueError(f"{path!r} has no 'images' or 'arr_0' array (found {list(data)})")
    return tk.ArrayDataset(data[key], data["labels"] if "labels" in data else None)


def load_data(args):
    """-> dataset with .num_classes; items (image (C, S, S) in [-1, 1], label) or (moments, label)."""
    path = args.data_path
    if args.data == "fashion_mnist" and path is None:
        path = tk.FASHION_MNIST_DIR
    if args.data != "builtin":
        if path is None:
            raise ValueError(f"--data {args.data} needs --data_path")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data_path {path!r} does not exist (--data {args.data})")
    if args.data == "builtin":
        images, labels = make_shapes(BUILTIN_PER_CLASS, args.image_size or 16)
        return tk.ArrayDataset(images.numpy(), labels.numpy(), num_classes=len(SHAPES))
    if args.data == "folder":
        folder = tk.ImageFolder(path, args.image_size or 256)
        if args.image_size is None and folder.smallest < folder.image_size:    # the default would upsample them
            raise ValueError(f"--data_path {path!r} has images as small as {folder.smallest} pixels a side, under "
                             f"the default --image_size {folder.image_size}: pass --image_size (e.g. "
                             f"{folder.smallest}; --image_size {folder.image_size} upsamples them)")
        return folder
    if args.data == "latents":
        return tk.CachedLatents(path)
    return load_array_file(path) if args.data == "array" else tk.load_fashion_mnist(path)


def make_tokenizer(args, dataset):
    """Pixel patches (small images), or an autoencoder's latents (--vae: KL-16, or one trained here, a VQ
    one's codes for --head ce); checks the image size against the data. An autoencoder run reads pixels."""
    if args.vae is None:
        if args.data == "latents":
            raise ValueError("--data latents holds VAE posteriors: pass the --vae that cached them (kl16.ckpt)")
        size = getattr(dataset, "image_size", args.image_size)
        if args.image_size not in (None, size):
            raise ValueError(f"--image_size {args.image_size} but the {args.data} images are {size}x{size}")
        if args.vq is not None and args.model not in tk.AUTOENCODERS:
            return vq_tokenizer(args, dataset, size)
        return tk.PixelTokenizer(size, dataset.channels, args.patch_size)
    vae = tk.load_vae(args.vae)
    if args.data == "latents" and isinstance(vae, tk.AutoencoderVQ):
        raise ValueError(f"--data latents holds a KL autoencoder's posteriors; --vae {args.vae} is a VQ one: "
                         "train on the images (--data folder / array / fashion_mnist) with it")
    if args.data == "latents":
        size = dataset.moments.shape[-1] * vae.downsample_factor
        made_by = dataset.weights_sha
        if dataset.moments.shape[2] != 2 * getattr(vae, "embed_dim", -1) or made_by not in (None, tk.weights_digest(vae)):
            raise ValueError(f"--data_path {args.data_path!r} holds the latents of another autoencoder than --vae "
                             f"{args.vae} (its weights {made_by}, {dataset.moments.shape[2] // 2} channels): pass the "
                             "--vae that cached them, or cache them again with this one")
    else:
        size = getattr(dataset, "image_size", args.image_size or 256)
        if dataset.channels != vae.in_channels:
            read_as = " (a folder's are read as RGB: for 1-channel images use --data array)" if args.data == "folder" else ""
            raise ValueError(f"--vae {args.vae} reads images of {vae.in_channels} channel(s); the {args.data} images "
                             f"have {dataset.channels}{read_as}: train an autoencoder on these images (train.py --model "
                             "kl_f2)")
        trained = vae.trained_image_size
        if args.image_size is None and trained not in (None, size):
            raise ValueError(f"--vae {args.vae} was trained on {trained}x{trained} images; the {args.data} images are "
                             f"{size}x{size}: pass --image_size {trained} (or --image_size {size} to use it at that size)")
    if isinstance(vae, tk.AutoencoderVQ):
        return tk.VQAETokenizer(vae, size, args.patch_size, discrete=args.head == "ce")
    if args.head == "ce":
        raise ValueError(f"--head ce needs discrete tokens: --vae {args.vae} is a KL autoencoder (continuous); "
                         "pass a VQ autoencoder's checkpoint, or --vq K on pixels")
    return tk.KLTokenizer(vae, size, args.patch_size)


def vq_tokenizer(args, dataset, size):
    """--vq K: the codebook file if it exists (so several runs share one codebook), else a fresh
    k-means fit (seeded, deterministic), written there for the next run."""
    path, p = args.codebook or os.path.join(args.output_dir, "codebook.pth"), args.patch_size
    if os.path.exists(path):
        cfg = tk.torch_load(path)
        vq = tk.build_tokenizer(cfg) if isinstance(cfg, dict) and cfg.get("kind") == "vq" else None
        if vq is None or (vq.num_codes, vq.image_size, vq.channels, vq.patch_size) != (args.vq, size, dataset.channels, p):
            found = "not a VQTokenizer config" if vq is None else f"K={vq.num_codes}, {vq.image_size}px, patch {vq.patch_size}"
            raise ValueError(f"--codebook {path} does not fit this run ({found}; want K={args.vq}, {size}px, "
                             f"patch {p}): pass another --codebook path")
        return vq
    print0(f"fitting a {args.vq}-code k-means codebook on the {p}x{p} patches (seed {args.seed}) -> {path}")
    vq = tk.VQTokenizer.fit(dataset, args.vq, p, seed=args.seed)
    if not dist.is_initialized() or dist.get_rank() == 0:      # one writer; every rank fits the same book
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_checkpoint(path, vq.config())
    return vq


# ------------------------------------------------------------------------------------------------
# Optimisation: the paper's schedule and EMA
# ------------------------------------------------------------------------------------------------
def learning_rate(step, peak, warmup_steps, total_steps, schedule):
    """Linear warmup to `peak` (step 0 already trains), then constant (the paper) or cosine to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return peak


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model, every step. d ramps as min(decay, (1 + step) / (10 + step)):
    a short run still gets a useful average; from step ~90k on it is the paper's 0.9999, and a full
    ImageNet run's final EMA is the same (what came before step 90k is weighted by < e^-40)."""
    d = min(decay, (1 + step) / (10 + step))
    # One multi-tensor launch for all weights. Buffers need no averaging: the models' only buffers are
    # the Diffusion Loss schedule constants and the CE head's codebook, equal in both copies.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
# Arguments that change the numbers: resuming with a different value would silently start another run.
MUST_MATCH = ("model", "data", "image_size", "patch_size", "hflip", "seed", "batch_size", "shards", "blr",
              "lr_schedule", "warmup_epochs", "weight_decay", "grad_clip", "ema_decay", "head", "vq", "order",
              "diffloss_w", "mask_ratio_min", "mask_ratio_law", "pos_embed_init", "dropout", "encoder_depth",
              "decoder_depth", "precision", "kl_weight", "disc_weight", "disc_start")


def save_checkpoint(path, state):
    """Atomic: a crash or a failed write (full disk, read-only directory) leaves the previous file intact
    (write a temp file, then rename); a failed write stops the run with one line."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:      # torch reports a full disk as RuntimeError("... file write failed")
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        raise OSError(f"cannot write {path} ({str(e).splitlines()[0]}): {kept}; free disk space or pass another "
                      "--output_dir, then --resume") from None


def same_config(a, b):
    """== for plain dicts that may hold tensors (a VQ tokenizer's codebook)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_config(a[k], b[k]) for k in a)
    return a == b


def checkpoint_args(ckpt):
    """The arguments a checkpoint was trained with (stored resolved). A flag it predates holds the value
    it trained with: the parser's default, resolved by the same rule (resolve_defaults), except
    --precision: a run from before it trained in fp32 on a CPU (on a GPU in bf16: check_resume does not
    compare what is unknown)."""
    return resolve_defaults({**vars(build_parser().parse_args([])), "precision": "fp32", **ckpt["args"]})


def check_resume(ckpt, run_args, tokenizer_cfg):
    need = ("model", "model_ema", "optimizer", "step", "args", "tokenizer")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in need):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"--resume {run_args['resume']!r} is not a train.py checkpoint (it needs {', '.join(need)}; "
                         f"found {found}): pass the checkpoint-last.pth of the run to continue")
    old = checkpoint_args(ckpt)
    keys = MUST_MATCH + (("epochs",) if run_args["lr_schedule"] == "cosine" else ())
    if "precision" not in ckpt["args"]:   # from before --precision: fp32 on a CPU, bf16 on a GPU; either continues
        keys = tuple(k for k in keys if k != "precision")
    if "data_size" in ckpt["args"]:       # another data set (or size) changes every epoch-based step count
        keys += ("data_size",)
    diff = [f"{k}: checkpoint {old.get(k)!r} vs now {run_args.get(k)!r}" for k in keys if old.get(k) != run_args.get(k)]
    if "vae_sha" not in ckpt["tokenizer"]:    # from before autoencoder configs named their weights: the rest
        tokenizer_cfg = {k: v for k, v in tokenizer_cfg.items() if k != "vae_sha"}
    if not same_config(ckpt["tokenizer"], tokenizer_cfg):
        show = lambda cfg: {k: (f"tensor{tuple(v.shape)}" if torch.is_tensor(v) else v) for k, v in cfg.items()}
        same_kind = ckpt["tokenizer"].get("kind") == tokenizer_cfg.get("kind")
        diff.append(f"tokenizer: checkpoint {show(ckpt['tokenizer'])} vs now {show(tokenizer_cfg)}"
                    + (" (different codebooks)" if same_kind and tokenizer_cfg.get("kind") == "vq" else "")
                    + (" (other autoencoder weights: pass the --vae the run started with)"
                       if same_kind and ckpt["tokenizer"].get("vae_sha") != tokenizer_cfg.get("vae_sha") else ""))
    if not diff and old.get("data_path") != run_args.get("data_path"):
        print0(f"--resume: --data_path {old.get('data_path')!r} -> {run_args.get('data_path')!r}: allowed, the data "
               f"set has the same size ({run_args.get('data_size')} images), so the schedule is unchanged")
    if diff:
        raise ValueError("--resume: this run's settings differ from the checkpoint's, so it would not continue "
                         "the same run:\n  " + "\n  ".join(diff) + "\n  (shards = world_size * accum_iter)")


def checkpoint_path(args):
    """OUTPUT_DIR/checkpoint-last.pth, the file this run writes; refused if it already holds a run that
    --resume does not continue (a new run would overwrite it)."""
    path = os.path.join(args.output_dir, "checkpoint-last.pth")
    if args.resume is None and os.path.exists(path):
        raise FileExistsError(f"{path} exists: continue it with --resume {path}, or pick a new --output_dir")
    if args.resume is not None and os.path.exists(path) and not os.path.samefile(args.resume, path):
        raise FileExistsError(f"--output_dir {args.output_dir} holds another run's checkpoint, which --resume "
                              f"{args.resume} would overwrite: pass --output_dir {os.path.dirname(args.resume) or '.'} "
                              "(the run's own) or an empty one")
    return path


def start_metrics(path, resumed_step=None):
    """Start a run's metrics.jsonl: empty for a new run; a resumed run keeps the rows up to its checkpoint's
    step and drops what came after it (those steps are trained again)."""
    rows = []
    if resumed_step is not None and os.path.exists(path):
        rows = [r for r in metric_rows(path) if json.loads(r)["step"] <= resumed_step]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(rows)


def metric_rows(path):
    """The lines of a metrics.jsonl. A last line that is not JSON was torn by a crash mid-write (it is
    after the checkpoint's step anyway): dropped. A bad line before it is not a crash: an error."""
    lines = [line for line in open(path) if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print0(f"{path}: dropping a torn last line (a crash mid-write): {line.strip()[:60]!r}")
                return lines[:-1]
            raise ValueError(f"{path} line {i + 1} is not JSON: repair or remove that file to --resume") from None
    return lines


# ------------------------------------------------------------------------------------------------
# Arguments: the parser, the defaults that depend on other flags, the model's keyword arguments
# ------------------------------------------------------------------------------------------------
# The paper's values are MAR's constructor defaults (MAR-B on ImageNet 256): the parser and the rule
# below read them there instead of spelling them again.
MAR_DEFAULTS = {k: p.default for k, p in inspect.signature(mar.MAR).parameters.items()}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="mar_tiny", choices=list(mar.MODELS) + list(tk.AUTOENCODERS),
      help="size from mar.MODELS, or an autoencoder to train as a tokenizer (tokenizer.AUTOENCODERS: kl_f4, "
           "kl_f2, vq_f4, vq_f2)")
    a("--data", default="builtin", choices=DATA_SOURCES,
      help="builtin: shapes drawn by code; folder: root/<class>/<images>; latents: a tokenizer.cache_latents "
           "directory; array: .npz/.npy of uint8 images; fashion_mnist: its idx files")
    a("--data_path", default=None, help="folder, cache directory, array file or idx directory")
    a("--image_size", type=int, default=None, help="builtin / folder image size (default 16 / 256)")
    a("--patch_size", type=int, default=None,
      help="token = p x p patch: VAE latents (default 1), pixels (default 4; 8 on --data builtin)")
    a("--vae", default=None, help="kl16.ckpt, or the checkpoint of an autoencoder trained here: model its "
                                  "latents instead of pixels (a VQ one's codes with --head ce)")
    a("--vq", type=int, default=None, metavar="K",
      help="discrete tokens (Table 1's CE baseline): snap each pixel patch to the nearest of K k-means codes; "
           "vq_* autoencoders: their codebook size (default 1024)")
    a("--kl_weight", type=float, default=None,
      help="kl_* autoencoders: weight of the KL term per pixel (default LDM's 1e-6)")
    a("--disc_weight", type=float, default=0.0,
      help="autoencoders: weight of LDM's adversarial term (a PatchGAN, hinge loss, adaptive weight; LDM: 0.5); "
           "0 = none")
    a("--disc_start", type=float, default=0.0, help="autoencoders: epoch at which the adversarial term starts")
    a("--codebook", default=None, help="--vq codebook file: loaded if it exists, else fitted (seeded by --seed) "
                                       "and written there (default: OUTPUT_DIR/codebook.pth)")
    a("--head", default="diffusion", choices=mar.HEADS,
      help="per-token loss: diffusion (the paper), ce (cross-entropy over the --vq codes), l2 (MSE, App. D.2)")
    a("--order", default=None, choices=("raster", "random"), help="ar_* models: generation order (default raster)")
    a("--diffloss_w", type=int, default=None,
      help="width of the per-token head's MLP (default: the model's in mar.MODELS; the paper's Table 4 varies it)")
    a("--mask_ratio_min", type=float, default=None,
      help="mar_* models: lower end of the training mask ratio, N(1, 0.25) truncated to [this, 1] (the truncnorm "
           "law; default: 0 on --data builtin, whose few tokens need training with many known tokens; else the "
           "paper's 0.7)")
    a("--mask_ratio_law", default=None, choices=mar.MASK_RATIO_LAWS,
      help="mar_* models: law of the training mask ratio: truncnorm (the paper's, see --mask_ratio_min), uniform "
           "(the masked count uniform on 1..seq), cosine (as the generation schedule visits it); see MAR.mask_count "
           "(default: uniform on --data builtin without --mask_ratio_min, else truncnorm)")
    a("--pos_embed_init", default=MAR_DEFAULTS["pos_embed_init"], choices=mar.POS_EMBED_INITS,
      help="initial value of the learned position embeddings: normal (N(0, 0.02), the paper's) or sincos (2D "
           "sin-cos of the token grid, then learned as usual)")
    a("--encoder_depth", type=int, default=None,
      help="mar_* models: blocks of the MAE encoder (default: the model's, e.g. mar_tiny 2)")
    a("--decoder_depth", type=int, default=None,
      help="mar_* models: blocks of the decoder, the only ones an unknown token's query passes through (default: "
           "the model's, e.g. mar_tiny 2; --encoder_depth 1 --decoder_depth 3 keeps mar_tiny's size)")
    a("--dropout", type=float, default=None,
      help="dropout on the Transformer's attention and projections (default: the model's, 0.1 as the released "
           "code; the per-token head has none)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True,
      help="random horizontal flips (the paper's augmentation); --no-hflip for digits or text")
    a("--batch_size", type=int, default=64, help="images per process per micro-step")
    a("--accum_iter", type=int, default=1, help="micro-steps per optimizer step (global batch = batch x procs x this)")
    a("--epochs", type=float, default=12, help="length of the run and of the cosine schedule (paper: 800)")
    a("--max_steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    a("--warmup_epochs", type=float, default=1, help="linear warmup (paper: 100)")
    a("--blr", type=float, default=4e-3,
      help="base lr: lr = blr * global_batch / 256 (paper: 1e-4 for MAR-B..H; mar_tiny on shapes: 4e-3)")
    a("--lr_schedule", choices=("constant", "cosine"), default="constant", help="after warmup (paper: constant)")
    a("--weight_decay", type=float, default=0.02, help="on weight matrices (paper: 0.02)")
    a("--grad_clip", type=float, default=3.0, help="max gradient norm (paper: 3.0)")
    a("--ema_decay", type=float, default=0.9999, help="EMA of the weights, used for sampling (paper: 0.9999)")
    a("--grad_checkpointing", action="store_true", help="recompute activations in backward: less memory")
    a("--compile", action="store_true", help="torch.compile the Diffusion Loss MLP (benchmarks/README.md)")
    a("--precision", choices=PRECISIONS, default="auto",
      help="autocast of the forward pass: auto = bf16 on GPUs and on CPUs with bf16 instructions (Table 1's models "
           "train 1.6-1.8x faster there: benchmarks/README.md), else fp32")
    a("--seed", type=int, default=0)
    a("--num_workers", type=int, default=0, help="DataLoader processes (use ~8 for --data folder/latents)")
    a("--output_dir", default=DEFAULT_OUTPUT_DIR)
    a("--resume", default=None, help="checkpoint to continue (it must exist)")
    a("--log_every", type=int, default=50)
    a("--ckpt_every", type=int, default=500)
    a("--sample_every", type=int, default=1000, help="preview grid every N steps and at the end; 0 = none")
    return p


def resolve_defaults(args):
    """The defaults that depend on other flags, all decided here (args: a dict, filled in place where a
    flag was left None). Tokens: KL-16 latents 1x1 (the paper's), pixels 4x4, the built-in shapes 8x8.
    Order: ar_* models generate in raster order. Mask ratio (mar_* models): the paper's law and lower end
    (MAR's defaults: truncnorm on [0.7, 1]), except on the built-in shapes unless a --mask_ratio_min asks
    for the truncnorm law; the lower end is stored with every law (the others ignore it). ar_* models do
    not mask: they record the truncnorm law and no lower end."""
    builtin, is_mar = args["data"] == "builtin", args["model"].startswith("mar_")
    autoencoder = args["model"] in tk.AUTOENCODERS                 # reads whole images: no patches, no order
    # The built-in shapes' own defaults, chosen with experiments/shapes_judge.py (experiments/README.md): 4
    # tokens of 8x8 pixels, and the masked count uniform on 1..4, since with 4 tokens the paper's N(1, 0.25)
    # on [0.7, 1] trains with at most one known while generation conditions on up to three (the uniform law
    # trains each count alike; 92.8% -> 94.9% of samples recognised, 1,400 each). With the truncnorm law
    # chosen by hand the shapes keep its lower end 0, their default before the uniform law.
    shapes_law = is_mar and builtin and args["mask_ratio_min"] is None
    derived = {
        "patch_size": 1 if args["vae"] or autoencoder else 8 if builtin else 4,
        "order": "raster" if args["model"].startswith("ar_") else None,
        "mask_ratio_law": "uniform" if shapes_law else MAR_DEFAULTS["mask_ratio_law"],
        "mask_ratio_min": None if not is_mar else 0.0 if builtin else MAR_DEFAULTS["mask_ratio_min"],
    }
    for name, value in derived.items():
        if args[name] is None:
            args[name] = value
    return args


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "accum_iter", "log_every", "ckpt_every", "diffloss_w", "patch_size", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:            # torch's generators take 64-bit seeds
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    if not 0 < args.epochs < math.inf:        # also NaN; a run of 0 epochs would still train one step
        raise ValueError(f"--epochs must be > 0 and finite, got {args.epochs} (fractions work: --epochs 0.5)")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {args.max_steps} (leave it out to run all --epochs)")
    if not args.warmup_epochs >= 0:
        raise ValueError(f"--warmup_epochs must be >= 0, got {args.warmup_epochs}")
    # The optimizer's numbers: a negative clip norm would flip the gradients, a decay above 1 diverge.
    for name, ok, want in (("blr", 0 < args.blr < math.inf, "a finite number > 0 (paper: 1e-4)"),
                           ("grad_clip", 0 < args.grad_clip, "> 0 (paper: 3.0; inf: no clipping)"),
                           ("weight_decay", 0 <= args.weight_decay < math.inf, "a finite number >= 0 (paper: 0.02)"),
                           ("ema_decay", 0 <= args.ema_decay <= 1, "in [0, 1] (paper: 0.9999)")):
        if not ok:
            raise ValueError(f"--{name} must be {want}, got {getattr(args, name)}")
    if args.model in tk.AUTOENCODERS:
        # An autoencoder reads whole images: MAR's token and model flags would be ignored, so they are errors.
        ignored = [f for f in ("vae", "codebook", "order", "diffloss_w", "mask_ratio_min", "mask_ratio_law",
                               "encoder_depth", "decoder_depth", "dropout", "patch_size") if getattr(args, f) is not None]
        ignored += [f for f, on in (("head", args.head != "diffusion"), ("compile", args.compile),
                                    ("grad_checkpointing", args.grad_checkpointing),
                                    ("pos_embed_init", args.pos_embed_init != MAR_DEFAULTS["pos_embed_init"]),
                                    ("vq", args.vq is not None and not args.model.startswith("vq_")),
                                    ("kl_weight", args.kl_weight is not None and not args.model.startswith("kl_"))) if on]
        if ignored:
            raise ValueError(f"--model {args.model} trains an autoencoder: drop {', '.join('--' + f for f in ignored)} "
                             "(MAR's flags; --vq is the vq_* codebook size, --kl_weight the kl_* KL weight)")
        if args.data == "latents":
            raise ValueError(f"--model {args.model} trains an autoencoder on images: --data latents holds another "
                             "autoencoder's latents; pass the images (--data folder / array / fashion_mnist)")
    elif args.head == "ce" and args.vq is None and args.vae is None:
        raise ValueError("--head ce is a softmax over discrete codes: add --vq K (e.g. --vq 1024), or a VQ "
                         "autoencoder's --vae")
    if args.model not in tk.AUTOENCODERS and (args.kl_weight is not None or args.disc_weight or args.disc_start):
        raise ValueError("--kl_weight, --disc_weight and --disc_start are for the autoencoders (--model kl_f4, vq_f4, ...)")
    if not (0 <= args.disc_weight < math.inf and 0 <= args.disc_start < math.inf):
        raise ValueError(f"--disc_weight and --disc_start must be finite numbers >= 0, got {args.disc_weight}, "
                         f"{args.disc_start}")
    if args.disc_start and not args.disc_weight:
        raise ValueError("--disc_start without --disc_weight: there is no adversarial term to start (add "
                         "--disc_weight, e.g. LDM's 0.5)")
    if args.disc_weight and args.disc_start >= args.epochs:
        raise ValueError(f"--disc_start {args.disc_start} is not before --epochs {args.epochs}: the adversarial "
                         "term would never start")
    if args.kl_weight is not None and not 0 <= args.kl_weight < math.inf:
        raise ValueError(f"--kl_weight must be a finite number >= 0, got {args.kl_weight}")
    if args.vq is not None and (args.vq < 2 or args.vae is not None):   # (an autoencoder's codebook: K >= 2)
        raise ValueError(f"--vq {args.vq}: needs K >= 2 and pixel tokens (it quantizes pixel patches, not --vae latents)")
    if args.mask_ratio_min is not None and (args.model.startswith("ar_") or not 0 <= args.mask_ratio_min <= 1):
        raise ValueError(f"--mask_ratio_min {args.mask_ratio_min}: needs a mar_* model (ar_* models do not mask) "
                         "and a value in [0, 1]")
    if args.mask_ratio_law not in (None, "truncnorm") and (args.model.startswith("ar_") or args.mask_ratio_min is not None):
        raise ValueError(f"--mask_ratio_law {args.mask_ratio_law}: needs a mar_* model and no --mask_ratio_min "
                         "(the lower bound belongs to the truncnorm law)")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    for flag in ("encoder_depth", "decoder_depth"):
        depth = getattr(args, flag)
        if depth is not None and (args.model.startswith("ar_") or depth < 1):
            raise ValueError(f"--{flag} {depth}: needs a mar_* model (ar_* models have one stack of blocks) "
                             "and a value >= 1")
    # A flag that would be ignored is an error: the checkpoint's arguments must say what the run used.
    if args.data == "builtin" and args.data_path is not None:
        raise ValueError("--data_path is for the other --data sources; --data builtin draws its shapes in code")
    if args.data == "latents" and args.image_size is not None:
        raise ValueError("--image_size: cached latents fix the image size (the latents' size x the VAE's factor); drop it")
    if args.order is not None and not args.model.startswith("ar_"):
        raise ValueError(f"--order is for the causal ar_* models; {args.model} always generates in random order")
    resolve_defaults(vars(args))
    args.precision = resolve_precision(args.precision, default_device_type())   # stored resolved, like the above
    if args.resume is not None and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint (a missing file never means "
                                "'start from scratch': drop --resume to start a new run)")
    return args


def model_kwargs(args, tokenizer):
    """mar.build_model's keyword arguments for this run (get_args' resolved values; the caller adds
    num_classes): the token shape, then each model flag, always handed over. A flag left None stands for
    the model's own value (mar.MODELS, or the class's default) and is not passed. The mask ratio and the
    depths of the two halves exist for mar_* models only, the order for ar_* models only. An autoencoder
    (tokenizer.build_autoencoder) gets the images' channels, its codebook size and its KL weight."""
    if args.model in tk.AUTOENCODERS:
        kw = dict(in_channels=tokenizer.channels, num_codes=args.vq, kl_weight=args.kl_weight)
        return {k: v for k, v in kw.items() if v is not None}
    kw = dict(seq_len=tokenizer.seq_len, token_dim=tokenizer.token_dim, head=args.head,
              num_codes=tokenizer.num_codes if args.head == "ce" else None,
              clip_x0=tokenizer.token_bound if args.head == "diffusion" else None,  # bounded tokens: clip x0 (DiffLoss)
              diffloss_w=args.diffloss_w, pos_embed_init=args.pos_embed_init, attn_dropout=args.dropout,
              proj_dropout=args.dropout, grad_checkpointing=args.grad_checkpointing)
    if args.model.startswith("mar_"):
        kw.update(mask_ratio_law=args.mask_ratio_law, mask_ratio_min=args.mask_ratio_min,
                  encoder_depth=args.encoder_depth, decoder_depth=args.decoder_depth)
    else:
        kw.update(order=args.order)
    return {k: v for k, v in kw.items() if v is not None}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def duration(seconds):
    """3725.2 -> '1h02m05s', 65 -> '1m05s': an ETA of days stays readable."""
    h, rest = divmod(int(seconds), 3600)
    return (f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m") + f"{rest % 60:02d}s"


def take_lock(path):
    """Create the lock file `path` holding our pid; False if a running process holds it. The lock of a process
    that is gone (killed, machine restarted) is taken over. Also the experiments' locks (experiments/)."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            pass
        try:
            text = open(path).read().strip()
            if not text and time.time() - os.path.getmtime(path) < 60:
                return False                           # its pid is being written
            if text:
                with contextlib.suppress(PermissionError):   # another user's process: it runs
                    os.kill(int(text), 0)              # ProcessLookupError if there is no such process
                return False
        except FileNotFoundError:                      # released meanwhile: try again
            continue
        except (ProcessLookupError, ValueError):
            pass
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)                            # its process is gone


def release_lock(path):
    """Remove our lock file (the one holding our pid). One already gone (deleted by hand) is no error: the work
    it guarded is done; one another process has taken since is its lock, left to it."""
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            ours = f.read().strip() == str(os.getpid())
        if ours:
            os.remove(path)


def lock_output_dir(output_dir):
    """One run per output directory: OUTPUT_DIR/train.lock holds the pid of the train.py writing there (two
    would interleave metrics.jsonl and overwrite each other's checkpoints). -> the lock's path."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:                      # a file in the way, no permission
        raise ValueError(f"--output_dir {output_dir}: cannot make the directory ({e.strerror})") from None
    path = os.path.join(output_dir, "train.lock")
    if not take_lock(path):
        pid = "that just stopped"
        with contextlib.suppress(FileNotFoundError):    # released meanwhile: the message still holds
            pid = open(path).read().strip() or "being started"
        raise FileExistsError(f"--output_dir {output_dir} is in use by another train.py (pid {pid}): wait for it "
                              f"or pick another directory (if no train.py runs there, delete {path})")
    return path


class StopOnSignal:
    """SIGTERM / SIGINT (Ctrl-C) while training only note the signal: the step in progress finishes, then
    the run saves a checkpoint and stops (a second Ctrl-C gives up on the clean stop). The previous
    handlers come back when the training loop ends, however it ends."""

    def __init__(self, rank, world, device):
        self.rank, self.world, self.device, self.signal = rank, world, device, None

    def __enter__(self):
        self.old = {s: signal.signal(s, self.note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def note(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"[rank {self.rank}] {signal.Signals(signum).name}: finishing this step, then saving", flush=True)

    def agreed(self):
        """Whether to stop after this step: yes on every rank if any rank got a signal (they must stop together)."""
        if self.world == 1:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Adversary:
    """LDM's adversarial term while an autoencoder trains (--disc_weight > 0): a PatchGAN discriminator with
    its own Adam (betas (0.5, 0.9), taming's; the autoencoder's learning rate) and the hinge loss. Once `on`
    (from --disc_start), the autoencoder's loss gains disc_weight * adaptive_weight * -D(reconstruction)
    (tokenizer.py's forward calls generator_term), and after each training step the discriminator takes one
    step on the same real images and their (detached) reconstructions, made before the autoencoder's step
    (taming decodes them again after it: one forward pass more for the same end)."""

    def __init__(self, channels, image_size, weight, device, world):
        self.disc = tk.PatchDiscriminator(channels).to(device)
        if self.disc.patches(image_size) < 1:
            raise ValueError(f"--disc_weight: images of {image_size}x{image_size} are too small for the PatchGAN "
                             "discriminator (12x12 at least): drop --disc_weight or raise --image_size")
        self.ddp = DDP(self.disc, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 \
            else self.disc
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=0.0, betas=(0.5, 0.9))
        self.weight, self.on, self.pairs = weight, False, []
        self.sums = torch.zeros(3, device=device)        # since the last log: D's loss, -D(rec), the weight
        self.counts = [0, 0]                             # D steps, generator terms
        self.finite = torch.ones((), dtype=torch.bool, device=device)      # D's last loss (train's check)

    def generator_term(self, rec_loss, images, rec, last_layer):
        if not self.on:
            return 0.0
        self.pairs.append((images, rec.detach()))
        self.disc.requires_grad_(False)                  # the gradient flows through D to the decoder only
        try:
            g_loss = -self.disc(rec).float().mean()
        finally:
            self.disc.requires_grad_(True)
        weight = self.weight * tk.adaptive_weight(rec_loss, g_loss, last_layer)
        self.sums[1:] += torch.stack([g_loss.detach(), weight])
        self.counts[1] += 1
        return weight * g_loss

    def step(self, lr, device, precision):
        """The discriminator's step on this training step's pairs (none while off)."""
        pairs, self.pairs = self.pairs, []
        if not pairs:
            return
        real, fake = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        with autocast(device, precision):
            logits = self.ddp(torch.cat([real, fake.to(real.dtype)])).float()
        loss = tk.hinge_d_loss(*logits.chunk(2))
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sums[0] += loss.detach()
        self.counts[0] += 1
        self.finite = torch.isfinite(loss.detach())

    def log_stats(self):
        """Rank 0's means since the last log: the discriminator's loss (1.0 = chance, logits near 0), the
        generator's adversarial loss -D(rec) and its weight (disc_weight x adaptive weight), which make
        the logged loss larger than the reconstruction's by their product."""
        if not self.counts[1]:
            return {}
        d, g, w = self.sums.tolist()
        stats = dict(disc_loss=round(d / max(self.counts[0], 1), 4), gen_loss=round(g / self.counts[1], 4),
                     adv_weight=round(w / self.counts[1], 4))
        self.sums.zero_()
        self.counts = [0, 0]
        return stats

    def state_dict(self):
        return {"disc": self.disc.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state):
        tk.load_state_dict_strict(self.disc, state["disc"], "discriminator (resume)")
        self.opt.load_state_dict(state["optimizer"])


def main(argv=None):
    """Train; -> the number of the signal that stopped the run early (its checkpoint saved), else None."""
    args = get_args(argv)
    rank, world, device = setup_distributed()
    lock = error = None
    if rank == 0:
        try:
            lock = lock_output_dir(args.output_dir)
        except (ValueError, FileExistsError) as e:
            error = e
    if world > 1:                             # the other ranks stop too, instead of waiting for rank 0 forever
        failed = torch.tensor(float(error is not None), device=device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            error = FileExistsError(f"--output_dir {args.output_dir}: rank 0 could not lock it (its message says why)")
    if error is not None:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise error
    try:
        stopped_by = train(args, rank, world, device)
        if world > 1:
            # Leave together: rank 0 is still writing the last checkpoint when the others finish; a rank
            # that tears its gloo connections down meanwhile was seen to abort (SIGABRT, "terminate called
            # without an active exception") in CI, and torchrun then fails the whole job.
            dist.barrier()
    finally:
        if lock is not None:
            release_lock(lock)
        if dist.is_initialized():
            dist.destroy_process_group()
    return stopped_by


def build_model(args, tokenizer, num_classes):
    """The model to train: an autoencoder (a tokenizer, reading pixels) or a MAR / AR model of the tokens."""
    if args.model in tk.AUTOENCODERS:
        model = tk.build_autoencoder(args.model, **model_kwargs(args, tokenizer))
        if tokenizer.image_size % model.downsample_factor:
            raise ValueError(f"--model {args.model} downsamples by {model.downsample_factor}: the images "
                             f"({tokenizer.image_size}x{tokenizer.image_size}) must be a multiple of it (--image_size)")
        return model
    model = mar.build_model(args.model, num_classes=num_classes, **model_kwargs(args, tokenizer))
    if args.head == "ce":                        # the head samples codes: it holds the tokenizer's codebook
        model.diffloss.codebook.copy_(tokenizer.codebook)
    return model


@torch.no_grad()
def preview(args, ema, tokenizer, dataset, step, device):
    """OUTPUT_DIR/samples_STEP.png (8 per class, sample.py's defaults: no CFG, 64 steps at most), or an
    autoencoder's reconstructions_STEP.png (rows of 8 images, each above its reconstruction)."""
    if args.model in tk.AUTOENCODERS:
        x = torch.stack([dataset[i][0] for i in range(min(32, len(dataset)))]).to(device)
        rec = ema.reconstruct(x)
        rows = [part for k in range(0, len(x), 8) for part in (x[k:k + 8], rec[k:k + 8])]
        save_grid(to_uint8(torch.cat(rows)), os.path.join(args.output_dir, f"reconstructions_{step:07d}.png"), 8)
    else:
        labels = torch.tensor(grid_classes(dataset.num_classes), device=device).repeat_interleave(8)
        g = torch.Generator(device).manual_seed(args.seed)
        images = generate(ema, tokenizer, labels, g, precision=resolve_precision(SAMPLE_PRECISION, device.type))
        save_grid(images, os.path.join(args.output_dir, f"samples_{step:07d}.png"), nrow=8)


def train(args, rank, world, device):
    """One process's run: data, tokens, model (or the --resume one), then the steps; -> the signal that
    stopped it early (its checkpoint saved), else None."""
    is_main = rank == 0
    shards = world * args.accum_iter
    global_batch = args.batch_size * shards
    run_args = dict(vars(args), world_size=world, shards=shards)   # a plain dict: loads with weights_only
    ckpt_path = checkpoint_path(args)
    dataset = load_data(args)
    run_args["data_size"] = len(dataset)          # the schedule's steps per epoch: a resume must see the same
    steps_per_epoch = len(dataset) / global_batch
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    disc_start = round(args.disc_start * steps_per_epoch)
    if args.disc_weight and disc_start >= total_steps:      # (get_args compares epochs; the steps round)
        raise ValueError(f"--disc_start {args.disc_start:g} is step {disc_start} of {total_steps} ({len(dataset)} "
                         f"images, global batch {global_batch}): the adversarial term would never start; lower it")
    tokenizer = make_tokenizer(args, dataset).to(device)
    ckpt = tk.torch_load(args.resume) if args.resume else None
    if ckpt is not None:
        check_resume(ckpt, run_args, tokenizer.config())

    torch.manual_seed(args.seed)                                         # same initial weights on every rank
    autoencoder = args.model in tk.AUTOENCODERS                          # a tokenizer to train: it reads pixels
    model = build_model(args, tokenizer, dataset.num_classes)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(mar.param_groups(model, args.weight_decay), lr=0.0, betas=(0.9, 0.95))
    adversary = Adversary(tokenizer.channels, tokenizer.image_size, args.disc_weight, device, world) \
        if args.disc_weight > 0 else None
    step = 0
    if ckpt is not None:
        tk.load_state_dict_strict(model, ckpt["model"], f"{args.model} (resume)")
        tk.load_state_dict_strict(ema, ckpt["model_ema"], f"{args.model} EMA (resume)")
        opt.load_state_dict(ckpt["optimizer"])
        if adversary is not None:
            adversary.load_state_dict(ckpt["adversary"])
        step = ckpt["step"]
    model.to(device)
    ema.to(device)
    if args.compile:
        # The head sees a static (B * seq * 4, C) batch every step: one graph. In place (Module.compile),
        # so the state dict keeps its names (no "_orig_mod."). The Transformer stays eager: its
        # known-token count changes every step (a new shape, more graphs).
        model.diffloss.net.compile()
    opt.load_state_dict(opt.state_dict())        # moves a resumed optimizer's state onto the device
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    stop_step = min(total_steps, args.max_steps) if args.max_steps is not None else total_steps
    peak_lr = args.blr * global_batch / 256                               # the paper's linear scaling rule
    my_shards = list(range(rank * args.accum_iter, (rank + 1) * args.accum_iter))
    sampler = StepSampler(len(dataset), args.batch_size, shards, my_shards, args.seed, args.hflip, step, stop_step)
    loader = iter(torch.utils.data.DataLoader(Flippable(dataset), batch_sampler=sampler, num_workers=args.num_workers,
                                              pin_memory=device.type == "cuda"))

    metrics = os.path.join(args.output_dir, "metrics.jsonl")
    if is_main:
        start_metrics(metrics, step if ckpt is not None else None)
    n_params = sum(p.numel() for p in model.parameters())
    reads = f"images {tokenizer.image_size}x{tokenizer.image_size}x{tokenizer.channels}" if autoencoder else \
        f"tokens {tokenizer.seq_len} x {tokenizer.token_dim}"
    print0(f"{args.model}: {n_params / 1e6:.2f}M parameters, {reads}, "
           f"{dataset.num_classes} classes, {len(dataset)} images | {world} process(es) on {device}, "
           f"{describe_precision(args.precision, device.type)}, global batch "
           f"{global_batch}, lr {peak_lr:.2e}, {stop_step} steps"
           + (f" (--max_steps; the schedule has {total_steps})" if stop_step < total_steps else "")
           + f", {steps_per_epoch:.1f} steps/epoch"
           + (f", resuming at step {step}" if step else ""))

    finished = {}                                # an autoencoder's latent scale, measured at the end

    def checkpoint():
        if is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "model_ema": ema.state_dict(), "config": {**model.config, "model": args.model},
                "tokenizer": tokenizer.config(), "optimizer": opt.state_dict(), "step": step,
                "epoch": int(step / steps_per_epoch), "args": run_args, **finished,
                **({"adversary": adversary.state_dict()} if adversary else {})})

    def check_finite():
        bad = int(first_bad)                     # the same on every rank: gradients are all-reduced
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss/gradient at step {bad}: stopping. The last good checkpoint is "
                f"{ckpt_path if os.path.exists(ckpt_path) else 'none'}; try a lower --blr.")

    loss_sum, window_start, window_steps, t_start = torch.zeros((), device=device), time.time(), 0, time.time()
    start_step, t_first = step, None
    first_bad = torch.tensor(-1, device=device)
    with StopOnSignal(rank, world, device) as stop:
        while step < stop_step:
            lr = learning_rate(step, peak_lr, warmup_steps, total_steps, args.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            if adversary is not None:
                adversary.on = step >= disc_start
            for a in range(args.accum_iter):
                x, labels = next(loader)
                x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                torch.manual_seed(shard_seed(args.seed, step, my_shards[a]))  # all of the model's draws
                with torch.no_grad():                                     # tokens in fp32: frozen tokenizer
                    tokens = x if autoencoder else \
                        tokenizer.tokens_from_moments(x) if args.data == "latents" else tokenizer.encode(x)
                sync = a == args.accum_iter - 1 or world == 1             # DDP all-reduces on the last one
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast(device, args.precision):
                    loss = ddp(tokens, labels, **({"adversary": adversary} if adversary else {})) / args.accum_iter
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            # The first step with a non-finite gradient norm, kept on the device: reading it every step
            # would make the host wait for the device each step; it is read before anything is logged
            # or saved (check_finite), so no checkpoint ever holds weights updated with it.
            first_bad = torch.where(torch.isfinite(grad_norm) | (first_bad >= 0), first_bad, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if adversary is not None:
                adversary.step(lr, device, args.precision)
                first_bad = torch.where(adversary.finite | (first_bad >= 0), first_bad, step)
            update_ema(ema, model, args.ema_decay, step)
            step += 1
            window_steps += 1
            # ETA from the mean step time since the first step of this process: the first one also pays
            # one-time costs (thread pools, allocator, DataLoader start, autotuning), a 50-step window is noisy
            now = time.time()
            if t_first is None:
                t_first = now
            mean_step = (now - t_first) / (step - start_step - 1) if step > start_step + 1 else now - t_start
            eta = (stop_step - step) * mean_step
            log = step % args.log_every == 0 or step == stop_step

            stopping = stop.agreed()
            if log or step % args.ckpt_every == 0 or stopping:
                check_finite()
            if step == start_step + 1 and not (log or stopping):      # first feedback at once, not at step 50
                print0(f"step {step}/{stop_step} | first step {now - t_start:.1f} s (includes start-up) | "
                       f"ETA {duration(eta)} (from this step alone)")
            if log or stopping:
                if world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                elapsed = time.time() - window_start
                row = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=loss_sum.item() / window_steps,
                           lr=lr, grad_norm=round(grad_norm.item(), 4), images_per_s=round(window_steps * global_batch / elapsed, 1),
                           elapsed_s=round(time.time() - t_start, 1))
                stats = model.log_stats() if hasattr(model, "log_stats") else {}     # e.g. a codebook's use
                stats.update(adversary.log_stats() if adversary else {})
                row.update(stats)
                print0(f"step {step}/{stop_step} | epoch {row['epoch']:.2f} | loss {row['loss']:.4f} | lr {lr:.2e} | "
                       f"{row['images_per_s']:.0f} img/s | ETA {duration(eta)}"
                       + "".join(f" | {k} {v}" for k, v in stats.items()))
                if is_main:
                    with open(metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                loss_sum.zero_()
                window_start, window_steps = time.time(), 0
            if step % args.ckpt_every == 0 or step == stop_step or stopping:
                checkpoint()
            if is_main and args.sample_every > 0 and (step % args.sample_every == 0 or step == stop_step):
                preview(args, ema, tokenizer, dataset, step, device)
            if stopping:
                print0(f"stopped by signal at step {step}; continue with --resume {ckpt_path}")
                break
    if autoencoder and step == stop_step:
        # The latent scale (1 / std of the latents over the training images, as 0.2325 is for KL-16 on
        # ImageNet) and range (the sampler's clip), stored in the checkpoint: train.py --vae and sample.py
        # read them from there.
        finished["scale"], finished["latent_bound"] = tk.latent_stats(ema, dataset, device=device)
        print0(f"latent scale {finished['scale']:.4f}, range +-{finished['latent_bound']:.4g} (1 / std and max |z| "
               f"of the latents over {min(len(dataset), 2_000)} training images): use this checkpoint as --vae "
               f"{ckpt_path}")
        checkpoint()
    print0(f"done: step {step}, {time.time() - t_start:.0f} s; checkpoint {ckpt_path}")
    return stop.signal


if __name__ == "__main__":
    try:
        signum = main()
    except (ValueError, OSError, FloatingPointError) as e:
        # bad input, a failed write or a stopped run: the message says what to fix; a traceback would bury it
        raise SystemExit(f"train.py: error: {e}")
    if signum is not None:   # stopped by SIGTERM / Ctrl-C, checkpoint saved: not finished, as a scheduler must see
        raise SystemExit(128 + signum)
