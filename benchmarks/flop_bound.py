"""
benchmarks/flop_bound.py -- the fastest any fp32 implementation could sample on this machine

However it is compiled, fused or hand-written, a sampler still has to do its matrix products, and
no product runs faster than the best rate this CPU's GEMMs reach. So, for MAR's generation loop:

  bound (s/image) = matrix-product FLOPs per image / best fp32 GEMM rate of the machine
  largest possible speedup over eager = eager s/image / bound

This script
  1. counts the matrix-product FLOPs of one `model.sample_tokens` call with torch.utils.flop_counter
     (every Linear of the Transformer and of the Diffusion Loss MLP; the attention scores and the
     element-wise work are not counted, which lowers the bound, so the speedup it gives is an upper
     limit), split into the Diffusion Loss head and the rest;
  2. measures the GEMM rate: square fp32 products (MKL's best case) of each side in --gemm, median of
     5 after a warm-up, at the current thread count; the fastest side sets the rate;
  3. times the eager sampler: median of --repeats runs after one warm-up.
It prints one line; the results are in benchmarks/README.md. Random weights of the shapes of
experiments/table1.py's model by default (speed does not depend on the values; a trained checkpoint:
--checkpoint). Defaults are its sampling setting: batch 250, 16 steps, 100 diffusion
steps, linear CFG 3.0.

  OMP_NUM_THREADS=2 python benchmarks/flop_bound.py                     # Table 1 model, 2 cores
  python benchmarks/flop_bound.py --checkpoint runs/t1_mar_tiny_diffusion/checkpoint-last.pth
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules
import mar  # noqa: E402


def count_flops(model, batch, num_iter, cfg):
    """Matrix-product FLOPs of one sample_tokens(batch) call -> (total, the Diffusion Loss head's).
    The head's share is counted by a second counter around each DiffLoss.sample call (counters nest:
    both see every product inside it)."""
    labels = torch.arange(batch) % model.num_classes
    head, sample = [], model.diffloss.sample

    def counted_sample(*a, **kw):
        with FlopCounterMode(display=False) as counter:
            out = sample(*a, **kw)
        head.append(counter.get_total_flops())
        return out

    model.diffloss.sample = counted_sample                 # an instance attribute, removed below
    try:
        with FlopCounterMode(display=False) as total:
            model.sample_tokens(batch, num_iter, cfg, labels=labels, generator=torch.Generator().manual_seed(0))
    finally:
        del model.diffloss.sample
    return total.get_total_flops(), sum(head)


def gemm_rate(n, repeats=5):
    """Median fp32 GFLOP/s of an n x n x n torch.mm at the current thread count."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (EMA weights) instead of random ones")
    p.add_argument("--model", default="mar_tiny", help="mar.MODELS name for random weights")
    p.add_argument("--seq_len", type=int, default=49)
    p.add_argument("--token_dim", type=int, default=16)
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--num_sampling_steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--num_iter", type=int, default=16)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--gemm", default="512,1024,2048", help="sides of the square GEMMs; the fastest sets the rate")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.checkpoint:
        model = mar.load_checkpoint(args.checkpoint)[0]
        model.diffloss.set_sampling_steps(str(args.num_sampling_steps))
    else:
        model = mar.build_model(args.model, seq_len=args.seq_len, token_dim=args.token_dim,
                                num_classes=args.num_classes, num_sampling_steps=str(args.num_sampling_steps)).eval()
    flops, head = count_flops(model, args.batch, args.num_iter, args.cfg)
    rate, side = max((gemm_rate(int(n)), n) for n in args.gemm.split(","))
    labels = torch.arange(args.batch) % model.num_classes
    gen = torch.Generator()

    def run():
        gen.manual_seed(0)
        t0 = time.perf_counter()
        model.sample_tokens(args.batch, args.num_iter, args.cfg, labels=labels, generator=gen)
        return (time.perf_counter() - t0) / args.batch

    run()                                                                    # warm-up
    eager = statistics.median(run() for _ in range(args.repeats))
    bound = flops / args.batch / (rate * 1e9)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), fp32; "
          f"{args.checkpoint or args.model}: seq {model.seq_len} x {model.token_dim}, batch {args.batch}, "
          f"{args.num_iter} steps, {model.diffloss.num_sampling_steps} diffusion steps, cfg {args.cfg:g}")
    print(f"matrix products {flops / args.batch / 1e9:.2f} GFLOP/image (Diffusion Loss head {head / flops:.0%}) | "
          f"GEMM rate {rate:.1f} GFLOP/s ({side}^3) | bound {bound:.4f} s/image | eager {eager:.4f} s/image "
          f"({flops / args.batch / eager / 1e9:.1f} GFLOP/s) | largest possible speedup {eager / bound:.2f}x")


if __name__ == "__main__":
    main()
