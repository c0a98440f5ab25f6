"""
sample.py -- generate images from a MAR / AR checkpoint (ours from train.py, or the released ones).

How it fits: mar.py's `load_checkpoint` rebuilds the model (from the checkpoint's config, or from the
tensor shapes of a released file), `model.sample_tokens` runs the paper's generation loop (Sec. 3.5:
K steps in random order, each token drawn by the Diffusion Loss sampler, Sec. 3.3), and tokenizer.py
decodes the tokens into images. train.py calls `generate` / `save_grid` for its preview grids.

Run:
  python sample.py                                    # output/checkpoint-last.pth -> output/samples.png
  python sample.py --ckpt output/checkpoint-last.pth --cfg 3.0 --num_iter 16 --out grid.png
  # released MAR-B, ImageNet 256, the paper's FID setting (50 images per class -> 50,000 in one .npz):
  torchrun --nproc_per_node=8 sample.py --ckpt mar_base/checkpoint-last.pth --model mar_base \
      --vae kl16.ckpt --cfg 2.9 --num_iter 256 --npz mar_base.npz --batch_size 128
  python fid.py mar_base.npz --ref adm_in256_stats.npz --inception weights-inception-2015-12-05-6726825d.pth

The images' labels are class-balanced and class-major (image i has class i // per_class), as the ADM
evaluation expects 50 per class. Batch b is generated with a generator seeded by (--seed, b) and
batches go to ranks round-robin, so a given (--seed, --batch_size) gives the same images on one
process or many (on the same kind of machine).
"""
import argparse
import contextlib
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

import mar
import tokenizer as tk

DEFAULT_OUTPUT_DIR = "output"  # train.py's default --output_dir; sample.py reads its latest checkpoint
# Sampling temperature when none is given, by tokenizer kind: the paper's 1.0 for VAE latents (all its
# FID numbers use it) and for VQ codes (a plain softmax); 0.5 for pixel tokens, where the small, briefly
# trained heads of the toy runs spread each token too widely (chosen with experiments/shapes_judge.py;
# results in experiments/README.md).
DEFAULT_TEMPERATURE = {"kl": 1.0, "vqae": 1.0, "vq": 1.0, "pixel": 0.5}
EVAL_PER_CLASS = 50            # FID protocol: 50 images per class (50,000 for ImageNet)
GRID_PER_CLASS = 8             # a preview grid: one row of 8 per class
GRID_MAX_CLASSES = 16          # a preview of a 1000-class model shows 8 classes spread over the range
PRECISIONS = ("auto", "fp32", "bf16")   # auto: bf16 where the device runs it fast (fast_bf16), else fp32
SAMPLE_PRECISION = "auto"


# ------------------------------------------------------------------------------------------------
# Shared with train.py: one process group setup, rank-0 printing, autocast, generation, grids
# ------------------------------------------------------------------------------------------------
def setup_distributed():
    """(rank, world_size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (nanoGPT's test);
    a plain `python` run is rank 0 of 1. NCCL with one GPU per process, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(default_device_type())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def print0(*args, **kwargs):
    """print on rank 0 only: every rank runs the same code, one of them talks."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def default_device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_bf16(device_type):
    """Whether the device multiplies bf16 matrices natively, as torch reports it: a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 or AMX (oneDNN runs bf16 matrix products natively there; on other CPUs bf16 is
    emulated, slower than fp32). Not the processor's name: a VM may hide flags."""
    if device_type == "cuda":                  # native only: pre-Ampere GPUs emulate it
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":   # torch.cpu's private probes; a torch without them counts as no
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in
                   ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def resolve_precision(precision, device_type):
    """--precision auto -> "bf16" where fast_bf16, else "fp32"; "fp32" / "bf16" are taken as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device_type) else "fp32"
    return precision


def describe_precision(precision, device_type):
    """For the start-up line: the precision taken and whether this device runs bf16 fast."""
    fast = "reports fast bf16" if fast_bf16(device_type) else "reports no fast bf16 (bf16 is emulated, slower)"
    return f"precision {precision} (this {device_type.upper()} {fast})"


def autocast(device, precision):
    """bf16 autocast: the matrix products (Linear, attention) in bf16, which has fp32's exponent range
    (the released code's fp16 is a known source of NaN losses). What must stay fp32 does by construction:
    the parameters, so the optimizer state and the EMA (autocast casts copies, never the weights); the
    Diffusion Loss coefficients and the sampler's update, since diffloss.py casts the net's output to fp32
    before them (its first of 100 steps multiplies the noise prediction's error by 1/sqrt(alpha) = 316); the
    loss and its reduction, computed from that fp32 output. "fp32": no autocast."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_uint8(images):
    """images in [-1, 1] (B, C, H, W) -> uint8 (B, H, W, C) on the CPU."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(model, tokenizer, labels, generator, num_iter=64, cfg=1.0, cfg_schedule="linear", temperature=None,
             precision="fp32"):
    """labels (B,) long on the model's device -> uint8 images (B, H, W, C). The model must be in eval mode.
    num_iter (MAR's K) is capped at the sequence length; the causal AR always takes seq_len steps.
    temperature None: DEFAULT_TEMPERATURE of the tokenizer's kind. precision: "fp32" or "bf16" (autocast);
    the tokenizer decodes in fp32 either way."""
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE[tokenizer.config()["kind"]]
    kwargs = dict(cfg=cfg, cfg_schedule=cfg_schedule, labels=labels, temperature=temperature, generator=generator)
    if isinstance(model, mar.MAR):
        kwargs["num_iter"] = min(num_iter, model.seq_len)
    with autocast(labels.device, precision):
        tokens = model.sample_tokens(len(labels), **kwargs)                 # (B, seq, token_dim)
    return to_uint8(tokenizer.decode(tokens.float()))


def save_grid(images, path, nrow):
    """uint8 (N, H, W, C) -> one PNG, `nrow` images per row, 2-pixel gaps. Images under 64 pixels are
    enlarged (nearest neighbour, integer factor) so that a 16x16 sample is visible in a viewer."""
    from PIL import Image
    n, h, w, c = images.shape
    rows, pad = math.ceil(n / nrow), 2
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(np.asarray(images)):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    zoom = max(1, 64 // max(h, w))
    grid = grid.repeat(zoom, axis=0).repeat(zoom, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def grid_classes(num_classes):
    """Classes of a preview grid: all of them for small label sets, else 8 spread over the range."""
    if num_classes <= GRID_MAX_CLASSES:
        return list(range(num_classes))
    return torch.linspace(0, num_classes - 1, GRID_PER_CLASS).round().long().tolist()


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def load_model(args):
    """-> (model in eval mode, the checkpoint dict). Validates --model against the file."""
    if args.model is not None and args.model not in mar.MODELS:
        raise ValueError(f"unknown --model {args.model!r}; valid names: {', '.join(mar.MODELS)}")
    model, ckpt = mar.load_checkpoint(args.ckpt, key=args.weights)
    name, overrides = model.config["model"], {k: v for k, v in model.config.items() if k != "model"}
    if args.model is not None and args.model != name:
        raise ValueError(f"--model {args.model} does not match {args.ckpt!r}, which holds a {name!r} "
                         f"({overrides}); drop --model or pass the matching checkpoint")
    model.diffloss.set_sampling_steps(args.num_sampling_steps)
    return model.eval(), ckpt


def clip_to_token_range(model, tokenizer):
    """The Diffusion Loss sampler clips each step's x_0 estimate to the tokens' range where the tokenizer
    knows it (pixels: [-1, 1]; an autoencoder trained here: its latents' measured range; KL-16: none, as
    released). Taken from the tokenizer, not from the run's config: a run trained on an autoencoder's
    latents before autoencoders recorded their range gets it too."""
    if hasattr(model.diffloss, "clip_x0"):
        model.diffloss.clip_x0 = tokenizer.token_bound
    return model


def load_tokenizer(args, ckpt):
    """train.py checkpoints store the tokenizer's config; released MAR files are KL-16 at 256x256. An
    autoencoder's weights are another file: --vae, else the one the run trained with (its --vae), if it
    is still there."""
    cfg = ckpt.get("tokenizer") or dict(kind="kl", vae=tk.VAE_CONFIGS["kl16"], image_size=256, patch_size=1,
                                        scale=tk.KL16_SCALE)
    vae = args.vae
    if cfg["kind"] in ("kl", "vqae") and vae is None:
        vae = (ckpt.get("args") or {}).get("vae") if isinstance(ckpt.get("args"), dict) else None
        if vae is None or not os.path.isfile(vae):
            raise ValueError(f"{args.ckpt!r} models an autoencoder's latents: pass --vae (kl16.ckpt, or the "
                             "autoencoder's checkpoint) to decode them")
    return tk.build_tokenizer(cfg, vae)


def plan_labels(args, num_classes):
    """All images' labels, class-major: (N,) long."""
    evaluation = args.npz is not None or args.png_dir is not None
    if args.labels:
        try:
            classes = [int(c) for c in args.labels.split(",")]
        except ValueError:
            raise ValueError(f"--labels {args.labels!r}: expected comma-separated class indices, e.g. 0,3,7") from None
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--labels {bad} out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    else:
        classes = list(range(num_classes)) if evaluation else grid_classes(num_classes)
    per_class = EVAL_PER_CLASS if evaluation else GRID_PER_CLASS
    n = args.num_images if args.num_images is not None else per_class * len(classes)
    if n <= 0 or n % len(classes):
        raise ValueError(f"--num_images {n} is not a positive multiple of the {len(classes)} classes asked "
                         f"for: images are class-balanced, {per_class} per class by default")
    return torch.tensor(classes).repeat_interleave(n // len(classes))


def check_outputs(args):
    """Every output path is checked, and its directory made, before any image is generated: a bad path
    found after sampling would lose the whole run's images."""
    from PIL import Image
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out!r}: the grid is an image; name it .png (or another image extension)")
    if args.npz is not None and not args.npz.endswith(".npz"):
        raise ValueError(f"--npz {args.npz!r}: name the file with .npz (numpy would write {args.npz}.npz)")
    files = [(flag, path) for flag, path in (("--out", args.out), ("--npz", args.npz)) if path is not None]
    dirs = [(flag, os.path.dirname(os.path.abspath(path))) for flag, path in files]
    for flag, path in files:
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a directory: name a file inside it")
    for flag, d in dirs + ([("--png_dir", args.png_dir)] if args.png_dir is not None else []):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:          # a file where a directory should be, no permission, read-only disk
            raise ValueError(f"{flag}: cannot make directory {d!r} ({e.strerror}): pass another path") from None
        if not os.access(d, os.W_OK):
            raise ValueError(f"{flag}: directory {d!r} is not writable: pass another path")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join(DEFAULT_OUTPUT_DIR, "checkpoint-last.pth"),
                   help="train.py or released checkpoint (default: train.py's latest)")
    p.add_argument("--weights", choices=("model_ema", "model"), default="model_ema",
                   help="which weights to sample with: the EMA (the paper's choice) or the raw ones")
    p.add_argument("--model", default=None, help="expected size (mar_base, ...): checked against the file")
    p.add_argument("--vae", default=None, help="kl16.ckpt, needed to decode KL-16 tokens (default for a train.py "
                                               "checkpoint: the --vae it trained with)")
    p.add_argument("--cfg", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 = none, > 1 guides (paper: 2.9-3.2), 0..1 moves "
                        "towards the unconditional model")
    p.add_argument("--cfg_schedule", choices=mar.CFG_SCHEDULES, default="linear")
    p.add_argument("--temperature", type=float, default=None,
                   help="scales the diffusion sampler's noise (--head ce: softmax temperature; l2: no effect); "
                        "default: 1.0 (the paper's) for KL-16 latents and VQ codes, 0.5 for pixel tokens")
    p.add_argument("--num_iter", type=int, default=64, help="MAR generation steps K (paper: 64 or 256)")
    p.add_argument("--num_sampling_steps", type=int, default=100, help="diffusion steps per token (paper: 100)")
    p.add_argument("--num_images", type=int, default=None,
                   help=f"default: {EVAL_PER_CLASS} per class with --npz/--png_dir, else {GRID_PER_CLASS} per class")
    p.add_argument("--labels", default=None, help="comma-separated classes, e.g. 207,360 (default: all)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass, per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="PNG grid (up to 8 per class, 16 classes); default: samples.png next to --ckpt")
    p.add_argument("--npz", default=None, help="write all images as uint8 NHWC under 'arr_0' (ADM format)")
    p.add_argument("--png_dir", default=None, help="write every image as <dir>/<index>.png")
    p.add_argument("--compile", action="store_true", help="torch.compile the sampler (Diffusion Loss step; MAR's Transformer)")
    p.add_argument("--precision", choices=PRECISIONS, default=SAMPLE_PRECISION,
                   help=f"autocast of the model: auto = bf16 on GPUs and on CPUs with bf16 instructions, else fp32 "
                        f"(default {SAMPLE_PRECISION}; benchmarks/README.md)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_iter < 1:
        raise ValueError("--batch_size and --num_iter must be >= 1")
    # Guidance mixes the conditional and unconditional noise predictions as u + w (c - u) (diffloss.py):
    # w > 1 guides, 0 <= w < 1 interpolates towards u (w = 0: unconditional), w < 0 points away from
    # the class asked for, which no sampler intends.
    if not 0 <= args.cfg < math.inf:             # also NaN
        raise ValueError(f"--cfg must be a finite number >= 0, got {args.cfg} (1 = no guidance; the paper uses 2.9-3.2)")
    if args.temperature is not None and not 0 < args.temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature} (the paper's: 1.0)")
    if args.ckpt == p.get_default("ckpt") and not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"no checkpoint at {args.ckpt!r}: run `python train.py` first (it writes it), "
                                "or pass --ckpt FILE")
    if args.out is None:                       # outputs stay with the run they came from
        args.out = os.path.join(os.path.dirname(args.ckpt), "samples.png")
    check_outputs(args)

    rank, world, device = setup_distributed()
    precision = resolve_precision(args.precision, device.type)
    model, ckpt = load_model(args)
    model.to(device)
    tokenizer = load_tokenizer(args, ckpt).to(device)
    clip_to_token_range(model, tokenizer)
    labels = plan_labels(args, model.num_classes)
    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE[tokenizer.config()["kind"]]
    if args.compile:
        # Most of the sampling time is the 100-step Diffusion Loss loop (benchmarks/README.md); one graph
        # fuses the MLP and the update of each step (and MAR's Transformer). The compiled functions
        # shadow methods, so the modules and their state dict are unchanged.
        model.compile_sampler()

    batches = list(range(math.ceil(len(labels) / args.batch_size)))[rank::world]
    print0(f"{args.ckpt}: {model.config['model']} ({args.weights}), {len(labels)} images, "
           f"{world} process(es), cfg {args.cfg} ({args.cfg_schedule}), temperature {args.temperature}, "
           f"{min(args.num_iter, model.seq_len)} steps, {describe_precision(precision, device.type)}")
    mine, t0 = [], time.time()
    for b in batches:
        idx = torch.arange(b * args.batch_size, min((b + 1) * args.batch_size, len(labels)))
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)   # (seed, batch) -> same images
        images = generate(model, tokenizer, labels[idx].to(device), g, args.num_iter, args.cfg,
                          args.cfg_schedule, args.temperature, precision)       # (b, H, W, C) uint8
        mine.append((idx, images))
        if args.png_dir is not None:
            from PIL import Image
            os.makedirs(args.png_dir, exist_ok=True)
            for i, img in zip(idx.tolist(), images.numpy()):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(os.path.join(args.png_dir, f"{i:06d}.png"))
        print0(f"batch {b + 1}/{math.ceil(len(labels) / args.batch_size)}: "
               f"{sum(len(i) for i, _ in mine) * world / (time.time() - t0):.2f} images/s")
    elapsed = time.time() - t0

    # One file on rank 0: every rank writes its part, rank 0 assembles them in image order.
    parts = (args.npz or args.out) + ".parts"
    if world > 1:
        if rank == 0:
            os.makedirs(parts, exist_ok=True)
        dist.barrier()
        idx = torch.cat([i for i, _ in mine]) if mine else torch.zeros(0, dtype=torch.long)
        imgs = torch.cat([x for _, x in mine]) if mine else torch.zeros(0, dtype=torch.uint8)
        torch.save({"idx": idx, "images": imgs}, os.path.join(parts, f"rank{rank}.pt"))
        dist.barrier()
        if rank == 0:
            mine = [(d["idx"], d["images"]) for d in (torch.load(os.path.join(parts, f"rank{r}.pt"))
                                                      for r in range(world))]
            shutil.rmtree(parts)
    if rank == 0:
        order = torch.cat([i for i, _ in mine]).argsort()
        images = torch.cat([x for _, x in mine])[order].numpy()                # (N, H, W, C) in image order
        per_class = len(labels) // len(labels.unique())
        shown = [i for i in range(len(labels)) if i % per_class < GRID_PER_CLASS][:GRID_PER_CLASS * GRID_MAX_CLASSES]
        save_grid(images[shown], args.out, nrow=min(per_class, GRID_PER_CLASS))
        if args.npz is not None:
            np.savez(args.npz, arr_0=images)
        print0(f"{len(images)} images in {elapsed:.1f} s ({len(images) / elapsed:.2f} images/s); grid -> {args.out}"
               + (f"; npz {images.shape} -> {args.npz}" if args.npz else "")
               + (f"; PNGs -> {args.png_dir}" if args.png_dir else ""))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        # bad input (or a stopped run): the message says what to fix; a traceback would bury it
        raise SystemExit(f"sample.py: error: {e}")
