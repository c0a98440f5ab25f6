"""
experiments/ablations.py -- the paper's ablations (Sec. 5.2-5.3: Fig. 6, Table 4, Fig. 7, Table 2) at CPU
scale on Fashion-MNIST, with Table 1's protocol: experiments/table1.py's training runs, data, sampler
settings and FID (its Evaluator, with the cached Inception features of the reference images). Each
study is a plot (docs/ablation_*.png) and a table (experiments/ablations.md), both regenerated from
one JSON line per measured point (experiments/ablations.jsonl).

Run (from the repository root; a point already in the JSONL is skipped, so a stopped run continues):
  python experiments/ablations.py --runs_dir runs                    # every sweep (estimated cost below)
  python experiments/ablations.py --runs_dir runs --sweeps steps,temperature
  python experiments/ablations.py --plots-only                       # PNGs and Markdown from the JSONL
As with table1.py, one process per core with OMP_NUM_THREADS=1 is the fastest use of a small CPU: e.g.
two shells with different --sweeps (the training runs and the cached features are shared under lock
files; both processes append to the JSONL, and the report is rebuilt from the file).

Studies: each varies one setting of the default -- mar_tiny of Table 1's run "mar_diffusion" (Diffusion
Loss on 49 pixel tokens of 4x4, MLP 2 x 256), 16 generation steps (Table 1's "MAR default" row), 100
diffusion steps (Table 1's --num_sampling_steps), temperature 1.0, the linear CFG schedule:
  steps        FID w/o and w/ CFG vs the diffusion sampling steps of the head, --steps_grid (5 ... 250, a
               respacing of the 1000-step schedule). Paper (Fig. 6 left): 100 steps are enough.
  temperature  FID w/o and w/ CFG vs tau of the diffusion sampler, --temperature_grid. Paper (Fig. 6
               right): tau matters, as for cross-entropy; the best tau w/o CFG is below 1.
  cfg          FID vs the guidance scale (1.0 and --cfg_grid), linear and constant schedules.
  mlp          Table 4: Diffusion Loss MLP widths --widths at the default depth (2), each a training run
               of Table 1's budget (the 256 run is Table 1's "mar_diffusion"; the others train.py
               --diffloss_w W into RUNS_DIR/t1_mar_tiny_diffusion_wW). FID w/o and w/ CFG, the head's
               parameters, sampling time. Paper: even a small MLP is competitive; width helps. Its widths
               256 / 512 / 1024 are 0.25-1x MAR-L's Transformer width (1024); this one is 128 wide and
               its default head already 256, so the grid is 64 / 128 / 256 / 512 (0.5-4x): a 1024 head
               (14M of the model's 15M parameters) would train for ~12 h of one core here, 15x the
               default run (measured: its first steps; the 512 run: 2.5 h, a third of it on two threads).
  speed        Fig. 7: FID vs seconds per image, MAR at --num_iter_grid generation steps and the causal
               AR raster run "ar_diffusion" (49 steps, KV cache), both w/ CFG (the paper's figure is).
  tokenizers   Table 2 analogue, a table of Table 1's numbers (experiments/table1.jsonl), nothing
               measured here: the VQ tokenizer is k-means over raw 4x4 pixel patches, so its
               pre-quantization continuous tokens ARE the plain pixel tokens, and "Diffusion Loss on the
               VQ tokenizer's continuous tokens" is Table 1's MAR Diffusion Loss row. Rows: pixel tokens
               + Diff Loss (mar16_diffusion), VQ codes + CrossEnt (mar16_ce), each with its tokenizer's
               MSE / PSNR / rFID (Table 1's "tokens" row) beside the generation FIDs.

Protocol (table1.py's, except where said; its settings are read from table1.get_args, so pass the flags
a Table 1 run used, if not the defaults, in --table1_args):
  * FID of N = --num (1,000) class-balanced samples (image i has class i % 10) against the statistics of
    the 10,000 test images (Evaluator.ref("test")). FID at N = 1,000 is biased upward compared with Table
    1's N = 5,000: compare points within a plot, not with Table 1. The floor at this N (N class-balanced
    training images vs the test set) is recorded and drawn in every plot: it is the first N rows of
    Table 1's cached training-reference features, since lab.balanced_subset is prefix-consistent
    (image i is the (i // 10)-th of class i % 10 in one seeded permutation, whatever the total).
  * W/ CFG curves use one scale w: Table 1's choice for the row (lab.best_cfg of "mar16_diffusion";
    "ar_raster_diffusion" for AR) once its sweep is complete in --table1, else --cfg (3.0); each record
    says which (cfg_source). The MLP widths all use the 256 run's w.
  * Sampling: EMA weights, fp32, batches of --batch, batch b seeded with (--seed, b) as table1.py; the
    seconds per image are the generation alone (no Inception), with the batch and threads recorded.
    Times are taken on a shared machine: compare them within one sitting.
  * A point is its sampling settings (run, MLP width, generation steps, diffusion steps, temperature,
    CFG scale and schedule) plus N, seed and the checkpoint's step, not its sweep: the default point
    belongs to several sweeps and is measured once. At CFG 1.0 the schedule does not matter.
Cost (from Table 1's measurements on this 2-core machine, one thread per process, two processes): a
point is N x (generation + Inception at ~6 images/s); the default generates at 0.156 s/image (batch 250)
and 0.34-0.48 s/image w/ CFG, so a default point at N = 1,000 is ~5.5 min w/o CFG and ~8-11 min w/ CFG;
the head's share of the generation grows with the diffusion steps and the width. New points per sweep
(shared ones counted once), roughly: steps 10 (~1.5 h), temperature 8 (~1 h), cfg 10 (~1.5 h), speed 6
(~1 h, plus the AR raster run if Table 1 has not trained it: ~50 min), mlp 6 (~1.5 h, plus the 64,
128 and 512 training runs: 48 min for Table 1's 256 head, 2.5 h for 512, less than 48 min each for the
narrow ones). About 10 hours of one core, half that on two processes; plus table1.py's cached reference
features if missing (40 min).
"""
import argparse
import os
import shlex
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import fid  # noqa: E402
import lab  # noqa: E402
import mar  # noqa: E402
import table1  # noqa: E402
import tokenizer as tk  # noqa: E402

SWEEPS = ("steps", "temperature", "cfg", "mlp", "speed", "tokenizers")
DEFAULT_W = mar.MODELS["mar_tiny"]["diffloss_w"]      # 256: Table 1's run
MAR_STEPS = table1.ROWS["mar16_diffusion"][1]          # 16: Table 1's "MAR default" row
# sweep -> (title, x axis label, log x, x ticks at the measured settings (else round numbers)); in this order
PLOTS = {
    "steps": ("Diffusion sampling steps (Fig. 6, left)", "diffusion sampling steps", True, True),
    "temperature": ("Temperature (Fig. 6, right)", "temperature tau", False, True),
    "cfg": ("CFG scale", "guidance scale", False, True),
    "mlp": ("Denoising MLP width (Table 4)", "Diffusion Loss MLP width (depth 2)", True, True),
    "speed": ("Speed / quality (Fig. 7)", "generation seconds per image", False, False),
}
COLUMN = {"num_sampling_steps": "diffusion steps", "temperature": "temperature", "cfg": "CFG scale",    # table rows
          "diffloss_w": "MLP width", "num_iter": "generation steps"}
ROW_LOSS = {"mar16_diffusion": "Diff Loss", "mar16_ce": "CrossEnt"}      # Table 1's rows of the tokenizer table


# ------------------------------------------------------------------------------------------------
# Sweeps: curves of points; a point = fixed settings + one varied setting
# ------------------------------------------------------------------------------------------------
def guidance(t1, t1_records, row, default):
    """(scale, source) for the w/ CFG curves: Table 1's choice for `row` once its sweep is complete."""
    w = lab.best_cfg(t1, t1_records, row, **(lab.latest_key(t1_records, row=row, kind="sweep") or {}))
    return (w, f"table1 {row}") if w is not None else (default, "--cfg")


def curves(args, t1, t1_records, sweep):
    """[dict(label, fixed, varied, grid, cfg_source)] of one sweep."""
    w, src = guidance(t1, t1_records, "mar16_diffusion", args.cfg)
    base = dict(run="mar_diffusion", diffloss_w=DEFAULT_W, num_iter=MAR_STEPS,
                num_sampling_steps=t1.num_sampling_steps, temperature=1.0, cfg=1.0, cfg_schedule="linear")
    plain_and_guided = lambda varied, grid: [
        dict(label="w/o CFG", fixed=base, varied=varied, grid=grid, cfg_source=None),
        dict(label=f"w/ CFG {w:g}", fixed=dict(base, cfg=w), varied=varied, grid=grid, cfg_source=src)]
    if sweep == "steps":
        return plain_and_guided("num_sampling_steps", args.steps_grid)
    if sweep == "temperature":
        return plain_and_guided("temperature", args.temperature_grid)
    if sweep == "mlp":
        return plain_and_guided("diffloss_w", args.widths)
    if sweep == "cfg":
        return [dict(label=f"{s} schedule", fixed=dict(base, cfg_schedule=s), varied="cfg",
                     grid=[1.0] + args.cfg_grid, cfg_source="--cfg_grid") for s in mar.CFG_SCHEDULES]
    w_ar, src_ar = guidance(t1, t1_records, "ar_raster_diffusion", args.cfg)
    return [dict(label=f"MAR w/ CFG {w:g}", fixed=dict(base, cfg=w), varied="num_iter", grid=args.num_iter_grid,
                 cfg_source=src),
            dict(label=f"AR raster, KV cache, w/ CFG {w_ar:g}", fixed=dict(base, run="ar_diffusion", cfg=w_ar),
                 varied="num_iter", grid=[table1.SEQ_LEN], cfg_source=src_ar)]


def point(curve, x):
    p = dict(curve["fixed"], **{curve["varied"]: x})
    if p["cfg"] == 1.0:
        p["cfg_schedule"] = "linear"      # no guidance: one point for both schedules
    return p


def on_curve(record, curve):
    """Whether a measured point lies on the curve (any value of its varied setting)."""
    return all(record.get(k) == v for k, v in curve["fixed"].items()
               if k != curve["varied"] and not (k == "cfg_schedule" and record["cfg"] == 1.0))


# ------------------------------------------------------------------------------------------------
# Training runs (Table 1's, and its run with other head widths)
# ------------------------------------------------------------------------------------------------
def training_spec(run, width):
    """table1.run_spec's (name, extra, suffix) of a run at a head width: another width than the
    default is Table 1's run with train.py --diffloss_w, in its own directory."""
    return (run, (), "") if width == DEFAULT_W else (run, ("--diffloss_w", str(width)), f"_w{width}")


def load_run(path):
    """-> (model, tokenizer, what the records say about the run)."""
    model, ckpt = mar.load_checkpoint(path)
    info = dict(lab.checkpoint_key(model, ckpt), train_time_s=lab.training_time(os.path.dirname(path)),
                params=sum(p.numel() for p in model.parameters()),
                head_params=sum(p.numel() for p in model.diffloss.parameters()))
    return model, tk.build_tokenizer(ckpt["tokenizer"]), info


def measure_floor(args, t1, ev):
    with lab.claim(args, kind="floor", n=args.num, seed=t1.seed) as mine:
        if mine:
            train_feats = ev.features("train")[:args.num]      # balanced_subset is prefix-consistent (header)
            lab.append_record(args.out, dict(kind="floor", n=args.num, seed=t1.seed, ref="test",
                                             fid=fid.frechet_distance(*lab.stats(train_feats), *ev.ref("test"))),
                              who="ablations")


def measure(args, t1, ev, runs, sweep, t1_records):
    """Every point of the sweep that the JSONL lacks and no other process is measuring (lab.claim)."""
    for curve in curves(args, t1, t1_records, sweep):
        for x in curve["grid"]:
            p = point(curve, x)
            model, tokenizer, info = runs[p["run"], p["diffloss_w"]]
            key = dict(p, n=args.num, seed=t1.seed, precision=t1.precision, train_steps=info["train_steps"],
                       weights_sha=info["weights_sha"])
            with lab.claim(args, kind="point", **key) as mine:
                if not mine:
                    continue
                model.diffloss.set_sampling_steps(p["num_sampling_steps"])
                images, s_per_image = ev.sample(model, tokenizer, args.num, p["num_iter"], p["cfg"],
                                                p["cfg_schedule"], p["temperature"])
                lab.append_record(args.out, dict(
                    key, kind="point", sweep=sweep, cfg_source=curve["cfg_source"] if p["cfg"] != 1.0 else None,
                    ref="test", fid=ev.fid(images, "test"), s_per_image=round(s_per_image, 4), batch=t1.batch,
                    threads=torch.get_num_threads(), **info), who="ablations")
                write_report(args, t1)


# ------------------------------------------------------------------------------------------------
# Report: PNG plots (Pillow, no plotting library) and the Markdown, from the JSONL only
# ------------------------------------------------------------------------------------------------
def write_report(args, t1):
    """The PNGs and experiments/ablations.md from the JSONL as it is on disk (and Table 1's)."""
    records, t1_records = lab.read_records(args.out), lab.read_records(args.table1)
    points = [r for r in records if r["kind"] == "point" and r["n"] == args.num and r["seed"] == t1.seed]
    floor = lab.find(records, kind="floor", n=args.num, seed=t1.seed)
    floor = floor[-1]["fid"] if floor else None
    first = points[0] if points else {}
    lines = ["# Ablations on Fashion-MNIST (experiments/ablations.py)", "",
             f"FID of N = {args.num} class-balanced samples vs the 10,000 test images: biased upward vs Table 1's "
             f"N = {t1.num_fid}, so compare within a plot. Floor (N = {args.num} training images vs the test set): "
             f"FID {lab.fmt(floor)}. Default: MAR {MAR_STEPS} steps, {t1.num_sampling_steps} diffusion steps, "
             f"temperature 1.0, linear CFG, MLP 2 x {DEFAULT_W}. Sampling: fp32, batch {first.get('batch', '-')}, "
             f"{first.get('threads', '-')} thread(s), torch {first.get('torch', '-')}; s / image = generation only."]
    for i, (sweep, (title, xlabel, logx, data_ticks)) in enumerate(PLOTS.items()):
        cs = curves(args, t1, t1_records, sweep)
        varied = cs[0]["varied"]
        per_curve = [{r[varied]: r for r in points if on_curve(r, c)} for c in cs]      # latest per setting
        lines += ["", f"## {i + 1}. {title}", ""]
        if not any(per_curve):
            lines.append("Not measured yet.")
            continue
        png = os.path.join(args.plots_dir, f"ablation_{sweep}.png")
        at = (lambda r: r["s_per_image"]) if sweep == "speed" else (lambda r: r[varied])
        tag = (lambda r: f"K={r['num_iter']}" if r["run"] == "mar_diffusion" else "AR") if sweep == "speed" else None
        series = [(c["label"], [(at(r), r["fid"], tag(r) if tag else "") for _, r in sorted(pts.items())])
                  for c, pts in zip(cs, per_curve) if pts]
        os.makedirs(args.plots_dir, exist_ok=True)
        lab.line_plot(png, series, title, xlabel, "FID", logx, data_ticks,
                  hline=floor and (f"floor (N = {args.num} training images)", floor))
        lines += [f"![{title}]({os.path.relpath(png, os.path.dirname(os.path.abspath(args.table)))})", ""]
        head = [COLUMN[varied]] + [f"{c['label']}: {what}" for c in cs for what in ("FID", "s / image")]
        if sweep == "mlp":
            head += ["head params", "training"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for x in sorted(set().union(*per_curve)):
            cells = [f"{x:g}"]
            for pts in per_curve:
                r = pts.get(x)
                cells += [lab.fmt(r and r["fid"]), lab.fmt(r and r["s_per_image"], 3)]
            if sweep == "mlp":
                r = next(pts[x] for pts in per_curve if x in pts)
                cells += [f"{r['head_params'] / 1e6:.2f}M",
                          f"{r['train_time_s'] / 60:.0f} min ({r['train_steps']} steps)"]
            lines.append("| " + " | ".join(cells) + " |")
        sources = {r["cfg_source"] for pts in per_curve for r in pts.values() if r["cfg_source"]}
        lines += ["", f"CFG scales from: {', '.join(sorted(sources)) or '-'}."]
    lines += ["", "## 6. Tokenizers (Table 2 analogue, Table 1's numbers)", ""] + tokenizer_table(t1, t1_records)
    tmp = f"{args.table}.{os.getpid()}.tmp"          # several processes may share the report
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.table)


def tokenizer_table(t1, t1_records):
    """Table 2's question on Table 1's records: the tokenizer's reconstruction beside the generation FID."""
    tokens = {t["tokens"]: t for t in lab.find(t1_records, row="tokens")}        # the latest of each
    lines = [f"Generation: FID of Table 1 (N = {t1.num_fid} vs the 10k test images, MAR {MAR_STEPS} steps); "
             "the VQ tokenizer is k-means over raw 4x4 pixel patches, so its pre-quantization continuous tokens "
             "are the pixel tokens: Diffusion Loss on them is the first row.", "",
             "| tokens | loss | MSE ([-1, 1]) | PSNR (dB) | rFID | FID w/o CFG | FID w/ CFG (scale) |",
             "|---|---|---|---|---|---|---|"]
    for row, name, label in (("mar16_diffusion", "pixel", "pixel patches = VQ pre-quantization (continuous)"),
                             ("mar16_ce", f"vq{t1.vq}", f"VQ-{t1.vq} codes (discrete)")):
        finals = lab.find(t1_records, row=row, kind="final", n=t1.num_fid, **lab.setting(t1))
        key = lab.latest_key(finals) or {}                    # Table 1's latest weights of the row
        finals = lab.find(finals, **key)
        plain = [r for r in finals if r["cfg"] == 1.0]
        w = lab.best_cfg(t1, t1_records, row, **key)
        guided = [r for r in finals if r["cfg"] == w]
        t = tokens.get(name)
        cells = [label, ROW_LOSS[row], lab.fmt(t and t["mse"], 4),
                 "-" if t is None else ("exact" if t["psnr_db"] is None else lab.fmt(t["psnr_db"])),
                 lab.fmt(t and t["rfid"]), lab.fmt(plain[-1]["fid"] if plain else None),
                 f"{guided[-1]['fid']:.2f} ({w:g})" if guided else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------
def floats(text):
    return [float(v) for v in text.split(",") if v]


def ints(text):
    return [int(v) for v in text.split(",") if v]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, from: {', '.join(SWEEPS)} (default: all)")
    a("--runs_dir", default="runs", help="table1.py's training runs and cache (the mlp runs are added there)")
    a("--out", default=os.path.join(ROOT, "experiments", "ablations.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "ablations.md"), help="the Markdown report")
    a("--plots_dir", default=os.path.join(ROOT, "docs"), help="where the ablation_*.png plots go")
    a("--plots-only", dest="plots_only", action="store_true", help="only regenerate the plots and --table from --out")
    a("--table1", default=os.path.join(ROOT, "experiments", "table1.jsonl"),
      help="table1.py's results: its chosen CFG scales and the tokenizer rows")
    a("--table1_args", default="", help="table1.py flags its results were measured with, where not the defaults "
                                        "(e.g. '--num_fid 2000 --inception w.pth'): the protocol is read from them")
    a("--num", type=int, default=1000, help="N: samples per point")
    a("--batch", type=int, default=250, help="images per generation batch")
    a("--seed", type=int, default=0, help="sampling seed (and Table 1's reference subset)")
    a("--cfg", type=float, default=3.0, help="w/ CFG scale while Table 1 has chosen none")
    a("--steps_grid", type=ints, default="5,10,25,50,100,250", help="steps: diffusion sampling steps")
    a("--temperature_grid", type=floats, default="0.4,0.6,0.8,1.0,1.2", help="temperature: tau")
    a("--cfg_grid", type=floats, default="1.5,2,3,4,6,8", help="cfg: guidance scales besides 1.0 (Table 1's grid)")
    a("--widths", type=ints, default="64,128,256,512", help="mlp: Diffusion Loss MLP widths")
    a("--num_iter_grid", type=ints, default=f"1,2,4,8,{MAR_STEPS},{table1.SEQ_LEN}", help="speed: MAR steps")
    a("--max_steps", type=int, default=None, help="cap every training run (smoke tests only: not the protocol)")
    args = p.parse_args(argv)
    args.sweeps = [s for s in args.sweeps.split(",") if s]
    bad = [s for s in args.sweeps if s not in SWEEPS]
    if bad:
        raise ValueError(f"unknown --sweeps {bad}; valid: {', '.join(SWEEPS)}")
    return args


def table1_args(args):
    """table1.py's settings: its defaults, --table1_args, then ours that it shares (they win)."""
    t1 = table1.get_args(shlex.split(args.table1_args) + [
        "--runs_dir", args.runs_dir, "--batch", str(args.batch), "--seed", str(args.seed)]
        + (["--max_steps", str(args.max_steps)] if args.max_steps else []))
    if not 2 <= args.num <= t1.num_fid:
        raise ValueError(f"--num must be in 2..{t1.num_fid} (Table 1's --num_fid: the floor takes the first --num "
                         f"of its training-reference images), got {args.num}")
    return t1


def main(argv=None, inception=None):
    """inception: a feature network to use instead of loading table1's --inception (the tests' stand-in)."""
    args = get_args(argv)
    t1 = table1_args(args)
    measured = [s for s in args.sweeps if s != "tokenizers"]
    if not args.plots_only and measured:
        ev = lab.Evaluator(t1, inception)
        t1_records = lab.read_records(args.table1)
        needed = {(point(c, x)["run"], point(c, x)["diffloss_w"])
                  for s in measured for c in curves(args, t1, t1_records, s) for x in c["grid"]}
        paths = lab.train_all({key: table1.run_spec(t1, *training_spec(*key)) for key in sorted(needed)},
                              len(ev.train_set))
        runs = {key: load_run(path) for key, path in paths.items()}                     # train first, then measure
        measure_floor(args, t1, ev)
        for sweep in measured:
            measure(args, t1, ev, runs, sweep, t1_records)
    write_report(args, t1)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"ablations.py: error: {e}")
