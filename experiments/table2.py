"""
experiments/table2.py -- the paper's Table 2 (Sec. 5.1, the Diffusion Loss across tokenizers) at CPU scale
on Fashion-MNIST, with tokenizers trained here: LDM's KL autoencoder and its VQ twin (train.py --model
kl_f4 | kl_f2 | vq_f4 | vq_f2, tokenizer.AUTOENCODERS). The paper's results are on a learned continuous
tokenizer (KL-16); Table 1 here is on raw pixel patches. This asks whether its findings hold on learned
latents: the Diffusion Loss on a VQ tokenizer's continuous latents against cross-entropy on its codes, and
the AR / MAR ordering on KL latents against the one on pixels.

Run (from the repository root; everything finished is kept in the JSONL and skipped; two shells with
OMP_NUM_THREADS=1 share the runs and points through lock files, as table1.py):
  python experiments/table2.py --runs_dir runs --table1_args "--precision bf16"   # tokenizers, then rows
  python experiments/table2.py --runs_dir runs --tokenizers_only                  # the tokenizers and their figure
  python experiments/table2.py --table-only                                       # Markdown from the JSONL
Outputs: experiments/table2.jsonl, experiments/table2.md, docs/table2.png (reconstructions and samples),
RUNS_DIR/t2_* (the tokenizers' and the rows' runs).

Protocol (every choice):
  * Tokenizers (TOKENIZERS): each autoencoder trained by train.py on the 60,000 training images for
    --tokenizer_epochs (--tokenizer_batch 64, lr 1e-3 constant after 0.2 epochs of warmup, AdamW, EMA, seed 0, no
    flips), L1 + 1e-6 KL (kl_*) or L1 + codebook + 0.25 commitment with 1,024 codes (vq_*), no perceptual
    term; the *_gan candidates add LDM's adversarial term from the second epoch (--disc_weight 0.5
    --disc_start 1; *_gan0.1: --disc_weight 0.1). kl_f4: 28x28 -> 7x7 x 16 (patch 1); kl_f2: 14x14 x 4
    (patch 2); both give Table 1's 49 tokens of 16. The latent scale is the one train.py measures at the end (1 / std).
  * Tokenizer quality: MSE ([-1, 1]) and PSNR ([0, 1]) of the reconstructions of the 10,000 test images
    (KL through the posterior mean, VQ through its codes) and their rFID against the test set's statistics
    (--num_rfid of them, class-balanced). Pixel tokens are exact (rFID 0); Table 1's k-means VQ-1024 is
    measured the same way.
  * The rows' KL tokenizer is the KL candidate with the lowest rFID (--tokenizers names the candidates, the
    KL ones by default). The VQ rows use vq_f4 (trained the same way when a VQ row first needs it): as in the
    paper's VQ-16 rows, the Diffusion Loss on its latents and the cross-entropy on its codes then model the
    same 7x7 grid, 49 tokens each, as every other row. An f2 twin would give 196 codes per image to the
    cross-entropy row (one code per token) against 49 patches of 2x2 latents to the Diffusion Loss row.
  * Rows (ROWS): Table 1's protocol (table1.py's header: table1.COMMON, 2 epochs, its CFG / temperature
    sweeps against the training images, N = 5,000 vs the test set), with --vae: MAR with the small-data
    recipe's flags and AR raster with the Diffusion Loss on the KL latents; MAR (recipe) with the Diffusion
    Loss on vq_f4's latents before quantisation (7x7 x 16, patch 1), and with cross-entropy on its codes (one
    code per token). The Diffusion Loss rows sample with each step's x_0 estimate clipped to the latents'
    range, measured with the scale (sample.clip_to_token_range; the released sampler does not clip KL-16's
    latents, and unclipped these 2-epoch models diverge). Each row's run directory and records
    name its tokenizer's weights. Beside them, Table 1's pixel rows (experiments/table1.jsonl).
  * A control, not in the paper: MAR (recipe) with the Diffusion Loss on kl_f4's latents, the same 7x7 x 16
    grid as vq_f4's. Beside the KL row (kl_f2's 14x14 x 4 in 2x2 patches) and the VQ-latents row, it tells
    the bottleneck (KL or VQ) from the grid.
"""
import argparse
import math
import os
import shlex
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import lab  # noqa: E402
import table1  # noqa: E402
import tokenizer as tk  # noqa: E402
from sample import save_grid, to_uint8  # noqa: E402

# candidate -> (train.py --model, patch size giving 49 tokens of 16, train.py flags); "_gan": with LDM's
# adversarial term from the second epoch on, at LDM's kl-f8 weight 0.5 or ("_gan0.1") a fifth of it
GAN_START = 1


def gan(weight):
    return "--disc_weight", str(weight), "--disc_start", str(GAN_START)


TOKENIZERS = {"kl_f4": ("kl_f4", 1, ()), "kl_f2": ("kl_f2", 2, ()), "kl_f4_gan": ("kl_f4", 1, gan(0.5)),
              "kl_f4_gan0.1": ("kl_f4", 1, gan(0.1)), "vq_f4": ("vq_f4", 1, ()), "vq_f2": ("vq_f2", 2, ()),
              "vq_f4_gan": ("vq_f4", 1, gan(0.5)), "vq_f4_gan0.1": ("vq_f4", 1, gan(0.1))}
RECIPE = table1.RUNS["mar_diffusion_recipe"][3]                 # the small-data recipe's train.py flags
VQ_ROWS_TOKENIZER = "vq_f4"                                      # (the protocol above says why f4)
# id -> (model, order, head, tokens ("kl": the chosen KL, "vq": VQ_ROWS_TOKENIZER, or a candidate's name), num_iter,
# labels, paper's Table 2 FID w/o, w/ CFG (ImageNet 256, MAR-L: KL-16 and VQ-16; "-": not in the paper))
ROWS = {
    "mar16_diffusion_kl": ("mar_tiny", None, "diffusion", "kl", 16, ("MAR (recipe)", "KL", "Diff Loss"),
                           ("3.50", "1.98")),
    "ar_raster_diffusion_kl": ("ar_tiny", "raster", "diffusion", "kl", None, ("AR raster", "KL", "Diff Loss"),
                               ("-", "-")),
    "mar16_diffusion_vq": ("mar_tiny", None, "diffusion", "vq", 16,
                           ("MAR (recipe)", "VQ, latents before quantisation", "Diff Loss"), ("7.82", "-")),
    "mar16_ce_vq": ("mar_tiny", None, "ce", "vq", 16, ("MAR (recipe)", "VQ, codes", "CrossEnt"), ("8.79", "3.69")),
    "mar16_diffusion_klf4": ("mar_tiny", None, "diffusion", "kl_f4", 16, ("MAR (recipe)", "KL, 7x7 grid", "Diff Loss"),
                             ("-", "-")),
}
PIXEL_ROWS = {"mar16_diffusion_recipe": ("MAR (recipe)", "pixels", "Diff Loss"),     # Table 1's, for comparison
              "ar_raster_diffusion": ("AR raster", "pixels", "Diff Loss")}


# ------------------------------------------------------------------------------------------------
# Tokenizers: train, measure, choose
# ------------------------------------------------------------------------------------------------
def tokenizer_dir(args, name):
    return os.path.join(args.runs_dir, f"t2_{name}_{args.precision}")


def tokenizer_spec(args, name):
    """lab.ensure_trained's (run directory, train.py arguments) of an autoencoder."""
    model, _, flags = TOKENIZERS[name]
    argv = ["--model", model, "--data", "fashion_mnist", "--no-hflip", "--batch_size", str(args.tokenizer_batch),
            "--epochs", str(args.tokenizer_epochs), "--warmup_epochs", "0.2", "--blr", "4e-3", "--seed", "0",
            "--precision", args.precision, "--sample_every", "0", *flags]
    argv += ["--data_path", args.data_path] if args.data_path else []
    return tokenizer_dir(args, name), argv + (["--max_steps", str(args.max_steps)] if args.max_steps else [])


def reconstruct(tokenizer, images, batch=500):
    """uint8 (n, 28, 28, 1) -> their reconstructions, uint8, and the MSE ([-1, 1]) / PSNR ([0, 1]) over them.
    tokenizer: a tk autoencoder (its reconstruct()) or a pixel / k-means VQ tokenizer (encode -> decode)."""
    out, se = [], 0.0
    for start in range(0, len(images), batch):
        x = lab.unit_images(images[start:start + batch])
        with torch.no_grad():
            rec = tokenizer.reconstruct(x) if hasattr(tokenizer, "reconstruct") else \
                tokenizer.decode(tokenizer.encode(x))
        se += ((rec - x) ** 2).sum().item()
        out.append(to_uint8(rec).numpy())
    mse = se / images.size
    return np.concatenate(out), mse, (10 * math.log10(4 / mse) if mse > 0 else None)


def measure_tokenizer(args, ev, name, tokenizer, train_info):
    """The "tokens" record of a tokenizer: MSE / PSNR on the 10,000 test images, rFID of --num_rfid of them.
    train_info: what the record says of a trained one (its weights_sha is part of the key)."""
    everything = lab.uint8_images(ev.test_set, torch.arange(len(ev.test_set)))
    idx = lab.balanced_subset(ev.test_set.labels, min(args.num_rfid, len(ev.test_set)), args.seed).numpy()
    key = {k: train_info[k] for k in ("weights_sha", "precision") if k in train_info}
    with lab.claim(args, kind="tokens", tokenizer=name, n=len(idx), **key) as mine:
        if mine:
            rec, mse, psnr = reconstruct(tokenizer, everything)
            rfid = 0.0 if mse == 0 else ev.fid(rec[idx], "test")
            lab.append_record(args.out, dict(kind="tokens", tokenizer=name, n=len(idx), ref="test", mse=mse,
                                             psnr_db=psnr, rfid=rfid, **train_info), who="table2")
            write_table(args)


def measure_codes(args, ev, name, vae, weights_sha, batch=500):
    """The "codes" record of a VQ autoencoder on the 10,000 test images: how much of its codebook they use
    (the fraction of codes picked at least once, and the perplexity exp(H) of the picks, at most K): a
    collapsed codebook would show here; and the quantisation gap, E||z - e||^2 / E||z - E z||^2 (the
    share of the latents' variance that snapping z to its code e removes): near 0, the continuous latents
    the Diffusion Loss rows model are nearly K points, which the cross-entropy row models exactly."""
    with lab.claim(args, kind="codes", tokenizer=name, weights_sha=weights_sha, ref="test") as mine:
        if mine:
            images = lab.uint8_images(ev.test_set, torch.arange(len(ev.test_set)))
            counts = torch.zeros(vae.quantize.embedding.num_embeddings)
            gap = s1 = s2 = 0.0                             # sums of ||z - e||^2; of z and z^2 per channel
            for start in range(0, len(images), batch):
                x = lab.unit_images(images[start:start + batch])
                with torch.no_grad():
                    z = vae.encode(x)
                    zq, _, idx = vae.quantize(z)
                counts += torch.bincount(idx.flatten(), minlength=len(counts))
                z = z.double()                                                # (B, E, h, w)
                gap += ((zq.double() - z) ** 2).sum().item()
                s1, s2 = s1 + z.sum((0, 2, 3)), s2 + (z ** 2).sum((0, 2, 3))
            n = counts.sum().item()                                 # latent vectors (B h w in all)
            variance = (s2 - s1 ** 2 / n).sum().item()
            used, perplexity = tk.code_usage(counts)
            lab.append_record(args.out, dict(kind="codes", tokenizer=name, weights_sha=weights_sha, ref="test",
                                             n=len(ev.test_set), codes=len(counts), used=used,
                                             perplexity=perplexity, gap=gap / variance), who="table2")


def tokenizers(args, ev, names):
    """Train these candidates, measure each (and the pixel / k-means VQ-1024 baselines) -> {name: (checkpoint,
    digest of its EMA weights)}: a tokenizer trained further is another tokenizer, with its own records."""
    paths = lab.train_all({n: tokenizer_spec(args, n) for n in names}, len(ev.train_set))
    trained = {}
    for name in names:
        vae = tk.load_vae(paths[name])
        ckpt = tk.torch_load(paths[name])
        info = dict(train_steps=ckpt["step"], epochs=ckpt["args"]["epochs"], weights_sha=lab.weights_sha(vae),
                    scale=ckpt["scale"], precision=args.precision,
                    train_time_s=lab.training_time(os.path.dirname(paths[name])))
        measure_tokenizer(args, ev, name, vae, info)
        if hasattr(vae, "quantize"):
            measure_codes(args, ev, name, vae, info["weights_sha"])
        trained[name] = (paths[name], info["weights_sha"])
    measure_tokenizer(args, ev, "pixel", tk.PixelTokenizer(28, 1, 4), {})
    measure_tokenizer(args, ev, f"vq{args.vq}", table1.vq_tokenizer(args, ev.train_set), {})
    return trained


def chosen_kl(args, records, trained):
    """The KL candidate whose weights (these trainings) have the lowest rFID; None until each is measured."""
    kl = [n for n in TOKENIZERS if n.startswith("kl_") and n in args.tokenizers]
    rfid = {n: r["rfid"] for n in kl for r in lab.find(records, kind="tokens", tokenizer=n, weights_sha=trained[n][1])}
    return min(kl, key=lambda n: rfid[n]) if kl and all(n in rfid for n in kl) else None


# ------------------------------------------------------------------------------------------------
# Rows: Table 1's protocol on the chosen tokenizers
# ------------------------------------------------------------------------------------------------
def row_spec(args, row, kl, trained):
    """lab.ensure_trained's (run directory, train.py arguments) of a row. The directory names the
    tokenizer's weights: a retrained tokenizer gets new rows, never a row trained on the old one."""
    model, order, head, _, _, _, _ = ROWS[row]
    name = tokens_of(row, kl)
    path, sha = trained[name]
    patch = 1 if head == "ce" else TOKENIZERS[name][1]
    i = table1.COMMON.index("--patch_size")                       # pixels' 4; the tokenizer's is set below
    argv = table1.COMMON[:i] + table1.COMMON[i + 2:] + ["--model", model] + (["--order", order] if order else [])
    argv += ["--head", head]
    argv += list(RECIPE) if model.startswith("mar_") else []
    argv += ["--vae", path, "--patch_size", str(patch), "--precision", args.precision]
    argv += (["--data_path", args.data_path] if args.data_path else []) + \
        (["--max_steps", str(args.max_steps)] if args.max_steps else [])
    return os.path.join(args.runs_dir, f"t2_{row}_{name}_{sha[:8]}_{args.precision}"), argv


def tokens_of(row, kl):
    """The autoencoder whose tokens a row models: the chosen KL one, VQ_ROWS_TOKENIZER, or the one it names."""
    return {"kl": kl, "vq": VQ_ROWS_TOKENIZER}.get(ROWS[row][3], ROWS[row][3])


def evaluate_row(args, ev, row, name, sha, ckpt_path):
    model, ckpt, tokenizer = lab.load_row_model(args, ckpt_path)
    common = dict(tokenizer=name, tokenizer_sha=sha, num_iter=ROWS[row][4] or model.seq_len,
                  clip_x0=getattr(model.diffloss, "clip_x0", None),              # sample.clip_to_token_range
                  train_time_s=lab.training_time(os.path.dirname(ckpt_path)), batch=args.batch,
                  threads=torch.get_num_threads(), **lab.setting(args))
    lab.measure_row(args, ev, row, model, tokenizer, ckpt, ROWS[row][4], common, ROWS[row][2] == "diffusion",
                    lambda: write_table(args), "table2")
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# The report, from the JSONLs only
# ------------------------------------------------------------------------------------------------
def write_table(args):
    records = lab.read_records(args.out)
    tokens = {(r["tokenizer"], r.get("precision")): r for r in lab.find(records, kind="tokens")}  # latest of each
    lines = ["Tokenizers: reconstructions of the test images (MSE in [-1, 1], PSNR on [0, 1]) and their rFID "
             "(N of them vs the test set's statistics); a VQ autoencoder's codebook use on the test images (the "
             "fraction of codes picked, the perplexity of the picks) and its quantisation gap (the share of the "
             "latents' variance that snapping them to their codes removes).", "",
             "| tokenizer | trained (epochs, precision, steps, time) | MSE | PSNR (dB) | rFID (N) | latent scale | "
             "codes used (perplexity), gap |", "|---|---|---|---|---|---|---|"]
    codes = {(r["tokenizer"], r["weights_sha"]): r for r in lab.find(records, kind="codes")}
    for (name, precision), r in tokens.items():
        c = codes.get((name, r.get("weights_sha")))
        used = f"{c['used']:.1%} of {c['codes']} ({c['perplexity']:.0f}), {lab.fmt(c.get('gap'), 4)}" if c else "-"
        psnr = "exact" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        epochs = "-" if r.get("epochs") is None else f"{r['epochs']:g}"
        train = f"{epochs}, {precision}, {r['train_steps']}, {r['train_time_s'] / 60:.0f} min" \
            if "train_steps" in r else "-"
        lines.append(f"| {name} | {train} | {r['mse']:.4f} | {psnr} | {r['rfid']:.2f} ({r['n']}) | "
                     f"{lab.fmt(r.get('scale'), 4)} | {used} |")
    t1, t1_records = table1.get_args(["--out", args.table1]), lab.read_records(args.table1)   # Table 1's fp32
    lines += ["", f"Rows: Table 1's protocol (FID of N = {args.num_fid} samples vs the 10,000 test images; CFG "
              f"scale chosen by FID of {args.num_sweep} samples vs training images; tuned: the temperature too); "
              "paper: its Table 2, ImageNet 256, MAR-L, KL-16 / VQ-16.", "",
              "| model | tokens | loss | FID w/o CFG | FID w/ CFG (scale) | w/ CFG, tuned (scale, temperature) | "
              "paper w/o, w/ CFG |", "|---|---|---|---|---|---|---|"]
    for row, (_, _, _, _, _, labels, paper) in ROWS.items():
        res = lab.row_results(args, records, row)
        cells = lab.fid_cells(res) if res else ["not measured yet", "-", "-"]
        who = f" ({res['latest']['tokenizer']})" if res else ""
        lines.append(f"| {labels[0]} | {labels[1]}{who} | {labels[2]} | " + " | ".join(cells)
                     + f" | {', '.join(paper)} |")
    for row, labels in PIXEL_ROWS.items():
        res = lab.row_results(t1, t1_records, row)
        cells = lab.fid_cells(res) if res else ["not measured yet", "-", "-"]
        lines.append(f"| {labels[0]} | {labels[1]} (Table 1) | {labels[2]} | " + " | ".join(cells) + " | - |")
    sweeps, notes = lab.find(records, kind="sweep", n=args.num_sweep, **lab.setting(args)), []
    for row in ROWS:                                  # each row's latest weights (those of its finals)
        mine = [r for r in sweeps if r["row"] == row]
        if not mine:
            continue
        pts = lab.find(mine, **lab.latest_key(mine))
        plain = sorted({r["cfg"]: r["fid"] for r in pts if "temperature" not in r}.items())
        joint = sorted({(r["cfg"], r["temperature"]): r["fid"] for r in pts if "temperature" in r}.items())
        notes.append(f"- {row}: " + ", ".join(f"{c:g}: {f:.2f}" for c, f in plain)
                     + ("; " + ", ".join(f"({c:g}, {t:g}): {f:.2f}" for (c, t), f in joint) if joint else ""))
    unclipped = lab.find(records, kind="sweep_unclipped")
    if unclipped:
        notes.append("- sampled without the clip of x_0 (the released sampler on latents; the same weights): "
                     + ", ".join(f"{r['row']} at {r['cfg']:g}: {r['fid']:.2f}" for r in unclipped))
    if notes:
        lines += ["", f"Sweeps (FID of {args.num_sweep} samples vs the training images): CFG scale: FID, then "
                      "(scale, temperature): FID."] + notes
    tmp = f"{args.table}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.table)


def figure(args, ev, vaes, samples):
    """docs/table2.png: 8 test images, their reconstructions by each tokenizer, then each row's samples
    (--tokenizers_only: the reconstructions by the --tokenizers, in TOKENIZERS' order)."""
    x = lab.uint8_images(ev.test_set, lab.balanced_subset(ev.test_set.labels, 8, args.seed))
    rows = [x] + [reconstruct(vae, x)[0] for vae in vaes] + [s[:8] for s in samples]
    save_grid(np.concatenate(rows), os.path.join(args.docs, "table2.png"), nrow=8)


# ------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    a("--tokenizers", default=",".join(n for n in TOKENIZERS if n.startswith("kl_")),
      help=f"candidates to train and measure, from: {', '.join(TOKENIZERS)} (the VQ rows add {VQ_ROWS_TOKENIZER})")
    a("--tokenizers_only", action="store_true", help="only train and measure the tokenizers")
    a("--tokenizer_epochs", type=float, default=2, help="the autoencoders' training length")
    a("--tokenizer_batch", type=int, default=64, help="the autoencoders' batch (and lr = 4e-3 * batch / 256)")
    a("--num_rfid", type=int, default=10_000, help="test reconstructions per rFID")
    a("--runs_dir", default="runs", help="table1.py's runs and cache (the t2_* runs are added there)")
    a("--out", default=os.path.join(ROOT, "experiments", "table2.jsonl"), help="results, one JSON per line")
    a("--table", default=os.path.join(ROOT, "experiments", "table2.md"), help="the Markdown table")
    a("--table1", default=os.path.join(ROOT, "experiments", "table1.jsonl"), help="Table 1's results (pixel rows)")
    a("--table-only", dest="table_only", action="store_true", help="only regenerate --table from --out")
    a("--docs", default=os.path.join(ROOT, "docs"), help="where table2.png goes; empty: no figure")
    a("--table1_args", default="", help="table1.py flags of the protocol where not its defaults (--precision bf16, "
                                        "--inception, --data_path, ...)")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    args.tokenizers = [t for t in args.tokenizers.split(",") if t]
    bad = [r for r in args.rows if r not in ROWS] + [t for t in args.tokenizers if t not in TOKENIZERS]
    if bad:
        raise ValueError(f"unknown --rows / --tokenizers {bad}; rows: {', '.join(ROWS)}; tokenizers: "
                         f"{', '.join(TOKENIZERS)}")
    if not args.tokenizers_only and args.rows and not any(t.startswith("kl_") for t in args.tokenizers):
        raise ValueError(f"the rows model the chosen KL tokenizer's latents (or {VQ_ROWS_TOKENIZER}'s): add a kl_* to "
                         f"--tokenizers")
    if args.tokenizer_epochs <= GAN_START and any("_gan" in t for t in args.tokenizers):
        raise ValueError(f"the *_gan candidates start their adversarial term at epoch {GAN_START}: --tokenizer_epochs "
                         f"must be more (got {args.tokenizer_epochs:g})")
    # Table 1's protocol (its settings, defaults and --table1_args), with this table's files
    t1 = table1.get_args(shlex.split(args.table1_args) + ["--runs_dir", args.runs_dir])
    for k, v in vars(t1).items():
        if k not in ("rows", "out", "table", "table_only", "runs_dir"):
            setattr(args, k, v)
    return args


def main(argv=None, inception=None):
    """inception: a feature network to use instead of --inception (the tests' stand-in)."""
    args = get_args(argv)
    if args.table_only:
        write_table(args)
        print(open(args.table).read())
        return
    ev = lab.Evaluator(args, inception)
    names = [n for n in TOKENIZERS if n in args.tokenizers]
    trained = tokenizers(args, ev, names)
    while not args.tokenizers_only and (kl := chosen_kl(args, lab.read_records(args.out), trained)) is None:
        print("table2: waiting for the tokenizer measurements another process is taking", flush=True)
        time.sleep(30)
        tokenizers(args, ev, names)                         # (one whose process died is taken over)
    if args.tokenizers_only:
        if args.docs:
            figure(args, ev, [tk.load_vae(trained[n][0]) for n in names], [])
        write_table(args)
        print(open(args.table).read())
        return
    needed = sorted({tokens_of(row, kl) for row in args.rows} - set(trained))
    if needed:                                              # the VQ rows' (or a control's), trained the same way
        trained.update(tokenizers(args, ev, needed))
    ckpts = lab.train_all({row: row_spec(args, row, kl, trained) for row in args.rows}, len(ev.train_set))
    samples = []
    for row in args.rows:
        name = tokens_of(row, kl)
        model, tokenizer = evaluate_row(args, ev, row, name, trained[name][1], ckpts[row])
        if args.docs:
            samples.append(ev.sample(model, tokenizer, 8, ROWS[row][4], 1.0)[0])
    if args.docs:
        figure(args, ev, [tk.load_vae(trained[n][0]) for n in (kl, VQ_ROWS_TOKENIZER) if n in trained], samples)
    write_table(args)
    print(open(args.table).read())


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"table2.py: error: {e}")
