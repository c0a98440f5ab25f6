"""
experiments/table1.py -- the paper's Table 1 (Sec. 5.1, and the L2 row of App. D, "L2 Loss vs. Diff
Loss") at CPU scale on Fashion-MNIST: Diffusion Loss on continuous tokens vs cross-entropy on discrete
(VQ) tokens, for AR raster, AR random order, MAR one token per step and MAR several tokens per step;
plus a MAR with an L2 (MSE) head. Every training run is train.py; sampling is sample.py's `generate`;
FID is fid.py.

Run (from the repository root; everything finished is kept in the JSONL and skipped):
  python experiments/table1.py --runs_dir runs                        # the whole table, hours on 2 cores
  python experiments/table1.py --rows mar16_diffusion,mar16_ce,floor  # some rows (ROWS below)
  python experiments/table1.py --train_only                           # only the 10 training runs
  python experiments/table1.py --rows mar16_ce --no_cfg               # only the FID w/o CFG, for now
  python experiments/table1.py --table-only                           # Markdown from the JSONL
On a small CPU, run the same command in two shells with OMP_NUM_THREADS=1: they split the runs and
measurements through lock files (experiments/lab.py).
Outputs: experiments/table1.jsonl (one JSON object per measurement), experiments/table1.md (the
table, regenerated from the JSONL after every measurement), RUNS_DIR/t1_* (checkpoints, train logs),
RUNS_DIR/t1_cache (codebook, Inception features of the reference images).

Protocol (every choice):
  * Data: Fashion-MNIST 28x28, the 60,000 training images for training, the 10,000 test images as the
    FID reference. No flips (--no-hflip: clothes are not all left-right symmetric in the data set).
  * Continuous tokens: 4x4 pixel patches -> 49 tokens of 16 values (KL-16's token width), exact
    round trip. Discrete tokens: the same patches snapped to the nearest of K = 1024 codes of a k-means
    codebook (tokenizer.VQTokenizer.fit: k-means++ init, 25 Lloyd steps, 200,000 training patches,
    seed 0), fitted once and shared by every CE run. K was chosen among 64, 256 and 1024 by the
    reconstruction error of the 10k test images (the "tokens" row reports the chosen one's).
  * Training: every run is train.py with exactly COMMON below (2 epochs = 1,875 steps of 64 images,
    lr 1e-3 = 4e-3 * 64/256, 0.2 epochs warmup, then constant; AdamW, EMA, seed 0) plus the model
    (mar_tiny, or ar_tiny with --order raster|random: the same Transformer size, 4 blocks of width
    128) and the head: --head diffusion (pixel tokens), --head ce --vq 1024 (VQ tokens), --head l2.
    The CE and L2 heads are an MLP of the Diffusion Loss MLP's width and depth (mar.TokenMLP). The two
    MAR rows of one loss share one trained model (they differ only at inference): 7 runs.
  * One row the paper does not have, "mar16_diffusion_mr0": MAR trained with --mask_ratio_min 0 instead
    of the paper's 0.7, an 8th run: the paper's range never shows the model more than 14 known tokens,
    while the 16-step generation predicts 34 of the 49 tokens with more known (15 to 45).
  * A second, "mar16_diffusion_recipe": MAR with the small-data recipe experiments/recipe.py chose by
    FID against the training images (--mask_ratio_law uniform --pos_embed_init sincos --dropout 0).
  * A third, "ar_raster_diffusion_dropout0": AR raster with --dropout 0, the part of that recipe that is
    not about MAR, so that the recipe's MAR meets an AR given the same change.
  * Sampling: lab.Evaluator's (EMA weights, class-balanced labels, seeded batches of --batch), --precision
    (fp32; training too), temperature 1.0, the linear CFG schedule and 100 diffusion steps per token
    (the paper's).
    MAR: num_iter 49 ("one token per step") or 16 ("MAR default", ~3 tokens per step); AR: 49 steps.
  * CFG: each row is measured without CFG (cfg 1.0) and with the scale that gives the lowest FID in a
    sweep over --cfg_grid with --num_sweep (1,000) samples against the TRAINING-set reference (never
    the test set); the chosen scale is then evaluated at the full N (the sweeps are measured before
    the finals). A chosen scale at the edge of the grid is flagged in the table. A Diffusion Loss row
    then sweeps the temperature too, as the paper tunes both per model: --temperature_grid (0.6, 0.8)
    at the chosen scale and its grid neighbours, the same 1,000 samples vs training images; the joint
    choice is measured at the full N as a third column, beside the temperature-1.0 ones.
  * FID: fid.py with the FID Inception weights (--inception), N = --num_fid (5,000) samples against
    the statistics of all 10,000 test images. The training-set reference is a class-balanced subset
    (seeded permutation) of N training images; its FID against the test set is the "floor" row.
  * Tokenizer quality ("tokens" row): MSE / PSNR of the 10k test images through each tokenizer and
    rFID of the reconstructions of a class-balanced subset of N test images vs the 10k statistics
    (for pixel tokens the reconstruction is exact, so that number is the small-N bias alone).
  * Also recorded per row: sampling seconds per image (generation only, batch and threads stated),
    parameters (all, and the head's), training time and steps.
Cost: a Diffusion Loss row (2 x 5,000 + ~10 x 1,000 samples) is hours of one core, a CE row under one;
--cfg_grid (fewer points), --num_sweep and --num_sampling_steps are the knobs if that is too much.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import fid  # noqa: E402
import lab  # noqa: E402
import tokenizer as tk  # noqa: E402
import train  # noqa: E402
from sample import PRECISIONS  # noqa: E402

COMMON = ["--data", "fashion_mnist", "--patch_size", "4", "--no-hflip", "--batch_size", "64", "--epochs", "2",
          "--warmup_epochs", "0.2", "--blr", "4e-3", "--seed", "0"]
NUM_CODES = 1024
SEQ_LEN = 49            # 28x28 images, 4x4 patches

# training runs: name -> (model, order or None, head, more train.py flags). The last run is not the
# paper's: MAR with the training mask ratio min 0 instead of 0.7 (see ROWS).
RUNS = {
    "mar_diffusion": ("mar_tiny", None, "diffusion", ()),
    "ar_diffusion": ("ar_tiny", "raster", "diffusion", ()),
    "ar_random_diffusion": ("ar_tiny", "random", "diffusion", ()),
    "mar_ce": ("mar_tiny", None, "ce", ()),
    "ar_ce": ("ar_tiny", "raster", "ce", ()),
    "ar_random_ce": ("ar_tiny", "random", "ce", ()),
    "mar_l2": ("mar_tiny", None, "l2", ()),
    "mar_diffusion_mr0": ("mar_tiny", None, "diffusion", ("--mask_ratio_min", "0")),
    # experiments/recipe.py's chosen candidate (recipe.CHOSEN; a test checks that the flags agree)
    "mar_diffusion_recipe": ("mar_tiny", None, "diffusion",
                             ("--mask_ratio_law", "uniform", "--pos_embed_init", "sincos", "--dropout", "0")),
    # the control for the recipe's dropout 0, which is not specific to MAR (see ROWS)
    "ar_diffusion_dropout0": ("ar_tiny", "raster", "diffusion", ("--dropout", "0")),
}
# table rows, in the paper's order: id -> (training run, num_iter (MAR) or None (AR), label columns)
ROWS = {
    "ar_raster_ce": ("ar_ce", None, ("AR", "raster", "causal", "1", "CrossEnt (VQ)")),
    "ar_raster_diffusion": ("ar_diffusion", None, ("AR", "raster", "causal", "1", "Diff Loss")),
    "ar_random_ce": ("ar_random_ce", None, ("AR", "random", "causal", "1", "CrossEnt (VQ)")),
    "ar_random_diffusion": ("ar_random_diffusion", None, ("AR", "random", "causal", "1", "Diff Loss")),
    "mar1_ce": ("mar_ce", SEQ_LEN, ("MAR", "random", "bidirect", "1", "CrossEnt (VQ)")),
    "mar1_diffusion": ("mar_diffusion", SEQ_LEN, ("MAR", "random", "bidirect", "1", "Diff Loss")),
    "mar16_ce": ("mar_ce", 16, ("MAR", "random", "bidirect", ">1 (16 steps)", "CrossEnt (VQ)")),
    "mar16_diffusion": ("mar_diffusion", 16, ("MAR", "random", "bidirect", ">1 (16 steps)", "Diff Loss")),
    "mar16_l2": ("mar_l2", 16, ("MAR", "random", "bidirect", ">1 (16 steps)", "L2 (MSE)")),
    # Not in the paper: its MAR trains with a mask ratio in [0.7, 1] (chosen for 256 tokens), so it never
    # sees more than 14 of 49 tokens known, while its 16-step generation conditions on up to 45.
    # This row asks how much of the MAR rows' gap to AR that mismatch explains (experiments/README.md).
    "mar16_diffusion_mr0": ("mar_diffusion_mr0", 16,
                            ("MAR, mask ratio min 0", "random", "bidirect", ">1 (16 steps)", "Diff Loss")),
    # Not in the paper: MAR with the small-data recipe of experiments/recipe.py (chosen there by FID
    # against the training images), confirmed here against the test set like every row.
    "mar16_diffusion_recipe": ("mar_diffusion_recipe", 16,
                               ("MAR, small-data recipe", "random", "bidirect", ">1 (16 steps)", "Diff Loss")),
    # Not in the paper: AR raster with the recipe's one change that applies to any model, dropout 0, so
    # that MAR's recipe is compared with an AR raster given the same chance (experiments/README.md).
    "ar_raster_diffusion_dropout0": ("ar_diffusion_dropout0", None,
                                     ("AR, dropout 0", "raster", "causal", "1", "Diff Loss")),
}
EXTRA_ROWS = ("floor", "tokens")
# The paper's Table 1 (ImageNet 256, MAR-L / AR-L ~400M parameters, 400 epochs, VQ-16 tokens for CrossEnt,
# KL-16 for Diff Loss): FID w/o CFG, w/ CFG. Its "AR random order" row is labelled "MAR, random, causal".
# The L2 row is App. D of the paper (D.2 or D.3 by version): "a disastrous FID score (>100)", no other number.
PAPER = {
    "ar_raster_ce": ("19.58", "4.92"), "ar_raster_diffusion": ("19.23", "4.69"),
    "ar_random_ce": ("16.22", "4.36"), "ar_random_diffusion": ("13.07", "4.07"),
    "mar1_ce": ("8.75", "3.50"), "mar1_diffusion": ("3.43", "1.84"),
    "mar16_ce": ("8.79", "3.69"), "mar16_diffusion": ("3.50", "1.98"),
    "mar16_l2": (">100", "-"), "mar16_diffusion_mr0": ("-", "-"), "mar16_diffusion_recipe": ("-", "-"),
    "ar_raster_diffusion_dropout0": ("-", "-"),
}


# ------------------------------------------------------------------------------------------------
# Training runs: train.py's arguments and directory for each of RUNS
# ------------------------------------------------------------------------------------------------
def run_dir(args, name, suffix=""):
    """RUNS_DIR/t1_<model>_<head><flags><suffix>, and _bf16 for a --precision bf16 run (another run than fp32's)."""
    model, order, head, flags = RUNS[name]
    return os.path.join(args.runs_dir, f"t1_{model}{'_random' if order == 'random' else ''}_{head}"
                                       f"{lab.flag_suffix(flags)}{suffix}{'' if args.precision == 'fp32' else '_bf16'}")


def codebook_path(args):
    return os.path.join(lab.cache_dir(args.runs_dir), f"codebook_k{args.vq}.pth")


def train_argv(args, name):
    model, order, head, flags = RUNS[name]
    argv = COMMON + ["--model", model] + (["--order", order] if order else []) + ["--head", head] + list(flags)
    if head == "ce":
        argv += ["--vq", str(args.vq), "--codebook", codebook_path(args)]
    if args.data_path:
        argv += ["--data_path", args.data_path]
    argv += ["--precision", args.precision]
    return argv + (["--max_steps", str(args.max_steps)] if args.max_steps else [])


def run_spec(args, name, extra=(), suffix=""):
    """lab.ensure_trained's (run directory, train.py arguments) of run `name`; extra: more train.py
    arguments (e.g. the ablations' variants of a run, argparse keeps the last), trained in run_dir + suffix."""
    return run_dir(args, name, suffix), train_argv(args, name) + list(extra)


def vq_tokenizer(args, train_set):
    """The codebook every CE run uses (train.py --codebook reads the same file): fitted once, as
    train.py would fit it (VQTokenizer.fit, seed 0)."""
    path = codebook_path(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def make():
        print(f"table1: fitting the {args.vq}-code codebook -> {path}", flush=True)
        train.save_checkpoint(path, tk.VQTokenizer.fit(train_set, args.vq, 4, seed=0).config())
    lab.once(path, make)
    return tk.build_tokenizer(tk.torch_load(path))


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def evaluate_row(args, ev, row, ckpt_path):
    run, num_iter, _ = ROWS[row]
    model, ckpt, tokenizer = lab.load_row_model(args, ckpt_path)
    all_test = lab.uint8_images(ev.test_set, torch.arange(len(ev.test_set)))
    recon_mse, recon_psnr, _ = lab.token_quality(tokenizer, all_test)
    common = dict(run=run, num_iter=num_iter or SEQ_LEN,
                  recon_mse=recon_mse, recon_psnr_db=recon_psnr,       # the tokenizer on the test images
                  train_time_s=lab.training_time(os.path.dirname(ckpt_path)),
                  params=sum(p.numel() for p in model.parameters()),
                  head_params=sum(p.numel() for p in model.diffloss.parameters()),
                  batch=args.batch, threads=torch.get_num_threads(), **lab.setting(args),
                  tokens=f"vq{tokenizer.num_codes}" if isinstance(tokenizer, tk.VQTokenizer) else "pixel")
    lab.measure_row(args, ev, row, model, tokenizer, ckpt, num_iter, common, RUNS[run][2] == "diffusion",
                    lambda: write_table(args), "table1")


def evaluate_floor(args, ev):
    with lab.claim(args, row="floor", n=args.num_fid) as mine:
        if mine:
            lab.append_record(args.out, dict(row="floor", kind="floor", n=args.num_fid, ref="test",
                                             fid=fid.frechet_distance(*ev.ref("train"), *ev.ref("test"))), who="table1")


def evaluate_tokens(args, ev):
    idx = ev.test_index()
    all_test = lab.uint8_images(ev.test_set, torch.arange(len(ev.test_set)))
    for name, tokenizer in (("pixel", tk.PixelTokenizer(28, 1, 4)), (f"vq{args.vq}", vq_tokenizer(args, ev.train_set))):
        with lab.claim(args, row="tokens", tokens=name, n=len(idx)) as mine:
            if not mine:
                continue
            mse, psnr, _ = lab.token_quality(tokenizer, all_test)
            if mse == 0:    # an exact round trip: the reconstructions are the images, whose features are cached
                rfid = fid.frechet_distance(*lab.stats(ev.features("test")[idx.numpy()]), *ev.ref("test"))
            else:
                rfid = ev.fid(lab.token_quality(tokenizer, all_test[idx.numpy()])[2], "test")
            lab.append_record(args.out, dict(row="tokens", kind="tokens", tokens=name, n=len(idx), ref="test",
                                             mse=mse, psnr_db=psnr, rfid=rfid), who="table1")


# ------------------------------------------------------------------------------------------------
# The Markdown table, from the JSONL only
# ------------------------------------------------------------------------------------------------
def write_table(args):
    """experiments/table1.md from the JSONL as it is on disk (other table1.py processes may have added rows)."""
    records = lab.read_records(args.out)
    lines = ["| variant | order | direction | tokens / step | loss | FID w/o CFG | FID w/ CFG (scale) | "
             "FID w/ CFG, temperature tuned (scale, temperature) | "
             "paper FID w/o, w/ CFG | s / image w/o, w/ CFG | params (head) | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (run, num_iter, labels) in ROWS.items():
        if lab.row_results(args, records, row) is None:
            lines.append("| " + " | ".join(list(labels) + ["not measured yet", "-", "-", ", ".join(PAPER[row])]
                                           + ["-"] * 3) + " |")
            continue
        res = lab.row_results(args, records, row)
        plain, guided, r = res["plain"], res["guided"], res["latest"]
        cells = list(labels) + lab.fid_cells(res) + [
            ", ".join(PAPER[row]),
            f"{lab.fmt(plain and plain['s_per_image'], 3)}, {lab.fmt(guided and guided['s_per_image'], 3)}",
            f"{r['params'] / 1e6:.2f}M ({r['head_params'] / 1e6:.2f}M)",
            f"{r['train_time_s'] / 60:.0f} min ({r['train_steps']} steps)"]
        lines.append("| " + " | ".join(cells) + " |")
    n = args.num_fid
    floor = lab.find(records, row="floor", n=n)
    first = lab.find(records, kind="final", n=n, **lab.setting(args))
    notes = [f"FID of N = {n} samples vs the 10,000 test images; CFG scale chosen by FID of {args.num_sweep} "
             "samples vs training images. Paper: ImageNet 256, AR/MAR-L, 400 epochs, VQ-16 (CrossEnt) and KL-16 "
             "(Diff Loss) tokens, its Table 1 (L2: App. D, 'a disastrous FID score (>100)')."]
    if first:
        notes.append(f"Sampling: {first[0]['precision']}, batch {first[0]['batch']}, {first[0]['threads']} thread(s), "
                     f"{first[0]['num_sampling_steps']} diffusion steps per token, torch {first[0]['torch']}.")
    if floor:
        notes.append(f"Floor (N = {n} training images vs the test set): FID {floor[-1]['fid']:.2f}.")
    tokens = {t["tokens"]: t for t in lab.find(records, row="tokens")}                # the latest of each
    if tokens:
        notes.append("")
        notes.append("| tokens | MSE ([-1, 1]), 10k test images | PSNR (dB) | rFID (N reconstructions vs 10k test) |")
        notes.append("|---|---|---|---|")
        for t in tokens.values():
            psnr = "exact" if t["psnr_db"] is None else f"{t['psnr_db']:.2f}"
            notes.append(f"| {t['tokens']} | {t['mse']:.4f} | {psnr} | {t['rfid']:.2f} (N = {t['n']}) |")
    sweeps = lab.find(records, kind="sweep", n=args.num_sweep, **lab.setting(args))
    # Each row's sweep is shown for the checkpoint its finals come from (the row above); the sweeps of a
    # later training of the row that has no finals yet (retrained after its checkpoint was lost, and
    # being measured, or lost again) are listed apart, never pooled with them.
    shown, later = {}, []
    for row in ROWS:
        mine = [r for r in sweeps if r["row"] == row]
        finals = lab.find(records, row=row, kind="final", n=n, **lab.setting(args))
        key = lab.latest_key(finals or mine)
        if key is None:
            continue
        shown[row] = lab.find(mine, **key)
        newest = lab.latest_key(mine)
        if newest is not None and newest != key:
            later.append((row, lab.find(mine, **newest)))
    for title, groups in [("", list(shown.items())), (" of later trainings, other weights than the rows', with "
                                                          "no finals yet", later)]:
        plain = [(row, pts) for row, pts in groups if any("temperature" not in r for r in pts)]
        joint = [(row, pts) for row, pts in groups if any("temperature" in r for r in pts)]
        if plain:
            notes.append("")
            notes.append(f"CFG sweep{title} (FID of {args.num_sweep} samples vs {n} training images):")
            for row, pts in plain:                                                       # latest per scale
                pts = sorted({r["cfg"]: r["fid"] for r in pts if "temperature" not in r}.items())
                notes.append(f"- {row}: " + ", ".join(f"{c:g}: {f:.2f}" for c, f in pts))
        if joint:
            notes.append("")
            notes.append(f"Joint CFG / temperature sweep{title} around each Diffusion Loss row's scale (FID of "
                         f"{args.num_sweep} samples vs {n} training images; temperature 1.0 is the CFG sweep above):")
            for row, pts in joint:
                pts = sorted({(r["cfg"], r["temperature"]): r["fid"] for r in pts if "temperature" in r}.items())
                notes.append(f"- {row}: " + ", ".join(f"({c:g}, {t:g}): {f:.2f}" for (c, t), f in pts))
    tmp = f"{args.table}.{os.getpid()}.tmp"          # several table1.py processes may share the table
    with open(tmp, "w") as f:
        f.write("\n".join(lines + [""] + notes) + "\n")
    os.replace(tmp, args.table)


# ------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--rows", default=",".join(list(ROWS) + list(EXTRA_ROWS)),
      help=f"comma-separated, from: {', '.join(list(ROWS) + list(EXTRA_ROWS))} (default: all)")
    a("--runs_dir", default="runs", help="training runs (t1_*) and the cache (t1_cache)")
    a("--out", default=os.path.join(ROOT, "experiments", "table1.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "table1.md"), help="the Markdown table")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--train_only", action="store_true", help="only the training runs the selected rows need")
    a("--no_cfg", action="store_true",
      help="only the FIDs w/o CFG (the sweep and the guided FID come in a later call without this flag)")
    a("--inception", default=os.path.join(ROOT, "..", "shared", "weights", "inception_fid_no_fc.pth"),
      help="FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or the fc-less file)")
    a("--data_path", default=None, help=f"Fashion-MNIST idx directory (default {tk.FASHION_MNIST_DIR})")
    a("--num_fid", type=int, default=5000, help="N: samples per reported FID (and training images of the floor)")
    a("--num_sweep", type=int, default=1000, help="samples per point of the CFG sweep")
    a("--cfg_grid", default="1.5,2,3,4,6,8", help="CFG scales of the sweep (a tiny model wants strong guidance: "
                                                 "4 was the best of 1.5..4 for the MAR Diffusion Loss row)")
    a("--temperature_grid", default="0.6,0.8",
      help="temperatures of the joint sweep (Diffusion Loss rows): each with the chosen CFG scale and its grid "
           "neighbours, the paper's per-model tuning of both; empty: none")
    a("--batch", type=int, default=250, help="images per generation batch")
    a("--fid_batch", type=int, default=50, help="images per Inception batch")
    a("--num_sampling_steps", type=int, default=100, help="diffusion steps per token (paper: 100)")
    a("--vq", type=int, default=NUM_CODES, help="K of the VQ codebook (CE rows)")
    a("--seed", type=int, default=0, help="sampling and reference-subset seed")
    a("--max_steps", type=int, default=None, help="cap every training run (smoke tests only: not the protocol)")
    a("--precision", choices=PRECISIONS[1:], default="fp32",
      help="train.py's and the sampler's precision (bf16: runs in RUNS_DIR/t1_*_bf16). fp32: every table here "
           "was measured so; bf16: faster on CPUs with bf16 instructions (experiments/precision.py)")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in args.rows if r not in ROWS and r not in EXTRA_ROWS]
    if bad:
        raise ValueError(f"unknown --rows {bad}; valid: {', '.join(list(ROWS) + list(EXTRA_ROWS))}")
    args.cfg_grid = [float(c) for c in args.cfg_grid.split(",")]
    args.temperature_grid = [float(t) for t in args.temperature_grid.split(",") if t]
    if any(c == 1.0 for c in args.cfg_grid) or args.num_fid < 2 or args.num_sweep < 2 or args.batch < 1:
        raise ValueError("--cfg_grid must not contain 1.0 (the w/o CFG row), --num_fid / --num_sweep must be >= 2, "
                         "--batch >= 1")
    return args


def main(argv=None, inception=None):
    """inception: an already built feature network (model(uint8 (N, C, H, W)) -> (features, logits)) to
    use instead of loading --inception; the tests pass a small stand-in."""
    args = get_args(argv)
    if args.table_only:
        write_table(args)
        print(open(args.table).read())
        return
    ev = lab.Evaluator(args, inception, measures=not args.train_only)
    runs = list(dict.fromkeys(ROWS[r][0] for r in args.rows if r in ROWS))
    if any(RUNS[r][2] == "ce" for r in runs):
        vq_tokenizer(args, ev.train_set)            # before any CE run, so that they all read this file
    ckpts = lab.train_all({run: run_spec(args, run) for run in runs}, len(ev.train_set))
    if args.train_only:
        return
    if "floor" in args.rows:
        evaluate_floor(args, ev)
    if "tokens" in args.rows:
        evaluate_tokens(args, ev)
    for row in args.rows:
        if row in ROWS:
            evaluate_row(args, ev, row, ckpts[ROWS[row][0]])
    write_table(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"table1.py: error: {e}")
