"""Ablation studies of the paper (CIFAR-100, TRADES / vanilla AT, settings of Tables I-II).

    python exp_ablations.py --study NAME [--quick] [--dry-run] [run flags ...]

Studies (each = a list of runs + a table or figure; finished runs are reused, unfinished ones resumed):
    relation        Table VI   vanilla AT + each relation loss in place of L_TP (rkd, crd, mca, tp)
    batch-size      Table VIII TRADES + TRAIN at batch 128, 256, 384
    lambda          Table IX   TRADES + TRAIN with lambda 0, 5a, 10a, 20a, 50a (+ test L_TP)
    std-backbone    Table VII  M = ResNet-18 vs WRN-34-10, and the standard models themselves
    pretrained-std  Table X    TRAIN* (M pre-trained and frozen) vs TRAIN (joint)
    mobilenet       Table XII  M' = MobileNetV3 with AT / TRADES +- TRAIN
    beta-sweep      Fig. 3     TRADES beta 1..6, kNN topology score vs k
    time            Table XI   seconds per step / epoch of AT, TRADES +- LBGAT / TRAIN on this device
    evidence        -          AT / TRADES +- TRAIN over 3 seeds, mean +- std and paired gains (--scale cpu|gpu)
Flags it does not know (e.g. --data-file, --device, --runs-dir) are passed to every run.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

import common

DEFAULTS = dict(dataset="cifar100", method="trades", lam="20a", arch="wrn34_10", std_arch="resnet18")
# --quick: smoke scale, minutes on a CPU
QUICK_ARGS = ["--quick", "--epochs", "2", "--milestones", "2", "--train-n", "1024", "--test-n", "500", "--eval-n", "500"]
FULL_METRICS = "nat,pgd,cw,aa"


def backbones(quick):
    """(small, large) backbones: the paper's ResNet-18 / WRN-34-10, or CPU-sized stand-ins."""
    return ("cnn_small", "resnet18") if quick else ("resnet18", "wrn34_10")


def study_relation(quick, dir_of):
    at = ["--method", "at"]
    return [("Vanilla AT", at, FULL_METRICS),
            ("MCA", at + ["--train", "--relation", "mca"], FULL_METRICS),
            ("Vanilla AT + RKD", at + ["--train", "--relation", "rkd"], FULL_METRICS),
            ("Vanilla AT + CRD", at + ["--train", "--relation", "crd"], FULL_METRICS),
            ("Vanilla AT + TRAIN", at + ["--train"], FULL_METRICS)]


def study_batch_size(quick, dir_of):
    return [(f"batch {b}", ["--train", "--batch-size", str(b)], FULL_METRICS) for b in (128, 256, 384)]


def study_lambda(quick, dir_of):
    return [(f"lambda {lam}", ["--train", "--lam", lam], "nat,pgd,tp") for lam in ("0", "5a", "10a", "20a", "50a")]


def study_std_backbone(quick, dir_of):
    small, large = backbones(quick)
    runs = []
    for std in (small, large):
        runs.append((f"standard training, {std}", ["--method", "standard", "--arch", std], FULL_METRICS))
        runs.append((f"TRADES + TRAIN, M = {std}", ["--train", "--std-arch", std], FULL_METRICS))
    return runs


def study_pretrained_std(quick, dir_of):
    small, _ = backbones(quick)
    standard = ["--method", "standard", "--arch", small]
    ckpt = os.path.join(dir_of(standard), "last.pt")
    return [("standard model", standard, FULL_METRICS),
            ("Vanilla AT", ["--method", "at"], FULL_METRICS),
            ("Vanilla AT + TRAIN*", ["--method", "at", "--train", "--std-arch", small, "--std-ckpt", ckpt, "--freeze-std"],
             FULL_METRICS),
            ("Vanilla AT + TRAIN", ["--method", "at", "--train", "--std-arch", small], FULL_METRICS)]


def study_mobilenet(quick, dir_of):
    mb = ["--arch", "mobilenet_v3"]
    return [("Vanilla AT", mb + ["--method", "at"], FULL_METRICS),
            ("Vanilla AT + TRAIN", mb + ["--method", "at", "--train"], FULL_METRICS),
            ("TRADES", mb + ["--method", "trades"], FULL_METRICS),
            ("TRADES + TRAIN", mb + ["--method", "trades", "--train"], FULL_METRICS)]


BETA_KS = "5,10,20,30,40,50"


def study_beta_sweep(quick, dir_of):
    return [(f"beta {b}", ["--method", "trades", "--beta", str(b)], "nat,pgd,knn") for b in range(1, 7)]


STUDIES = {"relation": study_relation, "batch-size": study_batch_size, "lambda": study_lambda,
           "std-backbone": study_std_backbone, "pretrained-std": study_pretrained_std, "mobilenet": study_mobilenet,
           "beta-sweep": study_beta_sweep}
TIME_CONFIGS = [("AT", "at", ()), ("AT + LBGAT", "at", ("lbgat",)), ("AT + TRAIN", "at", ("train",)),
                ("TRADES", "trades", ()), ("TRADES + LBGAT", "trades", ("lbgat",)), ("TRADES + TRAIN", "trades", ("train",))]


# ------------------------------------------------------------------------------------- running a study
NOT_IN_FOLDER = {"--device", "--runs-dir", "--data-dir"}  # flags that do not change what a run trains


def slug(args):
    """method-at_train_relation-mca: a folder name from flags (paths shortened to their last part)."""
    parts, i = [], 0
    while i < len(args):
        flag = args[i].lstrip("-")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = os.path.splitext(os.path.basename(os.path.dirname(args[i + 1]) if args[i + 1].endswith(".pt")
                                                      else args[i + 1]))[0]
            parts.append(f"{flag}-{value}")
            i += 2
        else:
            parts.append(flag)
            i += 1
    return "_".join(parts) or "default"


def study_root(passthrough, quick):
    """runs/ablations[_quick][_<data and other shared flags>]: one folder of runs per setting."""
    cfg, _ = common.parse_args(DEFAULTS, passthrough)
    shared, skip = [], False
    for i, a in enumerate(passthrough):
        if skip:
            skip = False
            continue
        if a in NOT_IN_FOLDER:
            skip = i + 1 < len(passthrough) and not passthrough[i + 1].startswith("--")
            continue
        shared.append(a)
    name = "ablations" + ("_quick" if quick else "") + (f"_{slug(shared)}" if shared else "")
    return os.path.join(cfg.runs_dir, name)


def run_dir_of(args, passthrough, quick):
    return os.path.join(study_root(passthrough, quick), slug(args))


IGNORED_SETTINGS = {"device", "resume", "overwrite", "out", "runs_dir", "data_dir", "_data_file_given", "_data_dir_given"}


def check_same_settings(run_dir, argv):
    """A folder is reused only if it holds a run with exactly these settings."""
    with open(os.path.join(run_dir, "config.json")) as fh:
        saved = json.load(fh)["config"]
    wanted = vars(common.parse_args(DEFAULTS, argv)[0])
    diff = sorted(k for k, v in wanted.items() if k not in IGNORED_SETTINGS and k in saved and saved[k] != v)
    if diff:
        raise common.UserError(f"{run_dir} holds a run with other settings ({', '.join(diff)}); "
                               "move it away or use another --runs-dir")


def run_and_evaluate(label, args, metrics, passthrough, quick, dry_run, log, run_dir=None, ckpt=None, eval_extra=()):
    run_dir = run_dir or run_dir_of(args, passthrough, quick)
    argv = args + passthrough + (QUICK_ARGS if quick else []) + ["--out", run_dir]
    status = common.run_status(run_dir)
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        check_same_settings(run_dir, argv)
    if dry_run:
        log(f"[{status}] {label}: {' '.join(argv)} -> {run_dir}")
        return None
    if status != "done":
        # partial: resume; missing but the folder has files (a run that diverged before its first
        # checkpoint, same settings as checked above): start it again
        again = ["--resume"] if status == "partial" else ["--overwrite"] if os.path.isdir(run_dir) else []
        try:
            common.main(DEFAULTS, argv + again)
        except SystemExit as e:
            if e.code != 1:  # common.main exits 1 on a NaN/inf loss only; 2 (bad input) ends the study
                raise
            log(f"{label}: diverged (non-finite loss), see {os.path.join(run_dir, 'log.txt')}; the study goes on")
            return {"failed": "diverged"}
        if common.run_status(run_dir) != "done":
            raise SystemExit(f"{label}: the run stopped before its last epoch; rerun the study to resume it")
    eval_json = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(eval_json):
        ckpt = os.path.join(run_dir, ckpt or ("last.pt" if "--method standard" in " ".join(args) else "best.pt"))
        eval_argv = [a for a in passthrough] + ["--eval", ckpt, "--metrics", metrics, "--knn-k", BETA_KS] + list(eval_extra)
        if quick:  # smoke scale: AutoAttack on 100 images, kNN support from the 1,024 training images
            eval_argv += ["--knn-train-n", "1024", "--aa-n", "100"]
        common.main(DEFAULTS, eval_argv)
    with open(eval_json) as fh:
        return json.load(fh)


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def render_table(study, rows):
    """The study's table, in run order; a failed run keeps its row, saying how it failed."""
    lines = _render_rows(study, [(label, r) for label, r in rows if "failed" not in r]).rstrip("\n").splitlines()
    head, body = lines[:2], iter(lines[2:])
    width = head[0].count("|") - 1
    name = (lambda label: label.split()[-1]) if study in ("lambda", "beta-sweep") else (lambda label: label)
    return "\n".join(head + [f"| {name(label)} | {r['failed']} |" + " - |" * (width - 2) if "failed" in r else next(body)
                             for label, r in rows])


def _render_rows(study, rows):
    if study == "lambda":
        head = "| lambda | Natural | PGD-20 | test L_TP |\n| --- | --- | --- | --- |"
        body = [f"| {label.split()[-1]} | {pct(r.get('natural'))} | {pct(r.get('pgd'))} | "
                f"{r['test_ltp']:.4f} |" if r.get("test_ltp") is not None else f"| {label} | - | - | - |"
                for label, r in rows]
        return head + "\n" + "\n".join(body)
    if study == "beta-sweep":
        ks = BETA_KS.split(",")
        head = ("| beta | Natural | PGD-20 | " + " | ".join(f"kNN k={k}" for k in ks) + " |\n"
                + "| --- " * (3 + len(ks)) + "|")
        body = [f"| {label.split()[-1]} | {pct(r['natural'])} | {pct(r['pgd'])} | "
                + " | ".join(pct(r["knn"]["natural"][k]) for k in ks) + " |" for label, r in rows]
        return head + "\n" + "\n".join(body)
    head = "| method | Natural | PGD-20 | CW-20 | AA |\n| --- | --- | --- | --- | --- |"
    body = []
    for label, r in rows:
        aa = pct(r.get("aa"))
        if r.get("aa") is not None and r["aa_n"] != r["n_test"]:
            aa += f" (n={r['aa_n']})"
        body.append(f"| {label} | {pct(r.get('natural'))} | {pct(r.get('pgd'))} | {pct(r.get('cw'))} | {aa} |")
    return head + "\n" + "\n".join(body)


def plot_beta_sweep(rows, path):
    """Fig. 3: kNN topology score (natural queries) vs k, one line per beta."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [int(k) for k in BETA_KS.split(",")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in rows:
        ax.plot(ks, [100 * r["knn"]["natural"][str(k)] for k in ks], marker="o", label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("topology score (kNN accuracy, %)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- the evidence study
"""Evidence study: does TRAIN raise natural accuracy over its base method by more than seed noise?

Scale "cpu" (chosen by measuring, 2026-12-01, AMD EPYC, one thread per run, batch 128, PGD-3):
  M' = M = cnn6 (six 3x3 convs, widths 16/32/64, ~0.1M parameters): 201 images/s for AT and 109 for
  TRADES + TRAIN, against 124 / 94 for cnn_small (three convs) and 61 / 34 for the same net at widths
  32/64/128. Six convolutions instead of three make standard training clearly beat AT on natural accuracy
  (the 'Standard' reference row checks this). The first 8,000 training images of the shared CIFAR-10
  copy (official order, about class-balanced), 8 epochs with lr x0.1 at epochs 6 and 7 (75%/90% of the
  paper's schedule, as in the paper), PGD-3 with step 0.01 (3 x 0.01 ~ eps = 0.031), lambda 5 (the
  paper's CIFAR-10 value), 3 seeds. Evaluation of last.pt (no checkpoint picked on test data) on the
  first 1,000 test images: natural, PGD-20, CW-20, AutoAttack APGD-CE + APGD-DLR (the standard version's
  APGD-T, FAB-T and Square would multiply the evaluation time by ~4 at this budget), kNN@30 with the
  first 1,000 training images as support, test L_TP, M's natural accuracy. About 12-14 minutes of one
  core per run; the study's 15 runs fit ~3 hours of a 2-core machine, run as two processes with
  --configs (README).
Scale "gpu": PreAct-ResNet-18 M' / ResNet-18 M on full CIFAR-10, PGD-10, 30 epochs (lr x0.1 at 23, 27),
  standard AutoAttack on 1,000 images; every run resumes, so --max-minutes splits it into GPU jobs.
"""
EVIDENCE_CONFIGS = [("standard", "Standard", ["--method", "standard"]),
                    ("at", "AT", ["--method", "at"]),
                    ("at_train", "AT + TRAIN", ["--method", "at", "--train"]),
                    ("trades", "TRADES", ["--method", "trades"]),
                    ("trades_train", "TRADES + TRAIN", ["--method", "trades", "--train"])]
EVIDENCE_PAIRS = [("at", "at_train"), ("trades", "trades_train")]
EVIDENCE_SEEDS = (1, 2, 3)
SHARED_CIFAR10 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "cifar10.npz")
EVIDENCE_SCALES = {
    "cpu": {"train": ["--dataset", "cifar10", "--data-file", SHARED_CIFAR10, "--arch", "cnn6", "--std-arch", "cnn6",
                      "--train-n", "8000", "--test-n", "1000", "--epochs", "8", "--milestones", "6,7", "--steps", "3",
                      "--step-size", "0.01", "--eval-steps", "10", "--eval-n", "500", "--lam", "5", "--beta", "6"],
            "eval": ["--aa-n", "1000", "--aa-attacks", "apgd-ce,apgd-dlr", "--knn-k", "30", "--knn-train-n", "1000"]},
    "gpu": {"train": ["--dataset", "cifar10", "--data-file", SHARED_CIFAR10, "--arch", "preact_resnet18",
                      "--std-arch", "resnet18", "--epochs", "30", "--milestones", "23,27", "--steps", "10",
                      "--step-size", "0.007", "--eval-steps", "20", "--eval-n", "1000", "--lam", "5", "--beta", "6"],
            "eval": ["--aa-n", "1000", "--knn-k", "30", "--knn-train-n", "10000"]},
}
EVIDENCE_METRICS = [("natural", "Natural"), ("pgd", "PGD-20"), ("cw", "CW-20"), ("aa", "AA"),
                    ("knn_natural", "kNN@30 natural"), ("knn_robust", "kNN@30 robust"), ("test_ltp", "test L_TP"),
                    ("std_natural", "M natural")]


def evidence_runs(scale, configs=None, seeds=EVIDENCE_SEEDS):
    """[(key, label, seed, train args, metrics)] of the evidence study at one scale."""
    out = []
    for key, label, args in EVIDENCE_CONFIGS:
        if configs and key not in configs:
            continue
        metrics = "nat,pgd" if key == "standard" else "nat,pgd,cw,aa,knn,tp"
        for seed in seeds:
            out.append((key, label, seed, EVIDENCE_SCALES[scale]["train"] + args + ["--seed", str(seed)], metrics))
    return out


def evidence_values(r):
    """The study's numbers of one eval.json (fractions; test L_TP as is; None where not measured)."""
    knn = r.get("knn") or {}
    return {"natural": r.get("natural"), "pgd": r.get("pgd"), "cw": r.get("cw"), "aa": r.get("aa"),
            "knn_natural": (knn.get("natural") or {}).get("30"), "knn_robust": (knn.get("robust") or {}).get("30"),
            "test_ltp": r.get("test_ltp"), "std_natural": r.get("std_natural")}


def mean_std(values):
    """'m +- s' of the values present (percent for accuracies); '-' when none."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def scaled(key, v):
    return None if v is None else (v if key == "test_ltp" else 100 * v)


def evidence_tables(results):
    """results: {config key: {seed: eval.json dict}} -> markdown: mean +- std per configuration, the TRAIN
    gain per base method (mean +- std of the per-seed paired differences), and every paired seed."""
    labels = {k: label for k, label, _ in EVIDENCE_CONFIGS}
    head = "| method | seeds | " + " | ".join(name for _, name in EVIDENCE_METRICS) + " |"
    sep = "| --- " * (2 + len(EVIDENCE_METRICS)) + "|"
    lines = ["Mean ± standard deviation over seeds (accuracies in %):", "", head, sep]
    for key, runs in results.items():
        vals = [evidence_values(r) for r in runs.values()]
        lines.append(f"| {labels[key]} | {len(vals)} | "
                     + " | ".join(mean_std([scaled(m, v[m]) for v in vals]) for m, _ in EVIDENCE_METRICS) + " |")
    gain_metrics = [(m, n) for m, n in EVIDENCE_METRICS if m not in ("test_ltp", "std_natural")]
    lines += ["", "TRAIN gain over its base method: mean ± std of the per-seed differences (points; "
              "positive = TRAIN better), and how many seeds TRAIN wins:", "",
              "| pair | seeds | " + " | ".join(n for _, n in gain_metrics) + " |", "| --- " * (2 + len(gain_metrics)) + "|"]
    paired_rows = []
    for base, plus in EVIDENCE_PAIRS:
        if base not in results or plus not in results:
            continue
        seeds = sorted(set(results[base]) & set(results[plus]))
        cells = []
        for m, _ in gain_metrics:
            diffs = []
            for s in seeds:
                a, b = evidence_values(results[base][s])[m], evidence_values(results[plus][s])[m]
                if a is not None and b is not None:
                    diffs.append(100 * (b - a))
            wins = sum(d > 0 for d in diffs)
            cells.append(f"{mean_std(diffs)} ({wins}/{len(diffs)})" if diffs else "-")
        lines.append(f"| {labels[plus]} vs {labels[base]} | {len(seeds)} | " + " | ".join(cells) + " |")
        for s in seeds:
            a, b = evidence_values(results[base][s]), evidence_values(results[plus][s])
            paired_rows.append(f"| {labels[plus]} vs {labels[base]} | {s} | " + " | ".join(
                "-" if a[m] is None or b[m] is None else f"{100 * a[m]:.2f} → {100 * b[m]:.2f}" for m, _ in gain_metrics) + " |")
    if paired_rows:
        lines += ["", "Paired per seed (base → with TRAIN):", "",
                  "| pair | seed | " + " | ".join(n for _, n in gain_metrics) + " |", "| --- " * (2 + len(gain_metrics)) + "|"]
        lines += paired_rows
    return "\n".join(lines)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_learning_curves(curves, path):
    """curves: {label: [metrics rows of each seed]} -> one PNG: natural and PGD accuracy per epoch of M'
    (solid) and M (dashed, TRAIN runs), the mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, seeds) in enumerate(curves.items()):
        colour = plt.cm.tab10(i % 10)
        epochs = [r["epoch"] for r in seeds[0]]
        pgd_key = next(k for k in seeds[0][0] if k.startswith("pgd") and k.endswith("_acc"))
        for ax, key, std_key in ((axes[0], "nat_acc", "std_nat_acc"), (axes[1], pgd_key, "std_" + pgd_key)):
            mean = lambda k: [100 * statistics.mean(rows[e][k] for rows in seeds) for e in range(len(epochs))]
            ax.plot(epochs, mean(key), color=colour, marker="o", ms=3, label=f"{label} M'")
            if std_key in seeds[0][0]:
                ax.plot(epochs, mean(std_key), color=colour, ls="--", label=f"{label} M")
    axes[0].set_title("natural accuracy (monitored test images)")
    axes[1].set_title(f"PGD accuracy ({pgd_key.split('_')[0].upper()})")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evidence_study(scale, configs, seeds, passthrough, dry_run, log):
    """Train and evaluate every run of the evidence study; write evidence_<scale>.md and the curves PNG."""
    cfg, _ = common.parse_args(DEFAULTS, passthrough)
    root = os.path.join(cfg.runs_dir, f"evidence_{scale}")
    runs = evidence_runs(scale, configs, seeds)
    if dry_run:
        for sc in EVIDENCE_SCALES:
            for key, label, seed, args, metrics in evidence_runs(sc, configs, seeds):
                log(f"[{sc}] {label}, seed {seed}: {' '.join(args)}")
        return None
    log(f"evidence study ({scale}): {len(runs)} runs in {root}")
    results, curves = {}, {}
    for key, label, seed, args, metrics in runs:
        run_dir = os.path.join(root, f"{key}_seed{seed}")
        r = run_and_evaluate(f"{label} seed {seed}", args, metrics, passthrough, False, False, log, run_dir=run_dir,
                             ckpt="last.pt", eval_extra=EVIDENCE_SCALES[scale]["eval"])
        if "failed" in r:
            continue
        results.setdefault(key, {})[seed] = r
        curves.setdefault(label, []).append(read_metrics(run_dir))
    table = evidence_tables(results)
    with open(os.path.join(root, f"evidence_{scale}.md"), "w") as fh:
        fh.write(table + "\n")
    png = plot_learning_curves(curves, os.path.join(root, f"evidence_{scale}_curves.png"))
    log(table)
    log(f"table: {os.path.join(root, f'evidence_{scale}.md')}; curves: {png}")
    return table


# ------------------------------------------------------------------------------------- the time study
def time_study(quick, passthrough, steps, warmup, log):
    """Median seconds per training step (after warm-up) of each configuration, extrapolated to an epoch
    of 50,000 images; TRAIN's overhead relative to its base method."""
    cfg, _ = common.parse_args(DEFAULTS, passthrough + (["--quick"] if quick else []) + ["--dataset", "cifar100"])
    device = torch.device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    torch.manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (cfg.batch_size,), device=device)
    per_epoch = math.ceil(50_000 / cfg.batch_size)
    runs = {}  # label -> (config, models, optimizers); all built first so steps can be interleaved
    for label, method, plugins in TIME_CONFIGS:
        c = argparse.Namespace(**vars(cfg))
        c.method, c.train, c.lbgat = method, "train" in plugins, "lbgat" in plugins
        models = common.build_models(c, 100, device)
        runs[label] = (c, models, common.build_optimizers(models, c))
    # Round-robin: one step of every configuration per round, so a slow spell of a shared machine
    # slows all configurations alike instead of biasing whichever one ran during it.
    times = {label: [] for label in runs}
    for i in range(warmup + steps):
        for label, (c, models, opts) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            common.train_step(models, opts, x, y, c, epoch=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    results = {label: statistics.median(t) for label, t in times.items()}
    for label, sec in results.items():
        log(f"{label}: {sec:.3f} s/step")
    lines = [f"Training time on {name}: M' = {cfg.arch}, M = {cfg.std_arch}, batch {cfg.batch_size}, "
             f"PGD-{cfg.steps}; median of {steps} steps after {warmup} warm-up, configurations interleaved; "
             f"epoch = {per_epoch} steps",
             "", "| method | s / step | s / epoch (extrapolated) | overhead vs base |", "| --- | --- | --- | --- |"]
    for label, method, plugins in TIME_CONFIGS:
        base = results["AT" if method == "at" else "TRADES"]
        over = "" if not plugins else f"{100 * (results[label] / base - 1):+.1f}%"
        lines.append(f"| {label} | {results[label]:.3f} | {results[label] * per_epoch:.0f} | {over} |")
    return "\n".join(lines)


def main(argv=None):
    p = common.Parser(description=__doc__.splitlines()[0], add_help=True)
    p.add_argument("--study", required=True, choices=sorted(list(STUDIES) + ["time", "evidence"]))
    p.add_argument("--quick", action="store_true", help="smoke scale: cnn_small, data subset, 2 epochs")
    p.add_argument("--dry-run", action="store_true", help="print the runs the study would make, run nothing")
    p.add_argument("--steps-only", type=int, default=None, help="time study: timed steps (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="time study: warm-up steps (default 3, quick 1)")
    p.add_argument("--scale", choices=sorted(EVIDENCE_SCALES), default="cpu", help="evidence study: cpu or gpu scale")
    p.add_argument("--configs", type=common.name_list([k for k, _, _ in EVIDENCE_CONFIGS]), default=None,
                   help="evidence study: run only these configurations (e.g. at,trades_train)")
    p.add_argument("--seeds", type=common.int_list, default=list(EVIDENCE_SEEDS), help="evidence study: seeds")
    args, passthrough = p.parse_known_args(argv)
    log = print
    if args.study == "evidence":
        return evidence_study(args.scale, args.configs, args.seeds, passthrough, args.dry_run, log)
    if args.study == "time":
        steps = args.steps_only or (3 if args.quick else 10)
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
        if args.dry_run:
            log(f"time study: {len(TIME_CONFIGS)} configurations x ({warmup} warm-up + {steps} timed) steps")
            return None
        table = time_study(args.quick, passthrough, steps, warmup, log)
        log(table)
        return table
    root = study_root(passthrough, args.quick)
    dir_of = lambda run_args: run_dir_of(run_args, passthrough, args.quick)
    runs = STUDIES[args.study](args.quick, dir_of)
    log(f"study {args.study}: {len(runs)} runs" + (" (quick)" if args.quick else ""))
    rows = []
    for label, run_args, metrics in runs:
        r = run_and_evaluate(label, run_args, metrics, passthrough, args.quick, args.dry_run, log)
        if r is not None:
            rows.append((label, r))
    if args.dry_run:
        return None
    table = render_table(args.study, rows)
    with open(os.path.join(root, f"{args.study}.md"), "w") as fh:
        fh.write(table + "\n")
    log(f"table: {os.path.join(root, args.study + '.md')}")
    if args.study == "beta-sweep":
        log(f"figure: {plot_beta_sweep([(l, r) for l, r in rows if 'failed' not in r], os.path.join(root, 'beta-sweep.png'))}")
    log(table)
    failed = [label for label, r in rows if "failed" in r]
    if failed:
        log(f"error: {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); their rows say how")
        raise SystemExit(1)
    return table


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
