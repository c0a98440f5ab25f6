"""
benchmarks/speed.py -- sampling and training speed of MAR, as a table and as JSON lines.
Results, with those of the released code at the same settings: benchmarks/README.md.

What it measures, with random weights of the released shapes (seq 256 x 16 KL-16 tokens, 1000 classes):
  sample  `model.sample_tokens(batch, num_iter, cfg, labels)` (the paper's generation loop, Sec. 3.5,
          each token drawn by the Diffusion Loss sampler, Sec. 3.3) then the KL-16 decode
          (`KLTokenizer.decode`), timed separately: s/image with and without the decode.
  train   one full training step per iteration on cached-latent-shaped random tokens (B, 256, 16):
          forward (random mask, diffusion_batch_mul 4 as in the model) + backward + grad clip 3.0 +
          AdamW (paper's param_groups, fused on CUDA) + train.py's EMA update of every weight.
          Data loading is not included (the released code trains from cached latents too).
Each row: warm-up runs first (they also absorb torch.compile), then `--repeats` timed runs; the
median is reported. On CUDA every timed region is bracketed by torch.cuda.synchronize(); peak memory
is torch.cuda.max_memory_allocated over the timed runs ("-" on CPU). --dtype picks the autocast
dtype (default bf16 on CUDA, fp32 on CPU; fp16 training uses a GradScaler, as the released code did).

--compile wraps, by module assignment (mar.py / diffloss.py stay untouched), every encoder and
decoder Block, the Diffusion Loss MLP (`model.diffloss.net`) and the VAE decoder in torch.compile.
The sampling loops themselves (the 64 AR steps, the 100 diffusion steps) stay in Python: the number
of tokens per AR step varies, so the compiled pieces see several shapes (marked dynamic after the
first recompile); compiling can spill into the second warm-up run, so use --warmup 2 or more. The
`compiled_while_timed` column counts graphs compiled during the timed runs: a row is valid only if 0.

--compare (mainly for CPUs) instead times the project's own compiled paths against eager
on copies of the same model: `model.compile_sampler()` (sample.py --compile) for sampling and the
in-place compiled Diffusion Loss MLP (train.py --compile) for training. Eager and compiled runs
alternate, so both see the same machine load; each gets its own row, and the compiled row's
`first_run_s` is its first (compiling) run, timed before the warm-up. CPU commands: benchmarks/README.md.

The GPU table of benchmarks/README.md, on one H100 (each command < 10 min; rows are appended to --out):
  B=python benchmarks/speed.py; O="--out speed_h100.jsonl"
  $B --what sample --models mar_base  --batch 256 --dtype fp16 $O   # fp16 autocast, as the released code
  $B --what sample --models mar_base  --batch 256 --dtype bf16 $O
  $B --what sample --models mar_base  --batch 64  --dtype bf16 $O
  $B --what sample --models mar_large --batch 256 --dtype bf16 $O
  $B --what train  --models mar_base  --train_batch 128,64 --dtype bf16 $O
  $B --what train  --models mar_large --train_batch 64 --dtype bf16 $O
  ...and the same lines with --compile --warmup 2 (--warmup 3 for training: the mask ratio changes shapes).
The speed targets this project set for itself: sampling <= 0.05 (MAR-B 256), 0.06 (MAR-L 256),
0.08 (MAR-B 64) s/image with the decode; training >= 1.5x the released code's images/s with no more memory.

CI / CPU smoke run (seconds; a tiny VAE with random weights decodes when seq_len is not 256):
  python benchmarks/speed.py --device cpu --models mar_tiny --batch 2 --num_iter 4 \
      --num_sampling_steps 5 --seq_len 16 --token_dim 4 --train_batch 2 --train_steps 2 --repeats 1 --warmup 0
"""
import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules
import mar  # noqa: E402
import train  # noqa: E402
from tokenizer import VAE_CONFIGS, AutoencoderKL, KLTokenizer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = [("what", 6), ("model", 10), ("batch", 6), ("num_iter", 9), ("diff_steps", 11), ("cfg", 4),
           ("dtype", 5), ("compile", 8), ("s_per_image", 12), ("s_per_image_no_decode", 22),
           ("images_per_s", 13), ("peak_mem_gib", 13), ("compiled_while_timed", 21), ("first_run_s", 12), ("device", 0)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: wait before reading the clock


def timed(fn, device):
    """(fn's result, wall seconds), the GPU's queue drained at both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def autocast(device, dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure(run, args, device, twin=None):
    """Warm-up runs, then `args.repeats` timed ones -> (their results, graphs compiled while timing).
    The second number should be 0: otherwise torch.compile was still compiling; raise --warmup.
    With `twin` (--compare: the same benchmark on a compiled copy) the two alternate, run by run, so
    that both see the same machine load -> (results, twin results, graphs, seconds of twin's first run)."""
    first = timed(twin, device)[1] if twin is not None else None      # compiles: timed on its own
    for _ in range(args.warmup):
        run()
        if twin is not None:
            twin()
    reset_peak(device)
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    before = graphs()
    results, twin_results = [], []
    for _ in range(args.repeats):
        results.append(run())
        if twin is not None:
            twin_results.append(twin())
    if twin is None:
        return results, graphs() - before
    return results, twin_results, graphs() - before, first


def build_tokenizer(seq_len, token_dim, device):
    """KL-16 (random weights) for the released token shape; otherwise VAE_CONFIGS["tiny"] with
    token_dim latent channels, so that a tiny CPU run still exercises the decode."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"--seq_len {seq_len} is not a square token grid; pass --no_decode")
    cfg = VAE_CONFIGS["kl16"] if (seq_len, token_dim) == (256, 16) else {**VAE_CONFIGS["tiny"], "embed_dim": token_dim}
    vae = AutoencoderKL(**cfg).to(device)
    return KLTokenizer(vae, image_size=side * vae.downsample_factor)  # patch 1: one token per latent pixel


def compile_hot_paths(model, tok):
    """torch.compile by assignment: Transformer blocks, the Diffusion Loss MLP, the VAE decoder."""
    for blocks in (model.encoder_blocks, model.decoder_blocks):
        for i in range(len(blocks)):
            blocks[i] = torch.compile(blocks[i])
    model.diffloss.net = torch.compile(model.diffloss.net)
    if tok is not None:
        tok.vae.decoder = torch.compile(tok.vae.decoder)


def bench_sample(model, tok, batch, args, device, dtype, twin=None):
    """-> [row] (or [eager row, compiled row] with twin, a compiled copy of model)."""
    labels = torch.arange(batch, device=device) % model.num_classes   # class-balanced, as for FID

    def runner(model):
        model.eval()
        gen = torch.Generator(device).manual_seed(0)

        def run():
            with autocast(device, dtype):
                tokens, t_ar = timed(lambda: model.sample_tokens(batch, args.num_iter, args.cfg, labels=labels,
                                                                 generator=gen), device)   # (B, seq, C)
                t_dec = timed(lambda: tok.decode(tokens), device)[1] if tok is not None else None
            return t_ar, t_dec
        return run

    def row(runs):
        r = dict(what="sample", batch=batch, num_iter=args.num_iter, diff_steps=args.num_sampling_steps,
                 cfg=args.cfg, s_per_image_no_decode=statistics.median(a for a, _ in runs) / batch, s_per_image=None)
        if tok is not None:
            r["s_per_image"] = statistics.median(a + d for a, d in runs) / batch
        return r

    if twin is None:
        runs, new_graphs = measure(runner(model), args, device)
        return [{**row(runs), "compiled_while_timed": new_graphs}]
    runs, twin_runs, new_graphs, first = measure(runner(model), args, device, runner(twin))
    return [{**row(runs), "compile": False}, {**row(twin_runs), "compile": True, "compiled_while_timed": new_graphs,
                                               "first_run_s": first}]


def bench_train(model, batch, args, device, dtype, twin=None):
    """-> [row] (or [eager row, compiled row] with twin, a compiled copy of model)."""
    def runner(model):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # The paper's optimizer, as the released code sets it: AdamW (0.9, 0.95), wd 0.02 on matrices
        # only, lr 1e-4 * batch / 256.
        opt = torch.optim.AdamW(mar.param_groups(model, 0.02), lr=1e-4 * batch / 256, betas=(0.9, 0.95),
                                fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
        ema = copy.deepcopy(model).requires_grad_(False)
        count = itertools.count()

        def step():
            tokens = torch.randn(batch, model.seq_len, model.token_dim, device=device)  # cached-latent shaped
            labels = torch.randint(0, model.num_classes, (batch,), device=device)
            with autocast(device, dtype):
                loss = model(tokens, labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            scaler.step(opt)
            scaler.update()
            train.update_ema(ema, model, 0.9999, next(count))  # train.py's EMA, every step
        return lambda: timed(lambda: [step() for _ in range(args.train_steps)], device)[1]

    row = lambda seconds: dict(what="train", batch=batch, diffusion_batch_mul=model.diffusion_batch_mul,
                               images_per_s=batch * args.train_steps / statistics.median(seconds))
    if twin is None:
        seconds, new_graphs = measure(runner(model), args, device)
        return [{**row(seconds), "compiled_while_timed": new_graphs}]
    seconds, twin_seconds, new_graphs, first = measure(runner(model), args, device, runner(twin))
    return [{**row(seconds), "compile": False}, {**row(twin_seconds), "compile": True,
                                                  "compiled_while_timed": new_graphs, "first_run_s": first}]


def print_row(row):
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    print(" ".join(fmt(row.get(k)).ljust(w) for k, w in COLUMNS), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    a = p.add_argument
    a("--what", default="sample,train", help="comma list of sample, train")
    a("--models", default="mar_base,mar_large", help="comma list of mar_* names from mar.MODELS")
    a("--batch", type=ints, default=[256, 64], help="sampling batch sizes")
    a("--train_batch", type=ints, default=[128], help="training batch sizes (per GPU)")
    a("--train_steps", type=int, default=10, help="training steps per timed run")
    a("--num_iter", type=int, default=64, help="AR steps of generation (paper default 64)")
    a("--num_sampling_steps", type=int, default=100, help="diffusion steps per token (paper: 100)")
    a("--cfg", type=float, default=3.0, help="classifier-free guidance scale (linear schedule)")
    a("--dtype", choices=DTYPES, default=None, help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--compile", action="store_true", help="torch.compile the blocks, the DiffLoss MLP, the VAE decoder")
    a("--compare", action="store_true",
      help="eager and compiled (sample.py / train.py --compile) side by side, runs alternating")
    a("--num_classes", type=int, default=1000, help="classes of the model (1000 = ImageNet)")
    a("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    a("--warmup", type=int, default=1, help="untimed runs first (CUDA init, cuDNN autotune, compile)")
    a("--seq_len", type=int, default=256, help="tokens per image (256 = KL-16 at 256x256)")
    a("--token_dim", type=int, default=16, help="channels per token (16 = KL-16)")
    a("--no_decode", action="store_true", help="skip the VAE decode")
    a("--out", default=None, help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    what = args.what.split(",")
    models = args.models.split(",")
    bad = [w for w in what if w not in ("sample", "train")] + [m for m in models if not m.startswith("mar_")
                                                                or m not in mar.MODELS]
    if bad:
        p.error(f"unknown --what / --models entries {bad}; models: {[m for m in mar.MODELS if m.startswith('mar_')]}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.compare and args.compile:
        p.error("--compare times eager and compiled copies itself: drop --compile")

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 rows use TF32
    common = dict(dtype=dtype_name, compile=args.compile, torch=torch.__version__,
                  seq_len=args.seq_len, token_dim=args.token_dim, repeats=args.repeats,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu ({torch.get_num_threads()} threads)")
    print(" ".join(k.ljust(w) for k, w in COLUMNS))
    out = open(args.out, "a") if args.out else contextlib.nullcontext()
    with out:
        for name in models:
            model = mar.build_model(name, seq_len=args.seq_len, token_dim=args.token_dim, num_classes=args.num_classes,
                                    num_sampling_steps=str(args.num_sampling_steps)).to(device)
            tok = None if args.no_decode or "sample" not in what else build_tokenizer(args.seq_len, args.token_dim, device)
            if args.compile:
                compile_hot_paths(model, tok)
            twins = {}
            if args.compare:   # what sample.py --compile and train.py --compile do, on copies
                twins["sample"] = copy.deepcopy(model)
                twins["sample"].compile_sampler()
                twins["train"] = copy.deepcopy(model)
                twins["train"].diffloss.net.compile()
            jobs = [(bench_sample, b, (tok,), twins.get("sample")) for b in args.batch if "sample" in what]
            jobs += [(bench_train, b, (), twins.get("train")) for b in args.train_batch if "train" in what]
            for fn, batch, extra, twin in jobs:
                reset_peak(device)
                for row in fn(model, *extra, batch, args, device, dtype, twin):
                    row = {"model": name, **common, **row}
                    row["peak_mem_gib"] = peak_gib(device)  # after the runs: the peak of the timed ones
                    print_row(row)
                    if args.out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
            del model, tok, twins   # free this model's weights (and optimizer state) before the next one


if __name__ == "__main__":
    main()
