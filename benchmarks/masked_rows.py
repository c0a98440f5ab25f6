"""
benchmarks/masked_rows.py -- MAR's training step with the Diffusion Loss head on every row (as the
released code runs it, the unmasked rows weighted 0) against the head on the masked rows only
(DiffLoss.forward's num_masked, what MAR.forward does): the same draws and the same loss up to float
summation order (test_all.py), less work the fewer tokens are masked. Results: benchmarks/README.md.

Run (CPU; the two variants alternate in one process, each over the same mask draws; median of repeats):
  OMP_NUM_THREADS=1 python benchmarks/masked_rows.py                     # Table 1's model and batch
  python benchmarks/masked_rows.py --laws uniform --repeats 3 --steps 2  # quicker
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mar  # noqa: E402


def step_time(model, x, y, masked_only, seeds):
    """Mean seconds of forward + backward over the mask draws of `seeds`."""
    t0 = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        n = model.mask_count()
        mask = model.random_mask(len(x), x.device, n)
        loss = model.forward_loss(model.forward_z(x, mask, y, n), x, mask, n if masked_only else None)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / len(seeds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mar_tiny", choices=[m for m in mar.MODELS if m.startswith("mar_")])
    p.add_argument("--laws", default=",".join(mar.MASK_RATIO_LAWS), help="mask ratio laws to time")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=49)
    p.add_argument("--token_dim", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    print(f"{args.model}, batch {args.batch}, {args.seq_len} tokens x {args.token_dim}, fp32, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; median of {args.repeats} x {args.steps} steps")
    rows = []
    for law in args.laws.split(","):
        torch.manual_seed(0)
        model = mar.build_model(args.model, seq_len=args.seq_len, token_dim=args.token_dim, num_classes=10,
                                mask_ratio_law=law).train()
        x, y = torch.randn(args.batch, args.seq_len, args.token_dim), torch.arange(args.batch) % 10
        step_time(model, x, y, True, [0]), step_time(model, x, y, False, [0])          # warm up
        times = {True: [], False: []}
        for r in range(args.repeats):
            seeds = range(1000 * r, 1000 * r + args.steps)                              # the same draws for both
            for masked_only in (True, False):
                times[masked_only].append(step_time(model, x, y, masked_only, seeds))
        full, fast = statistics.median(times[False]), statistics.median(times[True])
        rows.append(dict(law=law, full_s=full, masked_only_s=fast, speedup=full / fast))
        print(f"{law:>10}: every row {full:.3f} s/step, masked rows only {fast:.3f} s/step, {full / fast:.2f}x")
    return rows


if __name__ == "__main__":
    main()
