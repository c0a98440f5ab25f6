"""
The tests of the experiment and benchmark scripts: experiments/shapes_judge.py, experiments/table1.py,
experiments/ablations.py, experiments/diagnose.py, recipe.py, curve.py and benchmarks/*.py (the benchmarks' tests live here too, at the end). Run
with everything else by `python -m pytest` at the repository root (pytest.ini names this file and
test_all.py), or alone: `python -m pytest experiments/test_experiments.py`.

Each script runs end to end at toy sizes: Table 1 and the ablations on a 100-image stand-in for
Fashion-MNIST with a small stand-in for the FID Inception (the real network is tested in test_all.py),
the benchmarks on tiny models. The numbers are not the point; what the scripts record, skip, share
between processes and report is.
"""
import argparse
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments"), os.path.join(ROOT, "benchmarks")]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # as in test_all.py: one thread for numpy's BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ablations  # noqa: E402
import curve  # noqa: E402
import diagnose  # noqa: E402
import fid_speed  # noqa: E402
import flop_bound  # noqa: E402
import head_ceiling  # noqa: E402
import lab  # noqa: E402
import mar  # noqa: E402
import masked_rows  # noqa: E402
import precision  # noqa: E402
import precision_speed  # noqa: E402
import recipe  # noqa: E402
import scarce  # noqa: E402
import speed  # noqa: E402
import table1  # noqa: E402
import table2  # noqa: E402
import tokenizer as T  # noqa: E402
import train  # noqa: E402
from diffloss import DiffLoss  # noqa: E402
from experiments import shapes_judge  # noqa: E402  (as test_all.py imports it: one cache of trained judges)
from mar import AR, MAR, build_model, load_checkpoint  # noqa: E402
from test_all import TRAIN_TINY, random_inception, write_idx  # noqa: E402  (helpers shared with the core tests)

torch.set_num_threads(1)      # as in test_all.py: small models, a 2-core machine


@pytest.fixture(autouse=True)
def one_thread_per_subprocess(monkeypatch):
    """table1.py trains in train.py subprocesses, which inherit the environment: one thread each, as
    table1.py's header advises for a small CPU (two threads per process on two busy cores are several
    times slower)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# ==============================================================================================
# The shapes judge (experiments/shapes_judge.py) that measures the demo's sample quality

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A train.py checkpoint of 16x16 shapes (the size of the judge that test_all.py trains), 4x4 patches
    -> 16 tokens; 2 steps: the judge's command line is under test, not the model."""
    d = tmp_path_factory.mktemp("tiny_run")
    train.main(TRAIN_TINY + ["--image_size", "16", "--patch_size", "4", "--max_steps", "2", "--output_dir", str(d)])
    return d / "checkpoint-last.pth"


def test_shapes_judge_scores_real_and_mislabelled_shapes():
    judge, real_acc = shapes_judge.train_judge(16)           # 16x16: the demo's size (test_all.py trains the same judge)
    assert real_acc > 0.95, f"the judge itself is unreliable: {real_acc:.2f} on unseen real shapes"
    x, y = train.make_shapes(10, 16, seed=2)                 # (100, 16, 16) uint8, classes interleaved
    acc, per_class = shapes_judge.accuracy(judge, x[..., None].numpy(), y)   # (N, S, S, 1) as sample.py writes
    assert acc > 0.9 and len(per_class) == 10
    assert math.isclose(acc, sum(per_class) / 10, abs_tol=1e-6)   # balanced classes: the mean of the classes
    wrong, wrong_per_class = shapes_judge.accuracy(judge, x, (y + 1) % 10)   # every label shifted by one class
    assert wrong <= 1 - acc + 1e-6 and max(wrong_per_class) < 0.5


def test_shapes_judge_cli_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    shapes_judge.main(["--ckpt", str(tiny_checkpoint), "--cfg", "1.0", "2.0", "--temperature", "0.5", "--num_iter", "4",
                       "--cfg_schedule", "linear", "constant", "--precision", "bf16",
                       "--num_sampling_steps", "5", "--per_class", "2", "--grid", str(tmp_path / "g.png")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line]
    assert [line.split(":")[0] for line in lines] == [f"cfg {c} ({s}) temperature 0.5 num_iter 4 bf16"
                                                      for c in (1, 2) for s in ("linear", "constant")]
    assert all(0 <= float(line.split("accuracy ")[1].split()[0]) <= 1 for line in lines)
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[1] > 10 * 16   # one row of 2 per class
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        shapes_judge.main(["--ckpt", str(tmp_path / "nope.pth")])


# ==============================================================================================
# Table 1 on Fashion-MNIST (experiments/table1.py)

class Features(nn.Module):
    """The stand-in for the FID Inception (why: test_table1_end_to_end_tiny): uint8 (N, 1, 28, 28) ->
    (4x4 mean-pooled pixels (N, 16) @ w (16, 8), no logits)."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.w, None


@pytest.fixture(scope="session")
def features():
    """One stand-in for every test (its weights are fixed, it keeps no state)."""
    return Features()


@pytest.fixture(scope="session")
def fashion_stand_in(tmp_path_factory):
    """A 100-image stand-in for Fashion-MNIST (28x28 shapes, 10 per class; 20 test images) in idx files,
    shared (read only) by the Table 1 and ablation tests."""
    data = tmp_path_factory.mktemp("fmnist")
    for split, per_class in (("train", 10), ("t10k", 2)):
        images, labels = train.make_shapes(per_class, 28, seed=len(split))
        write_idx(str(data / f"{split}-images-idx3-ubyte"), images.numpy())
        write_idx(str(data / f"{split}-labels-idx1-ubyte"), labels.numpy())
    return data


def test_table1_end_to_end_tiny(tmp_path, fashion_stand_in, features):
    """experiments/table1.py on a 100-image stand-in for Fashion-MNIST (28x28 shapes in idx files),
    N = 4: trains the CE run, fits the shared codebook, measures the floor, the tokenizers and one row
    w/o CFG (--no_cfg), then its CFG sweep; a last call finds everything done. The feature network is a
    small stand-in (the real Inception is tested in test_all.py): with 2048-d features each FID costs two
    2048 x 2048 eigendecompositions, minutes for this test on a busy 2-core machine."""
    data = fashion_stand_in
    out, table, runs = tmp_path / "t1.jsonl", tmp_path / "t1.md", tmp_path / "runs"
    argv = ["--rows", "mar16_ce,floor,tokens", "--runs_dir", str(runs), "--out", str(out), "--table", str(table),
            "--inception", str(tmp_path / "no_such_file.pth"), "--data_path", str(data), "--num_fid", "4", "--num_sweep", "2",
            "--cfg_grid", "2,3", "--batch", "3", "--num_sampling_steps", "2", "--vq", "8", "--max_steps", "2"]
    with pytest.raises(FileNotFoundError, match="--inception"):     # the weights file is checked when needed
        table1.main(argv[:1] + ["floor"] + argv[2:])
    table1.main(argv + ["--no_cfg"], inception=features)         # the FIDs w/o CFG first, the sweep later
    assert [(r["row"], r["kind"], r.get("cfg")) for r in map(json.loads, out.read_text().splitlines())] == \
        [("floor", "floor", None), ("tokens", "tokens", None), ("tokens", "tokens", None), ("mar16_ce", "final", 1.0)]
    assert "| MAR | random | bidirect | 1 | Diff Loss | not measured yet | - | - | 3.43, 1.84 |" in table.read_text()
    # a process beside this one measures the CFG-2 sweep point: it is skipped, so the FID w/ CFG waits too
    ckpt_path = str(runs / "t1_mar_tiny_ce" / "checkpoint-last.pth")
    sha = lab.weights_sha(mar.load_checkpoint(ckpt_path)[0])
    lock = lab.measurement_lock(table1.get_args(argv), row="mar16_ce", kind="sweep", cfg=2.0, n=2, train_steps=2,
                                weights_sha=sha, seed=0, num_sampling_steps=2, precision="fp32")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(lock, "w").write(str(holder.pid))
    table1.main(argv, inception=features)
    assert [(r["kind"], r.get("cfg")) for r in map(json.loads, out.read_text().splitlines())][4:] == [("sweep", 3.0)]
    holder.kill()
    holder.wait()                                                # it died: its lock is taken over
    table1.main(argv, inception=features)
    assert not os.path.exists(lock)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows[4:7] = [rows[5], rows[4], rows[6]]                      # sweep points in grid order (2, 3), then the final
    assert [(r["row"], r["kind"]) for r in rows] == [("floor", "floor"), ("tokens", "tokens"), ("tokens", "tokens"),
                                                     ("mar16_ce", "final"), ("mar16_ce", "sweep"),
                                                     ("mar16_ce", "sweep"), ("mar16_ce", "final")]
    pixel, vq = rows[1], rows[2]
    assert pixel["tokens"] == "pixel" and pixel["mse"] == 0 and pixel["psnr_db"] is None and vq["tokens"] == "vq8" and vq["mse"] > 0
    ev = lab.Evaluator(table1.get_args(argv), features)       # exact pixel tokens reuse the cached features
    assert pixel["rfid"] == pytest.approx(ev.fid(lab.uint8_images(ev.test_set, ev.test_index()), "test"))
    final = rows[3]
    assert (final["cfg"], final["n"], final["ref"], final["num_iter"], final["tokens"]) == (1.0, 4, "test", 16, "vq8")
    assert final["train_steps"] == 2 and final["s_per_image"] > 0 and final["fid"] > 0
    assert {r["weights_sha"] for r in rows[3:]} == {sha} and len(sha) == 12
    assert final["recon_mse"] == pytest.approx(vq["mse"]) and final["recon_psnr_db"] == pytest.approx(vq["psnr_db"])
    best = min(rows[4:6], key=lambda r: r["fid"])
    assert rows[4]["ref"] == "train" and rows[6]["cfg"] == best["cfg"]      # the sweep's choice, at full N
    ckpt = T.torch_load(str(runs / "t1_mar_tiny_ce" / "checkpoint-last.pth"))
    assert torch.equal(ckpt["tokenizer"]["codebook"], T.torch_load(str(runs / "t1_cache" / "codebook_k8.pth"))["codebook"])
    assert "| MAR | random | bidirect | >1 (16 steps) | CrossEnt (VQ) |" in table.read_text()
    assert " | 8.79, 3.69 | " in table.read_text()                   # the paper's FIDs beside ours
    log = (runs / "t1_mar_tiny_ce.log").read_text()
    assert not (runs / "t1_mar_tiny_ce.lock").exists()                 # released after training
    table1.main(argv, inception=features)                        # all done: nothing trained or measured again
    assert len(out.read_text().splitlines()) == len(rows) and (runs / "t1_mar_tiny_ce.log").read_text() == log
    # the run retrained (here: one EMA weight changed, the step the same): its points are measured anew,
    # not pooled with the old weights', and the table shows the new ones
    ckpt = T.torch_load(ckpt_path)
    ckpt["model_ema"]["z_proj.bias"][0] += 1.0
    train.save_checkpoint(ckpt_path, ckpt)
    sha2 = lab.weights_sha(mar.load_checkpoint(ckpt_path)[0])
    table1.main(argv, inception=features)
    again = [json.loads(line) for line in out.read_text().splitlines()][len(rows):]
    assert sha2 != sha and [(r["kind"], r["weights_sha"], r["train_steps"]) for r in again] == \
        [("sweep", sha2, 2), ("sweep", sha2, 2), ("final", sha2, 2), ("final", sha2, 2)]   # the sweep first
    assert f"| {again[2]['fid']:.2f} | " in table.read_text() and (runs / "t1_mar_tiny_ce.log").read_text() == log
    with pytest.raises(ValueError, match="unknown --rows"):
        table1.main(argv[:1] + ["mar_ce"] + argv[2:])


def test_table1_runs(tmp_path):
    """Every Table 1 run trains into its own directory with its own flags: the supplementary MAR with the
    mask ratio in [0, 1] must not reuse (or overwrite) the paper's MAR run, and vice versa."""
    args = table1.get_args(["--runs_dir", str(tmp_path)])
    dirs = {name: table1.run_dir(args, name) for name in table1.RUNS}
    assert len(set(dirs.values())) == len(dirs)
    for name in table1.RUNS:
        a = vars(train.get_args(table1.train_argv(args, name) + ["--output_dir", dirs[name]]))
        assert (a["model"], a["order"], a["head"]) == table1.RUNS[name][:3]
        if a["model"].startswith("mar_"):
            assert a["mask_ratio_min"] == (0.0 if name == "mar_diffusion_mr0" else 0.7)
    assert table1.ROWS["mar16_diffusion_mr0"][0] == "mar_diffusion_mr0"
    # the recipe row trains recipe.py's choice, in the directory of recipe.py's run of it (reused)
    flags = recipe.CANDIDATES[recipe.CHOSEN][0]
    assert table1.RUNS["mar_diffusion_recipe"][3] == flags
    assert table1.run_dir(args, "mar_diffusion_recipe") == table1.run_dir(args, recipe.RUN, lab.flag_suffix(flags))
    assert curve.MODELS["MAR recipe"] == (recipe.RUN, flags, "mar16_diffusion_recipe")
    # the AR raster control takes the recipe's dropout and nothing else: it differs from AR raster's run
    # in that one argument, set to the recipe's value
    ar, control = (vars(train.get_args(table1.train_argv(args, name))) for name in ("ar_diffusion", "ar_diffusion_dropout0"))
    assert {k for k in ar if ar[k] != control[k]} == {"dropout"}
    assert control["dropout"] == float(flags[flags.index("--dropout") + 1]) == 0.0
    assert table1.ROWS["ar_raster_diffusion_dropout0"][:2] == ("ar_diffusion_dropout0", None)


def test_table1_joint_choice():
    """The joint sweep's choice is the lowest FID over the chosen CFG scale's grid neighbours, each at
    temperature 1.0 and every --temperature_grid value; None while a point is missing, and None with an
    empty --temperature_grid (the CFG sweep alone does not tune the temperature, so the report's "temperature
    tuned" column must not show it as tuned)."""
    args = table1.get_args(["--cfg_grid", "1.5,2,3,4", "--temperature_grid", "0.8"])
    fid = {(1.5, 1.0): 9, (2, 1.0): 7, (3, 1.0): 5, (4, 1.0): 6, (2, 0.8): 4.5, (3, 0.8): 4.9, (4, 0.8): 8}
    rec = lambda c, t: dict(row="r", kind="sweep", n=args.num_sweep, cfg=float(c), fid=fid[c, t], **lab.setting(args),
                            **({} if t == 1.0 else {"temperature": t}))
    records = [rec(*p) for p in fid]
    assert lab.best_cfg(args, records, "r") == 3.0
    assert lab.best_setting(args, records, "r") == (2.0, 0.8)             # a neighbour of 3, not 3 itself
    assert lab.best_setting(args, [r for r in records if r.get("temperature") != 0.8 or r["cfg"] != 4], "r") is None
    assert lab.best_setting(table1.get_args(["--cfg_grid", "1.5,2,3,4", "--temperature_grid", ""]), records, "r") is None


def test_table1_report_keeps_trainings_apart(tmp_path):
    """A row's sweep in the report is the sweep of the checkpoint its finals come from; the sweep of a later
    training of the row (retrained after its checkpoint was lost, no finals yet) is listed apart, never
    pooled with it."""
    args = table1.get_args(["--runs_dir", str(tmp_path), "--out", str(tmp_path / "t.jsonl"),
                            "--table", str(tmp_path / "t.md"), "--cfg_grid", "2,4,6", "--temperature_grid", ""])
    common = dict(row="mar16_diffusion", run="mar_diffusion", num_iter=16, train_steps=10, params=1, head_params=1,
                  batch=1, threads=1, train_time_s=60, s_per_image=0.1, **lab.setting(args))
    old, new = dict(weights_sha="aaa"), dict(weights_sha="bbb")
    for key, fids in [(old, {2.0: 50.0, 4.0: 40.0, 6.0: 44.0}), (new, {2.0: 30.0, 4.0: 35.0, 6.0: 36.0})]:
        for cfg, f in fids.items():
            lab.append_record(args.out, dict(common, **key, kind="sweep", cfg=cfg, n=args.num_sweep, fid=f))
        if key is old:
            for cfg, f in [(1.0, 45.0), (4.0, 41.0)]:
                lab.append_record(args.out, dict(common, **key, kind="final", cfg=cfg, n=args.num_fid, fid=f))
    table1.write_table(args)
    text = (tmp_path / "t.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| MAR | random | bidirect | >1 (16 steps) | Diff"))
    assert "| 45.00 | 41.00 (4) |" in row
    sweep, later = text.split("of later trainings")
    assert "- mar16_diffusion: 2: 50.00, 4: 40.00, 6: 44.00" in sweep and "30.00" not in sweep
    assert "- mar16_diffusion: 2: 30.00, 4: 35.00, 6: 36.00" in later and "50.00" not in later


def test_table1_locks(tmp_path, monkeypatch):
    """table1.py processes share work through lock files: a lock of a running process is respected, one
    of a dead process (or a pid never written, a minute on) is taken over; cached reference features
    are computed once, a second process waits for the file instead of computing them again; a run
    another process trains is left to it; a lock deleted by hand is no error."""
    lock = str(tmp_path / "x.lock")
    assert lab.take_lock(lock) and open(lock).read() == str(os.getpid())
    assert not lab.take_lock(lock)                             # held by a running process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    open(lock, "w").write(dead.stdout.strip())
    assert lab.take_lock(lock)                                 # its process is gone
    open(lock, "w").write("")
    assert not lab.take_lock(lock)                             # pid still being written
    os.utime(lock, (time.time() - 120,) * 2)
    assert lab.take_lock(lock)
    held = argparse.Namespace(runs_dir=str(tmp_path / "claims"), out=str(tmp_path / "none.jsonl"))
    x_lock, other = lab.measurement_lock(held, kind="x"), str(os.getppid())     # (a live process's pid)
    with lab.claim(held, kind="x") as mine:                    # its lock deleted by hand meanwhile: the
        assert mine                                            # measurement's process goes on
        os.remove(x_lock)
    with lab.claim(held, kind="x"):                            # ... and one another process has taken
        os.remove(x_lock)                                      # since is left to it
        open(x_lock, "w").write(other)
    assert open(x_lock).read() == other

    args = argparse.Namespace(runs_dir=str(tmp_path), fid_batch=2)
    path = tmp_path / "t1_cache" / "features_ref.npy"
    path.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # "another process"
    naps = []   # lab.py's clock: a waiting process polls every 5 s; here it naps 0.05 s and notes it
    monkeypatch.setattr(lab, "time", argparse.Namespace(
        time=time.time, sleep=lambda s: naps.append(s) or time.sleep(0.05)))
    try:
        open(str(path) + ".lock", "w").write(str(holder.pid))
        feats = np.arange(6, dtype=np.float32).reshape(3, 2)
        tmp = tmp_path / "done.npy"
        np.save(tmp, feats)
        threading.Timer(0.2, lambda: os.replace(tmp, path)).start()  # it finishes a moment later
        got = lab.cached_features(args, "ref", lambda: pytest.fail("computed twice"), None)
        assert np.array_equal(got, feats) and naps                  # it waited for the file
        t1 = table1.get_args(["--runs_dir", str(tmp_path)])             # a run another process trains: not now
        open(table1.run_dir(t1, "mar_ce") + ".lock", "w").write(str(holder.pid))
        assert lab.ensure_trained(*table1.run_spec(t1, "mar_ce"), 100) is None and not os.path.exists(table1.run_dir(t1, "mar_ce"))
    finally:
        holder.kill()


# ==============================================================================================
# Ablations on Fashion-MNIST (experiments/ablations.py)

def test_ablations_end_to_end_tiny(tmp_path, monkeypatch, fashion_stand_in, features):
    """experiments/ablations.py on test_table1_end_to_end_tiny's stand-ins (28x28 shapes in idx files, a
    small feature network), N = 4: table1.py first measures its MAR Diffusion Loss row (so it has chosen
    a CFG scale) and the tokenizers; then every sweep at two settings (the mlp sweep: Table 1's run and a
    width-24 head trained with train.py --diffloss_w). Each distinct point is measured once, with
    the settings its record states reaching the sampler; a second call measures nothing; --plots-only
    rebuilds the same report."""
    from PIL import Image
    data = fashion_stand_in
    runs, t1_out, out, md, plots = (tmp_path / name for name in ("runs", "t1.jsonl", "a.jsonl", "a.md", "plots"))
    t1_flags = ["--data_path", str(data), "--inception", str(tmp_path / "no_such_file.pth"), "--num_fid", "8",
                "--num_sweep", "4", "--cfg_grid", "2,3", "--temperature_grid", "", "--num_sampling_steps", "2",
                "--vq", "8"]                         # (the joint temperature sweep: test_recipe_and_curve_end_to_end_tiny)
    shared = ["--runs_dir", str(runs), "--batch", "4", "--max_steps", "2"]
    table1.main(["--rows", "mar16_diffusion,tokens", "--out", str(t1_out), "--table", str(tmp_path / "t1.md")]
                + t1_flags + shared, inception=features)
    t1_records = lab.read_records(str(t1_out))
    w = lab.best_cfg(table1.get_args(t1_flags), t1_records, "mar16_diffusion")
    assert w in (2.0, 3.0)

    seen, real = [], lab.generate                 # what the sampler receives
    def spy(model, tokenizer, labels, g, num_iter, cfg, cfg_schedule, temperature, precision):
        seen.append((model.diffloss.net.input_proj.out_features, model.diffloss.num_sampling_steps,
                     num_iter if isinstance(model, MAR) else 49, temperature, cfg, cfg_schedule))
        assert precision == "fp32"                   # table1.py's --precision default: its tables' protocol
        return real(model, tokenizer, labels, g, num_iter, cfg, cfg_schedule, temperature, precision)
    monkeypatch.setattr(lab, "generate", spy)
    argv = ["--out", str(out), "--table", str(md), "--plots_dir", str(plots), "--table1", str(t1_out),
            "--table1_args", shlex.join(t1_flags), "--num", "4", "--steps_grid", "2,3", "--temperature_grid", "0.5,1",
            "--cfg_grid", "2", "--widths", "256,24", "--num_iter_grid", "4,16"] + shared
    ablations.main(argv, inception=features)
    floor, *points = lab.read_records(str(out))
    keys = ("run", "diffloss_w", "num_sampling_steps", "num_iter", "temperature", "cfg", "cfg_schedule")
    settings = lambda r: tuple(r[k] for k in keys)
    M = "mar_diffusion"
    expected = ({(M, 256, s, 16, 1.0, c, "linear") for s in (2, 3) for c in (1.0, w)}                 # steps
                | {(M, 256, 2, 16, t, c, "linear") for t in (0.5, 1.0) for c in (1.0, w)}            # temperature
                | {(M, 256, 2, 16, 1.0, c, s) for c in (1.0, 2.0) for s in ("linear", "constant")
                   if c != 1 or s == "linear"}                                                        # cfg
                | {(M, d, 2, 16, 1.0, c, "linear") for d in (256, 24) for c in (1.0, w)}             # mlp
                | {(M, 256, 2, k, 1.0, w, "linear") for k in (4, 16)}                                 # speed
                | {("ar_diffusion", 256, 2, 49, 1.0, 3.0, "linear")})
    assert sorted(map(settings, points)) == sorted(expected)                   # each distinct point once
    assert seen == [settings(r)[1:] for r in points]                           # ... sampled with its settings
    # (after 2 training steps the model hardly uses its class yet: CFG changes no sample, and FIDs cannot show it)
    assert all((r["kind"], r["n"], r["seed"], r["train_steps"], r["batch"], r["threads"], r["ref"])
               == ("point", 4, 0, 2, 4, torch.get_num_threads(), "test") and r["s_per_image"] > 0 for r in points)
    fids = {settings(r): r["fid"] for r in points}
    assert fids[M, 256, 2, 16, 0.5, 1.0, "linear"] != fids[M, 256, 2, 16, 1.0, 1.0, "linear"]       # temperature
    assert fids[M, 256, 3, 16, 1.0, 1.0, "linear"] != fids[M, 256, 2, 16, 1.0, 1.0, "linear"]       # diffusion steps
    heads = {r["diffloss_w"]: r["head_params"] for r in points if r["run"] == M}
    assert heads[24] < heads[256]                                            # the narrow head was trained
    assert T.torch_load(str(runs / "t1_mar_tiny_diffusion_w24" / "checkpoint-last.pth"))["args"]["diffloss_w"] == 24
    source = {settings(r): r["cfg_source"] for r in points}
    assert source[M, 256, 3, 16, 1.0, w, "linear"] == "table1 mar16_diffusion"
    assert source[M, 256, 3, 16, 1.0, 1.0, "linear"] is None
    assert source[M, 256, 2, 16, 1.0, 2.0, "constant"] == "--cfg_grid"
    assert source["ar_diffusion", 256, 2, 49, 1.0, 3.0, "linear"] == "--cfg"    # Table 1 has no AR row here: --cfg
    # the floor: N class-balanced training images, the first N of Table 1's reference subset
    ev = lab.Evaluator(table1.get_args(t1_flags + shared), features)
    labels = ev.train_set.labels
    assert torch.equal(lab.balanced_subset(labels, 4, 0), lab.balanced_subset(labels, 8, 0)[:4])
    train4 = lab.uint8_images(ev.train_set, lab.balanced_subset(labels, 4, 0))
    assert (floor["kind"], floor["n"]) == ("floor", 4)
    assert floor["fid"] == pytest.approx(ev.fid(train4, "test"), rel=1e-5)
    # the report: every study, a plot of each measured one, Table 1's numbers in the tokenizer table
    report = md.read_text()
    titles = ["Diffusion sampling steps", "Temperature", "CFG scale", "Denoising MLP", "Speed / quality", "Tokenizers"]
    for i, title in enumerate(titles):
        assert f"## {i + 1}. {title}" in report
    for sweep in ("steps", "temperature", "cfg", "mlp", "speed"):
        assert f"(plots/ablation_{sweep}.png)" in report
        assert Image.open(plots / f"ablation_{sweep}.png").size == (760, 500)
    plain = next(r for r in t1_records if r["row"] == "mar16_diffusion" and r["kind"] == "final" and r["cfg"] == 1.0)
    vq = next(r for r in t1_records if r.get("tokens") == "vq8")
    pixel_row, vq_row = [line for line in report.splitlines() if line.startswith(("| pixel patches", "| VQ-8 codes"))]
    assert "| exact |" in pixel_row and f"| {plain['fid']:.2f} |" in pixel_row
    assert f"| {vq['rfid']:.2f} | - | - |" in vq_row                            # CE row not measured in Table 1
    # all done: nothing trained or measured again; --plots-only rebuilds the same files from the JSONL
    log, pngs = (runs / "t1_ar_tiny_diffusion.log").read_text(), {p.name: p.read_bytes() for p in plots.iterdir()}
    ablations.main(argv, inception=features)
    assert len(lab.read_records(str(out))) == 1 + len(points) and len(seen) == len(points)
    assert (runs / "t1_ar_tiny_diffusion.log").read_text() == log
    md.unlink()
    for p in plots.iterdir():
        p.unlink()
    ablations.main(argv + ["--plots-only"])
    assert md.read_text() == report and {p.name: p.read_bytes() for p in plots.iterdir()} == pngs
    with pytest.raises(ValueError, match="unknown --sweeps"):
        ablations.main(argv + ["--sweeps", "steps,fig9"])
    with pytest.raises(ValueError, match="--num must be in 2..8"):
        ablations.main(argv + ["--num", "9"])


# ==============================================================================================
# Why MAR trails AR: experiments/diagnose.py, recipe.py and curve.py

def tiny_models():
    """A 3x3-token MAR, and causal ARs in both orders, random weights (eval mode: no dropout)."""
    kw = dict(seq_len=9, token_dim=4, num_classes=3)
    torch.manual_seed(0)
    m = MAR(**kw, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=2,
            decoder_num_heads=2, buffer_size=2, diffloss_d=1, diffloss_w=16).eval()
    ars = [AR(**kw, embed_dim=16, depth=2, num_heads=2, diffloss_d=1, diffloss_w=16, order=o).eval()
           for o in ("raster", "random")]
    return [m] + ars


@pytest.mark.parametrize("which", [0, 1, 2])
@torch.no_grad()
def test_loss_vs_known_matches_a_direct_computation(which):
    """diagnose.loss_vs_known (batched, chunked, gathered) against one image and one token at a time:
    for k known, the model's z from exactly those k tokens (MAR: a one-image forward_z with that mask;
    AR: the slot-k output of a one-image forward in that order) and the per-token loss at the same
    (t, noise) draws, averaged over the unknown tokens (MAR) or the slot-k tokens of the repeats (AR),
    then images."""
    model = tiny_models()[which]
    N, L, C = 5, 9, 4
    x, y = torch.randn(N, L, C, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    got = diagnose.loss_vs_known(model, x, y, seed=3, draws=2, chunk_size=3, ar_repeats=2)  # chunks of 3, 2
    want = []
    for k in range(L):
        total = 0.0
        for b in range(N):
            c, i = divmod(b, 3)
            B = 3 if c == 0 else 2
            t, noise = diagnose.head_draws(3, k, c, (B, L, C), 2)
            if isinstance(model, MAR):
                order = diagnose.known_order(3, k, c, B, L)[i]
                mask = torch.ones(1, L)
                mask[0, order[:k]] = 0
                z = model.forward_z(x[b:b + 1], mask, y[b:b + 1])[0]                # the count read off the mask
                losses = [sum(model.diffloss.loss_per_token(x[b, j][None], z[j][None], t[r, i, j][None],
                                                            noise[r, i, j][None]) for r in range(2)) / 2
                          for j in order[k:].tolist()]
                total += float(sum(losses)) / (L - k)
            else:                                                               # 2 repeats: orders, draws
                for o in range(2):
                    t, noise = diagnose.head_draws(3, k, c + o * 100_003, (B, L, C), 2)
                    order = diagnose.known_order(3, L + o, c, B, L)[i] if model.order == "random" else torch.arange(L)
                    z = model.forward_z(x[b:b + 1], y[b:b + 1], order[None])[0, k]
                    j = int(order[k])
                    total += float(sum(model.diffloss.loss_per_token(x[b, j][None], z[None], t[r, i, j][None],
                                                                     noise[r, i, j][None]) for r in range(2)) / 4)
        want.append(total / N)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_probs_and_uniform_attention_lift():
    """attention_probs reproduces the Attention module (its probabilities times v, then proj, equal the
    module's output); with the query/key weights zeroed every key gets the same attention, so the lift
    on the grid neighbours is exactly 1 in every layer, for MAR's decoder and the causal AR alike."""
    attn = mar.Attention(16, 2, 0.0, 0.0).eval()
    x = torch.randn(3, 7, 16)
    for causal in (False, True):
        p = diagnose.attention_probs(attn, x, causal)                                  # (B, H, L, L)
        v = attn.qkv(x).view(3, 7, 3, 2, 8)[:, :, 2].transpose(1, 2)                   # (B, H, L, D/H)
        torch.testing.assert_close(attn.proj((p @ v).transpose(1, 2).reshape(3, 7, 16)), attn(x, causal))
    x, y = torch.randn(6, 9, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    for model in tiny_models():
        with torch.no_grad():
            for blk in (model.decoder_blocks if isinstance(model, MAR) else model.blocks):
                blk.attn.qkv.weight[:32].zero_(), blk.attn.qkv.bias[:32].zero_()      # q = k = 0
        for known in (2, 5):
            np.testing.assert_allclose(diagnose.attention_lift(model, x, y, known), 1.0, rtol=1e-6)


def test_similarity_by_distance_of_sincos_embeddings():
    """On sincos_2d, the mean cosine similarity at each grid distance equals the closed form averaged
    over the offsets at that distance, (sum_i cos(w_i dr) + cos(w_i dc)) / (D/2); it falls with
    distance (negative correlation). Orthogonal embeddings: similarity 0 at every distance."""
    side, D = 4, 16
    curve, corr = diagnose.similarity_by_distance(mar.sincos_2d(side * side, D))
    w = 10000.0 ** (-np.arange(D // 4) / (D // 4))
    by_d = {}
    for i in range(side * side):
        for j in range(i + 1, side * side):
            dr, dc = i // side - j // side, i % side - j % side
            by_d.setdefault(round(math.hypot(dr, dc), 4), []).append((np.cos(w * dr) + np.cos(w * dc)).sum() / (D / 2))
    assert [d for d, _ in curve] == pytest.approx(sorted(by_d))
    np.testing.assert_allclose([s for _, s in curve], [np.mean(by_d[d]) for d in sorted(by_d)], atol=1e-6)
    assert corr < -0.5
    curve, _ = diagnose.similarity_by_distance(torch.eye(9))
    assert all(abs(s) < 1e-12 for _, s in curve) and curve[0][0] == 1.0


def random_checkpoint(path, name, **kw):
    """A train.py-style checkpoint of a random-weight model on 28x28 pixel tokens (4x4: 49 x 16)."""
    torch.manual_seed(0)
    model = build_model(name, seq_len=49, token_dim=16, num_classes=10, **kw)
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "config": model.config,
                "tokenizer": T.PixelTokenizer(28, 1, 4).config(), "step": 0}, path)
    return str(path)


def test_diagnose_end_to_end_tiny(tmp_path, fashion_stand_in):
    """experiments/diagnose.py on two checkpoints and a stand-in for the Fashion-MNIST test set: one JSON
    line per (checkpoint, diagnostic), the three plots and the table; a second call measures nothing."""
    data = fashion_stand_in
    mar_ckpt = random_checkpoint(tmp_path / "mar.pth", "mar_tiny", pos_embed_init="sincos")
    ar_ckpt = random_checkpoint(tmp_path / "ar.pth", "ar_tiny", order="random")
    out = tmp_path / "d.jsonl"
    argv = ["--ckpt", f"MAR sincos={mar_ckpt}", "--ckpt", f"AR random={ar_ckpt}", "--num", "4", "--draws", "1",
            "--attn_known", "8,40", "--data_path", str(data), "--out", str(out), "--table", str(tmp_path / "d.md"),
            "--docs", str(tmp_path)]
    diagnose.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["kind"]) for r in rows] == [(m, k) for m in ("MAR sincos", "AR random") for k in diagnose.KINDS]
    assert all(len(r["loss"]) == 49 for r in rows if r["kind"] == "known")
    pos = {r["model"]: r["embeddings"] for r in rows if r["kind"] == "pos"}
    assert sorted(pos["MAR sincos"]) == ["decoder_pos", "diffusion_pos", "encoder_pos"]
    assert pos["MAR sincos"]["decoder_pos"]["corr"] < -0.5                    # sin-cos: organised by distance
    lifts = {r["model"]: r["lift"] for r in rows if r["kind"] == "attention"}
    assert {m: {k: len(v) for k, v in lift.items()} for m, lift in lifts.items()} == \
        {"MAR sincos": {"8": 2, "40": 2}, "AR random": {"8": 4, "40": 4}}   # a lift per decoder / causal block
    for png in ("diagnose_known.png", "diagnose_pos.png", "diagnose_attention.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "| MAR sincos (0) |" in (tmp_path / "d.md").read_text()
    diagnose.main(argv)
    assert len(out.read_text().splitlines()) == len(rows)
    with pytest.raises(ValueError, match="LABEL=PATH"):
        diagnose.get_args(["--ckpt", mar_ckpt])


def test_curve_trend_and_meeting_point():
    """The trend is the least-squares line in log2(epochs) of the last 3 points; two lines meet where
    i_a + s_a x = i_b + s_b x, x = log2(epochs), counted only beyond the longest budget."""
    ar = [(2, 40.0), (4, 38.0), (8, 36.0), (16, 34.0)]                    # 40 - 2 (x - 1): exact line
    mar_ = [(2, 90.0), (4, 85.0), (8, 70.0), (16, 60.0)]                   # last 3: x = 2, 3, 4
    assert curve.trend(ar) == pytest.approx((-2.0, 42.0))
    slope, icpt = curve.trend(mar_)
    assert slope == pytest.approx(-12.5) and icpt == pytest.approx((85 + 70 + 60) / 3 + 12.5 * 3)
    assert curve.trend([(2, 1.0)]) is None
    x = (42.0 - icpt) / (slope + 2.0)                                      # where the two lines are equal
    assert curve.meeting_epochs((-2.0, 42.0), (slope, icpt), 16) == pytest.approx(2 ** x)
    assert 16 < 2 ** x
    assert curve.meeting_epochs((-2.0, 42.0), (-2.0, 80.0), 16) is None    # parallel
    assert curve.meeting_epochs((-2.0, 42.0), (-1.0, 80.0), 16) is None    # moving apart (met before 2 epochs)
    assert curve.meeting_epochs((-2.0, 42.0), (-12.5, 100.0), 256) is None  # met at ~46 epochs, before 256


def test_curve_saturating_fit_floor_range_and_meeting(tmp_path):
    """saturating_fit recovers (floor, r, B) of FID = floor + B r^log2(epochs) from 3 exact points, at
    doubling budgets and at uneven ones; lines that do not bend have no fit; floor_range holds the fit's
    floor (a point for spread 0) and is unbounded below where a move straightens the line; two fits meet
    where they are equal, beyond the longest budget only; the report states fits and meeting points."""
    law = lambda floor, r, b: (lambda e: floor + b * r ** math.log2(e))
    ar, mar_ = law(20.0, 0.5, 80.0), law(10.0, 0.8, 200.0)
    assert curve.saturating_fit([(e, ar(e)) for e in (2, 4, 8, 16)]) == pytest.approx((20.0, 0.5, 80.0))
    assert curve.saturating_fit([(e, mar_(e)) for e in (2, 4, 32)]) == pytest.approx((10.0, 0.8, 200.0))
    assert curve.saturating_fit([(2, 40.0), (4, 38.0), (8, 36.0)]) is None      # straight in log2(epochs)
    assert curve.saturating_fit([(2, 40.0), (4, 38.0), (8, 39.0)]) is None      # rises
    assert curve.saturating_fit([(4, 38.0), (8, 36.0)]) is None
    pts = [(e, ar(e)) for e in (4, 8, 16)]                                     # 40, 30, 25: gains 10, 5
    assert curve.floor_range(pts, 0.0) == pytest.approx((20.0, 20.0))
    lo, hi = curve.floor_range(pts, 1.0)
    assert lo < 20.0 < hi and math.isfinite(lo)
    # the highest floor: the first and last points up, the middle one down (41, 29, 26: gains 12, 3, r 0.25),
    # floor = y3 - d2 r / (1 - r)
    assert hi == pytest.approx(26.0 - 3.0 * 0.25 / 0.75)
    assert curve.floor_range([(4, 40.0), (8, 30.0), (16, 24.0)], 1.0)[0] == -math.inf    # gains 10, 6 -> 8, 8
    assert curve.floor_range([(4, 40.0), (8, 38.0), (16, 36.0)], 1.0) is None
    a, b = curve.saturating_fit(pts), curve.saturating_fit([(e, mar_(e)) for e in (4, 8, 16)])
    e = curve.meeting_saturating(a, b, 16)
    assert 16 < e and ar(e) == pytest.approx(mar_(e), abs=1e-6)               # mar_ is behind at 16, floor below
    assert curve.meeting_saturating(a, curve.saturating_fit([(e, law(30.0, 0.5, 80.0)(e)) for e in (4, 8, 16)]),
                                    16) is None                                 # levels off above: never meets
    assert curve.meeting_saturating(b, a, 2 * e) is None                      # met before the longest budget

    records = [dict(model=m, epochs=e, cfg=c, temperature=1.0, n=4, seed=0, train_steps=e, weights_sha=None,
                    sampler="cfg sweep" if c > 1 else "none", run_sha=None, ref="test", fid=f(e) + (c > 1))
               for m, f in (("AR raster", ar), ("MAR recipe", mar_)) for e in (2, 4, 8, 16) for c in (1.0, 3.0)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve.main(["--table-only", "--num", "4", "--out", str(tmp_path / "c.jsonl"), "--table", str(tmp_path / "c.md"),
                "--docs", str(tmp_path), "--fit_spread", "0"])
    report = (tmp_path / "c.md").read_text()
    assert "- AR raster w/ CFG: floor 21.0 (21.0 ... 21.0), r 0.50 per doubling" in report
    assert "- MAR recipe w/ CFG: floor 11.0 (11.0 ... 11.0), r 0.80 per doubling" in report
    assert f"- MAR recipe w/ CFG would meet AR raster w/ CFG at ~{e:.0f} epochs on these fits" in report


def test_line_plot_legend_wraps(tmp_path):
    """A legend wider than the plot continues on a second row above the frame: every series' swatch is
    drawn (the curve's five lines once cut the fifth off at the image's edge); one row for a short one."""
    from PIL import Image
    pts = [(2, 40.0, ""), (4, 30.0, ""), (8, 25.0, "")]
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]

    def legend_rows(labels, rows):
        """The legend's rows, read off the swatches' colours above the frame (its top margin is 60 + 20 rows)."""
        lab.line_plot(str(tmp_path / "p.png"), [(name, pts) for name in labels], "t", "x", "y", logx=True)
        img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))[:60 + 20 * rows - 5]
        ys = [np.nonzero((img == c).all(-1))[0] for c in colours[:len(labels)]]
        assert all(len(y) for y in ys), "a swatch of the legend is missing"
        return len({int(y.min()) for y in ys})
    curve_lines = ["AR raster w/ CFG", "AR random w/ CFG", "MAR paper w/ CFG", "MAR recipe w/ CFG",
                   "MAR recipe w/ CFG, tuned T"]                               # wider than the plot together
    assert legend_rows(curve_lines, 2) == 2
    assert legend_rows(["a", "b"], 1) == 1
    # a style's colour, and dashes: about half the pixels of the same line drawn solid
    drawn = []
    for dashed in (False, True):
        lab.line_plot(str(tmp_path / "d.png"), [("a", pts, {"color": "#ff0000", "dashed": dashed})], "t", "x", "y")
        drawn.append(int((np.asarray(Image.open(tmp_path / "d.png").convert("RGB")) == (255, 0, 0)).all(-1).sum()))
    assert 0.3 < drawn[1] / drawn[0] < 0.8, drawn


def test_recipe_and_curve_end_to_end_tiny(tmp_path, monkeypatch, fashion_stand_in, features):
    """table1.py's joint CFG / temperature sweep, then recipe.py (Table 1's run sampled with its EMA and
    its raw weights; a candidate's flags are train.py's, tested in test_all.py), then curve.py (Table 1's run seeds the curve, which trains on to 4 epochs and keeps both budgets'
    checkpoints), on a 100-image stand-in for Fashion-MNIST with a small feature network."""
    data = fashion_stand_in
    runs = tmp_path / "runs"
    t1_args = ["--data_path", str(data), "--num_fid", "4", "--num_sweep", "4", "--cfg_grid", "2,3",
               "--temperature_grid", "0.8", "--batch", "4", "--num_sampling_steps", "2",
               "--inception", str(tmp_path / "none.pth"), "--out", str(tmp_path / "t1.jsonl")]
    table1.main(["--rows", "mar16_diffusion", "--runs_dir", str(runs), "--table", str(tmp_path / "t1.md")] + t1_args,
                inception=features)
    t1 = [json.loads(line) for line in (tmp_path / "t1.jsonl").read_text().splitlines()]
    joint = [(r["cfg"], r.get("temperature", 1.0)) for r in t1 if r["kind"] == "sweep"]
    assert sorted(joint) == [(2.0, 0.8), (2.0, 1.0), (3.0, 0.8), (3.0, 1.0)]
    cfg = min((r for r in t1 if r["kind"] == "sweep" and "temperature" not in r), key=lambda r: r["fid"])["cfg"]
    best = min((r for r in t1 if r["kind"] == "sweep" and r["cfg"] in (2.0, 3.0)), key=lambda r: r["fid"])
    tuned = (best["cfg"], best.get("temperature", 1.0))                      # the whole grid is cfg's neighbours
    assert sorted((r["cfg"], r.get("temperature", 1.0)) for r in t1 if r["kind"] == "final") == \
        sorted({(1.0, 1.0), (cfg, 1.0), tuned})                             # w/o CFG, w/ CFG, tuned: at N
    cells = [line for line in (tmp_path / "t1.md").read_text().splitlines() if "| >1 (16 steps) | Diff Loss |" in line]
    assert f"({tuned[0]:g}, {tuned[1]:g})" in cells[0]

    argv = ["--runs_dir", str(runs), "--table1_args", " ".join(t1_args)]
    recipe.main(argv + ["--candidates", "paper,raw", "--num", "4", "--out", str(tmp_path / "r.jsonl"),
                        "--table", str(tmp_path / "r.md")], inception=features)
    rec = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["candidate"], r["weights"], r["cfg"], r["ref"], r["train_steps"]) for r in rec] == [
        ("paper", "model_ema", 1.0, "train", 3), ("paper", "model_ema", 6.0, "train", 3),
        ("raw", "model", 1.0, "train", 3), ("raw", "model", 6.0, "train", 3)]
    assert rec[0]["fid"] != rec[2]["fid"]                                   # the raw weights are another model
    assert "| uniform | --mask_ratio_law uniform | model_ema | not measured yet |" in (tmp_path / "r.md").read_text()
    assert "Earlier trainings" not in (tmp_path / "r.md").read_text()
    # a retraining of "paper" measured before these weights (another weights_sha) is listed apart
    earlier = [dict(r, weights_sha="e" * 12, fid=r["fid"] + 1) for r in rec[:2]]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier + rec))
    recipe.main(["--table-only", "--num", "4", "--out", str(tmp_path / "r.jsonl"), "--table", str(tmp_path / "r.md")])
    main_table, other = (tmp_path / "r.md").read_text().split("Earlier trainings")
    fmt = lambda r: f"| paper | - | model_ema | {r[0]['fid']:.2f} | {r[1]['fid']:.2f} | 3 |"
    assert fmt(rec) in main_table and fmt(earlier) in other and fmt(earlier) not in main_table
    with pytest.raises(ValueError, match="unknown --candidates"):
        recipe.get_args(["--candidates", "paper,bigger"])

    curve.main(argv + ["--models", "MAR paper", "--budgets", "2,4", "--num", "4", "--num_final", "8",
                       "--out", str(tmp_path / "c.jsonl"), "--table", str(tmp_path / "c.md"), "--docs", str(tmp_path)],
               inception=features)
    d = runs / "t1_mar_tiny_diffusion_curve"
    ep2, ep4 = T.torch_load(str(d / "checkpoint-ep002.pth")), T.torch_load(str(d / "checkpoint-ep004.pth"))
    table1_run = T.torch_load(str(runs / "t1_mar_tiny_diffusion" / "checkpoint-last.pth"))
    assert (ep2["step"], ep4["step"]) == (3, 6)
    assert all(torch.equal(ep2["model"][k], table1_run["model"][k]) for k in ep2["model"])
    cv = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(r["epochs"], r["n"], r["sampler"], r["cfg"], r["temperature"]) for r in cv] == [
        (e, n, s, *setting) for e, n in ((2, 4), (4, 4), (4, 8))                  # each budget, then N at the last
        for s, setting in (("none", (1.0, 1.0)), ("cfg sweep", (cfg, 1.0)), ("joint sweep", tuned))]
    if tuned == (cfg, 1.0):                      # the joint sweep kept temperature 1.0: recorded, not re-measured
        assert all(r["fid"] == q["fid"] and "copied_from" in r for q, r in zip(cv[1::3], cv[2::3]))
    assert (tmp_path / "curve.png").stat().st_size > 0
    report = (tmp_path / "c.md").read_text()
    for sampler, name in (("cfg sweep", "MAR paper w/ CFG"), ("joint sweep", "MAR paper w/ CFG, tuned T")):
        g = [r["fid"] for r in cv if r["sampler"] == sampler and r["n"] == 4]    # each guided line's 2 points
        assert f"- {name}: {g[1] - g[0]:+.2f} FID per doubling" in report
    assert f"| MAR paper | 4 | 6 | {cv[3]['fid']:.2f} | {cv[4]['fid']:.2f} ({cfg:g}, 1) | {cv[5]['fid']:.2f} " \
           f"({tuned[0]:g}, {tuned[1]:g}) |" in report
    final = report.split("FID of 8 samples")[1].split("Trends")[0]               # the N = --num_final table
    assert f"| MAR paper | 4 | 6 | {cv[6]['fid']:.2f} | {cv[7]['fid']:.2f} ({cfg:g}, 1) |" in final
    assert f"{cv[3]['fid']:.2f}" not in final
    # a second training of the same configuration (the run lost and trained again on another machine): its
    # points are listed apart, until it reaches a longer budget than the run shown
    assert {r["run_sha"] for r in cv} == {curve.run_sha(str(d))}
    again = [dict(r, run_sha="0123456789ab", weights_sha="0123456789ab", fid=r["fid"] + 100) for r in cv]

    def report_of(records):
        (tmp_path / "c2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        curve.main(["--table-only", "--num", "4", "--out", str(tmp_path / "c2.jsonl"), "--table",
                    str(tmp_path / "c2.md"), "--docs", str(tmp_path)])
        return (tmp_path / "c2.md").read_text()
    main, other = report_of(cv + again[:3]).split("Other trainings")
    assert f"{cv[0]['fid']:.2f}" in main and f"{again[0]['fid']:.2f}" in other.split("Trends")[0]
    assert f"{again[0]['fid']:.2f}" not in main and report_of(cv).count("Other trainings") == 0
    longer = [dict(r, epochs=8, train_steps=12) for r in again[3:6]]
    main, other = report_of(cv + again[:3] + longer).split("Other trainings")
    assert f"| MAR paper | 8 | 12 | {longer[0]['fid']:.2f} |" in main and f"{cv[3]['fid']:.2f}" in other
    # a model whose row has no joint sweep (here: MAR paper's CFG sweep alone, copied to AR raster's row)
    # puts every model of the call on its CFG sweep's scale at temperature 1.0
    ar = [dict(r, row="ar_raster_diffusion") for r in t1 if r["kind"] == "sweep" and "temperature" not in r]
    with open(tmp_path / "t1.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in ar)
    t1_ns = table1.get_args(t1_args + ["--runs_dir", str(runs)])
    assert curve.guided_settings(t1_ns, "MAR paper", 100, ["MAR paper"]) == \
        [("cfg sweep", (cfg, 1.0)), ("joint sweep", tuned)]
    assert curve.guided_settings(t1_ns, "MAR paper", 100, ["MAR paper", "AR raster"]) == [("cfg sweep", (cfg, 1.0))]
    with pytest.raises(RuntimeError, match="no complete CFG sweep of row ar_random_diffusion"):
        curve.guided_settings(t1_ns, "MAR paper", 100, ["MAR paper", "AR random"])
    # a joint sweep that keeps temperature 1.0 (the lower temperatures made worse here): its line's points
    # are the CFG sweep's, recorded again for that line, not measured again
    if tuned != (cfg, 1.0):
        worse = [dict(r, fid=r["fid"] + 1e3) for r in t1 if r["kind"] == "sweep" and "temperature" in r]
        with open(tmp_path / "t1.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in worse)
        assert curve.guided_settings(t1_ns, "MAR paper", 100, ["MAR paper"])[1] == ("joint sweep", (cfg, 1.0))
        curve.main(argv + ["--models", "MAR paper", "--budgets", "2,4", "--num", "4", "--num_final", "8",
                           "--out", str(tmp_path / "c.jsonl"), "--table", str(tmp_path / "c.md"),
                           "--docs", str(tmp_path)], inception=features)
        new = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()][len(cv):]
        assert [(r["epochs"], r["n"], r["sampler"], r["cfg"], r["temperature"], r["fid"]) for r in new] == [
            (q["epochs"], q["n"], "joint sweep", cfg, 1.0, q["fid"]) for q in cv[1::3]]
        assert all(r["copied_from"] == q["time"] for q, r in zip(cv[1::3], new))

    # Table 1 re-sweeping a row on other weights at 2 epochs (retrained: another weights_sha): a half-done
    # sweep is never used; a complete one is, unless Table 1 swept the curve's own 2-epoch weights
    settings = {m: curve.guided_settings(t1_ns, m, 100, [m]) for m in ("MAR paper", "AR raster")}
    other = lambda row, c, fid, sha: dict(t1[0], row=row, kind="sweep", n=4, cfg=c, fid=fid, weights_sha=sha)
    with open(tmp_path / "t1.jsonl", "a") as f:
        f.writelines(json.dumps(other(row, 2.0, -1.0, "0123456789ab")) + "\n"
                     for row in ("mar16_diffusion", "ar_raster_diffusion"))
    assert {m: curve.guided_settings(t1_ns, m, 100, [m]) for m in settings} == settings
    with open(tmp_path / "t1.jsonl", "a") as f:
        f.writelines(json.dumps(other(row, c, -c, "0123456789ab")) + "\n"          # complete: chooses 3
                     for row in ("mar16_diffusion", "ar_raster_diffusion") for c in (2.0, 3.0))
    assert curve.guided_settings(t1_ns, "MAR paper", 100, ["MAR paper"]) == settings["MAR paper"]
    assert curve.guided_settings(t1_ns, "AR raster", 100, ["AR raster"]) == [("cfg sweep", (3.0, 1.0))]

    # while another process holds AR raster's run, this one trains MAR paper on to its longest budget
    # before it waits (and the 4-epoch run, finished a moment ago, resumes despite its fresh mtime)
    (runs / "t1_ar_tiny_diffusion_curve.lock").write_text(str(os.getpid()))      # a live process's lock

    def no_wait(_):
        raise TimeoutError("waited")
    monkeypatch.setattr(lab.time, "sleep", no_wait)
    with pytest.raises(TimeoutError):
        curve.main(argv + ["--models", "AR raster,MAR paper", "--budgets", "2,4,6", "--train_only",
                           "--out", str(tmp_path / "c.jsonl"), "--table", str(tmp_path / "c.md"), "--docs", str(tmp_path)],
                   inception=features)
    assert T.torch_load(str(d / "checkpoint-ep006.pth"))["step"] == 9
    assert not (runs / "t1_ar_tiny_diffusion_curve").exists()
    # a run to 8 epochs at step 9, its files written just now: left alone while a live train.py holds its
    # train.lock (one started by hand); resumed at once when the lock's process is gone (a killed run)
    last = T.torch_load(str(d / "checkpoint-last.pth"))
    last["args"]["epochs"] = 8
    torch.save(last, d / "checkpoint-last.pth")
    (d / "train.lock").write_text(str(os.getpid()))
    assert curve.train_to(t1_ns, "MAR paper", 8, 100) is None and not (d / "checkpoint-ep008.pth").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / "train.lock").write_text(dead.stdout.strip())
    assert T.torch_load(curve.train_to(t1_ns, "MAR paper", 8, 100))["step"] == 12
    assert not (d / "train.lock").exists()


# ==============================================================================================
# Table 2: tokenizers trained here (experiments/table2.py)

def test_table2_end_to_end_tiny(tmp_path, fashion_stand_in, features, monkeypatch):
    """experiments/table2.py on the 100-image stand-in: the KL candidate (kl_f2) trained 2 steps, chosen (the
    only one), and vq_f4 trained because a VQ row needs it (whatever the chosen KL: its codes give the 49 tokens
    of the other rows); their quality measured beside pixel and k-means tokens; MAR with cross-entropy on
    vq_f4's codes trained on them and measured with Table 1's protocol; the figure; a second call finds
    everything done."""
    out, md = tmp_path / "t2.jsonl", tmp_path / "t2.md"
    t1 = ["--data_path", str(fashion_stand_in), "--num_fid", "4", "--num_sweep", "4", "--cfg_grid", "2",
          "--temperature_grid", "", "--batch", "4", "--num_sampling_steps", "2", "--vq", "8", "--max_steps", "2",
          "--inception", str(tmp_path / "none.pth"), "--precision", "fp32"]
    argv = ["--runs_dir", str(tmp_path / "runs"), "--out", str(out), "--table", str(md), "--table1",
            str(tmp_path / "t1.jsonl"), "--docs", str(tmp_path), "--tokenizers", "kl_f2", "--rows",
            "mar16_ce_vq", "--num_rfid", "4", "--tokenizer_batch", "8", "--table1_args", shlex.join(t1)]
    with pytest.raises(ValueError, match="add a kl_"):
        table2.get_args([a if a != "kl_f2" else "vq_f4" for a in argv])
    assert table2.get_args([a if a != "kl_f2" else "vq_f4" for a in argv] + ["--tokenizers_only"]).tokenizers_only
    run, gan = table2.tokenizer_spec(table2.get_args(argv), "kl_f4_gan")                 # a candidate's flags
    assert run.endswith("t2_kl_f4_gan_fp32") and " ".join(gan).count("--model kl_f4 ") == 1 and \
        "--disc_weight 0.5 --disc_start 1" in " ".join(gan)
    row_dir, row = table2.row_spec(table2.get_args(argv), "mar16_diffusion_klf4", "kl_f2",   # the control's tokens
                                   {"kl_f4": ("k.pth", "0123456789")})
    assert row_dir.endswith("t2_mar16_diffusion_klf4_kl_f4_01234567_fp32")
    assert "--vae k.pth --patch_size 1" in " ".join(row)
    monkeypatch.setattr(table2, "measure_codes", functools.partial(table2.measure_codes, batch=7))  # 20 images:
    table2.main(argv, inception=features)                                                          # 3 batches
    records = lab.read_records(str(out))
    tokens = {r["tokenizer"]: r for r in records if r["kind"] == "tokens"}
    assert set(tokens) == {"kl_f2", "vq_f4", "pixel", "vq8"} and tokens["pixel"]["rfid"] == 0.0
    assert tokens["kl_f2"]["train_steps"] == 2 and tokens["kl_f2"]["scale"] > 0 and tokens["kl_f2"]["mse"] > 0
    (codes,) = [r for r in records if r["kind"] == "codes"]                  # the VQ one's codebook use
    assert (codes["tokenizer"], codes["weights_sha"], codes["codes"]) == ("vq_f4", tokens["vq_f4"]["weights_sha"], 1024)
    assert 0 < codes["used"] <= 1 and 1 - 1e-6 <= codes["perplexity"] <= codes["used"] * 1024 + 1e-3
    vq = T.load_vae(str(tmp_path / "runs" / "t2_vq_f4_fp32" / "checkpoint-last.pth"))     # the gap, directly:
    test = T.load_fashion_mnist(str(fashion_stand_in), "test")                        # ||z - e||^2 over the
    with torch.no_grad():                                                             # variance of z
        z = vq.encode(lab.unit_images(lab.uint8_images(test, torch.arange(len(test))))).double()
        zq = vq.quantize(z.float())[0].double()
    want = ((z - zq) ** 2).sum() / ((z - z.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum()
    assert codes["gap"] == pytest.approx(want.item(), rel=1e-6) and codes["ref"] == "test"
    rows = [r for r in records if r.get("row") == "mar16_ce_vq"]
    assert sorted((r["kind"], r["cfg"]) for r in rows) == [("final", 1.0), ("final", 2.0), ("sweep", 2.0)]
    assert {(r["tokenizer"], r["tokenizer_sha"]) for r in rows} == {("vq_f4", tokens["vq_f4"]["weights_sha"])}
    run = tmp_path / "runs" / f"t2_mar16_ce_vq_vq_f4_{tokens['vq_f4']['weights_sha'][:8]}_fp32"   # its tokenizer's
    ckpt = T.torch_load(str(run / "checkpoint-last.pth"))
    assert (ckpt["tokenizer"]["kind"], ckpt["tokenizer"]["discrete"], ckpt["config"]["seq_len"]) == ("vqae", True, 49)
    assert ckpt["args"]["mask_ratio_law"] == "uniform" and ckpt["args"]["dropout"] == 0       # the recipe
    assert (tmp_path / "table2.png").exists() and "| MAR (recipe) | VQ, codes (vq_f4) | CrossEnt |" in md.read_text()
    assert f"| kl_f2 | 2, fp32, 2, 0 min | {tokens['kl_f2']['mse']:.4f} |" in md.read_text()
    assert f"| {codes['used']:.1%} of 1024 ({codes['perplexity']:.0f}), {codes['gap']:.4f} |" in md.read_text()
    (sweep,) = [r for r in rows if r["kind"] == "sweep"]
    assert f"- mar16_ce_vq: 2: {sweep['fid']:.2f}" in md.read_text()                          # the sweep points
    with pytest.raises(ValueError, match="must be more"):
        table2.get_args(argv + ["--tokenizers", "kl_f4_gan,vq_f4_gan", "--tokenizer_epochs", "1"])
    (tmp_path / "table2.png").unlink()
    table2.main(argv + ["--tokenizers_only"], inception=features)      # reconstructions only, nothing measured again
    assert (tmp_path / "table2.png").exists()
    table2.main(argv, inception=features)
    assert len(lab.read_records(str(out))) == len(records)


# ==============================================================================================
# Does MAR overtake AR when data is scarce? (experiments/scarce.py)

def test_scarce_subsets_are_balanced_nested_seeded_and_apart_from_validation():
    labels = torch.arange(10).repeat_interleave(torch.tensor([7, 9, 8, 9, 7, 12, 7, 8, 9, 10]))   # rarest: 7
    order = scarce.balanced_order(labels, seed=3)
    assert len(order) == 70 and len(set(order.tolist())) == 70
    for n in (10, 30, 60):                                           # every prefix of 10k holds k of each class
        assert torch.bincount(labels[order[:n]], minlength=10).tolist() == [n // 10] * 10
    assert torch.equal(order, scarce.balanced_order(labels, seed=3))             # seeded
    assert not torch.equal(order, scarce.balanced_order(labels, seed=4))
    val = order[-10:]
    assert torch.bincount(labels[val], minlength=10).tolist() == [1] * 10
    scarce.check_sizes([10, 60], len(order), num_val=10)             # the largest subset stops before the tail
    with pytest.raises(ValueError, match="--sizes must be in 1..60"):
        scarce.check_sizes([10, 61], len(order), num_val=10)


@pytest.mark.parametrize("name", ["mar_tiny", "ar_tiny_random"])
def test_scarce_chain_z_conditions_each_token_on_the_earlier_ones_only(name):
    """The chain rule's k-th factor: z of step k depends on the tokens earlier in the order (and the label)
    and on nothing later, so the sum of the per-token bounds bounds -log p(image). Changing the token drawn
    at step j changes the z of later steps only."""
    torch.manual_seed(0)
    kw = dict(order="random") if name.startswith("ar") else {}
    model = build_model(name.replace("_random", ""), seq_len=9, token_dim=4, num_classes=3, **kw).eval()
    tokens, labels = torch.randn(2, 9, 4), torch.tensor([0, 2])
    orders = torch.stack([torch.randperm(9), torch.randperm(9)])
    z = scarce.chain_z(model, tokens, labels, orders)
    for j in (0, 4, 8):
        changed = tokens.clone()
        changed[torch.arange(2), orders[:, j]] += 1.0
        z2 = scarce.chain_z(model, changed, labels, orders)
        assert torch.allclose(z2[:, :j + 1], z[:, :j + 1], atol=1e-5), j     # steps up to j do not see it
        if j < 8:
            assert (z2[:, j + 1:] - z[:, j + 1:]).abs().amax(dim=-1).min() > 1e-4, j   # every later step does
    # bits per image = the mean over its tokens of DiffLoss.bound_bits under the same draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    bits, var = scarce.image_bits(model, tokens, labels, orders, 3, g1)
    per_token, per_var = model.diffloss.bound_bits(scarce.take(tokens, orders).reshape(18, 4), z.reshape(18, -1),
                                                   3, g2)
    assert torch.allclose(bits, per_token.view(2, 9).mean(dim=1), rtol=1e-4)
    assert torch.allclose(var, per_var.view(2, 9).sum(dim=1) / 81, rtol=1e-4)


def test_scarce_copy_rate_counts_exact_copies():
    """A sample set of which half are exact training images: those (and only those) are copies, since a
    copy's nearest-training distance, 0, is below any test image's; the median distances are exact."""
    g = np.random.default_rng(0)
    train_images = g.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8)
    test_images = g.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
    fresh = g.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    samples = np.concatenate([train_images[:10], fresh])
    test_nearest = scarce.nearest_distances(test_images, train_images)
    brute = [min(np.linalg.norm(x.astype(float) - y.astype(float)) for y in train_images) for x in test_images[:5]]
    assert np.allclose(test_nearest[:5], brute, rtol=1e-5)
    stats = scarce.copy_stats(samples, train_images, test_nearest)
    assert stats["copy_rate"] == 0.5 and stats["test_median_nearest"] == pytest.approx(float(np.median(test_nearest)))
    assert scarce.copy_stats(fresh, train_images, test_nearest)["copy_rate"] <= 0.2     # random images: ~1%


def test_scarce_end_to_end_tiny(tmp_path, fashion_stand_in, features):
    """experiments/scarce.py on the 100-image stand-in: a subset of 20 (the last 10 of the balanced order
    are the validation split), MAR trained 3 steps (every stage is that checkpoint under --max_steps, so
    it is measured once; the AR models differ in chain_z only, above): bits/dim on 4 test / train /
    validation images, the sweep against the validation split, FID and copies at the chosen setting, the
    selected checkpoint's final FID, the report and its plot; a second call finds everything done."""
    out, md, runs = tmp_path / "s.jsonl", tmp_path / "s.md", tmp_path / "runs"
    argv = ["--runs_dir", str(runs), "--out", str(out), "--table", str(md), "--data_path", str(fashion_stand_in),
            "--sizes", "20", "--models", "MAR", "--num_val", "10", "--num_bpd", "4", "--strata", "2",
            "--orders", "1", "--max_steps", "3", "--precision", "fp32", "--docs", str(tmp_path),
            "--inception", str(tmp_path / "no_such_file.pth"), "--num_sweep", "4", "--num_fid", "4", "--num_final", "6",
            "--cfg_grid", "2,3", "--temperature_grid", "0.5", "--batch", "4", "--num_sampling_steps", "2",
            "--mar_steps", "2"]
    with pytest.raises(ValueError, match="--sizes must be in 1..90"):
        scarce.main([a if a != "20" else "95" for a in argv])
    with pytest.raises(FileNotFoundError, match="--inception .*no_such_file.pth' not found"):
        scarce.main(argv)                                 # before any training starts
    assert not runs.exists()
    scarce.main(argv, inception=features)
    records = lab.read_records(str(out))
    bpd = [r for r in records if r["kind"] == "bpd"]
    assert sorted((r["model"], r["set"]) for r in bpd) == [("MAR", "test"), ("MAR", "train"), ("MAR", "val")]
    assert all(r["train_steps"] == 3 and r["n"] == 4 and r["bpd"] > 0 and r["mc_se"] >= 0 for r in bpd)
    for m in ("MAR",):
        sweep = [(r["cfg"], r["temperature"]) for r in records if r["kind"] == "sweep" and r["model"] == m]
        assert sweep[:2] == [(2.0, 1.0), (3.0, 1.0)] and len(sweep) == 3 and sweep[2][1] == 0.5
        choice = scarce.sweep_choice(scarce.get_args(argv), records, 20, m)
        (f,) = [r for r in records if r["kind"] == "fid" and r["model"] == m]
        (final,) = [r for r in records if r["kind"] == "final" and r["model"] == m]
        assert (f["cfg"], f["temperature"]) == choice == (final["cfg"], final["temperature"])
        assert (f["n"], final["n"], final["train_steps"]) == (4, 6, 3) and 0 <= f["copy_rate"] <= 1
    subset = np.load(runs / "scarce_data" / "subset20_seed0.npz")
    assert subset["images"].shape == (20, 28, 28, 1) and np.bincount(subset["labels"]).tolist() == [2] * 10
    args = train.checkpoint_args(T.torch_load(str(runs / "scarce_n20_mar_fp32" / "checkpoint-last.pth")))
    assert (args["dropout"], args["mask_ratio_law"], args["pos_embed_init"]) == (0.1, "uniform", "sincos")
    assert args["warmup_epochs"] * 20 == scarce.WARMUP_IMAGES and args["data"] == "array"
    scarce.main(argv, inception=features)
    assert len(lab.read_records(str(out))) == len(records)              # nothing measured twice
    report = md.read_text()
    assert "### 20 training images" in report and "| MAR | 3 |" in report and "Selected by" in report
    assert (tmp_path / "scarce.png").exists()


# ==============================================================================================
# Benchmarks (benchmarks/*.py): their tiny CPU runs keep working, and what they count is exact

def test_masked_rows_benchmark_runs(capsys):
    rows = masked_rows.main(["--laws", "truncnorm,uniform", "--batch", "2", "--seq_len", "16", "--token_dim", "4",
                             "--steps", "1", "--repeats", "1"])
    assert [r["law"] for r in rows] == ["truncnorm", "uniform"]
    assert all(r["full_s"] > 0 and r["masked_only_s"] > 0 for r in rows)
    assert "masked rows only" in capsys.readouterr().out


def test_precision_speed_benchmark_runs(tmp_path, capsys):
    """benchmarks/precision_speed.py on tiny settings: one row per (case, threads), fp32 and bf16 timed."""
    out = tmp_path / "p.jsonl"
    rows = precision_speed.main(["--cases", "demo_train,table1_sample_cfg6", "--threads", "1", "--repeats", "1",
                                 "--warmup", "0", "--train_steps", "1", "--sample_batch", "3",
                                 "--num_sampling_steps", "2", "--out", str(out)])
    assert [(r["case"], r["threads"], r["batch"]) for r in rows] == [("demo_train", 1, 64), ("table1_sample_cfg6", 1, 3)]
    assert rows[0]["s_per_step_fp32"] > 0 and rows[1]["s_per_image_bf16"] > 0 and rows[1]["cfg"] == 6.0
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(saved) == 2 and saved[0]["torch"] == torch.__version__ and "fast_bf16" in saved[0]
    assert "reports fast bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        precision_speed.main(["--cases", "nope"])


def test_precision_experiment_end_to_end_tiny(tmp_path, fashion_stand_in, features):
    """experiments/precision.py on the stand-in data (one model, for time): trained in fp32 and in bf16
    (train.py --precision, the precision stored in the checkpoint), each checkpoint sampled in both; 4
    points, one table row per training; a second call measures nothing again."""
    t1_args = ["--data_path", str(fashion_stand_in), "--num_fid", "4", "--batch", "4", "--num_sampling_steps", "2",
               "--inception", str(tmp_path / "none.pth")]
    argv = ["--runs_dir", str(tmp_path / "runs"), "--table1_args", shlex.join(t1_args), "--num", "4",
            "--max_steps", "2", "--out", str(tmp_path / "p.jsonl"), "--table", str(tmp_path / "p.md"),
            "--models", "mar_recipe"]
    precision.main(argv, inception=features)
    rec = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["train_precision"], r["precision"]) for r in rec) == sorted(
        ("mar_recipe", t, p) for t in ("fp32", "bf16") for p in ("fp32", "bf16"))
    shas = {t: {r["weights_sha"] for r in rec if r["train_precision"] == t} for t in ("fp32", "bf16")}
    assert len(shas["fp32"]) == len(shas["bf16"]) == 1 and shas["fp32"] != shas["bf16"]         # two trainings
    assert all((r["cfg"], r["run"], r["num_iter"]) == (6.0, "mar_diffusion_recipe", 16) for r in rec)
    for p in ("fp32", "bf16"):
        run = table1.run_dir(table1.get_args(["--runs_dir", str(tmp_path / "runs")]), "mar_diffusion_recipe", "_" + p)
        assert T.torch_load(os.path.join(run, "checkpoint-last.pth"))["args"]["precision"] == p
    table = (tmp_path / "p.md").read_text()
    assert table.count("| mar_recipe | 6 |") == 2 and "| ar_raster | 3 | fp32 | not measured yet |" in table
    precision.main(argv, inception=features)
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(rec)


def test_speed_benchmark_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "speed.jsonl"
    speed.main(["--device", "cpu", "--models", "mar_tiny", "--batch", "2",
                "--num_iter", "4", "--num_sampling_steps", "5", "--seq_len", "16", "--token_dim", "4",
                "--train_batch", "2", "--train_steps", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["what"] for r in rows] == ["sample", "train"]
    for r in rows:
        assert r["model"] == "mar_tiny" and r["batch"] == 2 and r["dtype"] == "fp32"
        assert r["peak_mem_gib"] is None and r["device"].startswith("cpu") and r["torch"] == torch.__version__
    sampling, training = rows
    assert (sampling["num_iter"], sampling["diff_steps"], sampling["cfg"]) == (4, 5, 3.0)
    # the tiny VAE decodes too, so the time with the decode exceeds the time without it
    assert sampling["s_per_image"] > sampling["s_per_image_no_decode"] > 0
    assert training["images_per_s"] > 0 and training["diffusion_batch_mul"] == 4
    printed = capsys.readouterr().out
    assert "sample" in printed and "train" in printed   # the printed table


def test_fid_speed_benchmark_runs(tmp_path, capsys):
    """benchmarks/fid_speed.py end to end on a tiny run (random weights): one row per variant."""
    path = str(tmp_path / "inception.pth")
    torch.save(random_inception().state_dict(), path)
    fid_speed.main(["--inception", path, "--batch", "1", "--size", "8", "--repeats", "1", "--warmup", "0"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["reference", "fused"]
    assert float(rows["reference"][2]) == 1.0 and float(rows["fused"][1]) > 0  # speedup column, images/s
    assert float(rows["reference"][5]) == 0 and float(rows["fused"][5]) < 1e-3  # max_abs_diff


def test_head_ceiling_benchmark(capsys):
    """benchmarks/head_ceiling.py: its "products alone" are exactly the Linear layers the sampler runs every
    step (input projection, each block's modulation and MLP, the final modulation and projection), and a
    tiny run prints one row per CFG setting with the ceiling."""
    net = DiffLoss(5, 7, 3, 12).net
    per_step = [net.input_proj] + [m for b in net.res_blocks for m in (b.adaLN_modulation[-1], b.mlp[0], b.mlp[2])]
    per_step += [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
    assert head_ceiling.product_shapes(5, 12, 3) == [(m.in_features, m.out_features) for m in per_step]
    head_ceiling.main(["--token_dim", "4", "--width", "16", "--depth", "1", "--z_dim", "8", "--rows", "6",
                       "--steps", "3", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cfg")]
    assert [r.split(":")[0] for r in rows] == ["cfg 1", "cfg 3"] and all("ceiling speedup" in r for r in rows)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_flop_bound_counts_the_head_exactly(cfg, capsys):
    """benchmarks/flop_bound.py: the head's counted FLOPs equal the closed form (cond_embed once per
    token row, the time embedding once per step and call, every per-step Linear once per row and step;
    under CFG two rows per token), the total adds the Transformer's, and a tiny run prints its bound."""
    B, num_iter, steps = 3, 4, 5
    model = build_model("mar_tiny", seq_len=9, token_dim=4, num_classes=3, num_sampling_steps=str(steps)).eval()
    net = model.diffloss.net
    Z, w = net.cond_embed.in_features, net.cond_embed.out_features
    rows = B * model.seq_len * (1 if cfg == 1.0 else 2)                 # head rows over the whole generation
    per_row_step = sum(i * o for i, o in head_ceiling.product_shapes(model.token_dim, w, len(net.res_blocks)))
    time_embed = sum(m.in_features * m.out_features for m in net.time_embed.mlp if isinstance(m, nn.Linear))
    expected = 2 * (rows * Z * w + num_iter * steps * time_embed + steps * rows * per_row_step)
    total, head = flop_bound.count_flops(model, B, num_iter, cfg)
    assert head == expected
    assert total > head and "sample" not in vars(model.diffloss)       # the counting wrapper is gone again
    flop_bound.main(["--seq_len", "9", "--token_dim", "4", "--num_classes", "3", "--num_sampling_steps", "3",
                     "--batch", "2", "--num_iter", "3", "--gemm", "64", "--repeats", "1"])
    assert "largest possible speedup" in capsys.readouterr().out
