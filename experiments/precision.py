"""
experiments/precision.py -- bf16 against fp32 on a CPU with bf16 instructions: what does training in bf16,
and what does sampling in bf16, cost in FID? (train.py / sample.py --precision; the speed is in
benchmarks/precision_speed.py.)

Runs: two of Table 1's training runs (table1.RUNS), each trained twice with table1.py's protocol, once with
--precision fp32 and once with --precision bf16 (directories RUNS_DIR/t1_*_fp32 and _bf16), the same seed
and data order, so that the two differ by the precision alone:
  mar_recipe  the small-data recipe's MAR ("mar_diffusion_recipe"), sampled with 16 steps at CFG 6
  ar_raster   AR raster ("ar_diffusion"), 49 steps at CFG 3
(each row's CFG scale is its Table 1 choice). Every trained model is then sampled in fp32 and in bf16 with the
same draws (EMA weights, batch 250, seeded batches, temperature 1.0, 100 diffusion steps, linear CFG).

Measured: FID of --num (1,000) class-balanced samples against the 5,000 training images (table1.py's sweep
reference, never the test set). Training's cost is the (bf16-trained, fp32-sampled) cell against the
(fp32, fp32) one; sampling's cost the (fp32, bf16) cell against (fp32, fp32). Each is compared with what a
retraining in fp32 moves the same number (recipe.md and table1.md hold retrainings of both runs).

Run (from the repository root; a point already in the JSONL is skipped, a stopped training resumes):
  python experiments/precision.py --runs_dir runs
  python experiments/precision.py --table-only            # experiments/precision.md from the JSONL
As table1.py: one process per core (OMP_NUM_THREADS=1), sharing runs and points through lock files.
"""
import argparse
import os
import shlex
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import lab  # noqa: E402
import mar  # noqa: E402
import sample  # noqa: E402
import table1  # noqa: E402
import tokenizer as tk  # noqa: E402

# name -> (table1.RUNS run, MAR steps or None (AR: one token per step), CFG scale: the row's Table 1 choice)
MODELS = {"mar_recipe": ("mar_diffusion_recipe", 16, 6.0), "ar_raster": ("ar_diffusion", None, 3.0)}
PRECISIONS = sample.PRECISIONS[1:]                  # fp32, bf16


def training_spec(name, precision):
    """table1.run_spec's (run, extra train.py flags, directory suffix). The flag overrides the --precision
    fp32 that table1.train_argv passes (argparse keeps the last)."""
    return MODELS[name][0], ("--precision", precision), "_" + precision


def measure(args, t1, ev, name, train_precision, path):
    run, num_iter, cfg = MODELS[name]
    model, ckpt = mar.load_checkpoint(path)
    model.diffloss.set_sampling_steps(t1.num_sampling_steps)
    tokenizer = tk.build_tokenizer(ckpt["tokenizer"])
    for precision in PRECISIONS:
        point = dict(model=name, cfg=cfg, n=args.num, **{**lab.setting(t1), "precision": precision},
                     **lab.checkpoint_key(model, ckpt))                  # precision: the sampling one here
        with lab.claim(args, **point) as mine:
            if mine:
                images, s_per_image = ev.sample(model, tokenizer, args.num, num_iter, cfg, precision=precision)
                lab.append_record(args.out, dict(
                    point, run=run, train_precision=train_precision, num_iter=num_iter or table1.SEQ_LEN,
                    temperature=1.0, ref="train", fid=ev.fid(images, "train"), s_per_image=round(s_per_image, 4),
                    batch=t1.batch, threads=torch.get_num_threads(),
                    train_time_s=lab.training_time(os.path.dirname(path))), who="precision")
                write_table(args)


def write_table(args):
    records = [r for r in lab.read_records(args.out) if r["n"] == args.num]
    lines = [f"FID of {args.num} samples vs the training-set reference (temperature 1.0, each row's Table 1 CFG "
             "scale; lower is better), by the precision of training (rows) and of sampling (columns). Written by "
             "experiments/precision.py from experiments/precision.jsonl.", "",
             "| model | CFG | trained in | FID, sampled in fp32 | FID, sampled in bf16 | weights |",
             "|---|---|---|---|---|---|"]
    for name, (run, num_iter, cfg) in MODELS.items():
        for tp in PRECISIONS:
            mine = lab.find(records, model=name, train_precision=tp)
            key = lab.latest_key(mine)                        # the latest weights measured
            if key is None:
                lines.append(f"| {name} | {cfg:g} | {tp} | not measured yet | - | - |")
                continue
            by = {r["precision"]: r for r in lab.find(mine, **key)}
            cell = lambda p: lab.fmt(by[p]["fid"]) if p in by else "-"
            lines.append(f"| {name} | {cfg:g} | {tp} | {cell('fp32')} | {cell('bf16')} | {key['weights_sha']} |")
    first = records[:1]
    if first:
        lines += ["", f"Sampling: batch {first[0]['batch']}, {first[0]['threads']} thread(s), torch "
                      f"{first[0]['torch']}. The speed of each precision is measured in benchmarks/README.md "
                      "(precision_speed.py), not here: these runs shared the machine."]
    tmp = f"{args.table}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.table)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    a("--runs_dir", default="runs", help="table1.py's runs and cache (the runs here are added there)")
    a("--out", default=os.path.join(ROOT, "experiments", "precision.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "precision.md"), help="the Markdown table")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--num", type=int, default=1000, help="samples per FID")
    a("--table1_args", default="", help="more table1.py flags (its protocol: --inception, --data_path, ...)")
    a("--max_steps", type=int, default=None, help="cap every training run (smoke tests only: not the protocol)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown --models {bad}; valid: {', '.join(MODELS)}")
    return args


def main(argv=None, inception=None):
    """inception: a feature network to use instead of table1's --inception (the tests' stand-in)."""
    args = get_args(argv)
    if args.table_only:
        write_table(args)
        print(open(args.table).read())
        return
    t1 = table1.get_args(shlex.split(args.table1_args) + ["--runs_dir", args.runs_dir]
                         + (["--max_steps", str(args.max_steps)] if args.max_steps else []))
    if not 2 <= args.num <= t1.num_fid:
        raise ValueError(f"--num must be in 2..{t1.num_fid} (the training-set reference holds --num_fid images)")
    ev = lab.Evaluator(t1, inception)
    # Each run is measured as soon as it is trained (lab.train_all would wait for all four first).
    pending = {(m, p): training_spec(m, p) for m in args.models for p in PRECISIONS}
    while pending:
        for (name, precision), spec in list(pending.items()):
            path = lab.ensure_trained(*table1.run_spec(t1, *spec), len(ev.train_set))
            if path is not None:
                measure(args, t1, ev, name, precision, path)
                del pending[name, precision]
        if pending:
            print(f"precision: waiting for {', '.join(map(str, pending))}: another process trains them", flush=True)
            time.sleep(30)
    write_table(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"precision.py: error: {e}")
