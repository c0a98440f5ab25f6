"""
experiments/shapes_judge.py -- how recognisable are a checkpoint's samples of the built-in shapes?

A small CNN (the "judge") is trained on real shapes from train.make_shapes (seed 0) and checked on
unseen ones (seed 1, ~100%); it then classifies class-balanced samples of a train.py checkpoint, and
the accuracy (chance: 10%) says how often a sample shows the shape it was asked for. It is the number
behind the demo study in experiments/README.md, and test_all.py's learning test uses the same judge.

It lives here, not in train.py or sample.py: the judge knows one data set (the built-in shapes) and
exists to evaluate, so the core files do not grow for it. It uses theirs (train.make_shapes,
sample.generate); they never import it.

Run (a few sampling settings of one checkpoint, no retraining):
  python experiments/shapes_judge.py --ckpt output/checkpoint-last.pth --cfg 1.0 3.0 --temperature 1.0 0.5 --num_iter 16 4
"""
import argparse
import functools
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
import mar     # noqa: E402
import sample  # noqa: E402
import train   # noqa: E402


@functools.lru_cache(maxsize=None)
def train_judge(image_size=16, steps=400, seed=0):
    """-> (judge CNN in eval mode, its accuracy on 500 unseen real shapes). Seeded: the same judge on
    every machine, and trained once per process (cached). Max-pooling over positions makes it
    indifferent to where the shape sits."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, len(train.SHAPES)))
    x, y = train.make_shapes(300, image_size, seed=seed)
    x = to_input(x)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = train.make_shapes(50, image_size, seed=seed + 1)
    return net, accuracy(net, xt, yt)[0]


def to_input(images):
    """uint8 (N, S, S) or (N, S, S, 1) as sample.py writes them -> float (N, 1, S, S) in [-1, 1]."""
    images = torch.as_tensor(images)
    if images.dim() == 4:
        images = images[..., 0]
    return images[:, None].float() / 127.5 - 1


@torch.no_grad()
def accuracy(judge, images, labels):
    """-> (fraction of images classified as their label, [that fraction for each class])."""
    pred = judge(to_input(images)).argmax(1)
    labels = torch.as_tensor(labels)
    per_class = [(pred[labels == c] == c).float().mean().item() for c in range(len(train.SHAPES))]
    return (pred == labels).float().mean().item(), per_class


def judge_checkpoint(ckpt, settings, per_class=20, num_sampling_steps=100, seed=0, grid=None, judge=None):
    """Samples per_class images of each class for every setting (dict of sample.generate's keyword
    arguments: num_iter, cfg, temperature, ...) and judges them. -> [(setting, accuracy, per_class)].
    `grid`: a PNG path; the first setting's first 8 samples of each class are saved there."""
    model, ck = sample.mar.load_checkpoint(ckpt)
    model.diffloss.set_sampling_steps(num_sampling_steps)
    model.eval()
    tokenizer = sample.tk.build_tokenizer(ck["tokenizer"])
    if judge is None:
        judge, real = train_judge(tokenizer.image_size)
        if real < 0.95:
            raise RuntimeError(f"the judge itself is unreliable: {real:.2f} on unseen real shapes")
    labels = torch.arange(len(train.SHAPES)).repeat_interleave(per_class)        # class-major, balanced
    results = []
    for i, setting in enumerate(settings):
        images = sample.generate(model, tokenizer, labels, torch.Generator().manual_seed(seed), **setting)
        if i == 0 and grid is not None:
            keep = torch.arange(len(labels)) % per_class < sample.GRID_PER_CLASS
            sample.save_grid(images[keep], grid, nrow=min(per_class, sample.GRID_PER_CLASS))
        results.append((setting, *accuracy(judge, images, labels)))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join(sample.DEFAULT_OUTPUT_DIR, "checkpoint-last.pth"))
    p.add_argument("--cfg", type=float, nargs="+", default=[3.0], help="one or more guidance scales")
    p.add_argument("--temperature", type=float, nargs="+", default=[sample.DEFAULT_TEMPERATURE["pixel"]],
                   help="one or more temperatures (default: sample.py's for pixel tokens)")
    p.add_argument("--num_iter", type=int, nargs="+", default=[64], help="one or more K (capped at seq_len)")
    p.add_argument("--cfg_schedule", nargs="+", default=["linear"], choices=mar.CFG_SCHEDULES,
                   help="one or more CFG schedules (sample.py's --cfg_schedule)")
    p.add_argument("--num_sampling_steps", type=int, default=100)
    p.add_argument("--precision", nargs="+", choices=sample.PRECISIONS[1:],
                   default=[sample.resolve_precision(sample.SAMPLE_PRECISION, "cpu")],
                   help="one or more sampling precisions (default: sample.py's on this CPU)")
    p.add_argument("--per_class", type=int, default=20, help="samples per class (10 classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="PNG of the first setting's samples, 8 per class")
    args = p.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt!r}: no such checkpoint (train one with python train.py)")
    settings = [dict(cfg=c, temperature=t, num_iter=k, cfg_schedule=s, precision=pr) for c, t, k, s, pr in
                itertools.product(args.cfg, args.temperature, args.num_iter, args.cfg_schedule, args.precision)]
    t0 = time.time()
    for setting, acc, per_class in judge_checkpoint(args.ckpt, settings, args.per_class, args.num_sampling_steps,
                                                    args.seed, args.grid):
        print(f"cfg {setting['cfg']:g} ({setting['cfg_schedule']}) temperature {setting['temperature']:g} num_iter "
              f"{setting['num_iter']} {setting['precision']}: "
              f"accuracy {acc:.3f} | per class " + " ".join(f"{n} {a:.2f}" for n, a in zip(train.SHAPES, per_class)),
              flush=True)
    print(f"{len(settings)} settings x {args.per_class * len(train.SHAPES)} samples in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"shapes_judge.py: error: {e}")
