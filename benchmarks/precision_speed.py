"""
benchmarks/precision_speed.py -- fp32 against bf16 autocast (train.py / sample.py --precision) on this machine's
CPU: the training step and the sampler of Table 1's models, and the demo's training step. Results:
benchmarks/README.md; whether bf16 costs FID: experiments/precision.py.

What it times, with random weights (no step's cost depends on their values) on inputs of the real shapes:
  train   one whole train.py step: the forward under autocast, backward, gradient clipping at 3.0, AdamW
          (the paper's parameter groups) and train.py's EMA update. Table 1's models: mar_tiny and ar_tiny
          on Fashion-MNIST's 49 tokens of 16 (4x4 patches), batch 64; the demo: mar_tiny on the built-in
          shapes' 4 tokens of 64 (8x8 patches, the uniform mask law), batch 64. Each timed repeat is
          --train_steps steps whose random draws (mask ratio, t, noise) are seeded by the step, so fp32 and
          bf16 time the same steps.
  sample  sample.py's generate for Table 1's MAR: batch 250, 16 generation steps, 100 diffusion steps per
          token, the pixel decode; without CFG and with CFG 6 (linear schedule).
For each thread count, every case runs in fp32 and in bf16 alternately (both see the same machine load):
--warmup untimed runs each (a sampling warm-up uses 10 images), then --repeats timed runs; the median is
reported with the ratio fp32 / bf16. The header states what torch reports of the CPU and its bf16 flags.

Run (on an otherwise idle machine; about 17 minutes on 2 cores):
  python benchmarks/precision_speed.py --out benchmarks/precision_speed.jsonl
  python benchmarks/precision_speed.py --cases demo_train --threads 1 --repeats 2      # quicker
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mar  # noqa: E402
import tokenizer as tk  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from sample import autocast, fast_bf16, generate  # noqa: E402

# name -> (what, model, seq_len, token_dim, batch, extra: mask law (train) or CFG scale (sample))
CASES = {
    "table1_train_mar": ("train", "mar_tiny", 49, 16, 64, "truncnorm"),
    "table1_train_ar": ("train", "ar_tiny", 49, 16, 64, None),
    "demo_train": ("train", "mar_tiny", 4, 64, 64, "uniform"),
    "table1_sample": ("sample", "mar_tiny", 49, 16, 250, 1.0),
    "table1_sample_cfg6": ("sample", "mar_tiny", 49, 16, 250, 6.0),
}
PRECISIONS = sample.PRECISIONS[1:]                  # fp32, bf16
CPU = torch.device("cpu")


def cpu_flags():
    """The CPU's model name and its bf16 / AMX / AVX-512 flags from /proc/cpuinfo (Linux; else '')."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor(), ""
    line = lambda key: next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(key)), "")
    flags = [f for f in line("flags").split() if "bf16" in f or f.startswith("amx") or f in ("avx512f", "avx512_vnni")]
    return line("model name"), " ".join(flags)


def build(name, seq_len, token_dim, extra, what, num_sampling_steps):
    kw = dict(mask_ratio_law=extra) if name.startswith("mar_") and what == "train" else {}
    torch.manual_seed(0)
    return mar.build_model(name, seq_len=seq_len, token_dim=token_dim, num_classes=10, clip_x0=1.0,
                           num_sampling_steps=str(num_sampling_steps), **kw)


def train_runner(model, batch, steps):
    """-> run(precision, repeat): seconds of `steps` train.py steps (their draws seeded by (repeat, step))."""
    model.train()
    opt = torch.optim.AdamW(mar.param_groups(model, 0.02), lr=1e-3, betas=(0.9, 0.95))
    ema = copy.deepcopy(model).requires_grad_(False)
    tokens = torch.rand(batch, model.seq_len, model.token_dim) * 2 - 1        # pixels in [-1, 1]
    labels = torch.arange(batch) % 10

    def run(precision, repeat):
        t0 = time.perf_counter()
        for s in range(steps):
            torch.manual_seed(1000 * repeat + s)
            with autocast(CPU, precision):
                loss = model(tokens, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            train.update_ema(ema, model, 0.9999, s)
        return time.perf_counter() - t0
    return run


def sample_runner(model, batch, cfg):
    """-> run(precision, repeat): seconds of one sample.py generate call of `batch` images (10 to warm up)."""
    model.eval()
    tokenizer = tk.PixelTokenizer(28, 1, 4)                                     # 49 tokens of 16

    def run(precision, repeat):
        n = min(10, batch) if repeat < 0 else batch
        labels = torch.arange(n) % 10
        t0 = time.perf_counter()
        generate(model, tokenizer, labels, torch.Generator().manual_seed(repeat), num_iter=16, cfg=cfg,
                 temperature=1.0, precision=precision)
        return time.perf_counter() - t0
    return run


def bench(case, threads, args):
    what, name, seq_len, token_dim, batch, extra = CASES[case]
    batch = (args.sample_batch or batch) if what == "sample" else batch
    torch.set_num_threads(threads)
    model = build(name, seq_len, token_dim, extra, what, args.num_sampling_steps)
    run = train_runner(model, batch, args.train_steps) if what == "train" else sample_runner(model, batch, extra)
    for w in range(args.warmup):
        for p in PRECISIONS:
            run(p, -1 - w)
    times = {p: [] for p in PRECISIONS}
    for r in range(args.repeats):
        for p in PRECISIONS:                                                 # alternating: the same load
            times[p].append(run(p, r))
    med = {p: statistics.median(t) for p, t in times.items()}
    per = batch * (args.train_steps if what == "train" else 1)
    unit = "s_per_step" if what == "train" else "s_per_image"
    scale = args.train_steps if what == "train" else batch
    return dict(case=case, what=what, model=name, tokens=f"{seq_len}x{token_dim}", batch=batch,
                diffusion_steps=args.num_sampling_steps,
                **({"cfg": extra} if what == "sample" else {"mask_ratio_law": extra}), threads=threads,
                **{f"{unit}_{p}": round(med[p] / scale, 4) for p in PRECISIONS},
                **{f"images_per_s_{p}": round(per / med[p], 1) for p in PRECISIONS},
                speedup=round(med["fp32"] / med["bf16"], 2), repeats=args.repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    a("--threads", default="1,2", help="comma-separated torch thread counts")
    a("--repeats", type=int, default=3, help="timed runs per precision (the median is reported)")
    a("--warmup", type=int, default=1, help="untimed runs per precision first")
    a("--train_steps", type=int, default=5, help="training steps per timed run")
    a("--sample_batch", type=int, default=None, help="images per sampling run (default 250; smoke tests: fewer)")
    a("--num_sampling_steps", type=int, default=100, help="diffusion steps per token (the paper's 100)")
    a("--out", default=None, help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown --cases {bad}; valid: {', '.join(CASES)}")
    threads = [int(t) for t in args.threads.split(",") if t]
    if args.repeats < 1 or args.warmup < 0 or args.train_steps < 1 or any(t < 1 for t in threads):
        p.error("--repeats, --train_steps and every --threads must be >= 1, --warmup >= 0")
    model_name, flags = cpu_flags()
    machine = dict(cpu=model_name, cpu_flags=flags, fast_bf16=fast_bf16("cpu"), torch=torch.__version__,
                   cores=os.cpu_count())
    print(f"{model_name} ({os.cpu_count()} cores): flags {flags or '-'}; torch {torch.__version__} reports fast bf16: "
          f"{machine['fast_bf16']}; median of {args.repeats} runs after {args.warmup} warm-up")
    print(f"{'case':<20} {'threads':>7} {'fp32':>10} {'bf16':>10} {'unit':>12} {'fp32/bf16':>10}")
    rows = []
    for t in threads:
        for case in cases:
            row = bench(case, t, args)
            rows.append(row)
            unit = "s_per_step" if row["what"] == "train" else "s_per_image"
            print(f"{case:<20} {t:>7} {row[unit + '_fp32']:>10.4f} {row[unit + '_bf16']:>10.4f} {unit:>12} "
                  f"{row['speedup']:>9.2f}x", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**row, **machine}) + "\n")
    return rows


if __name__ == "__main__":
    main()
