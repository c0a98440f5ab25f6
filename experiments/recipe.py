"""
experiments/recipe.py -- a small-data recipe for MAR: candidate changes to how MAR trains (each an option
of mar.MAR / train.py whose default is the paper's, so released checkpoints behave as before), one
controlled training run each at Table 1's budget, compared by FID. experiments/diagnose.py gives the
reasons for the candidates; experiments/README.md the discussion.

Candidates (CANDIDATES): Table 1's MAR Diffusion Loss run (table1.py's "mar_diffusion": mar_tiny on
Fashion-MNIST, 1,875 steps) with one change each:
  paper           none: the run itself (mask ratio N(1, 0.25) truncated to [0.7, 1], positions N(0, 0.02))
  raw             none, sampled with the raw weights instead of the EMA (no training run)
  uniform         --mask_ratio_law uniform: the masked count uniform on 1..49
  cosine          --mask_ratio_law cosine: the mask ratio as the cosine generation schedule visits it
  sincos          --pos_embed_init sincos: position embeddings start from the 2D sin-cos of the 7x7 grid
  uniform_sincos  both of uniform and sincos
  uniform_sincos_dropout0  uniform_sincos with --dropout 0 (the Transformer's dropout 0.1 off: 2 epochs
                  of 60,000 images are far from overfitting)
  uniform_sincos_dropout0_decoder3  that with --encoder_depth 1 --decoder_depth 3: the same 4 blocks, 3 of
                  them on an unknown token's path (2 in mar_tiny; an ar_tiny query passes through 4)

Run (from the repository root; a point already in the JSONL is skipped, a stopped training resumes):
  python experiments/recipe.py --runs_dir runs                       # every candidate
  python experiments/recipe.py --runs_dir runs --candidates uniform  # some
  python experiments/recipe.py --table-only                          # Markdown from the JSONL
As table1.py: one process per core (OMP_NUM_THREADS=1), sharing runs and points through lock files.

Protocol: table1.py's training (COMMON, the same seed: the candidates differ from "paper" by their one
flag) and sampling (EMA weights, fp32, batch 250, seeded batches, 100 diffusion steps, temperature 1.0,
linear CFG), MAR with 16 generation steps (Table 1's "MAR default" row). Each candidate is measured w/o
CFG and w/ CFG --cfg (6, Table 1's choice for that row), FID of --num (1,000) class-balanced samples
against the training-set reference (never the test set: the choice is made here, the confirmation at
N = 5,000 against the test set is Table 1's row for the recipe).
"""
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import lab  # noqa: E402
import mar  # noqa: E402
import table1  # noqa: E402
import tokenizer as tk  # noqa: E402

RUN = "mar_diffusion"                     # table1.RUNS: the run every candidate varies
MAR_STEPS = table1.ROWS["mar16_diffusion"][1]
# name -> (train.py flags added to the run's, checkpoint weights to sample with)
CANDIDATES = {
    "paper": ((), "model_ema"),
    "raw": ((), "model"),
    "uniform": (("--mask_ratio_law", "uniform"), "model_ema"),
    "cosine": (("--mask_ratio_law", "cosine"), "model_ema"),
    "sincos": (("--pos_embed_init", "sincos"), "model_ema"),
    "uniform_sincos": (("--mask_ratio_law", "uniform", "--pos_embed_init", "sincos"), "model_ema"),
    "uniform_sincos_dropout0": (("--mask_ratio_law", "uniform", "--pos_embed_init", "sincos", "--dropout", "0"),
                                "model_ema"),
    "uniform_sincos_dropout0_decoder3": (("--mask_ratio_law", "uniform", "--pos_embed_init", "sincos", "--dropout",
                                          "0", "--encoder_depth", "1", "--decoder_depth", "3"), "model_ema"),
}


# The candidate chosen by the table (experiments/README.md says why); curve.py and Table 1's recipe row
# (table1.RUNS["mar_diffusion_recipe"]) train with its flags.
CHOSEN = "uniform_sincos_dropout0"


def training_spec(name):
    """table1.run_spec's (run, extra flags, directory suffix) of a candidate."""
    return RUN, CANDIDATES[name][0], lab.flag_suffix(CANDIDATES[name][0])


def measure(args, t1, ev, name, path):
    flags, key = CANDIDATES[name]
    model, ckpt = mar.load_checkpoint(path, key)
    model.diffloss.set_sampling_steps(t1.num_sampling_steps)
    tokenizer = tk.build_tokenizer(ckpt["tokenizer"])
    for cfg in (1.0, args.cfg):
        point = dict(candidate=name, cfg=cfg, n=args.num, seed=t1.seed, precision=t1.precision,
                     **lab.checkpoint_key(model, ckpt))
        with lab.claim(args, **point) as mine:
            if mine:
                images, s_per_image = ev.sample(model, tokenizer, args.num, MAR_STEPS, cfg)
                lab.append_record(args.out, dict(
                    point, flags=" ".join(flags), weights=key, num_iter=MAR_STEPS, temperature=1.0, ref="train",
                    fid=ev.fid(images, "train"), s_per_image=round(s_per_image, 4),
                    train_time_s=lab.training_time(os.path.dirname(path))), who="recipe")
                write_table(args)


def write_table(args):
    records = [r for r in lab.read_records(args.out) if r["n"] == args.num]
    lines = [f"FID of {args.num} samples vs the training-set reference (MAR, {MAR_STEPS} steps, temperature 1.0; "
             "lower is better). Written by experiments/recipe.py from experiments/recipe.jsonl.", "",
             f"| candidate | train.py flags | weights | FID w/o CFG | FID w/ CFG {args.cfg:g} | train steps | train time |",
             "|---|---|---|---|---|---|---|"]
    header = lines[-2:]

    def row(name, key):
        by_cfg = {r["cfg"]: r for r in lab.find(records, candidate=name, **key)}
        plain, guided = by_cfg.get(1.0), by_cfg.get(args.cfg)
        r = plain or guided
        return (f"| {name} | {r['flags'] or '-'} | {r['weights']} | {lab.fmt(plain and plain['fid'])} | "
                f"{lab.fmt(guided and guided['fid'])} | {r['train_steps']} | {r['train_time_s'] / 60:.0f} min |")

    others = []
    for name in CANDIDATES:
        key = lab.latest_key(records, candidate=name)           # the candidate's latest weights measured
        if key is None:
            lines.append(f"| {name} | {' '.join(CANDIDATES[name][0]) or '-'} | {CANDIDATES[name][1]} | "
                         "not measured yet | - | - | - |")
            continue
        lines.append(row(name, key))
        earlier = {(r["train_steps"], r.get("weights_sha")) for r in lab.find(records, candidate=name)}
        others += [row(name, dict(train_steps=s, weights_sha=w)) for s, w in sorted(earlier, key=str)
                   if (s, w) != (key["train_steps"], key["weights_sha"])]
    if others:    # a run lost and trained again (another machine, another float order) is another run
        lines += ["", "Earlier trainings of the same candidates (other weights; a candidate is compared with the "
                      "runs trained beside it, on the same machine):", ""] + header + others
    tmp = f"{args.table}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.table)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--candidates", default=",".join(CANDIDATES), help=f"comma-separated, from: {', '.join(CANDIDATES)}")
    a("--runs_dir", default="runs", help="table1.py's runs and cache (the candidates' runs are added there)")
    a("--out", default=os.path.join(ROOT, "experiments", "recipe.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "recipe.md"), help="the Markdown table")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--train_only", action="store_true", help="only the training runs")
    a("--num", type=int, default=1000, help="samples per FID")
    a("--cfg", type=float, default=6.0, help="the w/ CFG scale (Table 1's choice for MAR, 16 steps)")
    a("--table1_args", default="", help="more table1.py flags (its protocol: --inception, --data_path, ...)")
    a("--max_steps", type=int, default=None, help="cap every training run (smoke tests only: not the protocol)")
    args = p.parse_args(argv)
    args.candidates = [c for c in args.candidates.split(",") if c]
    bad = [c for c in args.candidates if c not in CANDIDATES]
    if bad:
        raise ValueError(f"unknown --candidates {bad}; valid: {', '.join(CANDIDATES)}")
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
    ev = lab.Evaluator(t1, inception, measures=not args.train_only)
    specs = {name: training_spec(name) for name in args.candidates}
    paths = lab.train_all({spec: table1.run_spec(t1, *spec) for spec in set(specs.values())}, len(ev.train_set))
    if args.train_only:
        return
    for name in args.candidates:
        measure(args, t1, ev, name, paths[specs[name]])
    write_table(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"recipe.py: error: {e}")
