"""
benchmarks/head_ceiling.py -- how fast could the Diffusion Loss sampler be on this CPU?

The sampler's time is the MLP's matrix products plus everything around them (LayerNorm, SiLU, the
modulation, the update of Eq. 3, Python and dispatch). torch.compile can fuse and trim the second
part; it cannot make the products themselves faster (inductor calls the same MKL/oneDNN GEMMs on a
CPU). So the time of the products alone, at the same shapes, bounds what any compilation can gain:

  ceiling speedup = t(sampler) / t(its matrix products alone)

This script times, in one process and alternating (both see the same machine load):
  sampler   DiffLoss.sample(z, cfg) with random weights: `--steps` steps over `--rows` tokens
  products  the same Linear shapes as the network at the same row count, torch.addmm into
            preallocated outputs, nothing else: per step input_proj (C -> w); per block the
            modulation (w -> 3w) and the MLP (w -> w, w -> w); the final modulation (w -> 2w) and
            projection (w -> 2C). Under CFG the network sees 2 x rows.
and reports median seconds, GFLOP/s of the products (2 * rows * in * out per Linear per step), and
the ceiling. --compile adds a third variant, the sampler after DiffLoss.compile_sampler() (what
sample.py --compile runs), and reports its compile time (its first call) separately. Results are in
benchmarks/README.md. Defaults: experiments/table1.py's head (mar_tiny: 2 blocks x 256, tokens of 16
values, z of 128) at the rows of one MAR generation step with batch 250 and 16 steps (49 tokens:
~3 per step -> 768).

  python benchmarks/head_ceiling.py --compile                        # Table 1 head, no CFG and CFG 3
  python benchmarks/head_ceiling.py --width 1024 --depth 6 --z_dim 768 --rows 128   # MAR-B's head
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules
from diffloss import DiffLoss  # noqa: E402


def product_shapes(token_dim, width, depth):
    """(in, out) of every Linear the sampler runs once per step, in order."""
    return ([(token_dim, width)] + [(width, 3 * width), (width, width), (width, width)] * depth
            + [(width, 2 * width), (width, 2 * token_dim)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--token_dim", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--z_dim", type=int, default=128)
    p.add_argument("--rows", type=int, default=768, help="tokens sampled at once (B x tokens per step)")
    p.add_argument("--steps", type=int, default=100, help="diffusion sampling steps")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also time the compiled sampler")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    head = DiffLoss(args.token_dim, args.z_dim, args.depth, args.width, str(args.steps), clip_x0=1.0).eval()
    for prm in head.parameters():          # random weights: the zero-initialised layers would be trivially cheap
        torch.nn.init.normal_(prm, std=0.02)
    shapes = product_shapes(args.token_dim, args.width, args.depth)
    compiled = None
    if args.compile:
        compiled = copy.deepcopy(head)
        compiled.compile_sampler()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"thread(s), fp32; head {args.depth} x {args.width}, tokens of {args.token_dim}, {args.steps} steps, "
          f"{args.rows} rows; median of {args.repeats} alternating runs after one warm-up")
    for cfg in args.cfg:
        n = args.rows * (1 if cfg == 1.0 else 2)                          # rows the network sees
        z = torch.randn(n, args.z_dim)
        weights = [(torch.randn(o) * 0.02, torch.randn(i, o) * 0.02) for i, o in shapes]
        inputs = [torch.randn(n, i) for i, _ in shapes]
        outputs = [torch.empty(n, o) for _, o in shapes]

        def sampler(h=head):
            h.sample(z, cfg=cfg)

        def products():
            for _ in range(args.steps):
                for (b, w), x, out in zip(weights, inputs, outputs):
                    torch.addmm(b, x, w, out=out)

        runs = [("sampler", sampler), ("products", products)]
        times = {name: [] for name, _ in runs}
        with torch.inference_mode():
            if compiled is not None:
                t0 = time.perf_counter()
                sampler(compiled)                                          # compiles
                first = time.perf_counter() - t0
                runs.append(("compiled", lambda: sampler(compiled)))
                times["compiled"] = []
            sampler(), products()                                          # warm-up
            for _ in range(args.repeats):
                for name, fn in runs:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        gflop = 2 * n * sum(i * o for i, o in shapes) * args.steps / 1e9
        print(f"cfg {cfg:g}: network rows {n}, {gflop:.2f} GFLOP | sampler {med['sampler']:.3f} s "
              f"({gflop / med['sampler']:.1f} GFLOP/s) | products alone {med['products']:.3f} s "
              f"({gflop / med['products']:.1f} GFLOP/s) | ceiling speedup {med['sampler'] / med['products']:.2f}x"
              + (f" | compiled {med['compiled']:.3f} s ({med['sampler'] / med['compiled']:.2f}x; first call "
                 f"{first:.0f} s)" if compiled is not None else ""))


if __name__ == "__main__":
    main()
