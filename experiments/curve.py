"""
experiments/curve.py -- the training-length curve: FID against training epochs for AR raster, AR random
order, MAR with the paper's recipe and MAR with the small-data recipe (experiments/recipe.py), all with
the Diffusion Loss. The paper's ordering (MAR < AR random < AR raster in FID) is a claim about its
400-epoch regime; Table 1 here trains 2 epochs. This asks where along the budget the ordering turns.

Each model is ONE long run of Table 1's configuration (table1.py's COMMON: mar_tiny / ar_tiny,
Fashion-MNIST, batch 64, lr 1e-3, constant after a 0.2-epoch warmup), so that its checkpoints at 2, 4,
8, 16, 32 ... epochs are valid points of one curve: with a constant lr, --epochs only says where the
run stops, and the first 2 epochs ARE Table 1's run (the same seed and draws), whose finished
checkpoint seeds the curve's run when table1.py has trained it. After each budget the checkpoint is
kept as checkpoint-epNNN.pth beside checkpoint-last.pth.

Run (from the repository root; finished points are skipped, a stopped run resumes from its last
checkpoint; two shells with OMP_NUM_THREADS=1 share the runs and points through lock files):
  python experiments/curve.py --runs_dir runs                      # every model to every --budgets
  python experiments/curve.py --runs_dir runs --models "AR raster" --budgets 2,4,8,16
  python experiments/curve.py --table-only                         # PNG and Markdown from the JSONL
Cost: 937.5 steps per epoch; measured on one thread each, two runs side by side, AR raster takes ~2.2 s
per step and the recipe's MAR ~1.0-1.3 s (its uniform mask law leaves half the tokens to the head, which
runs on masked tokens only): 16 epochs are ~9 and ~5 hours of one core. A killed run resumes from its
last checkpoint (every 200 steps) once its train.py is gone (lab.ensure_trained).

Protocol: FID of --num (1,000) class-balanced samples against the 10,000 test images at every budget
(and --num_final, 5,000, at the longest one measured), w/o CFG and w/ CFG at each model's fixed
settings (guided_settings: the scale of Table 1's CFG sweep at 2 epochs, temperature 1.0; and, once
every model of the call has one, the CFG scale and temperature of Table 1's joint sweep at 2 epochs, a
second line per model, "tuned T"; the same for every budget, so that the curve measures the model, not
a re-tuned sampler; each point records its setting, which sweep chose it and its run, run_sha). A line is
one training run: a run lost and retrained from scratch is another training (another machine gives
other weights, bit for bit), whose points are kept apart, and the curve shows each model's run that
reaches the longest budget. MAR samples with 16 steps, AR with 49; EMA weights; 100 diffusion steps;
Table 1's seeded batches. The report (curve.md) adds each guided line's trend (FID per doubling of the
training length, over its last 3 points) and the budget at which each line would meet AR raster's if
both trends held: an extrapolation, for where the curves have not crossed by the longest budget measured.
Since the lines bend, it adds a second extrapolation that lets them level off: FID = floor + B r^log2(epochs)
through the last 3 points (saturating_fit), each floor with its range when the points move by a
retraining's spread (--fit_spread), and where these fits would meet AR raster's.
"""
import argparse
import math
import os
import shlex
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import lab  # noqa: E402
import mar  # noqa: E402
import recipe  # noqa: E402
import table1  # noqa: E402
import tokenizer as tk  # noqa: E402
import train  # noqa: E402


# label -> (table1.RUNS name, extra train.py flags, Table 1 row whose sampling it uses)
MODELS = {
    "AR raster": ("ar_diffusion", (), "ar_raster_diffusion"),
    "AR random": ("ar_random_diffusion", (), "ar_random_diffusion"),
    "MAR paper": ("mar_diffusion", (), "mar16_diffusion"),
    "MAR recipe": ("mar_diffusion", recipe.CANDIDATES[recipe.CHOSEN][0], "mar16_diffusion_recipe"),
}
TABLE1_EPOCHS = 2


def sweep_key(t1, records, label, n_train):
    """checkpoint_key of the Table 1 sweep that chooses `label`'s guided settings, or None: the sweep of the
    curve's own 2-epoch weights where Table 1 swept exactly those (the curve's run starts from Table 1's
    finished 2-epoch run where there is one: seed_from_table1), else of the latest weights at 2 epochs whose
    CFG sweep is complete. Never an incomplete sweep: while table1.py re-sweeps a row on retrained weights,
    the curve keeps sampling with the choice it had."""
    row, steps = MODELS[label][2], steps_at(t1, label, TABLE1_EPOCHS, n_train)
    keys = [{k: r.get(k) for k in ("train_steps", "weights_sha")}
            for r in lab.find(records, row=row, kind="sweep", train_steps=steps)]
    snap = snapshot(curve_dir(t1, label), TABLE1_EPOCHS)
    if os.path.exists(snap):
        keys.append(lab.checkpoint_key(*mar.load_checkpoint(snap)))          # preferred: tried first
    return next((key for key in reversed(keys) if lab.best_cfg(t1, records, row, **key) is not None), None)


def guided_settings(t1, label, n_train, models):
    """[(sampler, (CFG scale, temperature))]: the guided settings `label` is measured at, at every budget,
    from Table 1's sweeps of its row at 2 epochs (sweep_key). Always "cfg sweep": the CFG sweep's scale at
    temperature 1.0; and "joint sweep": the joint CFG / temperature sweep's choice, once every model of the
    curve (`models`) has one, so that no line gets a sampler tuned more than the others'. Each is a line."""
    records = lab.read_records(t1.out)

    def choices(model):
        row, key = MODELS[model][2], sweep_key(t1, records, model, n_train)
        if key is None:
            raise RuntimeError(f"{model}: Table 1 has no complete CFG sweep of row {row} at "
                               f"{steps_at(t1, model, TABLE1_EPOCHS, n_train)} steps yet: run experiments/table1.py "
                               f"--rows {row} first (the curve samples with its choice)")
        return lab.best_setting(t1, records, row, **key), lab.best_cfg(t1, records, row, **key)
    joint, cfg = choices(label)
    tuned = all(choices(m)[0] is not None for m in models)
    return [("cfg sweep", (cfg, 1.0))] + ([("joint sweep", joint)] if tuned else [])


def sampler_of(record):
    """Which setting a point was measured at: "none" (w/o CFG), "cfg sweep" or "joint sweep" (above);
    records from before the field are the first two."""
    return record.get("sampler", "none" if record["cfg"] == 1.0 else "cfg sweep")


def curve_suffix(label):
    return "_curve" + lab.flag_suffix(MODELS[label][1])


def curve_dir(t1, label):
    return table1.run_dir(t1, MODELS[label][0], curve_suffix(label))


def steps_at(t1, label, epochs, n_train):
    """The step train.py stops at for `label` trained to `epochs`."""
    name, flags, _ = MODELS[label]
    argv = table1.train_argv(t1, name) + list(flags) + ["--epochs", str(epochs)]
    return lab.total_steps(train.get_args(argv), n_train)


def snapshot(run_dir, epochs):
    return os.path.join(run_dir, f"checkpoint-ep{epochs:03d}.pth")


def run_sha(run_dir):
    """Which training a point belongs to: the weights_sha of the run's earliest snapshot. A run lost and
    retrained from scratch is another training (not bitwise the same on another machine), whose points
    make another line: a curve's points all come from one run."""
    first = min(f for f in os.listdir(run_dir) if f.startswith("checkpoint-ep"))
    return lab.weights_sha(mar.load_checkpoint(os.path.join(run_dir, first))[0])


def seed_from_table1(t1, label, n_train):
    """Start the curve's run from Table 1's finished 2-epoch run (the same run; saves its 2 epochs):
    table1.py's run, or recipe.py's candidate run for the recipe."""
    name, flags, _ = MODELS[label]
    src, dst = table1.run_dir(t1, name, lab.flag_suffix(flags)), curve_dir(t1, label)
    ckpt = os.path.join(src, "checkpoint-last.pth")
    if os.path.exists(dst) or not os.path.exists(ckpt) or \
            tk.torch_load(ckpt)["step"] != steps_at(t1, label, TABLE1_EPOCHS, n_train):
        return
    os.makedirs(dst + ".seeding", exist_ok=True)
    for f in ("checkpoint-last.pth", "metrics.jsonl"):
        shutil.copy2(os.path.join(src, f), os.path.join(dst + ".seeding", f))
    shutil.copy2(ckpt, snapshot(dst + ".seeding", TABLE1_EPOCHS))
    os.replace(dst + ".seeding", dst)                       # a directory appears whole or not at all
    print(f"curve: {label}: seeded from Table 1's run {src}", flush=True)


def train_to(t1, label, epochs, n_train):
    """The checkpoint of `label` at `epochs` (training or resuming as needed), or None while another
    process trains it."""
    name, flags, _ = MODELS[label]
    d = curve_dir(t1, label)
    snap = snapshot(d, epochs)
    if os.path.exists(snap):
        return snap
    if os.path.exists(os.path.join(d, "checkpoint-last.pth")):
        step = tk.torch_load(os.path.join(d, "checkpoint-last.pth"))["step"]
        if step > steps_at(t1, label, epochs, n_train):
            raise RuntimeError(f"{d} is past {epochs} epochs (step {step}) but has no {os.path.basename(snap)}: "
                               "budgets must be trained in increasing order; remove the run to redo it")
    path = lab.ensure_trained(*table1.run_spec(t1, name, list(flags) + ["--epochs", str(epochs)], curve_suffix(label)),
                              n_train)
    if path is not None:
        shutil.copy2(path, snap + ".tmp")
        os.replace(snap + ".tmp", snap)
        return snap
    return None


def measure(args, t1, ev, label, epochs, path, n):
    """FID w/o CFG and w/ the label's guided setting of the checkpoint at `epochs` (if not measured)."""
    model, ckpt = mar.load_checkpoint(path)
    model.diffloss.set_sampling_steps(t1.num_sampling_steps)
    tokenizer = tk.build_tokenizer(ckpt["tokenizer"])
    row = MODELS[label][2]
    num_iter = table1.ROWS[row][1]
    run = run_sha(curve_dir(t1, label))
    for sampler, (cfg, temperature) in [("none", (1.0, 1.0))] + guided_settings(t1, label, len(ev.train_set),
                                                                                 args.models):
        point = dict(model=label, epochs=epochs, cfg=cfg, temperature=temperature, n=n, seed=t1.seed,
                     precision=t1.precision, **lab.checkpoint_key(model, ckpt))
        with lab.claim(args, **point) as mine:
            if mine:
                images, s_per_image = ev.sample(model, tokenizer, n, num_iter, cfg, "linear", temperature)
                lab.append_record(args.out, dict(point, sampler=sampler, run_sha=run, ref="test",
                                                 fid=ev.fid(images, "test"), s_per_image=round(s_per_image, 4)),
                                  who="curve")
        done = lab.find(lab.read_records(args.out), **point)
        if done and not any(sampler_of(r) == sampler for r in done):
            # both sweeps chose this setting (a joint sweep that kept temperature 1.0): the same images, so
            # the point is recorded again for the other line, not measured again
            lab.append_record(args.out, dict(done[-1], sampler=sampler, copied_from=done[-1]["time"]),
                              who="curve")
        write_report(args)


def trend(points, last=3):
    """(FID change per doubling of the training length, FID at log2(epochs) = 0) of the least-squares line
    through the `last` latest (epochs, FID) points in log2(epochs): the curve's local slope. A straight
    line in log-epochs is a model of the recent trend only (a FID curve flattens towards its floor), so
    what it says about budgets beyond the measured ones is an extrapolation, labelled as such."""
    pts = sorted(points)[-last:]
    if len(pts) < 2:
        return None
    xs, ys = [math.log2(e) for e, _ in pts], [f for _, f in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def meeting_epochs(a, b, after):
    """The budget in epochs beyond `after` (the longest one measured) at which the trends a and b (slope,
    intercept) meet, or None if they do not meet there (parallel, moving apart, or crossed before)."""
    (sa, ia), (sb, ib) = a, b
    if sa == sb:
        return None
    x = (ib - ia) / (sa - sb)
    return 2.0 ** x if x > math.log2(after) else None


def saturating_fit(points, last=3):
    """(floor, r, B) of FID = floor + B r^x, x = log2(epochs), through the `last` latest points exactly
    (3 points, 3 parameters), or None where they do not bend towards a floor (FID not falling at every
    step, or gains per doubling not shrinking). Each doubling keeps the fraction r of the excess over the
    floor: a power law in epochs with an asymptote, the shape a straight line in log-epochs (trend) misses
    once a curve bends. For 3 points at doubling budgets, r = (y2 - y3) / (y1 - y2)."""
    pts = sorted(points)[-last:]
    if len(pts) < 3:
        return None
    (x1, y1), (x2, y2), (x3, y3) = [(math.log2(e), f) for e, f in pts]
    d1, d2 = y1 - y2, y2 - y3
    # q(r) = (r^x1 - r^x2) / (r^x2 - r^x3) falls from infinity (r -> 0) to (x2 - x1) / (x3 - x2) (r -> 1):
    # a floor exists where the measured ratio of the gains d1 / d2 lies in that range.
    if d1 <= 0 or d2 <= 0 or d1 / d2 <= (x2 - x1) / (x3 - x2) * (1 + 1e-12):
        return None
    q = lambda r: (r ** x1 - r ** x2) / (r ** x2 - r ** x3)
    lo, hi = 1e-12, 1.0 - 1e-12
    for _ in range(200):                                   # bisection in r: q is decreasing
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if q(mid) > d1 / d2 else (lo, mid)
    r = (lo + hi) / 2
    b = d1 / (r ** x1 - r ** x2)
    return y1 - b * r ** x1, r, b


def floor_range(points, spread, last=3):
    """(lowest, highest) floor of saturating_fit over every way of moving each of the last 3 points by
    -spread, 0 or +spread (what a retraining moves a point by): how much the fit's floor can be trusted.
    The lowest is -inf where some such move leaves no floor (then the data allow any lower one); None
    where the points themselves have no fit."""
    pts = sorted(points)[-last:]
    if saturating_fit(pts) is None:
        return None
    floors = []
    for i in range(3 ** len(pts)):
        moved = [(e, f + spread * ((i // 3 ** k) % 3 - 1)) for k, (e, f) in enumerate(pts)]
        fit = saturating_fit(moved)
        floors.append(-math.inf if fit is None else fit[0])
    return min(floors), max(floors)


def meeting_saturating(a, b, after, until=2.0 ** 20):
    """The first budget in epochs beyond `after` (and up to `until`) at which the saturating fits a and b
    (floor, r, B) are equal, or None (they stay apart: the one behind levels off above the other)."""
    f = lambda x: (a[0] + a[2] * a[1] ** x) - (b[0] + b[2] * b[1] ** x)
    x0, step = math.log2(after), 1.0 / 64
    xs = [x0 + k * step for k in range(int((math.log2(until) - x0) / step) + 1)]
    for lo, hi in zip(xs, xs[1:]):
        if f(lo) == 0 or (f(lo) > 0) != (f(hi) > 0):
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if (f(mid) > 0) == (f(lo) > 0) else (lo, mid)
            return 2.0 ** ((lo + hi) / 2)
    return None


GUIDED = {"cfg sweep": "w/ CFG", "joint sweep": "w/ CFG, tuned T"}      # sampler -> the line's name suffix


def runs_of(records, label):
    """{run_sha: {epochs: {sampler: the latest record}}} of `label`'s points, and the run the curve shows:
    the one that reaches the longest budget (of those, the one measured last). Records from before the
    field have run_sha None: one run."""
    runs, last = {}, {}
    for i, r in enumerate(records):
        if r["model"] == label:
            runs.setdefault(r.get("run_sha"), {}).setdefault(r["epochs"], {})[sampler_of(r)] = r
            last[r.get("run_sha")] = i
    shown = max(runs, key=lambda k: (max(runs[k]), last[k])) if runs else None
    return runs, shown


def write_report(args):
    every = lab.read_records(args.out)
    records = [r for r in every if r["n"] == args.num]
    header = ["| model | epochs | steps | FID w/o CFG | FID w/ CFG (scale, T 1) | FID w/ CFG, tuned T (scale, T) |",
              "|---|---|---|---|---|---|"]
    series, others, finals = [], [], []
    lines = [f"FID of {args.num} samples vs the 10,000 test images against training epochs "
             "(experiments/curve.py; docs/curve.png). Each model's guided settings are fixed along the "
             "curve, chosen by Table 1's sweeps of its 2-epoch run: the CFG sweep's scale at temperature "
             "1.0, and the joint CFG / temperature sweep's choice once every model has one (tuned T).", ""] + header
    kind = {}                                                       # a line's name -> its suffix
    cell = lambda r: "-" if r is None else f"{r['fid']:.2f} ({r['cfg']:g}, {r['temperature']:g})"
    row = lambda label, e, p: (f"| {label} | {e:g} | {next(iter(p.values()))['train_steps']} | "
                               f"{lab.fmt(p.get('none') and p['none']['fid'])} | {cell(p.get('cfg sweep'))} | "
                               f"{cell(p.get('joint sweep'))} |")
    for label in MODELS:
        runs, shown = runs_of(records, label)
        for run, pts in runs.items():
            (lines if run == shown else others).extend(row(label, e, pts[e]) for e in sorted(pts))
        final = runs_of([r for r in every if r["n"] == args.num_final and r.get("run_sha") == shown], label)[0]
        finals.extend(row(label, e, p) for e, p in sorted(final.get(shown, {}).items()))
        pts = runs.get(shown, {})
        for sampler, suffix in GUIDED.items():
            guided = [(e, pts[e][sampler]["fid"], "") for e in sorted(pts) if sampler in pts[e]]
            if guided:
                series.append((f"{label} {suffix}", guided))
                kind[f"{label} {suffix}"] = suffix
    if finals:
        lines += ["", f"FID of {args.num_final} samples vs the test images at the longest budget each run had "
                      "reached when measured (the same runs and settings):", ""] + header + finals
    trends = {name: trend([(e, f) for e, f, _ in pts]) for name, pts in series}
    longest = {name: max(e for e, _, _ in pts) for name, pts in series}
    if any(t is not None for t in trends.values()):
        lines += ["", f"Trends (least squares of FID against log2(epochs) over each line's last 3 points; an "
                      "extrapolation beyond the longest budget, not a measurement):"]
        for name, t in trends.items():
            if t is not None:
                lines.append(f"- {name}: {t[0]:+.2f} FID per doubling of the training length")
        for name, t in trends.items():                  # each line against AR raster's line of the same sampler
            ref = f"AR raster {kind[name]}"
            if not name.startswith("AR raster") and t is not None and trends.get(ref):
                e = meeting_epochs(trends[ref], t, max(longest[name], longest[ref]))
                lines.append(f"- {name} would meet {ref} " + (f"at ~{e:.0f} epochs if both trends held"
                             if e is not None else "at no longer budget on these trends"))
    fits = {name: saturating_fit([(e, f) for e, f, _ in pts]) for name, pts in series}
    if any(fit is not None for fit in fits.values()):
        lines += ["", f"Saturating fits (FID = floor + B r^log2(epochs) through each line's last 3 points: each "
                      f"doubling keeps the fraction r of the excess over the floor; an extrapolation, not a "
                      f"measurement; in brackets the floor's range with each point moved by -{args.fit_spread:g}, 0 "
                      f"or +{args.fit_spread:g} FID, what a retraining moves a point by):"]
        for name, pts in series:
            fit, rng = fits[name], floor_range([(e, f) for e, f, _ in pts], args.fit_spread)
            lines.append(f"- {name}: " + ("no floor in sight (not bending towards one yet)" if fit is None else
                         f"floor {fit[0]:.1f} ({rng[0]:.1f} ... {rng[1]:.1f}), r {fit[1]:.2f} per doubling"))
        for name, fit in fits.items():
            ref = f"AR raster {kind[name]}"
            if not name.startswith("AR raster") and fit is not None and fits.get(ref) is not None:
                e = meeting_saturating(fits[ref], fit, max(longest[name], longest[ref]))
                lines.append(f"- {name} would meet {ref} " + (f"at ~{e:.0f} epochs on these fits" if e is not None
                             else f"at no longer budget on these fits (floors {fit[0]:.1f} vs {fits[ref][0]:.1f})"))
    if others:
        lines += ["", "Other trainings of the same configurations, not in the curve (a run lost and trained again "
                      "from scratch is another run: not bitwise the same on another machine; each line of the curve "
                      "is one run, the one that reached the longest budget):", ""] + header + others
    if series:
        lab.line_plot(os.path.join(args.docs, "curve.png"), series, "FID (N = 1,000 vs test) against training length",
                  "training epochs (log scale)", "FID", logx=True)
    with open(args.table, "w") as f:
        f.write("\n".join(lines) + "\n")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    a("--budgets", default="2,4,8,16", help="training epochs of the curve's points, increasing")
    a("--runs_dir", default="runs", help="table1.py's runs and cache (the curve's runs are added there)")
    a("--out", default=os.path.join(ROOT, "experiments", "curve.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "curve.md"), help="the Markdown table")
    a("--docs", default=os.path.join(ROOT, "docs"), help="where curve.png goes")
    a("--table-only", dest="table_only", action="store_true", help="only the PNG and Markdown from --out")
    a("--train_only", action="store_true", help="only the training runs")
    a("--num", type=int, default=1000, help="samples per FID at each budget")
    a("--num_final", type=int, default=5000, help="samples per FID at the longest budget")
    a("--fit_spread", type=float, default=1.0, help="FID by which a point may move in a retraining, for the "
      "range of the saturating fits' floors (a retrained run moved 1,000-sample points by up to ~1 here)")
    a("--table1_args", default="", help="more table1.py flags (its protocol: --inception, --data_path, ...)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",") if b]
    if [m for m in args.models if m not in MODELS] or args.budgets != sorted(set(args.budgets)):
        raise ValueError(f"--models from {', '.join(MODELS)}; --budgets increasing, got {args.models}, {args.budgets}")
    return args


def main(argv=None, inception=None):
    """inception: a feature network to use instead of table1's --inception (the tests' stand-in)."""
    args = get_args(argv)
    if args.table_only:
        write_report(args)
        print(open(args.table).read())
        return
    t1 = table1.get_args(shlex.split(args.table1_args) + ["--runs_dir", args.runs_dir])
    ev = lab.Evaluator(t1, inception, measures=not args.train_only)
    n_train = len(ev.train_set)
    for label in args.models:
        seed_from_table1(t1, label, n_train)
    # Each pass takes the shortest budget that no other process is training, a model's budgets in
    # increasing order; a process waits only when every model of the call is taken by another one.
    todo = [(epochs, label) for epochs in args.budgets for label in args.models]
    while todo:
        for epochs, label in todo:
            if any(e < epochs for e, m in todo if m == label):
                continue
            path = train_to(t1, label, epochs, n_train)
            if path is not None:
                todo.remove((epochs, label))
                if not args.train_only:
                    measure(args, t1, ev, label, epochs, path, args.num)
                break
        else:
            heads = [f"{m} at {e:g} epochs" for e, m in todo if not any(f < e for f, o in todo if o == m)]
            print(f"curve: waiting for {', '.join(heads)} (other processes train them)", flush=True)
            time.sleep(30)
    if not args.train_only:
        for label in args.models:
            measure(args, t1, ev, label, args.budgets[-1], snapshot(curve_dir(t1, label), args.budgets[-1]),
                    args.num_final)
    write_report(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"curve.py: error: {e}")
