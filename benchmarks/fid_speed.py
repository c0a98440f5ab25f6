"""
benchmarks/fid_speed.py -- FID feature-extraction throughput on CPU: fid.py's fused Inception against
the op-by-op reference, and against torch.compile. Results: benchmarks/README.md.

The images are what the Fashion-MNIST experiments evaluate: uint8 grayscale 28x28 (random pixels; the
network's cost does not depend on them), fed to FIDInceptionV3 exactly as fid.extract_features does
(TF-1.x resize to 299, gray -> RGB, Inception-v3). Variants (--variants):
  reference  model(x): the network op by op, as torch-fidelity runs it (conv, BN, ReLU, NCHW)
  fused      model.fused()(x): BN folded into the convs, oneDNN conv + ReLU with pre-packed weights,
             channels-last (fid.extract_features' default)
  compiled   torch.compile of the reference network, channels-last, inductor's freezing on (it folds
             BN, fuses conv + ReLU and pre-packs the weights itself); its setup is the compile time
All variants run in one process, interleaved: --warmup untimed rounds, then --repeats rounds that time
each variant once on the same batch; the median gives images/s. `setup_s` is the one-off cost (building
the fused copy, compiling); `s_per_5k` = setup_s + 5,000 images at that rate (a Table 1 FID evaluation).
`max_abs_diff` is the largest |feature - reference feature| over the batch (features are ~O(1)).

  python benchmarks/fid_speed.py --inception weights-inception-2015-12-05-6726825d.pth --batch 50
  python benchmarks/fid_speed.py --inception WEIGHTS --batch 50 --variants reference,fused,compiled
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules
import fid  # noqa: E402

VARIANTS = ("reference", "fused", "compiled")


def build(variant, model):
    """(callable images -> features, setup seconds); the compile happens on the first call."""
    t0 = time.perf_counter()
    if variant == "reference":
        return model, 0.0
    if variant == "fused":
        with torch.inference_mode():
            return model.fused(), time.perf_counter() - t0
    import torch._inductor.config as inductor_config  # lazily: only this variant needs inductor

    inductor_config.freezing = True  # weights are constants: lets inductor fold BN and pre-pack them
    net = copy.deepcopy(model)
    net.memory_format = torch.channels_last
    return torch.compile(net), None  # setup measured at the first call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inception", required=True, help="FID Inception weights (torch-fidelity's file, with or without fc.*)")
    p.add_argument("--batch", type=int, default=50, help="images per forward (fid.py's default batch_size is 50)")
    p.add_argument("--size", type=int, default=28, help="image side before the resize to 299 (28: Fashion-MNIST)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1: grayscale, 3: RGB")
    p.add_argument("--variants", default="reference,fused", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (oneDNN kernel creation)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if "reference" not in variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants must include reference and only name {VARIANTS}, got {variants}")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1, --warmup >= 0")

    torch.manual_seed(0)
    model = fid.load_inception(args.inception, "cpu")
    images = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), dtype=torch.uint8)
    nets, setup = {}, {}
    for v in variants:
        nets[v], setup[v] = build(v, model)
    with torch.inference_mode():
        ref = model(images)[0]  # (B, 2048)
        diff = {}
        for v in variants:
            t0 = time.perf_counter()
            diff[v] = (nets[v](images)[0] - ref).abs().max().item()  # a compiled variant compiles here
            setup[v] = time.perf_counter() - t0 if setup[v] is None else setup[v]
        for _ in range(args.warmup):
            for v in variants:
                nets[v](images)
        seconds = {v: [] for v in variants}
        for _ in range(args.repeats):  # interleaved: a change in the machine's load hits every variant
            for v in variants:
                t0 = time.perf_counter()
                nets[v](images)
                seconds[v].append(time.perf_counter() - t0)

    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, fp32, batch {args.batch} "
          f"x {args.channels}x{args.size}x{args.size} uint8 -> 299, {args.repeats} repeats (median)")
    print(f"{'variant':10} {'images_per_s':>12} {'speedup':>8} {'setup_s':>8} {'s_per_5k':>9} {'max_abs_diff':>12}  runs (s/batch)")
    base = args.batch / statistics.median(seconds["reference"])
    for v in variants:
        rate = args.batch / statistics.median(seconds[v])
        print(f"{v:10} {rate:12.2f} {rate / base:8.2f} {setup[v]:8.1f} {setup[v] + 5000 / rate:9.0f} {diff[v]:12.2e}  "
              + " ".join(f"{s:.2f}" for s in seconds[v]))


if __name__ == "__main__":
    main()
