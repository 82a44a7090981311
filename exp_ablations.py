"""Ablation studies of the paper (CIFAR-100, TRADES / vanilla AT, settings of Tables I-II), and the evidence study.

    python exp_ablations.py --study NAME [--quick] [--dry-run] [run flags ...]

Each study is a list of runs (settings that differ from the study's base) + a table or figure; finished
runs are reused, unfinished ones resumed, each run is evaluated once.
Flags this script does not know (e.g. --data-file, --device, --runs-dir, --lr) are passed to every run.
"""
import dataclasses
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import torch

import common
import runs
import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = dict(dataset="cifar100", method="trades", lam="20a", arch="wrn34_10")  # M: resnet18 (LBGAT: resnet18_lbgat)
# --quick: smoke scale, minutes on a CPU (common's --quick preset, then these); 2 epochs leave nothing to select
# on a validation split: no split, and last.pt is evaluated
STUDY_QUICK = {"quick": True, "epochs": 2, "milestones": [2], "train_n": 1024, "val_n": 0, "test_n": 500, "eval_n": 500}
QUICK_EVAL = {"knn_train_n": 1024, "aa_n": 100}  # smoke scale: AutoAttack on 100 images, kNN support 1,024
FULL_METRICS = ["nat", "pgd", "cw", "aa"]
BETA_KS = [5, 10, 20, 30, 40, 50]


def backbones(quick):
    """(small, large) backbones: the paper's ResNet-18 / WRN-34-10, or CPU-sized stand-ins."""
    return ("cnn_small", "resnet18") if quick else ("resnet18", "wrn34_10")


# ------------------------------------------------------------------------------------- the studies
# A study: (quick, dir_of) -> [(label, settings that differ from the study's base, metrics)];
# dir_of(settings) is the run folder of those settings (for runs that use another run's checkpoint).
def study_relation(quick, dir_of):
    """Table VI: vanilla AT + each relation loss in place of L_TP."""
    at = {"method": "at"}
    return [("Vanilla AT", at, FULL_METRICS),
            ("MCA", {**at, "train": True, "relation": "mca"}, FULL_METRICS),
            ("Vanilla AT + RKD", {**at, "train": True, "relation": "rkd"}, FULL_METRICS),
            ("Vanilla AT + CRD", {**at, "train": True, "relation": "crd"}, FULL_METRICS),
            ("Vanilla AT + TRAIN", {**at, "train": True}, FULL_METRICS)]


def study_batch_size(quick, dir_of):
    """Table VIII: TRADES + TRAIN at batch 128, 256, 384."""
    return [(f"batch {b}", {"train": True, "batch_size": b}, FULL_METRICS) for b in (128, 256, 384)]


def study_lambda(quick, dir_of):
    """Table IX: TRADES + TRAIN with lambda 0, 5a, 10a, 20a, 50a (+ test L_TP)."""
    return [(f"lambda {lam}", {"train": True, "lam": common.Lambda.parse(lam)}, ["nat", "pgd", "tp"])
            for lam in ("0", "5a", "10a", "20a", "50a")]


def study_std_backbone(quick, dir_of):
    """Table VII: M = ResNet-18 vs WRN-34-10, and the standard models themselves."""
    small, large = backbones(quick)
    planned = []
    for std in (small, large):
        planned.append((f"standard training, {std}", {"method": "standard", "arch": std}, FULL_METRICS))
        planned.append((f"TRADES + TRAIN, M = {std}", {"train": True, "std_arch": std}, FULL_METRICS))
    return planned


def study_pretrained_std(quick, dir_of):
    """Table X: TRAIN* (M pre-trained and frozen) vs TRAIN (joint)."""
    small, _ = backbones(quick)
    standard = {"method": "standard", "arch": small}
    ckpt = os.path.join(dir_of(standard), "last.pt")
    return [("standard model", standard, FULL_METRICS),
            ("Vanilla AT", {"method": "at"}, FULL_METRICS),
            ("Vanilla AT + TRAIN*", {"method": "at", "train": True, "std_arch": small, "std_ckpt": ckpt,
                                     "freeze_std": True},
             FULL_METRICS),
            ("Vanilla AT + TRAIN", {"method": "at", "train": True, "std_arch": small}, FULL_METRICS)]


def study_mobilenet(quick, dir_of):
    """Table XII: M' = MobileNetV3 with AT / TRADES +- TRAIN."""
    mb = {"arch": "mobilenet_v3"}
    return [("Vanilla AT", {**mb, "method": "at"}, FULL_METRICS),
            ("Vanilla AT + TRAIN", {**mb, "method": "at", "train": True}, FULL_METRICS),
            ("TRADES", {**mb, "method": "trades"}, FULL_METRICS),
            ("TRADES + TRAIN", {**mb, "method": "trades", "train": True}, FULL_METRICS)]


def study_beta_sweep(quick, dir_of):
    """Fig. 3: TRADES beta 1..6, kNN topology score vs k (PNG)."""
    return [(f"beta {b}", {"method": "trades", "beta": float(b)}, ["nat", "pgd", "knn"]) for b in range(1, 7)]


STUDIES = {"relation": study_relation, "batch-size": study_batch_size, "lambda": study_lambda,
           "std-backbone": study_std_backbone, "pretrained-std": study_pretrained_std, "mobilenet": study_mobilenet,
           "beta-sweep": study_beta_sweep}
SHARE = common.Lambda.parse("share:0.15")
# The time study's configurations: (label, settings over the study's base, the label it is compared with or None).
# methods: Table XI (each plug-in against its base method) and the share lambda against a constant one;
# fast-paths: one configuration (--method, --train, --lam as given) under --channels-last and --compile.
TIME_CONFIGS = {
    "methods": [("AT", {"method": "at"}, None), ("AT + LBGAT", {"method": "at", "lbgat": True}, "AT"),
                ("AT + TRAIN", {"method": "at", "train": True}, "AT"), ("TRADES", {"method": "trades"}, None),
                ("TRADES + LBGAT", {"method": "trades", "lbgat": True}, "TRADES"),
                ("TRADES + TRAIN", {"method": "trades", "train": True}, "TRADES"),
                ("TRADES + TRAIN, share:0.15", {"method": "trades", "train": True, "lam": SHARE}, "TRADES + TRAIN")],
    "fast-paths": [("as given", {}, None), ("channels_last", {"channels_last": True}, "as given"),
                   ("compile", {"compile": True}, "as given"),
                   ("channels_last + compile", {"channels_last": True, "compile": True}, "as given")],
}


# ------------------------------------------------------------------------------------- running a study
class Study:
    """The settings every run of a study shares: the base Config (DEFAULTS, the --quick presets, the
    passed-through flags), the evaluation settings, and the folder its runs live in."""

    def __init__(self, passthrough, quick=False, defaults=DEFAULTS, root_name="ablations"):
        self.given = runs.parse_flags(defaults, passthrough)
        actions = {f.name for f in dataclasses.fields(runs.Actions)} - {"runs_dir"}
        bad = sorted(set(self.given) & actions)
        if bad:
            raise common.UserError(f"{', '.join('--' + k.replace('_', '-') for k in bad)} "
                                   "cannot be passed to a study's runs")
        self.quick = quick
        defaults = runs.fit_dataset_label(defaults, self.given)  # --data-file: a dataset label that describes it
        self.base = runs.make_config(defaults, {**(STUDY_QUICK if quick else {}), **self.given})
        self.eval_given = {k: v for k, v in self.given.items()
                           if k in {f.name for f in dataclasses.fields(runs.EvalConfig)} - {"eps", "test_n"}}
        self.root = os.path.join(self.given.get("runs_dir", "runs"), root_name + self.suffix())

    def suffix(self):
        """_quick and the passed-through settings that change every run, so studies on other settings
        or data never share a folder."""
        kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(runs.Config)}
        parts = ["quick"] if self.quick else []
        for k, v in sorted(self.given.items()):
            if k == "data_file":
                parts.append(f"data-file-{os.path.splitext(os.path.basename(v))[0]}")
            elif kinds.get(k) == runs.RUN and k != "quick":
                parts.append(runs.name_part(k, v))
        return "".join("_" + p for p in parts)

    def config(self, settings):
        cfg = dataclasses.replace(self.base, **settings)
        runs.validate(cfg)
        return cfg

    def dir_of(self, settings):
        """The run folder: the one naming scheme of runs.run_name, against the study's base."""
        return os.path.join(self.root, runs.run_name(self.config(settings), self.base))

    def eval_config(self, metrics, extra=None):
        return runs.EvalConfig(**{"metrics": metrics, "knn_k": BETA_KS, **(QUICK_EVAL if self.quick else {}),
                                    **self.eval_given, **(extra or {})})


def check_same_settings(run_dir, cfg):
    """A folder is reused only if it holds a run with exactly these run-defining settings."""
    saved, wanted = runs.load_run_config(run_dir).run_settings(), cfg.run_settings()
    diff = sorted(k for k in wanted if saved[k] != wanted[k])
    if diff:
        raise common.UserError(f"{run_dir} holds a run with other settings ({', '.join(diff)}); "
                               "move it away or use another --runs-dir")


def run_and_evaluate(study, label, settings, ecfg, dry_run, log, run_dir=None, ckpt=None):
    """Train (or resume, or reuse) one run and evaluate it once (ecfg None: not at all); -> its eval.json dict ({}
    without ecfg), {"failed": why}, or None on a dry run."""
    cfg = study.config(settings)
    run_dir = run_dir or study.dir_of(settings)
    status = runs.run_status(run_dir)
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        check_same_settings(run_dir, cfg)
    if dry_run:
        log(f"[{status}] {label}: {' '.join(runs.name_part(k, v) for k, v in settings.items())} -> {run_dir}")
        return None
    if status != "done":
        # partial: resume (its own settings, where it runs from now); missing but the folder has files
        # (a run that diverged before its first checkpoint, same settings as checked above): start again
        resume = status == "partial"
        if resume:
            cfg = runs.resume_config(run_dir, {k: getattr(cfg, k) for k in ("device", "data_file", "data_dir")})
        try:
            runs.run(cfg, run_dir, resume=resume, overwrite=not resume and os.path.isdir(run_dir),
                       command=f"exp_ablations.py ({label})")
        except common.Diverged as e:
            log(f"{label}: diverged ({e}); the study goes on")
            return {"failed": "diverged"}
    if ecfg is None:  # a run that is not evaluated (a selection run on the validation split)
        return {}
    eval_json = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(eval_json):
        ckpt = ckpt or runs.checkpoint_to_evaluate(cfg)
        return runs.evaluate_run(os.path.join(run_dir, ckpt), ecfg, run_dir)
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
    return "\n".join(head + [f"| {name(label)} | {r['failed']} |" + " - |" * (width - 2)
                             if "failed" in r else next(body)
                             for label, r in rows])


def _render_rows(study, rows):
    if study == "lambda":
        head = "| lambda | Natural | PGD-20 | test L_TP |\n| --- | --- | --- | --- |"
        body = [f"| {label.split()[-1]} | {pct(r.get('natural'))} | {pct(r.get('pgd'))} | "
                f"{r['test_ltp']:.4f} |" if r.get("test_ltp") is not None else f"| {label} | - | - | - |"
                for label, r in rows]
        return head + "\n" + "\n".join(body)
    if study == "beta-sweep":
        head = ("| beta | Natural | PGD-20 | " + " | ".join(f"kNN k={k}" for k in BETA_KS) + " |\n"
                + "| --- " * (3 + len(BETA_KS)) + "|")
        body = [f"| {label.split()[-1]} | {pct(r['natural'])} | {pct(r['pgd'])} | "
                + " | ".join(pct(r["knn"]["natural"][str(k)]) for k in BETA_KS) + " |" for label, r in rows]
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
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in rows:
        ax.plot(BETA_KS, [100 * r["knn"]["natural"][str(k)] for k in BETA_KS], marker="o", label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("topology score (kNN accuracy, %)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_study(name, quick, passthrough, dry_run, log):
    study = Study(passthrough, quick)
    planned = STUDIES[name](quick, study.dir_of)
    log(f"study {name}: {len(planned)} runs" + (" (quick)" if quick else ""))
    rows = []
    for label, settings, metrics in planned:
        r = run_and_evaluate(study, label, settings, study.eval_config(metrics), dry_run, log)
        if r is not None:
            rows.append((label, r))
    if dry_run:
        return None
    table = render_table(name, rows)
    with open(os.path.join(study.root, f"{name}.md"), "w") as fh:
        fh.write(table + "\n")
    log(f"table: {os.path.join(study.root, name + '.md')}")
    if name == "beta-sweep":
        png = plot_beta_sweep([(l, r) for l, r in rows if "failed" not in r],
                              os.path.join(study.root, "beta-sweep.png"))
        log(f"figure: {png}")
    log(table)
    failed = [label for label, r in rows if "failed" in r]
    if failed:
        raise StudyFailed(f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); their rows say how")
    return table


class StudyFailed(Exception):
    """Some runs of a study diverged: the table is written with their rows marked, the study exits 1."""


# ------------------------------------------------------------------------------------- the evidence study
EVIDENCE_CONFIGS = [("standard", "Standard", {"method": "standard"}),
                    ("at", "AT", {"method": "at"}),
                    ("at_train", "AT + TRAIN", {"method": "at", "train": True}),
                    ("trades", "TRADES", {"method": "trades"}),
                    ("trades_train", "TRADES + TRAIN", {"method": "trades", "train": True}),
                    # variants of AT + TRAIN (what else was tried), on EVIDENCE_VARIANT_SEEDS unless named
                    ("at_train_lam20a", "AT + TRAIN, lambda 20a",
                     {"method": "at", "train": True, "lam": common.Lambda.parse("20a")}),
                    ("at_train_lam1", "AT + TRAIN, lambda 1",
                     {"method": "at", "train": True, "lam": common.Lambda.parse("1")}),
                    ("at_train_nat", "AT + TRAIN, tp-input nat", {"method": "at", "train": True, "tp_input": "nat"}),
                    ("at_train_mean", "AT + TRAIN, reduction mean",
                     {"method": "at", "train": True, "tp_reduction": "mean"})]
EVIDENCE_VARIANTS = ("at_train_lam20a", "at_train_lam1", "at_train_nat", "at_train_mean")
EVIDENCE_VARIANT_SEEDS = [1]
EVIDENCE_PAIRS = [("at", "at_train"), ("trades", "trades_train")] + [("at", v) for v in EVIDENCE_VARIANTS]
EVIDENCE_SEEDS = [1, 2, 3]
SHARED_CIFAR10 = os.path.join(HERE, "..", "shared", "data", "cifar10.npz")
EVIDENCE_SCALES = {
    "cpu": {"train": dict(dataset="cifar10", data_file=SHARED_CIFAR10, arch="cnn6", std_arch="cnn6", train_n=8000,
                          test_n=1000, epochs=8, milestones=[6, 7], steps=3, step_size=0.01, eval_steps=10, eval_n=500,
                          lam="5", beta=6.0, device="cpu", val_n=0, baselines="release1"),
            "eval": dict(aa_n=1000, aa_attacks=["apgd-ce", "apgd-dlr"], knn_k=[30], knn_train_n=1000)},
    "gpu": {"train": dict(dataset="cifar10", data_file=SHARED_CIFAR10, arch="preact_resnet18", std_arch="resnet18",
                          epochs=30, milestones=[23, 27], steps=10, step_size=0.007, eval_steps=20, eval_n=1000,
                          lam="5", beta=6.0, val_n=0),
            "eval": dict(aa_n=1000, knn_k=[30], knn_train_n=10000)},
}
EVIDENCE_METRICS = [("natural", "Natural"), ("pgd", "PGD-20"), ("cw", "CW-20"), ("aa", "AA"),
                    ("knn_natural", "kNN@30 natural"), ("knn_robust", "kNN@30 robust"), ("test_ltp", "test L_TP"),
                    ("std_natural", "M natural")]


def evidence_runs(configs=None, seeds=EVIDENCE_SEEDS):
    """[(key, label, seed, settings, metrics)] of the evidence study. The variants run on the seeds of
    EVIDENCE_VARIANT_SEEDS among `seeds`, or on all of `seeds` when --configs names them."""
    out = []
    for key, label, settings in EVIDENCE_CONFIGS:
        if configs and key not in configs:
            continue
        metrics = ["nat", "pgd"] if key == "standard" else ["nat", "pgd", "cw", "aa", "knn", "tp"]
        run_seeds = ([s for s in seeds if s in EVIDENCE_VARIANT_SEEDS] if key in EVIDENCE_VARIANTS and not configs
                     else seeds)
        out += [(key, label, seed, {**settings, "seed": seed}, metrics) for seed in run_seeds]
    return out


def evidence_values(r):
    """The study's numbers of one eval.json (fractions; test L_TP as is; None where not measured)."""
    knn = r.get("knn") or {}
    return {"natural": r.get("natural"), "pgd": r.get("pgd"), "cw": r.get("cw"), "aa": r.get("aa"),
            "knn_natural": (knn.get("natural") or {}).get("30"), "knn_robust": (knn.get("robust") or {}).get("30"),
            "test_ltp": r.get("test_ltp"), "std_natural": r.get("std_natural")}


def mean_std(values, digits=2):
    """'m ± s' of the values present (sample std), with digits decimals; '-' when none."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def scaled(key, v):
    return None if v is None else (v if key == "test_ltp" else 100 * v)


def evidence_tables(results, labels=None, pairs=EVIDENCE_PAIRS):
    """results: {config key: {seed: eval.json dict}} -> markdown: mean ± std per configuration, the TRAIN
    gain per base method (mean ± std of the per-seed paired differences over `pairs` of config keys), and
    every paired seed. labels: {config key: label} (default: the evidence study's)."""
    labels = labels or {k: label for k, label, _ in EVIDENCE_CONFIGS}
    lines = ["Mean ± standard deviation over seeds (accuracies in %):", "",
             "| method | seeds | " + " | ".join(name for _, name in EVIDENCE_METRICS) + " |",
             "| --- " * (2 + len(EVIDENCE_METRICS)) + "|"]
    for key, by_seed in results.items():
        vals = [evidence_values(r) for r in by_seed.values()]
        lines.append(f"| {labels[key]} | {len(vals)} | "
                     + " | ".join(mean_std([scaled(m, v[m]) for v in vals]) for m, _ in EVIDENCE_METRICS) + " |")
    gain_metrics = [(m, n) for m, n in EVIDENCE_METRICS if m not in ("test_ltp", "std_natural")]
    gain_head = ["| pair | seeds | " + " | ".join(n for _, n in gain_metrics) + " |",
                 "| --- " * (2 + len(gain_metrics)) + "|"]
    gains, paired = [], []
    for base, plus in pairs:
        if base not in results or plus not in results:
            continue
        seeds = sorted(set(results[base]) & set(results[plus]))
        pair = f"{labels[plus]} vs {labels[base]}"
        cells = []
        for m, _ in gain_metrics:
            diffs = [100 * (b[m] - a[m]) for s in seeds
                     for a, b in [(evidence_values(results[base][s]), evidence_values(results[plus][s]))]
                     if a[m] is not None and b[m] is not None]
            cells.append(f"{mean_std(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else "-")
        gains.append(f"| {pair} | {len(seeds)} | " + " | ".join(cells) + " |")
        for s in seeds:
            a, b = evidence_values(results[base][s]), evidence_values(results[plus][s])
            paired.append(f"| {pair} | {s} | " + " | ".join(
                "-" if a[m] is None or b[m] is None else f"{100 * a[m]:.2f} → {100 * b[m]:.2f}"
                for m, _ in gain_metrics) + " |")
    if gains:
        lines += ["", "TRAIN gain over its base method: mean ± std of the per-seed differences (points; positive = "
                  "TRAIN better), and on how many seeds TRAIN is better:", ""] + gain_head + gains
        lines += ["", "Paired per seed (base → with TRAIN):", "", gain_head[0].replace("| seeds |", "| seed |"),
                  gain_head[1]] + paired
    return "\n".join(lines)


def evidence_study(scale, configs, seeds, passthrough, dry_run, log):
    """Train and evaluate every run of the evidence study; write evidence_<scale>.md and its curves PNG.

    The question: does TRAIN raise natural accuracy over its base method by more than seed noise?

    Scale "cpu" (chosen by measuring, 2026-12-01, AMD EPYC, one thread per run, batch 128, PGD-3):
      M' = M = cnn6 (six 3x3 convs, widths 16/32/64, ~0.1M parameters): 201 images/s for AT and 109 for
      TRADES + TRAIN, against 124 / 94 for cnn_small (three convs) and 61 / 34 for the same net at widths
      32/64/128. Six convolutions instead of three make standard training clearly beat AT on natural accuracy
      (the 'Standard' reference row checks this). The first 8,000 training images of the shared CIFAR-10
      copy (official order, about class-balanced), 8 epochs with lr x0.1 at epochs 6 and 7 (75%/90% of the
      schedule, as in the paper), PGD-3 with step 0.01 (3 x 0.01 ~ eps = 0.031), lambda 5 (the paper's
      CIFAR-10 value), 3 seeds. Evaluation of last.pt (no checkpoint picked on test data) on the first
      1,000 test images: natural, PGD-20, CW-20, AutoAttack APGD-CE + APGD-DLR (the standard version's
      APGD-T, FAB-T and Square would multiply the evaluation time by ~4 at this budget), kNN@30 with the
      first 1,000 training images as support, test L_TP, M's natural accuracy. About 12-14 minutes of one
      core per run; the study's 15 runs fit ~3 hours of a 2-core machine, run as two processes with
      --configs (README). The four variants of AT + TRAIN (lambda 20a and 1, --tp-input nat, --tp-reduction
      mean) run on seed 1 only (EVIDENCE_VARIANT_SEEDS): they show what else was tried, not a tuned result.
    Scale "gpu": PreAct-ResNet-18 M' / ResNet-18 M on full CIFAR-10, PGD-10, 30 epochs (lr x0.1 at 23, 27),
      standard AutoAttack on 1,000 images; every run resumes, so --max-minutes splits it into GPU jobs.
    Both scales evaluate last.pt, so they hold out no validation split (val_n=0). The cpu scale keeps the first
      release's training-attack start (baselines="release1": TRADES' start clamped to [0,1]), with which its runs
      were started, so that finished and unfinished runs stay one study.
    """
    if dry_run:
        for sc in EVIDENCE_SCALES:
            study = Study(passthrough, defaults={**DEFAULTS, **EVIDENCE_SCALES[sc]["train"]},
                          root_name=f"evidence_{sc}")
            for key, label, seed, settings, _ in evidence_runs(configs, seeds):
                cfg = study.config(settings)
                log(f"[{sc}] [{runs.run_status(study.dir_of(settings))}] {label}, seed {seed}: M'={cfg.arch} "
                    f"M={common.std_arch_of(cfg)} {cfg.train_n or 'all'} train images, {cfg.epochs} epochs, "
                    f"PGD-{cfg.steps} -> {study.dir_of(settings)}")
        return None
    study = Study(passthrough, defaults={**DEFAULTS, **EVIDENCE_SCALES[scale]["train"]}, root_name=f"evidence_{scale}")
    planned = evidence_runs(configs, seeds)
    log(f"evidence study ({scale}): {len(planned)} runs in {study.root}")
    results, curves = {}, {}
    for key, label, seed, settings, metrics in planned:
        ecfg = study.eval_config(metrics, {"knn_k": [30], **EVIDENCE_SCALES[scale]["eval"]})
        r = run_and_evaluate(study, f"{label}, seed {seed}", settings, ecfg, False, log, ckpt="last.pt")
        if "failed" in r:
            continue
        results.setdefault(key, {})[seed] = r
        if key not in EVIDENCE_VARIANTS:  # the figure shows the main configurations only, to stay readable
            curves.setdefault(label, []).append(runs.read_metrics(study.dir_of(settings)))
    table = evidence_tables(results)
    with open(os.path.join(study.root, f"evidence_{scale}.md"), "w") as fh:
        fh.write(table + "\n")
    png = curves and runs.plot_learning_curves(curves, os.path.join(study.root, f"evidence_{scale}_curves.png"))
    log(table)
    log(f"table: {os.path.join(study.root, f'evidence_{scale}.md')}; curves: {png}")
    return table


# ------------------------------------------------------------------------------------- the response study
RESULTS = os.path.join(HERE, "results")  # results/<study>/<run>/: each finished run's small files, committed
RESPONSE_LAMBDAS = ("0.03", "0.1", "0.3", "1")  # the grid of arm 1, fixed before any run (sum reduction)
RESPONSE_SELECT_SEEDS = [1, 2, 3]
RESPONSE_CONFIRM_SEEDS = [4, 5, 6]
RESPONSE_CAPACITY_SEEDS = [4, 5]
RESPONSE_ARMS = ("lambda", "confirm", "capacity")
RESPONSE_TRAIN = {**EVIDENCE_SCALES["cpu"]["train"], "val_n": 1000, "baselines": "official"}
RESPONSE_EVAL = {**EVIDENCE_SCALES["cpu"]["eval"], "nbr_k": [10, 30]}
RESPONSE_METRICS = {"lambda": ["nat", "pgd", "knn", "tp", "nbr"],
                    "confirm": ["nat", "pgd", "cw", "aa", "knn", "tp", "nbr"]}
RESPONSE_METRICS["capacity"] = RESPONSE_METRICS["confirm"]
WIDTHS = {"cnn6": 1, "cnn6x2": 2}
# Core-minutes of one run (training + evaluation, one thread), by (method, trains M, width, evaluation):
# first estimates from the evidence study's speeds (2026-12-01, AMD EPYC); `--dry-run` prints their sums.
RESPONSE_MINUTES = {("at", 1, "lambda"): 11, ("at", 1, "full"): 14, ("trades", 1, "full"): 16,
                    ("at", 2, "full"): 38}
PENDING = "lambda*"  # the settings of a run that waits for arm 1's selection


def response_settings(method, lam, arch=None, seed=1):
    """A run of the response study: every run trains M (lambda 0 = the base method with M alongside);
    arch: one of WIDTHS (default: the x1 net), for M' and M."""
    arch = arch or next(iter(WIDTHS))
    return {"method": method, "train": True, "lam": lam if lam == PENDING else common.Lambda.parse(lam),
            "arch": arch, "std_arch": arch, "seed": seed}


def response_label(settings):
    base = settings["method"].upper()
    lam = str(settings["lam"])
    width = WIDTHS[settings["arch"]]
    name = "lambda*" if lam == PENDING else f"lambda {lam}"
    return (f"{base} + M (lambda 0)" if lam == "0" else f"{base} + TRAIN ({name})") + \
        (f", width x{width}" if width != 1 else "")


def response_runs(arms=RESPONSE_ARMS):
    """[(arm, settings)] of the pre-registered design (settings["lam"] == PENDING until lambda* is chosen);
    a run that two arms share (same settings) is listed once, under the first."""
    planned = []
    if "lambda" in arms:
        planned += [("lambda", response_settings("at", lam, seed=s)) for s in RESPONSE_SELECT_SEEDS
                 for lam in ("0",) + RESPONSE_LAMBDAS]
    if "confirm" in arms:
        planned += [("confirm", response_settings(m, lam, seed=s)) for s in RESPONSE_CONFIRM_SEEDS
                 for m in ("at", "trades") for lam in ("0", PENDING)]
    if "capacity" in arms:
        planned += [("capacity", response_settings("at", lam, arch, seed=s)) for s in RESPONSE_CAPACITY_SEEDS
                 for arch in WIDTHS for lam in ("0", "5", PENDING)]
    seen, out = set(), []
    for arm, st in planned:
        key = tuple(sorted((k, str(v)) for k, v in st.items()))
        if key not in seen:
            seen.add(key)
            out.append((arm, st))
    return out


def val_score(rows):
    """Arm 1's selection score of a run: val natural + val PGD accuracy of its last epoch (= last.pt)."""
    last = rows[-1]
    pgd = next(k for k in last if k.startswith("val_pgd") and k.endswith("_acc"))
    return last["val_nat_acc"] + last[pgd]


def select_lambda(scores):
    """The pre-stated rule. scores: {lambda text: {seed: val_score}} over arm 1 -> (lambda*, why) once every
    positive lambda has all RESPONSE_SELECT_SEEDS, else (None, what is missing). lambda* = the positive
    lambda with the highest mean score over the seeds; a tie goes to the smaller lambda."""
    missing = [f"lambda {lam} seed {s}" for lam in RESPONSE_LAMBDAS for s in RESPONSE_SELECT_SEEDS
               if s not in scores.get(lam, {})]
    if missing:
        return None, f"arm 1 is not finished ({len(missing)} runs missing)"
    mean = {lam: statistics.mean(scores[lam][s] for s in RESPONSE_SELECT_SEEDS) for lam in RESPONSE_LAMBDAS}
    best = max(RESPONSE_LAMBDAS, key=lambda lam: (mean[lam], -float(lam)))
    return best, f"highest mean val natural + val PGD over seeds {RESPONSE_SELECT_SEEDS}: {100 * mean[best]:.2f}"


class Preregistered:
    """The one harness of the pre-registered studies (response, transfer): where each run lives and what is
    known of it. A finished, evaluated run's config.json, metrics.jsonl and eval.json are kept (committed) under
    results/<study>/<run>/, so its numbers survive a new machine and the tables are rebuilt from them; the run
    folder with its checkpoints is runs/<study>_cpu/<run>/. A study's design (its runs, placeholders such as
    lambda* that a selection rule fills in, its evaluation) is its own; running, keeping, committing, --dry-run
    and --report go through here."""

    def __init__(self, name, passthrough, train, results_root=None):
        self.study = Study(passthrough, defaults={**DEFAULTS, **train}, root_name=f"{name}_cpu")
        self.results_root = (results_root or os.path.join(RESULTS, name)) + self.study.suffix()

    def name(self, settings):
        return os.path.basename(self.study.dir_of(settings))

    def saved_dir(self, settings, evaluated=True):
        """The committed copy of a finished run, if it holds exactly these settings (else None); evaluated=False: a
        run that is never evaluated on the test set (a selection run on the validation split), kept without
        eval.json."""
        d = os.path.join(self.results_root, self.name(settings))
        if not os.path.isfile(os.path.join(d, "eval.json" if evaluated else "metrics.jsonl")):
            return None
        check_same_settings(d, self.study.config(settings))
        return d

    def status(self, settings, evaluated=True):
        """'done' only once the run's small files are kept under results/; a run that finished training but not its
        evaluation (stopped in it) or its keeping is 'trained', and the study's next pass evaluates and keeps it."""
        if settings is None:
            return "waits"
        if self.saved_dir(settings, evaluated):
            return "done"
        status = runs.run_status(self.study.dir_of(settings))
        return "trained" if status == "done" else status

    def keep(self, settings):
        """Copy a finished, evaluated run's small files into results/<study>/<name>/ -> that folder."""
        src, dst = self.study.dir_of(settings), os.path.join(self.results_root, self.name(settings))
        os.makedirs(dst, exist_ok=True)
        for f in ("config.json", "eval.json", "metrics.jsonl"):  # metrics.jsonl last: it marks an unevaluated run kept
            if os.path.isfile(os.path.join(src, f)):
                shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
        return dst

    def run_one(self, label, settings, ecfgs, commit, log, message):
        """Train (or resume) one run, evaluate last.pt with each EvalConfig of ecfgs (rows of its eval.json; none: a
        run never evaluated on the test set), keep its small files and (--commit) commit them -> False when it
        diverged or another process holds it."""
        run_dir = self.study.dir_of(settings)
        try:
            r = run_and_evaluate(self.study, label, settings, ecfgs[0] if ecfgs else None, False, log, ckpt="last.pt")
            if "failed" in r:
                return False
            for ecfg in ecfgs[1:]:  # further rows (e.g. other test_n): evaluated once, as the first
                rows = runs.eval_rows(runs.read_json(os.path.join(run_dir, "eval.json")))
                have = {row.get("n_test") for row, _ in rows}
                if ecfg.test_n not in have:
                    runs.evaluate_run(os.path.join(run_dir, "last.pt"), ecfg, run_dir)
        except common.FolderInUse:  # also while another process evaluates a trained run
            log(f"{label}: another process is running it; skipped")
            return False
        kept = self.keep(settings)
        if commit:
            commit_results(kept, f"{message} ({os.path.basename(kept)})", log)
        return True

    def finished(self, settings, evaluated=True):
        """(eval.json dict, metrics.jsonl rows) of a kept run, else None; evaluated=False (a selection run kept
        without eval.json): (None, rows)."""
        d = settings and self.saved_dir(settings, evaluated)
        return d and (runs.read_json(os.path.join(d, "eval.json")) if evaluated else None, runs.read_metrics(d))

    def write_report(self, text, figures, log):
        """tables.md (and the figures: {file name: draw(path)}) into results/<study>/."""
        os.makedirs(self.results_root, exist_ok=True)
        with open(os.path.join(self.results_root, "tables.md"), "w") as fh:
            fh.write(text + "\n")
        drawn = [draw(os.path.join(self.results_root, name)) for name, draw in figures.items()]
        log(text)
        log(f"tables: {os.path.join(self.results_root, 'tables.md')}; figure: "
            f"{', '.join(p for p in drawn if p) or 'none (no finished run)'}")
        return text


class ResponseStudy(Preregistered):
    """The response study's runs; lambda* (a placeholder until arm 1 is done) from its committed results."""

    def __init__(self, passthrough, results_root=None):
        super().__init__("response", passthrough, RESPONSE_TRAIN, results_root)

    def resolve(self, settings, lam_star):
        return settings if settings["lam"] != PENDING else (
            None if lam_star is None else {**settings, "lam": common.Lambda.parse(lam_star)})

    def scores(self):
        """{lambda text: {seed: val_score}} of arm 1's finished runs."""
        out = {}
        for _, st in response_runs(["lambda"]):
            d = self.saved_dir(st)
            if d:
                out.setdefault(str(st["lam"]), {})[st["seed"]] = val_score(runs.read_metrics(d))
        return out


def minutes_of(arm, settings):
    key = (settings["method"], WIDTHS[settings["arch"]], "lambda" if arm == "lambda" else "full")
    return RESPONSE_MINUTES.get(key, RESPONSE_MINUTES[("at", WIDTHS[settings["arch"]], "full")])


def commit_results(folder, message, log):
    """--commit: commit one run's result files (git add + commit of that folder only), serialised between
    the study's processes by a lock file beside the repository's index."""
    git_dir = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], cwd=folder, capture_output=True,
                             text=True).stdout.strip()
    if not git_dir:
        log(f"--commit: {folder} is not in a git repository; not committed")
        return
    with open(os.path.join(git_dir, "study-commit.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["git", "add", "--", folder], cwd=folder, check=True)
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", folder], cwd=folder)
    log(f"committed {folder}" if done.returncode == 0 else f"--commit: git commit of {folder} failed")


def response_study(arms, passthrough, dry_run, log, commit=False, results_root=None, report_only=False):
    """The response study (pre-registered; the design below was fixed before any of its runs).

    Question: is there a lambda at which TRAIN helps at the evidence study's CPU scale, does the lambda-5
    deficit shrink with width, and does L_TP make M''s neighbourhoods closer to M's?
    Scale: the evidence study's cpu scale (M' = M = cnn6, the first 8,000 CIFAR-10 images of the shared copy, 8
      epochs, lr x0.1 at 6 and 7, batch 128, PGD-3 step 0.01, eps 0.031, sum reduction), except that the last
      1,000 of the 8,000 images are a validation split (7,000 train) and the training attacks start as the
      official code does (baselines official). Every run trains M next to M' (--train); lambda 0 is the base
      method with M alongside, which leaves M''s loss unchanged and gives every run the mechanism measures.
    Arm 1, lambda (seeds 1-3): AT + TRAIN with constant lambda in {0.03, 0.1, 0.3, 1}, and lambda 0.
      Rule (select_lambda): lambda* = the positive lambda with the highest mean over seeds 1-3 of val natural +
      val PGD-10 accuracy of last.pt (the last metrics.jsonl row; 1,000 validation images); ties go to the
      smaller lambda. Reported: whether lambda* beats lambda 0 on that score. No test number enters the rule.
    Arm 2, confirmation (seeds 4-6, test set): AT vs AT + TRAIN(lambda*), TRADES vs TRADES + TRAIN(lambda*)
      (beta 6), paired differences per metric. The grid is not extended after seeing test numbers.
    Arm 3, capacity (seeds 4-5): width x1 (cnn6) and x2 (cnn6x2: widths 32/64/128, ~4x the FLOPs, M' = M),
      each AT vs AT + TRAIN(lambda 5) vs AT + TRAIN(lambda*); the width-x1 runs of AT and lambda* are arm 2's.
      Twice the width (not depth) keeps the net's shape, so only capacity changes.
    Mechanism, every run: the gradient share ||d(lambda L_TP)/df'|| / ||dL_robust/df'|| on M''s features (mean
      of the last 4 steps of each epoch, metrics.jsonl grad/...), test L_TP, and the neighbour agreement of M'
      (on x and on its PGD-20 x') with M (on x), k = 10 and 30, on the 1,000 test images.
    Evaluation of last.pt on the first 1,000 test images: arm 1 natural, PGD-20, kNN@30 (support: first 1,000
      training images), test L_TP, neighbour agreement; arms 2-3 add CW-20 and AutoAttack APGD-CE + APGD-DLR.
    Every run is reported; results/response/<run>/ keeps each finished run's config.json, metrics.jsonl and
    eval.json (committed), so tables are rebuilt from them when the run folders are gone.
    """
    rs = ResponseStudy(passthrough, results_root)
    lam_star, why = select_lambda(rs.scores())
    planned = response_runs(arms)
    if dry_run:
        log(f"response study: {len(planned)} runs; lambda*: {lam_star or 'not chosen yet'} ({why})")
        left = 0
        for arm, st in planned:
            actual = rs.resolve(st, lam_star)
            status, minutes = rs.status(actual), minutes_of(arm, st)
            left += minutes if status != "done" else 0
            where = rs.study.dir_of(actual) if actual else "(after arm 1)"
            log(f"[{status}] {arm}: {response_label(actual or st)}, seed {st['seed']}, ~{minutes} core-min -> {where}")
        log(f"remaining: ~{left} core-minutes (~{left / 120:.1f} h on 2 cores, one run per core)")
        return None
    if report_only:
        return response_report(rs, lam_star, log)
    log(f"response study: {len(planned)} runs in {rs.study.root}; lambda*: {lam_star or 'not chosen yet'} ({why})")
    waiting = []
    for arm, st in planned:
        actual = rs.resolve(st, lam_star)
        label = f"{response_label(actual or st)}, seed {st['seed']}"
        if actual is None:
            waiting.append(label)
            continue
        if rs.status(actual) == "done":
            continue
        ecfg = rs.study.eval_config(RESPONSE_METRICS[arm], RESPONSE_EVAL)
        if not rs.run_one(label, actual, [ecfg], commit, log, f"response study: {label}"):
            continue
        if arm == "lambda" and lam_star is None:  # the last run of arm 1 fixes lambda* for the runs after it
            lam_star, why = select_lambda(rs.scores())
            if lam_star:
                log(f"lambda* = {lam_star} ({why})")
    if waiting:
        log(f"{len(waiting)} runs wait for lambda* (arm 1 unfinished): {'; '.join(waiting)}")
    return response_report(rs, lam_star, log)


def response_values(r, rows):
    """The numbers of one run: from its eval.json r (fractions) and its metrics.jsonl rows."""
    v = evidence_values(r)
    nbr = r.get("nbr") or {}
    for q in ("natural", "robust"):
        for k in ("10", "30"):
            v[f"nbr{k}_{q}"] = (nbr.get(q) or {}).get(k)
    last = rows[-1]
    v.update(val_score=val_score(rows), share_first=rows[0].get("grad/share"), share=last.get("grad/share"),
             cos=last.get("grad/cos"), minutes=sum(row["seconds"] for row in rows) / 60)
    return v


def fmt(v, scale=100, digits=2):
    return "-" if v is None else f"{scale * v:.{digits}f}"


def mean_of(values, scale=100):
    return mean_std([None if v is None else scale * v for v in values])


def response_report(rs, lam_star, log):
    """Tables and figure of every finished run (read from results/response/), whatever is still missing."""
    done = []  # (arm, settings, eval.json dict, response_values)
    for arm, st in response_runs():
        actual = rs.resolve(st, lam_star)
        got = rs.finished(actual)  # an unreadable eval.json: one line, not a traceback
        if got:
            done.append((arm, actual, got[0], response_values(*got)))
    figures = {"response.png": lambda path: plot_response(done, path)} if done else {}
    return rs.write_report(response_tables(done, lam_star), figures, log)


def selection_table(done, lam_star):
    """Arm 1: each lambda's selection score per seed, mean ± std, and lambda* against lambda 0."""
    lams = ("0",) + RESPONSE_LAMBDAS
    score = {lam: {st["seed"]: v["val_score"] for arm, st, _, v in done if arm == "lambda" and str(st["lam"]) == lam}
             for lam in lams}
    out = ["## Arm 1 — lambda on the validation split", "",
           "Selection score: val natural + val PGD-10 accuracy of last.pt (%, sum of the two):", "",
           "| lambda | " + " | ".join(f"seed {s}" for s in RESPONSE_SELECT_SEEDS) + " | mean ± std |",
           "| --- " * (2 + len(RESPONSE_SELECT_SEEDS)) + "|"]
    for lam in lams:
        out.append(f"| {lam}{' (lambda*)' if lam == lam_star else ''} | "
                   + " | ".join(fmt(score[lam].get(s)) for s in RESPONSE_SELECT_SEEDS)
                   + f" | {mean_of(score[lam].values())} |")
    if lam_star:
        seeds = sorted(set(score[lam_star]) & set(score["0"]))
        diffs = [score[lam_star][s] - score["0"][s] for s in seeds]
        out += ["", f"lambda* = {lam_star}; lambda* minus lambda 0 on this score: {mean_of(diffs)} points, better on "
                f"{sum(d > 0 for d in diffs)} of {len(diffs)} seeds."]
    return out


def confirmation_table(done, lam_star):
    """Arm 2: the evidence study's tables (means, paired gains, per seed) on seeds 4-6."""
    results, labels = {}, {}
    for arm, st, r, _ in done:
        if st["seed"] in RESPONSE_CONFIRM_SEEDS and WIDTHS[st["arch"]] == 1 and str(st["lam"]) in ("0", lam_star):
            key = f"{st['method']}_{'m' if str(st['lam']) == '0' else 'star'}"
            labels[key] = response_label(st)
            results.setdefault(key, {})[st["seed"]] = r
    order = {k: results[k] for k in ("at_m", "at_star", "trades_m", "trades_star") if k in results}
    return ["## Arm 2 — confirmation on fresh seeds 4-6 (test set)", "",
            evidence_tables(order, labels, [("at_m", "at_star"), ("trades_m", "trades_star")]) if order
            else "no run yet"]


CAPACITY_METRICS = (("natural", "Natural"), ("pgd", "PGD-20"), ("aa", "AA"), ("nbr30_robust", "nbr@30 robust"))


def capacity_table(done, lam_star):
    """Arm 3: per width, AT (+ M) vs lambda 5 vs lambda* on seeds 4-5: means and paired differences to AT."""
    groups = {}
    for _, st, _, v in done:
        if st["method"] == "at" and st["seed"] in RESPONSE_CAPACITY_SEEDS and str(st["lam"]) in ("0", "5", lam_star):
            groups.setdefault((WIDTHS[st["arch"]], str(st["lam"])), {})[st["seed"]] = v
    out = ["## Arm 3 — capacity (AT, seeds 4-5; x2 = cnn6x2)", "",
           "Means over seeds, and the paired difference to AT + M of the same width and seed (points):", "",
           "| width | lambda | seeds | " + " | ".join(n for _, n in CAPACITY_METRICS) + " | "
           + " | ".join(f"Δ {n}" for _, n in CAPACITY_METRICS) + " |",
           "| --- " * (3 + 2 * len(CAPACITY_METRICS)) + "|"]
    for (width, lam), seeds in sorted(groups.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        base = groups.get((width, "0"), {})
        deltas = [mean_of([seeds[s][m] - base[s][m] for s in seeds if s in base
                           if seeds[s][m] is not None and base[s][m] is not None]) if lam != "0" else ""
                  for m, _ in CAPACITY_METRICS]
        out.append(f"| x{width} | {lam}{' (lambda*)' if lam == lam_star else ''} | {len(seeds)} | "
                   + " | ".join(mean_of(v[m] for v in seeds.values()) for m, _ in CAPACITY_METRICS) + " | "
                   + " | ".join(deltas) + " |")
    return out


MECHANISM = (("test_ltp", "test L_TP", 1), ("share_first", "grad share ep. 1", 1), ("share", "grad share ep. 8", 1),
             ("cos", "grad cos ep. 8", 1), ("nbr10_natural", "nbr@10 nat", 100), ("nbr30_natural", "nbr@30 nat", 100),
             ("nbr30_robust", "nbr@30 rob", 100), ("knn_natural", "kNN@30 nat", 100), ("natural", "Natural", 100))


def mechanism_table(done):
    """Per (width, method, lambda), over every seed that ran: L_TP, gradient share, neighbour agreement, kNN."""
    groups = {}
    for _, st, _, v in done:
        groups.setdefault((WIDTHS[st["arch"]], st["method"], float(str(st["lam"]))), []).append(v)
    out = ["## Mechanism (every run with an M; mean ± std over the seeds that ran)", "",
           "grad share = lambda ||dL_TP/df'|| / ||dL_robust/df'|| on M''s features (mean of the epoch's last 4 steps); "
           "nbr@k = neighbour agreement of M' (natural x or PGD-20 x') with M (x), %; chance = k/999.", "",
           "| width | method | lambda | seeds | " + " | ".join(n for _, n, _ in MECHANISM) + " |",
           "| --- " * (4 + len(MECHANISM)) + "|"]
    for (width, method, lam), vals in sorted(groups.items()):
        out.append(f"| x{width} | {method} | {lam:g} | {len(vals)} | "
                   + " | ".join(mean_of((v[m] for v in vals), scale) for m, _, scale in MECHANISM) + " |")
    return out


def every_run_table(done):
    cols = (("val_score", "val score"), ("natural", "Natural"), ("pgd", "PGD-20"), ("cw", "CW-20"), ("aa", "AA"),
            ("knn_natural", "kNN@30 nat"), ("nbr30_natural", "nbr@30 nat"), ("nbr30_robust", "nbr@30 rob"),
            ("std_natural", "M natural"))
    out = ["## Every run", "", "| arm | run | seed | " + " | ".join(n for _, n in cols)
           + " | test L_TP | grad share ep. 8 | train min |", "| --- " * (6 + len(cols)) + "|"]
    for arm, st, _, v in done:
        out.append(f"| {arm} | {response_label(st)} | {st['seed']} | " + " | ".join(fmt(v[m]) for m, _ in cols)
                   + f" | {fmt(v['test_ltp'], 1, 3)} | {fmt(v['share'], 1, 3)} | {v['minutes']:.1f} |")
    return out


def response_tables(done, lam_star):
    """done: [(arm, settings, eval.json dict, response_values)] -> the study's markdown."""
    out = selection_table(done, lam_star)
    if lam_star:
        out += [""] + confirmation_table(done, lam_star)
    out += [""] + capacity_table(done, lam_star) + [""] + mechanism_table(done) + [""] + every_run_table(done)
    return "\n".join(out)


def plot_response(done, path):
    """Natural / PGD-20 accuracy and neighbour agreement (nbr@30 natural) against lambda, AT runs, one line
    per width, mean over the seeds that ran at each point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for width in sorted(set(WIDTHS.values())):
        pts = {}
        for _, st, _, v in done:
            if st["method"] == "at" and WIDTHS[st["arch"]] == width:
                pts.setdefault(float(str(st["lam"])), []).append(v)
        lams = sorted(pts)
        if not lams:
            continue
        def mean(m):  # NaN (a gap) where no run measured it
            return [100 * statistics.mean(got) if got else math.nan
                    for got in ([v[m] for v in pts[lam] if v[m] is not None] for lam in lams)]
        axes[0].plot(lams, mean("natural"), marker="o", label=f"x{width} natural")
        axes[0].plot(lams, mean("pgd"), marker="s", ls="--", label=f"x{width} PGD-20")
        axes[1].plot(lams, mean("nbr30_natural"), marker="o", label=f"x{width} M'(x) vs M(x)")
        axes[1].plot(lams, mean("nbr30_robust"), marker="s", ls="--", label=f"x{width} M'(x') vs M(x)")
    for ax, title in ((axes[0], "test accuracy (%), AT + TRAIN"), (axes[1], "neighbour agreement @30 (%)")):
        ax.set_xscale("symlog", linthresh=0.03)
        ax.set_xlabel("lambda (0 = AT with M alongside)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- the transfer study
# the first 25,000 images (the last 1,000: validation), all 10,000 test images; channels_last: 1.29x faster per step
# for this study's step on the CPU (README: Choosing lambda), recorded in config.json (a PLACE setting)
TRANSFER_TRAIN = {**RESPONSE_TRAIN, "train_n": 25000, "test_n": 0, "channels_last": True}
TRANSFER_EVAL = [{"metrics": ["nat", "pgd", "tp", "nbr"]},  # all 10,000 test images
                 {"metrics": ["nat", "cw", "aa", "knn"], "test_n": 1000}]  # the first 1,000 (a second eval.json row)
TRANSFER_S = "share:0.15"  # S*, fixed from results/response.md (TRADES + TRAIN(0.1): mean share 0.16 / 0.14 / 0.16)
TRANSFER_SEEDS = [7, 8, 9]
TRANSFER_SCALED_SEEDS = [7, 8]
TRANSFER_LRS = (0.1, 0.2, 0.4)  # arm B's lr grid: unchanged, sqrt-scaled (x2), linear-scaled (x4, Goyal et al.)
TRANSFER_LR_SEED = 1
TRANSFER_BIG = 512
TRANSFER_ARMS = ("lr", "scale", "batch")
# Core-minutes of one run (one thread): training + evaluation by batch size (lr runs: no test evaluation). Estimated
# before the runs from the time study of this step (25 / 25 / 17); measured in sitting 1 (2026-12-07, Intel Xeon, two
# one-thread workers): batch-512 lr runs 17 min (~2 min an epoch); batch-128 runs 24-26 min (training 15.7-17.7,
# evaluation ~8.5).
TRANSFER_MINUTES = {(128, "full"): 26, (512, "full"): 26, (512, "val"): 17}


def transfer_settings(lam, seed, batch=128, beta=6.0, lr=None):
    """A run of the transfer study: TRADES (beta 6 unless the trade-off control's 3) with M trained alongside."""
    st = {"method": "trades", "train": True, "lam": lam if lam == PENDING else common.Lambda.parse(lam),
          "seed": seed, "batch_size": batch, "beta": beta}
    if lr is not None:
        st["lr"] = lr
    return st


def transfer_runs(arms=TRANSFER_ARMS):
    """[(arm, settings)] of the pre-registered design in the order the runs are made (arm B's lr first: it fixes
    lr* before any TRAIN run of arm B; then seed by seed, so an unfinished study has whole seeds)."""
    out = []
    if "lr" in arms:
        out += [("lr", transfer_settings("0", TRANSFER_LR_SEED, TRANSFER_BIG, lr=lr)) for lr in TRANSFER_LRS]
    for seed in TRANSFER_SEEDS:
        if "scale" in arms:
            out += [("scale", transfer_settings(lam, seed)) for lam in ("0", "0.1", TRANSFER_S)]
            out.append(("scale", transfer_settings("0", seed, beta=3.0)))
        if "batch" in arms:
            out += [("batch", transfer_settings(lam, seed, TRANSFER_BIG, lr=PENDING))
                    for lam in ("0", "0.1", TRANSFER_S)]
    if "batch" in arms:
        out += [("batch", transfer_settings("0.025", seed, TRANSFER_BIG, lr=PENDING)) for seed in TRANSFER_SCALED_SEEDS]
    return out


def transfer_label(st):
    lam = str(st["lam"])
    name = ("TRADES + M" + (f" (beta {st['beta']:g})" if st["beta"] != 6.0 else "") if lam == "0"
            else f"TRADES + TRAIN ({lam.replace('share:', 'share ')})")
    return name + (f", batch {st['batch_size']}" if st["batch_size"] != 128 else "") + \
        (f", lr {st['lr']:g}" if isinstance(st.get("lr"), float) and st["batch_size"] != 128 else "")


def select_lr(scores):
    """Arm B's rule: lr* = the lr of TRANSFER_LRS whose seed-1 TRADES + M run at batch 512 has the highest val
    natural + val PGD-10 accuracy of last.pt (val_score); a tie goes to the smaller lr. -> (lr*, why) or (None, why)."""
    missing = [lr for lr in TRANSFER_LRS if lr not in scores]
    if missing:
        return None, f"arm B's lr runs are not finished ({len(missing)} missing)"
    best = max(TRANSFER_LRS, key=lambda lr: (scores[lr], -lr))
    return best, (f"highest val natural + val PGD-10 at batch {TRANSFER_BIG}, seed {TRANSFER_LR_SEED}: "
                  f"{100 * scores[best]:.2f}")


class TransferStudy(Preregistered):
    """The transfer study's runs; lr* (arm B's learning rate, a placeholder until the lr runs are done)."""

    def __init__(self, passthrough, results_root=None):
        super().__init__("transfer", passthrough, TRANSFER_TRAIN, results_root)

    def resolve(self, settings, lr_star):
        return settings if settings.get("lr") != PENDING else (
            None if lr_star is None else {**settings, "lr": lr_star})

    def scores(self):
        """{lr: val_score} of the finished lr runs."""
        out = {}
        for _, st in transfer_runs(["lr"]):
            d = self.saved_dir(st, evaluated=False)
            if d:
                out[st["lr"]] = val_score(runs.read_metrics(d))
        return out

    def eval_configs(self):
        return [self.study.eval_config(e["metrics"], {**RESPONSE_EVAL, **{k: v for k, v in e.items()
                                                                          if k != "metrics"}}) for e in TRANSFER_EVAL]


def transfer_minutes(arm, settings):
    return TRANSFER_MINUTES[(settings["batch_size"], "val" if arm == "lr" else "full")]


def transfer_study(arms, passthrough, dry_run, log, commit=False, results_root=None, report_only=False):
    """The transfer study (pre-registered; this design was fixed and committed before any of its runs).

    Questions: (1) does TRAIN beat TRADES's own natural/robust trade-off, or only move along it (as a smaller
    beta would)? (2) does one gradient share S (--lam share:S) carry TRAIN's effect across batch sizes where a
    constant lambda does not (the multi-GPU case: L_TP over the global batch), and does scaling lambda by the
    batch do as well?
    Scale: TRADES (beta 6, baselines official), M' = M = cnn6, PGD-3 step 0.01 eps 0.031, sum reduction, the first
      25,000 CIFAR-10 training images of the shared copy, of which the last 1,000 are the validation split
      (24,000 train); 8 epochs, lr 0.1 x0.1 at epochs 6 and 7; every run trains M (lambda 0 = TRADES + M);
      fresh seeds 7, 8, 9; last.pt is evaluated. S* = 0.15, fixed from results/response.md.
    Arm S (scale, batch 128): TRADES + M vs TRADES + TRAIN(lambda 0.1) vs TRADES + TRAIN(share 0.15), seeds 7-9, and
      the trade-off control TRADES + M at beta 3, seeds 7-9. TRAIN beats the trade-off when its (natural, PGD-20) and
      (natural, AA) points lie above the straight line through beta 6 and beta 3 of the same seed (per seed, and
      on the means).
    Arm B (batch 512 in one process: the math of 4 GPUs x 128 under --ddp --tp-scope global): the same three,
      seeds 7-9, and TRADES + TRAIN(lambda 0.025 = 0.1 x 128/512, lambda scaled by the batch), seeds 7-8. Its lr
      (no warm-up) is chosen before any of its TRAIN runs by select_lr from TRADES + M runs at lr 0.1 / 0.2 / 0.4,
      seed 1 (no study seed), on the validation split only (arm "lr"; never evaluated on the test set).
      Prediction, stated before the runs: at batch 512 a constant lambda 0.1 runs at ~4x the share (~0.45, near
      where lambda 1 hurt) and loses part of the gain; share 0.15 keeps it.
    Evaluation of last.pt: natural, PGD-20, test L_TP and neighbour agreement (k 10, 30) on all 10,000 test images;
      natural, CW-20, AutoAttack (APGD-CE + APGD-DLR) and kNN@30 (support: the first 1,000 training images) on the
      first 1,000 (a second row of eval.json).
    Speed: --channels-last (1.29x faster per step than the plain layout for this step on the CPU, one thread,
      interleaved, 3 rounds; --compile 1.12x, both 1.12x), recorded in each config.json.
    Budget (TRANSFER_MINUTES; --dry-run sums it): ~10.4 core-hours estimated, under the ~12 allowed, so every run
      above is in the design. Should the first runs' measured times put the whole over ~12 core-hours, the
      batch-scaled runs (the last in order) are dropped first, then seed 9 of arm S; never an arm or the
      trade-off control; results/transfer.md says which.
    Every run is reported; results/transfer/<run>/ keeps each finished run's config.json, metrics.jsonl and (test
    runs) eval.json, committed.
    """
    ts = TransferStudy(passthrough, results_root)
    lr_star, why = select_lr(ts.scores())
    planned = transfer_runs(arms)
    if dry_run:
        log(f"transfer study: {len(planned)} runs; lr* at batch {TRANSFER_BIG}: {lr_star or 'not chosen yet'} ({why})")
        left = total = 0
        for arm, st in planned:
            actual = ts.resolve(st, lr_star)
            status, minutes = ts.status(actual, evaluated=arm != "lr"), transfer_minutes(arm, st)
            total += minutes
            left += minutes if status != "done" else 0
            where = ts.study.dir_of(actual) if actual else "(after arm B's lr runs)"
            log(f"[{status}] {arm}: {transfer_label(actual or st)}, seed {st['seed']}, ~{minutes} core-min -> {where}")
        log(f"design: ~{total} core-minutes ({total / 60:.1f} core-hours); "
            f"remaining: ~{left} core-minutes (~{left / 120:.1f} h on 2 cores, one run per core)")
        return None
    if report_only:
        return transfer_report(ts, lr_star, log)
    log(f"transfer study: {len(planned)} runs in {ts.study.root}; lr*: {lr_star or 'not chosen yet'} ({why})")
    for arm, st in planned:
        actual = ts.resolve(st, lr_star)
        label = f"{transfer_label(actual or st)}, seed {st['seed']}"
        if actual is None:
            log(f"{label}: waits for arm B's lr runs (another process holds one of them)")
            continue
        if ts.status(actual, evaluated=arm != "lr") == "done":
            continue
        if not ts.run_one(label, actual, ts.eval_configs() if arm != "lr" else [], commit, log,
                          f"transfer study: {label}"):
            continue
        if arm == "lr" and lr_star is None:
            lr_star, why = select_lr(ts.scores())
            if lr_star:
                log(f"lr* = {lr_star:g} ({why})")
    return transfer_report(ts, lr_star, log)


def transfer_values(ev, rows):
    """The numbers of one run: the 10,000-image row (natural, PGD-20, test L_TP, nbr) and the 1,000-image row (CW-20,
    AA, kNN@30; natural on those images for the (natural, AA) line) of its eval.json, and its metrics.jsonl."""
    by_n = {r.get("n_test"): r for r, _ in runs.eval_rows(ev)} if ev else {}
    full, first = by_n.get(max(by_n, default=None), {}), by_n.get(TRANSFER_EVAL[1]["test_n"], {})
    nbr = full.get("nbr") or {}
    v = {"natural": full.get("natural"), "pgd": full.get("pgd"), "test_ltp": full.get("test_ltp"),
         "std_natural": full.get("std_natural"), "natural_1k": first.get("natural"), "cw": first.get("cw"),
         "aa": first.get("aa"), "knn_natural": ((first.get("knn") or {}).get("natural") or {}).get("30"),
         "nbr30_natural": (nbr.get("natural") or {}).get("30"), "nbr30_robust": (nbr.get("robust") or {}).get("30")}
    v.update(val_score=val_score(rows), share=[r.get("grad/share") for r in rows], lam=[r.get("lambda") for r in rows],
             minutes=sum(r["seconds"] for r in rows) / 60)
    v["share_mean"] = statistics.mean(s for s in v["share"]) if all(s is not None for s in v["share"]) else None
    return v


TRANSFER_METRICS = (("natural", "Natural"), ("pgd", "PGD-20"), ("cw", "CW-20 (1k)"), ("aa", "AA (1k)"),
                    ("knn_natural", "kNN@30 nat (1k)"), ("nbr30_natural", "nbr@30 nat"), ("nbr30_robust", "nbr@30 rob"),
                    ("test_ltp", "test L_TP"), ("std_natural", "M natural"))


def config_key(st):
    return (st["batch_size"], str(st["lam"]), st["beta"])


def lr_table(done, lr_star):
    out = [f"## Arm B's learning rate (batch {TRANSFER_BIG}, TRADES + M, seed {TRANSFER_LR_SEED}, validation split "
           "only)",
           "", "| lr | val natural | val PGD-10 | score (sum) |", "| --- | --- | --- | --- |"]
    for arm, st, _, v, rows in done:
        if arm == "lr":
            last = rows[-1]
            pgd = next(k for k in last if k.startswith("val_pgd"))
            out.append(f"| {st['lr']:g}{' (lr*)' if st['lr'] == lr_star else ''} | {fmt(last['val_nat_acc'])} | "
                       f"{fmt(last[pgd])} | {fmt(v['val_score'])} |")
    out += ["", f"lr* = {lr_star:g}" if lr_star else "lr*: not chosen yet"]
    return out


def arm_table(done, arm):
    """Means over seeds per configuration, and the paired differences to TRADES + M (beta 6) of the same seed."""
    groups = {}
    for a, st, _, v, _ in done:
        if a == arm:
            groups.setdefault(config_key(st), {})[st["seed"]] = (st, v)
    batch = TRANSFER_BIG if arm == "batch" else 128  # transfer_settings' default batch (arm S)
    base = groups.get((batch, "0", 6.0), {})
    title = f"## Arm {'S' if arm == 'scale' else 'B'} — batch {batch}"
    out = [title, "", "Means ± std over seeds (%; test L_TP as is); natural, PGD-20, nbr and L_TP on all 10,000 test "
           "images, CW-20 / AA / kNN on the first 1,000.", "",
           "| configuration | seeds | " + " | ".join(n for _, n in TRANSFER_METRICS) + " |",
           "| --- " * (2 + len(TRANSFER_METRICS)) + "|"]
    order = sorted(groups, key=lambda k: (k[1] != "0", -k[2], k[1]))
    for key in order:
        seeds = groups[key]
        st = next(iter(seeds.values()))[0]
        out.append(f"| {transfer_label(st)} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(
            mean_of([v[m] for _, v in seeds.values()], 1 if m == "test_ltp" else 100)
            for m, _ in TRANSFER_METRICS) + " |")
    out += ["", "Paired differences to TRADES + M (beta 6) of the same seed (points): mean ± std, better / seeds:", "",
            "| configuration | " + " | ".join(f"Δ {n}" for _, n in TRANSFER_METRICS[:7]) + " |",
            "| --- " * 8 + "|"]
    for key in order:
        if key == (batch, "0", 6.0):
            continue
        seeds = groups[key]
        st = next(iter(seeds.values()))[0]
        cells = []
        for m, _ in TRANSFER_METRICS[:7]:
            d = [100 * (v[m] - base[s][1][m]) for s, (_, v) in seeds.items()
                 if s in base and v[m] is not None and base[s][1][m] is not None]
            cells.append(f"{mean_std(d)} ({sum(x > 0 for x in d)}/{len(d)})" if d else "-")
        out.append(f"| {transfer_label(st)} | " + " | ".join(cells) + " |")
    return out


def above_line(p, b6, b3, rob):
    """How far (points) the point p lies above the straight line through b6 and b3 in (natural, rob) coordinates:
    robust accuracy of p minus the line's robust accuracy at p's natural accuracy. None when not measured."""
    nat = "natural_1k" if rob == "aa" else "natural"
    vals = [q.get(k) for q in (p, b6, b3) for k in (nat, rob)]
    if any(x is None for x in vals) or b6[nat] == b3[nat]:
        return None
    slope = (b3[rob] - b6[rob]) / (b3[nat] - b6[nat])
    return 100 * (p[rob] - (b6[rob] + slope * (p[nat] - b6[nat])))


def tradeoff_table(done):
    """Arm S: does TRAIN's point lie above TRADES's own trade-off line (beta 6 -> beta 3) of the same seed?"""
    by = {}
    for a, st, _, v, _ in done:
        if a == "scale":
            by.setdefault(st["seed"], {})[(str(st["lam"]), st["beta"])] = v
    out = ["## Arm S — TRAIN against TRADES's own trade-off line", "",
           "Points above the straight line through TRADES + M at beta 6 and at beta 3 (same seed) in (natural, robust) "
           "coordinates: robust accuracy minus the line's at the same natural accuracy (points; > 0: above = TRAIN "
           "beats the trade-off, <= 0: it moves along it or below). The AA line uses natural accuracy on AA's 1,000 "
           "images. Means: the line through the mean points.", "",
           "| configuration | seed | natural gain over beta 6 | above the PGD-20 line | above the AA line |",
           "| --- | --- | --- | --- | --- |"]
    for lam in ("0.1", TRANSFER_S):
        rows, means = [], {}
        for seed in sorted(by):
            pts = by[seed]
            if not {(lam, 6.0), ("0", 6.0), ("0", 3.0)} <= set(pts):
                continue
            p, b6, b3 = pts[(lam, 6.0)], pts[("0", 6.0)], pts[("0", 3.0)]
            for name, q in (("p", p), ("b6", b6), ("b3", b3)):
                means.setdefault(name, []).append(q)
            line = [above_line(p, b6, b3, r) for r in ("pgd", "aa")]
            rows.append(f"| TRADES + TRAIN ({lam.replace('share:', 'share ')}) | {seed} | "
                        f"{fmt(p['natural'] - b6['natural'])} | "
                        + " | ".join("-" if x is None else f"{x:+.2f}" for x in line) + " |")
        if means:
            mean_pt = {name: {k: (statistics.mean(q[k] for q in qs) if all(q.get(k) is not None for q in qs) else None)
                              for k in ("natural", "natural_1k", "pgd", "aa")} for name, qs in means.items()}
            line = [above_line(mean_pt["p"], mean_pt["b6"], mean_pt["b3"], r) for r in ("pgd", "aa")]
            rows.append(f"| TRADES + TRAIN ({lam.replace('share:', 'share ')}) | mean | "
                        f"{fmt(mean_pt['p']['natural'] - mean_pt['b6']['natural'])} | "
                        + " | ".join("-" if x is None else f"{x:+.2f}" for x in line) + " |")
        out += rows
    return out


def transfer_table(done):
    """Does the effect carry across batch sizes: TRAIN minus TRADES + M, per configuration, at 128 and at 512."""
    gains = {}
    for a, st, _, v, _ in done:
        if a in ("scale", "batch"):
            gains.setdefault(config_key(st), {})[st["seed"]] = v
    out = ["## Transfer across batch sizes — TRAIN minus TRADES + M (same seed and batch), points", "",
           "| configuration | batch | seeds | Δ Natural | Δ PGD-20 | Δ AA (1k) | mean grad share | mean lambda |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(gains, key=lambda k: (k[1], k[0])):
        batch, lam, beta = key
        if lam == "0":
            continue
        base = gains.get((batch, "0", 6.0), {})
        seeds = gains[key]
        cells = []
        for m in ("natural", "pgd", "aa"):
            d = [100 * (v[m] - base[s][m]) for s, v in seeds.items() if s in base and v[m] is not None
                 and base[s][m] is not None]
            cells.append(f"{mean_std(d)} ({sum(x > 0 for x in d)}/{len(d)})" if d else "-")
        share = mean_std([v["share_mean"] for v in seeds.values()], 3) if seeds else "-"
        lam_mean = mean_std([statistics.mean(v["lam"]) for v in seeds.values()], 3)  # 0.025 is not 0.03
        out.append(f"| {lam} | {batch} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(cells)
                   + f" | {share} | {lam_mean} |")
    return out


def transfer_every_run(done):
    out = ["## Every run", "", "| arm | run | seed | val score | " + " | ".join(n for _, n in TRANSFER_METRICS)
           + " | grad share per epoch | lambda per epoch | train min |", "| --- " * (7 + len(TRANSFER_METRICS)) + "|"]
    for a, st, _, v, _ in done:
        per_epoch = lambda xs: " ".join("-" if x is None else f"{x:.3g}" for x in xs)
        out.append(f"| {a} | {transfer_label(st)} | {st['seed']} | {fmt(v['val_score'])} | "
                   + " | ".join(fmt(v[m], 1, 3) if m == "test_ltp" else fmt(v[m]) for m, _ in TRANSFER_METRICS)
                   + f" | {per_epoch(v['share'])} | {per_epoch(v['lam'])} | {v['minutes']:.1f} |")
    return out


def plot_transfer(done, path):
    """The measured gradient share and lambda(t) per epoch of every TRAIN run (one line each)."""
    plt = runs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"0.1": "-", TRANSFER_S: "--", "0.025": ":"}
    colours = {128: "tab:blue", TRANSFER_BIG: "tab:red"}
    seen = set()
    for a, st, _, v, _ in done:
        lam = str(st["lam"])
        if a == "lr" or lam == "0":
            continue
        epochs = list(range(1, len(v["share"]) + 1))
        label = f"{lam}, batch {st['batch_size']}"
        kw = dict(ls=styles.get(lam, "-."), color=colours.get(st["batch_size"], "k"), alpha=0.8,
                  label=None if label in seen else label)
        seen.add(label)
        axes[0].plot(epochs, v["share"], **kw)
        axes[1].plot(epochs, v["lam"], **kw)
    for ax, title, ylabel in ((axes[0], "measured gradient share (grad/share)",
                               "lambda ||dL_TP/df'|| / ||dL_rob/df'||"),
                              (axes[1], "lambda(t) (epoch mean)", "lambda")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].axhline(float(TRANSFER_S.split(":")[1]), color="grey", lw=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transfer_report(ts, lr_star, log):
    """Tables and figure of every finished run (read from results/transfer/), whatever is still missing."""
    done = []  # (arm, settings, eval.json dict or None, transfer_values, metrics rows)
    for arm, st in transfer_runs():
        actual = ts.resolve(st, lr_star)
        got = ts.finished(actual, evaluated=arm != "lr")
        if got:
            ev, rows = got
            done.append((arm, actual, ev, transfer_values(ev, rows), rows))
    text = [f"Transfer study: {len(done)} of {len(transfer_runs())} runs finished.", ""] + lr_table(done, lr_star)
    text += [""] + arm_table(done, "scale") + [""] + tradeoff_table(done)
    text += [""] + arm_table(done, "batch") + [""] + transfer_table(done) + [""] + transfer_every_run(done)
    figures = {"transfer.png": lambda path: plot_transfer(done, path)} if any(a != "lr" for a, *_ in done) else {}
    return ts.write_report("\n".join(text), figures, log)


# ------------------------------------------------------------------------------------- the time study
def time_study(quick, passthrough, steps, warmup, log, configs="methods"):
    """Median seconds per training step (after warm-up) of each configuration, extrapolated to an epoch
    of 50,000 images; TRAIN's overhead relative to its base method. Under torchrun with --ddp: the step
    of G processes on the global batch (rank 0 times and reports; the gradient all-reduce keeps the
    ranks in step)."""
    study = Study(passthrough, quick)
    cfg = study.base
    data_flags = [f"--{k.replace('_', '-')}" for k in ("dataset", "data_file", "data_dir", "train_n", "val_n", "test_n")
                  if k in study.given]
    if data_flags:  # the step is timed on random tensors; data flags change nothing (and are not checked)
        log(f"time study: {', '.join(data_flags)} not used: it times training steps on random 32x32 images of "
            "100 classes (Table XI's CIFAR-100 shape)")
    if distributed.setting_problem(cfg):
        raise common.UserError(distributed.setting_problem(cfg))
    with distributed.process_group(cfg):
        return time_steps(cfg, steps, warmup, log if distributed.is_main() else distributed.quiet,
                          TIME_CONFIGS[configs])


def time_steps(cfg, steps, warmup, log, configs=TIME_CONFIGS["methods"]):
    device = torch.device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    if cfg.ddp:
        name += f" x {distributed.world_size()} processes (DDP, {torch.distributed.get_backend()})"
    torch.manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (cfg.batch_size,), device=device)
    per_epoch = math.ceil(50_000 / cfg.batch_size)
    built = {}  # label -> (config, models, optimizers); all built first so steps can be interleaved
    for label, settings, _ in configs:
        c = dataclasses.replace(cfg, **settings)
        models = common.accelerate(common.build_models(c, 100, device), c)  # --fast / --amp / ... as in training
        distributed.wrap(models, c)
        built[label] = (c, models, common.build_optimizers(models, c))
    x, y = distributed.shard(x), distributed.shard(y)  # --ddp: this process's part of the global batch
    inputs = {label: x.contiguous(memory_format=torch.channels_last) if c.channels_last else x
              for label, (c, _, _) in built.items()}
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    # Round-robin: one step of every configuration per round, so a slow spell of a shared machine
    # slows all configurations alike instead of biasing whichever one ran during it.
    times = {label: [] for label in built}
    for i in range(warmup + steps):
        for label, (c, models, opts) in built.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            common.train_step(models, opts, inputs[label], y, c, epoch=1, scaler=scaler)
            distributed.sync_buffers(models, c)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    results = {label: statistics.median(t) for label, t in times.items()}
    for label, sec in results.items():
        log(f"{label}: {sec:.3f} s/step")
    std, std_lbgat = (common.std_arch_of(dataclasses.replace(cfg, lbgat=v)) for v in (False, True))
    lines = [f"Training time on {name}: M' = {cfg.arch}, M = {std}"
             + (f" ({std_lbgat} with LBGAT)" if std_lbgat != std else "")
             + f", batch {cfg.batch_size}, PGD-{cfg.steps}, amp {cfg.amp}, channels_last {cfg.channels_last}, "
             f"compile {cfg.compile}; median of {steps} steps after {warmup} warm-up, configurations interleaved; "
             f"epoch = {per_epoch} steps",
             "", "| configuration | s / step | images / s | s / epoch (extrapolated) | time vs | change |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, _, ref in configs:
        over = "" if ref is None else f"{100 * (results[label] / results[ref] - 1):+.1f}%"
        lines.append(f"| {label} | {results[label]:.3f} | {cfg.batch_size / results[label]:.0f} | "
                     f"{results[label] * per_epoch:.0f} | {ref or ''} | {over} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- command line
def study_list():
    lines = [f"  {name:<15} {((fn.__doc__ or '').strip().splitlines() or [''])[0]}" for name, fn in STUDIES.items()]
    lines.append(f"  {'time':<15} Table XI: seconds per step / epoch of AT, TRADES +- LBGAT / TRAIN on this device")
    lines.append(f"  {'evidence':<15} AT / TRADES +- TRAIN over 3 seeds: mean ± std, paired gains, "
                 "curves (--scale cpu|gpu)")
    lines.append(f"  {'response':<15} pre-registered: lambda on a validation split, confirmation on fresh seeds, "
                 "capacity, mechanism (--arms)")
    lines.append(f"  {'transfer':<15} pre-registered: TRAIN vs TRADES's trade-off line; one --lam share:S across batch "
                 "sizes (--transfer-arms)")
    return "\n".join(lines)


def stop_after(minutes):
    """--max-minutes: ask the running run to save its checkpoint and stop (as SIGTERM does) after this
    long, so a long study fits time-limited jobs; rerunning the study resumes it."""
    if minutes:
        timer = threading.Timer(60 * minutes, lambda: setattr(common.StopFlag, "requested", True))
        timer.daemon = True
        timer.start()


def import_script(path, log=print):
    """--extend: run an experiment script's module code (its registrations), not its __main__ block. A script that
    does not import (a syntax error, an exception at import) is bad input: one line naming the file, the line and
    the error. Its DEFAULTS are not the study's settings: the study keeps its own design, and the line printed here
    names the script's settings that differ, as flags to pass if they are wanted."""
    import importlib.util
    import traceback
    if not os.path.isfile(path):
        raise common.UserError(f"--extend {path}: no such file")
    registries = {"method": common.BASE_METHODS, "model": common.MODELS, "relation loss": common.RELATION_LOSSES}
    before = {kind: set(reg) for kind, reg in registries.items()}
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise common.UserError(f"--extend {path}: line {e.lineno}: SyntaxError: {e.msg}")
    except Exception as e:
        here = os.path.abspath(path)
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == here]
        where = f"line {lines[-1]}: " if lines else ""
        raise common.UserError(f"--extend {path}: {where}{type(e).__name__} at import: {e}")
    added = [f"{kind} {name}" for kind, reg in registries.items() for name in sorted(set(reg) - before[kind])]
    own = [f"--{k.replace('_', '-')} {runs.shown(v)}" for k, v in getattr(module, "DEFAULTS", {}).items()
           if DEFAULTS.get(k) != v and k != "method"]
    log(f"--extend {path}: registered {', '.join(added) or 'nothing new'}; the study keeps its own settings"
        + (f" (the script's DEFAULTS differ: {' '.join(own)}; give those flags to use them)" if own else ""))


def build_parser():
    """The study script's own flags; every other flag goes to the study's runs (runs.Parser: no abbreviations, so
    a run flag that begins like one of these, --steps, is passed on, not taken)."""
    import argparse
    p = runs.Parser(description=__doc__.splitlines()[0], epilog="studies:\n" + study_list() + "\n\nUnknown flags "
                      "(e.g. --data-file X.npz --device cpu --lr 0.05) are passed to every run of the study.",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True,
                   choices=sorted(list(STUDIES) + ["time", "evidence", "response", "transfer"]),
                   help="which study")
    p.add_argument("--quick", action="store_true", help="smoke scale: cnn_small, data subset, 2 epochs (default: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs the study would make, run nothing (default: off)")
    p.add_argument("--steps-only", type=int, default=None, help="time study: timed steps (default: 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="time study: warm-up steps (default: 3, quick 1)")
    p.add_argument("--time-configs", choices=sorted(TIME_CONFIGS), default="methods",
                   help="time study: methods (Table XI and the share lambda) or fast-paths (the configuration the run "
                   "flags give, plain / --channels-last / --compile) (default: methods)")
    p.add_argument("--scale", choices=sorted(EVIDENCE_SCALES), default="cpu",
                   help="evidence study scale (default: cpu)")
    p.add_argument("--configs", type=runs.name_list([k for k, _, _ in EVIDENCE_CONFIGS]), default=None,
                   help="evidence study: only these configurations, e.g. at,trades_train (default: all)")
    p.add_argument("--seeds", type=runs.int_list, default=EVIDENCE_SEEDS, help="evidence study seeds (default: 1,2,3)")
    p.add_argument("--max-minutes", type=float, default=0, help="save and stop the running run after this long; "
                   "rerun to continue (default: 0 = no limit)")
    p.add_argument("--arms", type=runs.name_list(RESPONSE_ARMS), default=list(RESPONSE_ARMS),
                   help="response study: only these arms, e.g. lambda or confirm,capacity (default: all)")
    p.add_argument("--transfer-arms", type=runs.name_list(TRANSFER_ARMS), default=list(TRANSFER_ARMS),
                   help="transfer study: only these arms, e.g. lr or scale,batch (default: all)")
    p.add_argument("--report", action="store_true", help="response / transfer study: write its tables and figure "
                   "from the finished runs, run nothing (default: off)")
    p.add_argument("--commit", action="store_true", help="response / transfer study: git-commit each finished "
                   "run's results/<study>/<run>/ files as it finishes (default: off)")
    p.add_argument("--extend", action="append", default=[], metavar="SCRIPT.py",
                   help="import an experiment script first, so the methods, relation losses and models it registers "
                   "can be named in the study's flags (e.g. --extend exp_example_method.py --method at_ls); the "
                   "study keeps its own settings, not the script's DEFAULTS (it prints those that differ, as flags)")
    return p


def main(argv=None):
    args, passthrough = build_parser().parse_known_args(argv)
    for script in args.extend:
        import_script(script)
    log = print
    stop_after(args.max_minutes)
    if args.study == "response":
        return response_study(args.arms, passthrough, args.dry_run, log, args.commit, report_only=args.report)
    if args.study == "transfer":
        return transfer_study(args.transfer_arms, passthrough, args.dry_run, log, args.commit, report_only=args.report)
    if args.study == "evidence":
        return evidence_study(args.scale, args.configs, args.seeds, passthrough, args.dry_run, log)
    if args.study == "time":
        steps = args.steps_only or (3 if args.quick else 10)
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
        if args.dry_run:
            log(f"time study: {len(TIME_CONFIGS[args.time_configs])} configurations x ({warmup} warm-up + {steps} "
                "timed) steps")
            return None
        table = time_study(args.quick, passthrough, steps, warmup, log, args.time_configs)
        if distributed.is_main():  # --ddp under torchrun: rank 0 reports
            log(table)
        return table
    return ablation_study(args.study, args.quick, passthrough, args.dry_run, log)


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except (StudyFailed, common.SanityError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except common.Interrupted as e:
        sys.stderr.write(f"{e}; rerun the study to continue\n")
        sys.exit(e.code)
