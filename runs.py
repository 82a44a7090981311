"""The harness around common.py: settings (Config, EvalConfig, Actions and their parsing), the command line
shared by every experiment script, run folders (lock, config.json, resume, export), evaluation files
(eval.json merging, results.md), tables and learning curves.

Imports go one way: runs.py uses common.py, never the reverse (common.main imports this module when a
script starts). A parser is built from the registries of common.py when a script runs, so a method,
relation loss or model registered by an experiment script is a valid --method / --relation / --arch.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import signal
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import MISSING, dataclass, field, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import distributed
from common import (AMP_DTYPES, BASE_METHODS, Diverged, EVAL_METRICS, FolderInUse, Interrupted, Lambda, MODELS, Models,
                    Normalized, RELATION_LOSSES, SanityError, TORCHVISION_SETS, UserError, bare_state_dict,
                    build_model, build_models, check_known_checkpoint, checkpoint_kind, evaluate_models, fit_weights,
                    hold_out_validation, load_checkpoint, load_data, on_stop_signals, save_atomic, std_arch_of,
                    train)
from kernels import triton_available


# =====================================================================================
# 1. settings
#    Config (a training run), EvalConfig (--eval) and Actions are dataclasses whose fields carry their
#    CLI help, default and kind: the one source of the parser, run names, resume checks and config.json.
# =====================================================================================
def parse_number(text):
    """'0.031' or '8/255' -> float."""
    try:
        if "/" in str(text):
            num, den = str(text).split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number like 0.031 or 8/255, got {text!r}")


def lam_arg(text):
    try:
        return Lambda.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def count_arg(text):
    """--train-n / --test-n N: N >= 1 images (0, the default, means all: leave the flag out for that)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of images, got {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n} (leave the flag out to use all images)")
    return n


def float_list(text):
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def int_list(text):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def name_list(allowed):
    def parse(text):
        names = [v.strip() for v in str(text).split(",") if v.strip()]
        bad = [v for v in names if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return names
    return parse


RUN, PLACE, CLI = "run", "place", "cli"


def setting(default, help, kind=RUN, in_name=True, **cli):
    """A settings field: its default, its --help text, its kind and its argparse options (type, choices...).
    kind RUN: defines what is trained (in the run name when not default, unless in_name=False; must match
    on --resume and when a study reuses a folder). PLACE: where it runs or reads from (may change on
    --resume). CLI: an action of the command line, never saved."""
    meta = {"help": help, "kind": kind, "in_name": in_name, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    """Every setting of a training run. One field = one flag (--name-with-dashes); exp_*.py scripts
    change the defaults (their DEFAULTS dict), --quick and --schedule fill in presets."""
    dataset: str = setting(
        None,
        "cifar10/cifar100 (torchvision, downloaded to --data-dir) or tinyimagenet "
        "(--data-dir/tiny-imagenet-200); also the data of --eval of a bare state_dict",
        in_name=False,
        choices=sorted(TORCHVISION_SETS) + ["tinyimagenet"],
    )
    image_size: int = setting(0, "resize images to this size first (0 = keep; Tiny ImageNet: 32)", type=int)
    data_dir: str = setting("./data", "where torchvision data sets / tiny-imagenet-200 live", PLACE)
    data_file: str = setting(
        "", "an .npz with x_train, y_train, x_test, y_test (uint8 NHWC) instead of torchvision", PLACE
    )
    train_n: int = setting(0, "use the first N >= 1 training images", type=count_arg)
    val_n: int = setting(1000, "hold the last N training images (after --train-n) out as the validation split that "
                         "picks best.pt (0 = none: best.pt is then picked on monitored test images; evaluate last.pt)",
                         type=int)
    test_n: int = setting(0, "use the first N >= 1 test images", type=count_arg)
    method: str = setting(
        "trades", "base method (standard = natural training)", in_name=False, choices=lambda: sorted(BASE_METHODS)
    )
    baselines: str = setting("official", "training attack starts and TRADES + LBGAT's loss: official (as the authors' "
                             "code, README) or release1 (this project's first release; runs saved before this setting "
                             "existed load as release1)", choices=["official", "release1"])
    train: bool = setting(False, "add TRAIN's topology-preserving loss lambda * L_TP")
    lbgat: bool = setting(False, "add LBGAT's logit guidance gamma * MSE(M'(x'), M(x)); with --method trades: "
                          "LBGAT's loss (no CE on M'), see README")
    lbgat0: bool = setting(False, "with --method at --lbgat: LBGAT's released LBGAT0 (lbgat.py with beta 0: TRADES' KL "
                           "attack, no CE on M') instead of the paper's Eq. 15")
    lam: Lambda = setting(
        Lambda.parse("5"), "lambda: a number (5) or <c>a (20a) = c * a(t), a(t) = 2/(1+exp(-10t/T)) - 1; or share:S "
        "(share:Sa): lambda(t) adapts so that the gradient share lambda ||dL_TP/df'|| / ||dL_robust/df'|| stays at S "
        "(S a(t)), the same in every batch size and setting (README: Choosing lambda)", type=lam_arg
    )
    relation: str = setting("tp", "relation loss used by --train (tp = L_TP)", choices=lambda: sorted(RELATION_LOSSES))
    tp_input: str = setting(
        "adv", "features of M' in L_TP: M'(x') (adv, the paper) or M'(x) (nat)", choices=["adv", "nat"]
    )
    tp_reduction: str = setting("sum", "L_TP reduction (sum = Eq. 14; mean divides by the batch size)",
                                choices=["sum", "mean"])
    tp_impl: str = setting("auto", "L_TP implementation: torch reference, triton kernel, or auto",
                           choices=["auto", "torch", "triton"])
    crd_temp: float = setting(0.1, "temperature of --relation crd", type=float)
    mca_temp: float = setting(0.1, "temperature of --relation mca", type=float)
    std_ckpt: str = setting("", "load M from a finished run's checkpoint (e.g. a --method standard run) or a bare "
                            "state_dict of --std-arch (e.g. a public standard model)")
    freeze_std: bool = setting(False, "keep M fixed (TRAIN* of Table X): no optimiser, eval mode")
    awp: bool = setting(False, "add adversarial weight perturbation (Wu et al. 2020) to M'")
    awp_gamma: float = setting(None, "AWP size (unset: 0.005 for trades, 0.01 otherwise)", type=float)
    awp_warmup: int = setting(0, "AWP starts after this many epochs", type=int)
    beta: float = setting(6.0, "TRADES / MART beta", type=float)
    gamma: float = setting(1.0, "LBGAT guidance weight", type=float)
    alp_weight: float = setting(0.5, "ALP logit-pairing weight", type=float)
    arch: str = setting("wrn34_10", "adversarial model M' (with --eval of a bare state_dict: its architecture)",
                        choices=lambda: sorted(MODELS))
    std_arch: str = setting(None, "standard model M (unset: resnet18; with --lbgat LBGAT's teacher resnet18_lbgat)",
                            choices=lambda: sorted(MODELS))
    eps: float = setting(None, "L-inf radius, 0.031 or 8/255 (unset: from --schedule: paper 0.031, las 8/255); "
                         "with --eval: unset = the run's own", type=parse_number)
    step_size: float = setting(0.007, "training attack step", type=parse_number)
    steps: int = setting(10, "training attack steps", type=int)
    eval_steps: int = setting(20, "PGD steps of the per-epoch monitoring and of --eval", type=int)
    eval_step_size: float = setting(0.003, "PGD step of the monitoring and of --eval", type=parse_number)
    eval_n: int = setting(1000, "test images monitored each epoch", type=int)
    schedule: str = setting("paper", "paper: 100 epochs, lr x0.1 at 75, 90, wd 2e-4, eps 0.031; las (LAS-AT, Tables "
                            "III/IV): 110 epochs, 100, 105, wd 5e-4, eps 8/255",
                            choices=sorted(["paper", "las"]))
    epochs: int = setting(None, "training epochs (unset: from --schedule)", type=int)
    milestones: list = setting(None, "epochs where lr x0.1, e.g. 75,90 (unset: from --schedule)", type=int_list)
    lr: float = setting(0.1, "SGD learning rate", type=float)
    momentum: float = setting(0.9, "SGD momentum", type=float)
    wd: float = setting(None, "weight decay (unset: from --schedule)", type=float)
    batch_size: int = setting(128, "training batch size", type=int)
    seed: int = setting(1, "seed of python, numpy and torch (runs repeat exactly on one machine)", type=int)
    amp: str = setting("off", "autocast of training's forward passes and attack (losses stay fp32; fp16 adds a "
                       "GradScaler); evaluation is always fp32", choices=sorted(AMP_DTYPES))
    channels_last: bool = setting(False, "channels_last memory format for models and batches", PLACE)
    compile: bool = setting(False, "torch.compile the trained models (nn.Module.compile)", PLACE)
    cudnn_benchmark: bool = setting(False, "torch.backends.cudnn.benchmark on CUDA", PLACE)
    fast: bool = setting(False, "the fast path: --amp bf16 --channels-last --compile --cudnn-benchmark "
                         "(GPU runs; not yet measured on a GPU, see README)", PLACE)
    device: str = setting(default_device(), "training device", PLACE)
    # Multi-GPU (distributed.py). ddp and sync_bn say how the global batch is spread over processes, not
    # what is trained: PLACE, so a run may resume on another number of GPUs. tp_scope local changes L_TP
    # itself (per-process graphs) and is named; global, the default, is the single-process loss.
    ddp: bool = setting(False, "multi-GPU under torchrun: torchrun --nproc_per_node G <script> ... --ddp; --batch-size "
                        "stays the global batch, each process takes 1/G of it (README: Fast path and multi-GPU)", PLACE)
    tp_scope: str = setting(
        "global",
        "--ddp: L_TP over the global batch (global: features gathered from every process) "
        "or over each process's shard (local: a coarser graph, ~G times smaller with sum reduction)",
        choices=["global", "local"],
    )
    sync_bn: bool = setting(False, "--ddp: SyncBatchNorm, batch statistics over the global batch (CUDA only)", PLACE)
    quick: bool = setting(False, "minutes-long CPU smoke run: cnn_small, subsets, few epochs and steps", in_name=False)

    def to_dict(self):
        """JSON-ready: what config.json and checkpoints store."""
        return {f.name: str(v) if isinstance(v, Lambda) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_saved(cls, saved):
        """A run's saved settings over today's defaults: settings added since then take their default, or the
        value that reproduces how the run was trained (FIRST_RELEASE: runs saved before validation splits and
        --baselines existed had no split, so their best.pt was picked on monitored test images, and trained with
        the first release's attack starts); keys that are no settings any more (old runs saved CLI actions too)
        are ignored."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{**FIRST_RELEASE, **{k: v for k, v in saved.items() if k in known}})
        cfg.lam = Lambda.parse(cfg.lam)
        return cfg

    def run_settings(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["kind"] == RUN}


@dataclass
class EvalConfig:
    """Settings of --eval CKPT. Unset (None) eps / data / test_n: those the run was trained with. arch / dataset /
    mean / std: only for a bare state_dict (a public checkpoint), which carries no settings."""
    eps: float = setting(None, "", type=parse_number)
    eval_steps: int = setting(20, "", type=int)
    eval_step_size: float = setting(0.003, "", type=parse_number)
    eval_model: str = setting("adv", "evaluate M' (adv) or the standard model M (std)", choices=["adv", "std"])
    metrics: list = setting(list(EVAL_METRICS), "subset of " + ",".join(EVAL_METRICS), type=name_list(EVAL_METRICS))
    cw_kappa: float = setting(50.0, "CW margin kappa", type=float)
    aa_n: int = setting(0, "AutoAttack on the first n test images (0 = all)", type=int)
    aa_attacks: list = setting([], "custom AutoAttack list instead of the standard version",
                               type=name_list(("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")))
    knn_k: list = setting([30], "k of the kNN topology score, e.g. 5,10,20,30,40,50", type=int_list)
    knn_train_n: int = setting(0, "kNN support: the first n training images (0 = all), natural + PGD-20", type=int)
    nbr_k: list = setting([10, 30], "k of the neighbour agreement (metric nbr: M' vs M kNN graphs on the test "
                          "images)", type=int_list)
    tsne: bool = setting(False, "also save a t-SNE picture of natural and PGD-20 features")
    eval_batch_size: int = setting(500, "batch size of the evaluation attacks", type=int)
    seed: int = setting(1, "", type=int)
    device: str = setting(default_device(), "", PLACE)
    data_file: str = setting(None, "", PLACE)
    data_dir: str = setting(None, "", PLACE)
    test_n: int = setting(None, "", type=count_arg)
    arch: str = setting(None, "")  # --arch, --dataset: flags of Config; here they describe a bare state_dict
    dataset: str = setting(None, "")
    mean: list = setting(None, "a bare state_dict's input normalisation (x - mean) / std: per-channel mean, e.g. "
                         "0.4914,0.4822,0.4465", type=float_list)
    std: list = setting(None, "... and per-channel std, e.g. 0.2471,0.2435,0.2616", type=float_list)


@dataclass
class Actions:
    """What the command line asks for, beyond the settings; never saved."""
    eval: str = setting(
        "", "evaluate a checkpoint: natural, PGD-20, CW-20, AutoAttack, kNN, test L_TP", CLI, metavar="CKPT"
    )
    table: list = setting(None, "print one markdown table of runs (run folders or eval.json files, e.g. runs/*): every "
                          "row of each eval.json, latest first; what has none gets a row saying why", CLI, nargs="+",
                          metavar="RUN")
    plot: list = setting(None, "draw natural and PGD accuracy per epoch (M' solid, M dashed) and the loss terms of "
                         "each RUN's metrics.jsonl into one PNG: RUN/curves.png for one run, curves_<names>.png in "
                         "the common parent folder of several", CLI, nargs="+", metavar="RUN")
    export: list = setting(None, "write CKPT's M' as a plain state_dict to FILE (TRADES' / RobustBench's WideResNet "
                           "key names for wrn34_10)", CLI, nargs=2, metavar=("CKPT", "FILE"))
    out: str = setting("", "run folder (default: <runs-dir>/<name from the non-default flags>)", CLI)
    runs_dir: str = setting("runs", "where run folders are made", CLI)
    resume: bool = setting(False, "continue the run in its folder from last.pt", CLI)
    overwrite: bool = setting(False, "replace an existing run folder's files (with --export: the existing FILE)", CLI)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no abbreviations: a prefix of a flag (--steps for a study's --steps-only,
    --step for --step-size) is never silently taken for another flag; every flag is given in full."""

    def __init__(self, *args, **kw):
        super().__init__(*args, allow_abbrev=False, **kw)

    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


# Settings --quick changes: a minutes-long CPU run that exercises the whole pipeline.
QUICK = {"arch": "cnn_small", "std_arch": "cnn_small", "epochs": 5, "milestones": [4], "train_n": 3072, "val_n": 500,
         "test_n": 1000, "eval_n": 1000, "steps": 3, "eval_steps": 5, "batch_size": 128}


# Settings --fast changes (flags given explicitly still win).
FAST = {"amp": "bf16", "channels_last": True, "compile": True, "cudnn_benchmark": True}


# --schedule fills these where unset; LAS-AT (Tables III/IV) trains and evaluates at eps 8/255
SCHEDULES = {"paper": {"epochs": 100, "milestones": [75, 90], "wd": 2e-4, "eps": 0.031},
             "las": {"epochs": 110, "milestones": [100, 105], "wd": 5e-4, "eps": 8 / 255}}


# Settings added after the first release, with the value that reproduces a run saved before them (its config.json
# lacks the key), so that such a run resumes exactly as it was trained; new runs get the field's default.
FIRST_RELEASE = {"val_n": 0, "baselines": "release1"}


GROUPS = ((Config, "run settings"), (EvalConfig, "evaluation (--eval CKPT; unset: the run's own eps and data)"),
          (Actions, "run folder, tables"))


def shown(v):
    if isinstance(v, bool) or v is None:
        return "off" if v is False else "unset" if v is None else "on"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v) if v != "" else "''"


def build_parser(defaults):
    """Every flag from the dataclasses' fields; a flag not given stays out of the namespace, so
    main() knows exactly what the user said. --help shows each default (the script's, if it sets one)."""
    p = Parser(description="TRAIN: topology-preserving adversarial training (see README.md)")
    seen = set()
    for cls, title in GROUPS:
        group = p.add_argument_group(title)
        for f in fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = defaults.get(f.name, f.default if f.default_factory is MISSING else f.default_factory())
            kw = dict(f.metadata["cli"])
            if callable(kw.get("choices")):  # a registry, read now: entries an experiment script added count
                kw["choices"] = kw["choices"]()
            if f.type is bool or f.type == "bool":
                kw["action"] = "store_true"
            text = "all" if kw.get("type") is count_arg and default == 0 else shown(default)
            if cls is Config:  # what a preset puts in place of the script's value (make_config's precedence)
                text += "".join(f"; {flag}: {shown(preset[f.name])}" for flag, preset in (("--quick", QUICK),
                                                                                           ("--fast", FAST))
                                if f.name in preset and preset_applies(f.name, defaults))
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (default: {text})", **kw)
    return p


def parse_flags(defaults, argv=None):
    """argv -> {setting: value} of the flags given (the only place argv is parsed; exit 2 on bad flags)."""
    return vars(build_parser(defaults).parse_args(argv))


def preset_applies(name, defaults):
    """Whether --quick / --fast may set `name`: the script's DEFAULTS leave it at the paper's value (the field's
    default) or do not set it; a value the script's author chose stays."""
    f = next(f for f in fields(Config) if f.name == name)
    paper = f.default if f.default_factory is MISSING else f.default_factory()
    return name not in defaults or defaults[name] == paper


DATASET_CLASSES = {**{name: n for name, (_, n) in TORCHVISION_SETS.items()}, "tinyimagenet": 200}


def npz_class_count(path):
    """The class count of an .npz data file from its labels alone (np.load reads arrays lazily); None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "class_names" in z.files:
                return len(z["class_names"])
            return int(max(z["y_train"].max(), z["y_test"].max())) + 1
    except Exception:  # load_data reports a bad file in one line later
        return None


def fit_dataset_label(defaults, given):
    """-> defaults whose dataset label describes --data-file: the script's label (e.g. exp_ablations' cifar100)
    gives way to the one with the file's class count (10: cifar10, 100: cifar100, 200: tinyimagenet; else none),
    so config.json never calls 10-class data cifar100; a --dataset typed against the file is refused."""
    path = given.get("data_file") or defaults.get("data_file")
    n = npz_class_count(path) if path and os.path.isfile(path) else None
    label = given.get("dataset", defaults.get("dataset"))
    if n is None or DATASET_CLASSES.get(label) == n:
        return defaults
    if "dataset" in given:
        raise UserError(f"--dataset {label} has {DATASET_CLASSES.get(label)} classes but --data-file {path} has {n}; "
                        "leave --dataset out (the file decides) or give the matching one")
    return {**defaults, "dataset": next((k for k, c in DATASET_CLASSES.items() if c == n), None)}


def make_config(defaults, given):
    """Config from: field defaults (the paper's settings) < the --quick / --fast presets < the script's own choices
    (DEFAULTS that differ from the paper's) < the flags given; then --schedule fills epochs / milestones / wd / eps
    where still unset. So a preset replaces what a script restates from the paper (arch wrn34_10 -> cnn_small under
    --quick), never what its author changed (a copied script's arch cnn6 stays cnn6)."""
    names = {f.name for f in fields(Config)}
    values = dict(defaults)
    presets = {**(QUICK if given.get("quick", defaults.get("quick")) else {}),
               **(FAST if given.get("fast", defaults.get("fast")) else {})}
    values.update({k: v for k, v in presets.items() if preset_applies(k, defaults)})
    values.update({k: v for k, v in given.items() if k in names})
    cfg = Config(**values)
    for k, v in SCHEDULES[cfg.schedule].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.lam = Lambda.parse(cfg.lam)
    return cfg


def validate(cfg):
    """Settings that parse but cannot run: one line, exit 2."""
    check_device_and_unit(cfg, ("eps", "step_size", "eval_step_size"))
    for k in ("epochs", "batch_size", "eval_n"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    validate_methods(cfg)
    if cfg.batch_size < 2 and cfg.train:
        raise UserError("--batch-size must be >= 2 with --train (L_TP compares samples)")
    if not cfg.data_file and not cfg.dataset:
        raise UserError("give --dataset or --data-file")
    if cfg.freeze_std and not cfg.std_ckpt:
        raise UserError("--freeze-std needs --std-ckpt (a frozen random M would teach nothing)")
    problem = distributed.setting_problem(cfg)
    if problem:
        raise UserError(problem)
    check_lowest(cfg)
    check_backends(cfg)


def check_backends(cfg):
    """What the settings need of this machine beyond --device: the Triton kernel and autocast in --amp's dtype.
    Checked here because they would otherwise fail at the first step, after the run folder's files exist."""
    kind = torch.device(cfg.device).type
    if cfg.tp_impl == "triton" and not triton_available(kind):
        raise UserError(f"--tp-impl triton needs triton and a CUDA --device (or TRITON_INTERPRET=1 on the CPU, "
                        f"for tests), not {cfg.device}; use --tp-impl auto or torch")
    if cfg.amp != "off" and not torch.amp.is_autocast_available(kind):
        raise UserError(f"--amp {cfg.amp}: autocast does not run on --device {cfg.device}; use --amp off")
    if cfg.amp == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16 or --amp off")


# The lowest value of each numeric setting of Config and EvalConfig (lists: of each entry); where 0 is
# allowed it means "all" or "off", as the flag's help says.
LOWEST = {"image_size": 0, "train_n": 0, "val_n": 0, "test_n": 0, "steps": 1, "eval_steps": 1, "awp_warmup": 0,
          "seed": 0, "milestones": 1, "lr": 0, "momentum": 0, "wd": 0, "beta": 0, "gamma": 0, "alp_weight": 0,
          "awp_gamma": 0, "aa_n": 0, "knn_k": 1, "nbr_k": 1, "knn_train_n": 0, "eval_batch_size": 1, "cw_kappa": 0}


def check_lowest(settings):
    """Numeric settings of a Config / EvalConfig below their LOWEST value (e.g. --steps -1): one line."""
    for f in fields(settings):
        v = getattr(settings, f.name)
        if f.name in LOWEST and v is not None and any(x < LOWEST[f.name] for x in (v if isinstance(v, list) else [v])):
            raise UserError(f"--{f.name.replace('_', '-')} must be >= {LOWEST[f.name]}, got {shown(v)}")
    if settings.seed >= 2 ** 32:  # numpy's limit
        raise UserError(f"--seed must be < 2**32, got {settings.seed}")


def validate_eval(ecfg):
    """EvalConfig settings that parse but cannot run: one line, exit 2."""
    check_lowest(ecfg)
    check_device_and_unit(ecfg, ("eps", "eval_step_size"))


def check_device_and_unit(settings, unit_keys):
    """Of a Config or an EvalConfig: its --device exists here, and each of unit_keys that is set lies in [0, 1]."""
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {settings.device} but CUDA is not available; use --device cpu")
    for k in unit_keys:
        if getattr(settings, k) is not None and not 0 <= getattr(settings, k) <= 1:
            raise UserError(f"--{k.replace('_', '-')} must lie in [0, 1] (inputs are in [0, 1])")


def validate_methods(cfg):
    """Combinations of a base method and its plug-ins that parse but cannot run (the records say which)."""
    if cfg.method not in BASE_METHODS:  # a resumed run of a method that an experiment script registers
        raise UserError(f"the method {cfg.method} is not registered here ({', '.join(BASE_METHODS)}); "
                        "run it with the experiment script that registers it")
    if cfg.lbgat0 and not cfg.lbgat:
        raise UserError("--lbgat0 needs --lbgat (it is a variant of LBGAT)")
    if cfg.lbgat0 and BASE_METHODS[cfg.method].lbgat0 is None:
        with_it = ", ".join(k for k, m in BASE_METHODS.items() if m.lbgat0 is not None)
        raise UserError(f"--lbgat0 replaces the loss of --method {with_it} (with --method trades it is --beta 0)")
    if cfg.ddp and cfg.train and not RELATION_LOSSES[cfg.relation].ddp:
        ok = ", ".join(k for k, r in RELATION_LOSSES.items() if r.ddp)
        raise UserError(f"--relation {cfg.relation} is not built for --ddp (only {ok} gather the global batch)")
    if cfg.train and cfg.lam.share and cfg.lbgat0:
        raise UserError("--lam share:S measures L_TP's pull against M''s own loss, and --lbgat0 has none besides "
                        "LBGAT's guidance; give a constant --lam")
    if cfg.lbgat0 and cfg.awp:
        raise UserError("--awp needs a loss of M' to ascend; --lbgat0 has none besides LBGAT's guidance")


def name_part(name, v):
    if isinstance(v, bool):
        return name.replace("_", "-") if v else f"no-{name.replace('_', '-')}"
    text = ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    return f"{name.replace('_', '-')}-{text.replace('/', '-').replace(':', '')}"  # share:0.15 -> lam-share0.15


def run_name(cfg, base, prefix=""):
    """[<prefix>_]<method>[_<flag>[-<value>]...]: the run-defining settings in which cfg differs from
    base (sorted by name), then _quick. The one naming scheme of scripts and studies."""
    parts = ([prefix] if prefix else []) + [cfg.method]
    for f in sorted(fields(Config), key=lambda f: f.name):
        v = getattr(cfg, f.name)
        if f.metadata["kind"] == RUN and f.metadata["in_name"] and v != getattr(base, f.name):
            parts.append(name_part(f.name, v))
    if cfg.quick:  # a quick run names the nets it trained when they are not the preset's (a script's own choice)
        parts += [name_part(k, getattr(cfg, k)) for k in ("arch", "std_arch")
                  if getattr(cfg, k) != QUICK[k] and name_part(k, getattr(cfg, k)) not in parts]
        parts.append("quick")
    return "_".join(parts)


def name_base(defaults, cfg):
    """What a run is named against: the script's defaults under the same --quick and --schedule (so
    their presets stay out of the name), with the default schedule (so a changed one is named)."""
    base = make_config(defaults, {"quick": cfg.quick, "schedule": cfg.schedule})
    base.schedule = defaults.get("schedule", Config.schedule)  # the field's default
    return base


# =====================================================================================
# 2. run folders
#    One process at a time (run_lock), checked before any work (check_writable), tidied after a kill -9
#    (remove_stale_temps, sync_metrics), files written only once training starts (start_run_dir).
# =====================================================================================
RUN_FILES = ("config.json", "metrics.jsonl", "log.txt", "last.pt", "best.pt", "eval.json", "results.md")
REPO = os.path.dirname(os.path.abspath(__file__))  # the repository (or worktree) this code runs from
PATH_SETTINGS = ("data_file", "data_dir")  # PLACE settings that name files: config.json records them portably


def recorded_path(path):
    """A path as config.json and eval.json record it: relative to the repository where it lies inside it or beside
    it (../shared/data/... of this workplace), so committed results name no machine's or worktree's folders;
    absolute elsewhere (a data set at /data/... is that machine's own). '' stays ''."""
    if not path:
        return path
    full = os.path.abspath(path)
    rel = os.path.relpath(full, REPO)
    return full if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def resolved_path(path):
    """A recorded path back to one that opens from any working directory (relative = to the repository)."""
    return path if not path or os.path.isabs(path) else os.path.normpath(os.path.join(REPO, path))


def recorded_config(cfg):
    """cfg.to_dict() with its paths recorded (recorded_path): config.json's "config"."""
    return {**cfg.to_dict(), **{k: recorded_path(getattr(cfg, k)) for k in PATH_SETTINGS}}


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("torchvision", "triton", "pyautoattack"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except OSError:
        return None


def check_run_dir(run_dir, resume, overwrite):
    """Refuse an existing run without resume / overwrite, and a resume without a checkpoint. A folder that
    holds only what a failed start left (failed_start) is no run: the same command starts it again."""
    if resume:
        if not os.path.isfile(os.path.join(run_dir, "last.pt")):
            again = ("; it stopped before its first checkpoint: run the same command without --resume to start "
                     "it again") if failed_start(run_dir) else ""
            raise UserError(f"--resume: no checkpoint {os.path.join(run_dir, 'last.pt')} to resume from{again}")
        return
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if existing and not overwrite and not failed_start(run_dir):
        raise UserError(f"run folder {run_dir} already holds a run ({', '.join(existing)}); "
                        "pass --resume to continue it, --overwrite to replace it, or --out elsewhere")


# What a start that failed before its first checkpoint leaves: nothing trained, measured or evaluated.
FAILED_START_FILES = {"config.json", "log.txt"}


def failed_start(run_dir):
    """The config.json of a start that stopped before its first checkpoint (a step that failed, a kill in epoch 1)
    when run_dir holds nothing else of a run but its log.txt; else None. Only a config.json we wrote counts:
    any other file of that name is someone's and stays."""
    existing = {f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))}
    if "config.json" not in existing or not existing <= FAILED_START_FILES:
        return None
    try:
        with open(os.path.join(run_dir, "config.json")) as fh:
            saved = json.load(fh)
        Config.from_saved(saved["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return saved


def init_run_dir(run_dir, keep=()):
    """Create the folder and clear an old run's files but keep (reached with --overwrite, or to start again
    after a failed start)."""
    os.makedirs(run_dir, exist_ok=True)
    for f in RUN_FILES:
        if f not in keep and os.path.exists(os.path.join(run_dir, f)):
            os.remove(os.path.join(run_dir, f))


def run_status(run_dir):
    """'missing', 'partial' (resume it) or 'done' (last.pt holds the final epoch; metrics.jsonl may lack that
    epoch's row when a process was killed between the two: --resume puts it there, sync_metrics)."""
    last = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(last) or not os.path.isfile(os.path.join(run_dir, "config.json")):
        return "missing"
    return "done" if checkpoint_progress(last)["epoch"] >= load_run_config(run_dir).epochs else "partial"


def checkpoint_progress(path):
    """A checkpoint's progress (epoch, step) without reading its weights: memory-mapped, cheap for any size."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["progress"]
    except Exception as e:
        raise UserError(f"could not read checkpoint {path}: {type(e).__name__}: {e}")


def load_run_config(run_dir):
    """The Config a run folder was trained with (its config.json)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as fh:
            cfg = Config.from_saved(json.load(fh)["config"])
        for k in PATH_SETTINGS:  # recorded relative to the repository (recorded_path)
            setattr(cfg, k, resolved_path(getattr(cfg, k)))
        return cfg
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"could not read the run settings {path}: {type(e).__name__}: {e}")


def resume_config(run_dir, given):
    """On --resume the run's own settings stand; flags given may only say where it runs (PLACE) or
    repeat the run's values: a flag that would change the run is refused."""
    cfg = load_run_config(run_dir)
    for k in distributed.LAUNCH_SETTINGS:  # --ddp, --sync-bn: how this resume is launched, off unless given
        setattr(cfg, k, False)
    kinds = {f.name: f.metadata["kind"] for f in fields(Config)}
    for k, v in given.items():
        if kinds.get(k) == PLACE:
            setattr(cfg, k, v)
        elif kinds.get(k) == RUN and v != getattr(cfg, k) and k != "quick":
            raise UserError(
                f"--resume: --{k.replace('_', '-')} {shown(v)} would change the run (it was trained with "
                f"{shown(getattr(cfg, k))}); only where it runs (--device, --data-file, --data-dir) may change"
            )
    return cfg


def make_logger(run_dir):
    path = os.path.join(run_dir, "log.txt")

    def log(msg):
        tqdm.write(msg)
        with open(path, "a") as fh:
            fh.write(msg + "\n")
    return log


# Run folders: one process at a time (run_lock), checked before any work (check_writable), tidied after a
# kill -9 (remove_stale_temps, sync_metrics), files written only once training starts (start_run_dir).
@contextlib.contextmanager
def run_lock(run_dir):
    """Hold <run_dir>/.lock (an exclusive fcntl.flock; the file names our PID) while training, resuming,
    overwriting or evaluating there: a second process gets one line naming the holder (UserError). The
    kernel drops the lock when the process ends, even on kill -9, so a stale .lock blocks nothing.
    Folders this call had to create are removed again when nothing else was written into them."""
    made = missing_dirs(run_dir)
    try:
        fd = acquire_lock(run_dir)
    except BaseException:
        remove_empty_dirs(made)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while still held: see acquire_lock's retry
            os.remove(os.path.join(run_dir, ".lock"))
        remove_empty_dirs(made)
        os.close(fd)


def missing_dirs(path):
    """The folders of path that do not exist yet, deepest first."""
    out, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        out.append(p)
        p = os.path.dirname(p)
    return out


def remove_empty_dirs(dirs):
    for d in dirs:  # deepest first; stop at the first one that holds something
        try:
            os.rmdir(d)
        except OSError:
            break


def acquire_lock(run_dir):
    """-> the fd of <run_dir>/.lock, flock'ed. If the holder removed the file between our open and our
    flock (run_lock's release), the lock we got is on a dead file: open it again."""
    path = os.path.join(run_dir, ".lock")
    for _ in range(100):
        try:
            os.makedirs(run_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"cannot use {run_dir} as a run folder ({e.strerror or e}); choose another --out / --runs-dir"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"run folder {run_dir} is in use by process {read_pid(path)} (it holds {path}); "
                            "wait until that process ends, or use another folder") from None
        if same_file(fd, path):
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as e:
                os.close(fd)
                raise UserError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
            return fd
        os.close(fd)
    raise UserError(f"could not lock {path}: other processes keep replacing it")


def same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_pid(path):
    try:
        with open(path) as fh:
            return fh.read().strip() or "?"
    except OSError:
        return "?"


PROBE_BYTES = 1 << 16


def check_writable(folder):
    """Write, sync and delete a 64 KiB probe file: a read-only or full folder is refused here, before data
    are loaded or attacks run, not after minutes of work."""
    probe = os.path.join(folder, f".probe{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise UserError(
            f"cannot write to {folder} ({e.strerror or e}); free space there or choose another folder"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def remove_stale_temps(run_dir, log):
    """name.tmpPID files (save_atomic) of a process that died while writing: stale,
    since we hold the folder's lock."""
    for name in sorted(os.listdir(run_dir)):
        base, _, pid = name.rpartition(".tmp")
        if base in RUN_FILES and pid.isdigit():
            os.remove(os.path.join(run_dir, name))
            log(f"removed {name}, left by a process that died while writing it")


def metrics_epoch(line):
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):  # a torn last line of a killed process, or of a full disk
        return None


def sync_metrics(run_dir, progress, log):
    """Make metrics.jsonl end at the epoch of last.pt (its progress): rows past it (a process of the older code,
    which appended the row first, killed before saving last.pt) go, since the resumed run writes those epochs
    again; the row of last.pt's own epoch, which train() appends only after saving it, comes back from last.pt
    when a kill or a full disk kept it out (checkpoints of the older code do not carry it)."""
    path, epoch = os.path.join(run_dir, "metrics.jsonl"), progress["epoch"]
    lines = []
    if os.path.isfile(path):
        with open(path) as fh:
            lines = [line for line in fh if line.strip()]
    keep = [line for line in lines if metrics_epoch(line) is not None and metrics_epoch(line) <= epoch]
    dropped = len(lines) - len(keep)
    restore = bool(progress.get("row")) and epoch not in [metrics_epoch(line) for line in keep]
    if restore:
        keep.append(json.dumps(progress["row"]))
    if dropped or restore:
        write_atomic(path, "".join(line if line.endswith("\n") else line + "\n" for line in keep))
    if dropped:
        log(f"metrics.jsonl: dropped {dropped} rows past epoch {epoch}, the epoch of last.pt")
    if restore:
        log(f"metrics.jsonl: added the row of epoch {epoch} from last.pt (the process stopped before writing it)")


def already_finished(run_dir, cfg):
    """--resume of a run whose last.pt holds its final epoch: nothing to do (exit 0) but complete metrics.jsonl
    (sync_metrics), said on one line."""
    progress = checkpoint_progress(os.path.join(run_dir, "last.pt"))
    if progress["epoch"] >= cfg.epochs:
        sync_metrics(run_dir, progress, print)
        print(f"{run_dir}: already finished ({progress['epoch']} epochs); nothing to resume")
    return progress["epoch"] >= cfg.epochs


def start_run_dir(run_dir, cfg, resume, command, log):
    """The run folder's files, written once training is sure to start: a new run's config.json (after
    --overwrite cleared the old run's files; after a failed start its log.txt stays, and says what that start
    was); a resumed run drops what a killed process left behind."""
    earlier = None if resume else failed_start(run_dir)
    if not resume:
        init_run_dir(run_dir, keep=("log.txt",) if earlier else ())
        # atomic: a full disk leaves no torn config.json, so the folder stays a failed start the command restarts
        write_atomic(os.path.join(run_dir, "config.json"), json.dumps(
            {"config": recorded_config(cfg), "versions": versions(), "git_commit": git_commit(), "command": command,
             "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    log(f"run folder: {run_dir}")
    if earlier:
        log(f"the start of {earlier.get('started', '?')} ({earlier.get('command') or 'command not recorded'}) "
            "wrote no checkpoint; starting again")
    remove_stale_temps(run_dir, log)
    if resume:
        sync_metrics(run_dir, checkpoint_progress(os.path.join(run_dir, "last.pt")), log)


# errno of a write that found no room: a full disk, a full quota, a file size limit (ulimit -f)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_error(exc):
    """The OSError of a full disk behind exc (torch.save raises a RuntimeError whose context is the OSError of
    its file's write, common.torch_save_file), else None."""
    seen = []
    while exc is not None and not any(exc is e for e in seen):
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def mount_point(path):
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


@contextlib.contextmanager
def full_disk_is_one_line(run_dir):
    """A write of the run that found the disk full (a checkpoint, a metrics row, the log) becomes one line naming
    the disk and what to do (UserError, exit 2) instead of torch's traceback. save_atomic has removed its temp
    file by then, and train() appends a metrics row only after its checkpoint, so the folder is consistent."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = disk_full_error(e)
        if full is None:
            raise
        mount = mount_point(run_dir)
        last = os.path.join(run_dir, "last.pt")
        then = (f"continue with --resume (last.pt holds epoch {checkpoint_progress(last)['epoch']})"
                if os.path.isfile(last) else "run the same command again")
        raise UserError(f"could not write to {run_dir}: {full.strerror} ({human_bytes(shutil.disk_usage(mount).free)} "
                        f"free on {mount}); free space there, then {then}") from None


def run(cfg, run_dir, resume=False, overwrite=False, command=""):
    """Train one run in run_dir -> run_dir. resume: continue from last.pt there (pass the run's own
    Config, load_run_config); overwrite: replace the run there. The folder is locked throughout
    (run_lock); its files appear only once the settings, the folder, the data, the models and the batch
    size have been checked, so a start that fails leaves nothing; one that fails later, before its first
    checkpoint, leaves a folder the same command starts again (failed_start). Raises UserError, Diverged,
    Interrupted."""
    validate(cfg)
    with distributed.process_group(cfg), contextlib.ExitStack() as held:  # --ddp: torchrun's processes

        def claim():  # --ddp: rank 0 alone locks and checks the folder; every rank gets its answer or error
            held.enter_context(run_lock(run_dir))
            check_run_dir(run_dir, resume, overwrite)
            if resume and already_finished(run_dir, cfg):
                return True
            check_writable(run_dir)
            return False
        if distributed.main_decides(claim):
            return run_dir
        data = load_data(cfg, torch.device(cfg.device))  # bad data -> error before anything is written
        data = hold_out_validation(data, cfg.val_n)
        log = make_logger(run_dir) if distributed.is_main() else distributed.quiet
        with full_disk_is_one_line(run_dir):
            train(cfg, run_dir, data, resume=resume, log=log,
                  on_start=lambda: distributed.is_main() and start_run_dir(run_dir, cfg, resume, command, log))
    return run_dir


# =====================================================================================
# 3. evaluation files
#    --eval of a run checkpoint or a bare state_dict: load it (common.evaluate_models measures),
#    merge the results into eval.json per metric, regenerate results.md; --export.
# =====================================================================================
def checkpoint_to_evaluate(cfg):
    """best.pt when it was picked on held-out training data; else last.pt (a best.pt picked on test images
    would be model selection on the test set; a standard model's PGD accuracy picks nothing useful)."""
    return "best.pt" if cfg.val_n and BASE_METHODS[cfg.method].adversarial else "last.pt"


STATE_DICT_FLAGS = ("arch", "dataset", "mean", "std")  # what --eval needs to know of a bare state_dict


def eval_run_config(ck, ecfg, path):
    """The settings --eval works with: the run's own (its data may have moved; --test-n subsets), or for a bare
    state_dict those the flags give (state_dict_config)."""
    if check_known_checkpoint(ck, path) == "state_dict":
        return state_dict_config(ecfg)
    given = [f"--{k}" for k in STATE_DICT_FLAGS if getattr(ecfg, k) is not None]
    if given:
        raise UserError(f"--eval uses the settings saved with the checkpoint: {', '.join(given)} cannot apply "
                        "(they describe a bare state_dict)")
    run_cfg = Config.from_saved(ck["config"])
    for k in ("data_file", "data_dir", "test_n"):
        if getattr(ecfg, k) is not None:
            setattr(run_cfg, k, getattr(ecfg, k))
    return run_cfg


def state_dict_config(ecfg):
    """Settings for a bare state_dict: M' = --arch on --dataset / --data-file (--data-dir, --test-n); eps: --eps,
    else the paper's 0.031 (the schedule's default)."""
    if not ecfg.arch:
        raise UserError("--eval of a bare state_dict needs --arch (e.g. wrn34_10) and --dataset or --data-file")
    if (ecfg.mean is None) != (ecfg.std is None) or (ecfg.mean is not None and (
            len(ecfg.mean) != 3 or len(ecfg.std) != 3 or min(ecfg.std) <= 0)):
        raise UserError("--mean and --std go together: three numbers each (per RGB channel), std > 0")
    given = {k: getattr(ecfg, k) for k in ("arch", "dataset", "data_file", "data_dir", "test_n") if getattr(ecfg, k)}
    cfg = make_config({}, {**given, "device": ecfg.device})
    if not cfg.data_file and not cfg.dataset:
        raise UserError("--eval of a bare state_dict needs --dataset or --data-file")
    return cfg


def eval_models(ck, run_cfg, ecfg, num_classes, device, path):
    """The models of a run checkpoint, or M' alone from a bare state_dict (behind Normalized with --mean / --std);
    in eval mode."""
    if checkpoint_kind(ck) == "run":
        models = build_models(run_cfg, num_classes, device)
        for k, m in models.saved().items():
            fit_weights(m, ck["models"].get(k), f"checkpoint {path} ({k})",
                        "its saved arch " + {"adv": run_cfg.arch, "std": std_arch_of(run_cfg)}.get(k, "relation heads"))
            m.eval()
        return models
    model = build_model(run_cfg.arch, num_classes).to(device)
    fit_weights(model, bare_state_dict(ck), path, f"--arch {run_cfg.arch}")
    if ecfg.mean is not None:
        model = Normalized(model, ecfg.mean, ecfg.std).to(device)
    return Models(model.eval())


def checkpoint_facts(ck, path):
    """eval.json's run, epoch and selection: 'best-by-val' / 'best-by-test' (a best.pt picked on the validation split /
    on monitored test images; a best.pt that does not say was picked on test images), 'last', or 'state_dict'."""
    path = os.path.abspath(path)
    if checkpoint_kind(ck) == "state_dict":
        return {"run": os.path.basename(path), "epoch": None, "selection": "state_dict"}
    on = ck["progress"].get("selected_on") or ("test" if os.path.basename(path) == "best.pt" else None)
    return {"run": os.path.basename(os.path.dirname(path)), "epoch": ck["progress"]["epoch"],
            "selection": f"best-by-{on}" if on else "last"}


NEED_STD = ("tp", "nbr")  # metrics that compare M' with M: only a checkpoint of a run trained with M has them


def check_eval_plan(ecfg, models, n_test, n_train, log):
    """What the evaluation can measure, checked before any attack runs -> the EvalConfig to run. nbr / tp without M
    (a run trained without --train): one line saying so, and exit 2 when nothing else was asked; a k that the images
    cannot satisfy (--nbr-k >= the test images, --knn-k > the kNN support): exit 2."""
    asked = list(ecfg.metrics)
    lacking = [m for m in asked if m in NEED_STD] if models.std is None else []
    if lacking:
        why = (f"metrics {','.join(lacking)} (test L_TP, neighbour agreement) compare M' with M, the standard model of "
               "a run trained with --train; this checkpoint holds none")
        rest = [m for m in asked if m not in NEED_STD]
        if not rest:
            raise UserError(why)
        log(f"note: {why}: {','.join(lacking)} not measured")
        ecfg = replace(ecfg, metrics=rest)
    if "nbr" in ecfg.metrics and max(ecfg.nbr_k) >= n_test:
        raise UserError(f"--nbr-k {max(ecfg.nbr_k)} needs more than {max(ecfg.nbr_k)} test images (there are {n_test})")
    support = 2 * min(ecfg.knn_train_n or n_train, n_train)  # natural + PGD-20 training images
    if "knn" in ecfg.metrics and max(ecfg.knn_k) > support:
        raise UserError(f"--knn-k {max(ecfg.knn_k)} is larger than the kNN support ({support} samples: natural + "
                        f"PGD-20 of {support // 2} training images, --knn-train-n)")
    return ecfg


def evaluate(ckpt_path, ecfg, out_dir=None, log=print):
    """Every metric of the paper's tables for one checkpoint -> a dict (eval.json's content): loads the
    checkpoint, its data and models, then common.evaluate_models.

    ecfg: an EvalConfig. out_dir: where the AutoAttack log and the t-SNE picture go (None: no files);
    write_eval() stores the results. Raises UserError, SanityError."""
    device = torch.device(ecfg.device)
    ck = load_checkpoint(ckpt_path, device)
    run_cfg = eval_run_config(ck, ecfg, ckpt_path)
    data = load_data(run_cfg, device)
    models = eval_models(ck, run_cfg, ecfg, data.num_classes, device, ckpt_path)
    if ecfg.eval_model == "std" and models.std is None:
        raise UserError(f"--eval-model std: this checkpoint holds no standard model ({', '.join(models.saved())})")
    ecfg = check_eval_plan(ecfg, models, len(data.x_test), len(data.x_train), log)
    eps = run_cfg.eps if ecfg.eps is None else ecfg.eps
    res = {"checkpoint": recorded_path(ckpt_path), **checkpoint_facts(ck, ckpt_path),
           "model": ecfg.eval_model, "arch": run_cfg.arch if ecfg.eval_model == "adv" else std_arch_of(run_cfg),
           "eps": eps, "eps_255": eps * 255, "n_test": len(data.x_test),
           "pgd_steps": ecfg.eval_steps, "pgd_step_size": ecfg.eval_step_size, "cw_kappa": ecfg.cw_kappa}
    log(f"evaluating {ckpt_path} ({res['arch']}, epoch {res['epoch']}) on {len(data.x_test)} test images, "
        f"eps {eps:.4f} ({eps * 255:.2f}/255)")
    return evaluate_models(models, data, eps, ecfg, run_cfg, res, out_dir, log)


# eval.json: the flat dict of evaluate() for one "row" (checkpoint file and epoch, model, eps, PGD steps, number of
# test images), merged over evaluations of that row; rows evaluated under other settings are kept in "earlier".
ROW_KEYS = ("model", "epoch", "eps", "pgd_steps", "pgd_step_size", "n_test")


EVAL_FORMAT = 2  # 2: merged rows, results.md regenerated from eval.json


# metric -> the settings beyond the row's that define its value (a change starts a new row)
METRIC_SETTINGS = {"natural": (), "std_natural": (), "pgd": (), "cw": ("cw_kappa",), "aa": ("aa_n", "aa_attacks"),
                   "knn": ("knn_train_n",), "test_ltp": (), "nbr": ()}


def same_row(old, new):
    """Whether new's values can stand next to old's in one row: same checkpoint, row settings, and the
    same settings for every metric both measured."""
    if os.path.basename(old.get("checkpoint", "")) != os.path.basename(new["checkpoint"]):
        return False
    if any(old.get(k) != new.get(k) for k in ROW_KEYS):
        return False
    both = [m for m in METRIC_SETTINGS if m in old and m in new]
    return all(old.get(k) == new.get(k) for m in both for k in METRIC_SETTINGS[m])


def merge_eval(old, new, log=print):
    """eval.json after an evaluation: new's metrics over old's when they share a row (what new did not
    measure stays), else new becomes the row and old moves to "earlier". Nothing is dropped."""
    if not old:
        return dict(new)
    earlier = old.get("earlier", [])
    old = {k: v for k, v in old.items() if k not in ("earlier", "legacy_rows", "format")}
    if not same_row(old, new):
        log(f"eval.json: the results of {row_label(old)} at eps {old.get('eps', 0) * 255:.2f}/255 stay in 'earlier'")
        return {**new, "earlier": earlier + [old]}
    again = [m for m in METRIC_SETTINGS if m in old and m in new and m not in ("knn", "nbr") and old[m] != new[m]]
    if again:
        log("eval.json: measured again with the same settings: "
            + ", ".join(f"{m} {old[m]:.4f} -> {new[m]:.4f}" for m in again))
    warnings = old.get("warnings", [])
    merged = {**old, **new, "warnings": warnings + [w for w in new["warnings"] if w not in warnings],
              "sanity": {**old.get("sanity", {}), **new["sanity"]}}
    for m in ("knn", "nbr"):  # other k: both kept
        if m in old and m in new:
            merged[m] = {q: {**old[m].get(q, {}), **new[m][q]} for q in new[m]}
    if len(old.get("worst_case_of", [])) > len(new["worst_case_of"]):  # the worst case over more attacks stays
        merged.update({k: old[k] for k in ("worst_case", "worst_case_n", "worst_case_of") if k in old})
    return {**merged, **({"earlier": earlier} if earlier else {})}


def read_json(path):
    """A JSON file written by us, or None when absent; an unreadable one is a UserError (never overwritten)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path} ({type(e).__name__}: {e}); move it away to write a new one")


def write_text(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def write_atomic(path, text):
    """A text file, atomically (save_atomic)."""
    save_atomic(path, lambda tmp: write_text(tmp, text))


def write_eval(res, run_dir, log=print):
    """Merge res into run_dir's eval.json (merge_eval) and regenerate results.md from it, one line per row
    of eval.json. A results.md of the older code (appended rows) is kept: its lines become "legacy_rows"."""
    path, md = os.path.join(run_dir, "eval.json"), os.path.join(run_dir, "results.md")
    old = read_json(path)
    legacy = (old or {}).get("legacy_rows")
    if "format" not in (old or {}) and os.path.isfile(md):  # a results.md of the code that appended rows
        with open(md) as fh:
            legacy = [line.rstrip("\n") for line in fh if line.strip()]
    merged = {**merge_eval(old, res, log), "format": EVAL_FORMAT}
    if legacy:
        merged["legacy_rows"] = legacy
    write_atomic(path, json.dumps(merged, indent=2))
    rows = (legacy or []) + run_rows(merged)[::-1]  # oldest first, as --table lists them latest first
    write_atomic(md, "\n".join(rows) + "\n")
    log(TABLE_HEADER + "\n" + run_rows(merged)[0])
    return merged


@contextlib.contextmanager
def signals_stop(message):
    """Ctrl-C / SIGTERM inside the block: stop at once with Interrupted(message) (main prints it, exit 130 / 143)
    instead of dying silently; nothing is written inside the block, so nothing is half-written."""
    def stop(signum, _frame):
        raise Interrupted(f"{signal.Signals(signum).name}: {message}", 128 + signum)
    with on_stop_signals(stop):
        yield


def evaluate_run(ckpt, ecfg, out_dir, log=print):
    """--eval: evaluate ckpt and merge the results into out_dir's eval.json / results.md (write_eval),
    holding out_dir's lock; a folder that cannot take them is refused before any attack runs."""
    validate_eval(ecfg)
    if not os.path.isfile(ckpt):
        raise UserError(f"checkpoint {ckpt} not found")
    with run_lock(out_dir):
        check_writable(out_dir)
        remove_stale_temps(out_dir, log)
        with signals_stop(f"--eval {ckpt}: interrupted before it finished; "
                          f"{os.path.join(out_dir, 'eval.json')} is unchanged"):
            res = evaluate(ckpt, ecfg, out_dir, log)
        return write_eval(res, out_dir, log)  # atomic: a kill now leaves the old eval.json or the new one


def eval_config(given):
    """EvalConfig from the flags given with --eval; a flag that cannot apply to a saved run is refused."""
    names = {f.name for f in fields(EvalConfig)}
    wrong = sorted(k for k in given if k not in names and k != "eval")
    if wrong:
        raise UserError(f"--eval uses the settings saved with the checkpoint: "
                        f"{', '.join('--' + k.replace('_', '-') for k in wrong)} cannot apply")
    return EvalConfig(**{k: v for k, v in given.items() if k in names})


def export_state_dict(ckpt_path, out_path, overwrite=False):
    """--export CKPT FILE: M' of a run checkpoint as a plain state_dict ({name: tensor}, no 'module.'), the form public
    releases take. A wrn34_10 loads strictly into RobustBench's WideResNet(depth=34, widen_factor=10)
    (robustbench/model_zoo/architectures/wide_resnet.py) and into TRADES' models/wideresnet.py except that class's
    unused sub_block1 (load_state_dict(..., strict=False) there)."""
    if os.path.exists(out_path) and not overwrite:
        raise UserError(f"--export: {out_path} exists; pass --overwrite to replace it, or choose another file")
    ck = load_checkpoint(ckpt_path, "cpu")
    if check_known_checkpoint(ck, ckpt_path) != "run":
        raise UserError(f"--export: {ckpt_path} is a bare state_dict already")
    try:
        save_atomic(out_path, lambda tmp: torch.save(ck["models"]["adv"], tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a missing folder as a RuntimeError
        raise UserError(f"--export: could not write {out_path}: {e}")
    return out_path


# =====================================================================================
# 4. tables and curves
#    --table RUN ...: every row of each run's eval.json; what has none gets a row saying why.
#    --plot RUN ...: learning curves from metrics.jsonl, drawn by the function the studies draw theirs with.
# =====================================================================================
TABLE_HEADER = ("| run | eps | Natural | PGD-20 | CW-20 | AA | kNN natural | kNN robust | L_TP | nbr@30 "
                "| checkpoint |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


# Settings that define a row (ROW_KEYS, METRIC_SETTINGS) but have no cell of their own: where a run's rows differ
# in one, each row's run cell names its value (eps, n, checkpoint and epoch are in every row already).
ROW_NOTES = {"pgd_steps": "steps", "pgd_step_size": "step size", "cw_kappa": "CW kappa", "aa_n": "AA n",
             "aa_attacks": "AA attacks", "knn_train_n": "kNN support n"}


def row_label(res, note=""):
    """The run cell: run, model, checkpoint file and epoch, and the number of test images of every column."""
    epoch = "" if res.get("epoch") is None else f", epoch {res['epoch']}"  # a bare state_dict has no epoch
    return (res["run"] + ("" if res.get("model", "adv") == "adv" else " (M)")
            + f" ({os.path.basename(res.get('checkpoint', '?'))}{epoch}, n={res.get('n_test')}" + note + ")")


def aa_cell(res, pct):
    """AA accuracy; when it ran on fewer images than the row: its n, and natural / PGD accuracy on those images."""
    if res.get("aa") is None or res["aa_n"] == res["n_test"]:
        return pct(res.get("aa"))
    sub = res.get("aa_subset")
    on_them = f"; natural {pct(sub['natural'])}, PGD-{res['pgd_steps']} {pct(sub['pgd'])} on them" if sub else ""
    return f"{pct(res['aa'])} (n={res['aa_n']}{on_them})"


def k_shown(by_k, k):
    """The k whose value a cell shows of a {"natural": {k: ...}, "robust": {...}} metric (kNN, neighbour agreement):
    k itself, else the first k evaluated; None when none was."""
    ks = (by_k or {}).get("natural", {})
    return k if k in ks else next(iter(ks), None)


def nbr_cell(res, pct, k="30"):
    """Neighbour agreement natural / robust at k=30; a run evaluated without k=30: the first k, which the cell names."""
    nbr = res.get("nbr")
    kk = k_shown(nbr, k)
    if kk is None:
        return "-"
    return f"{pct(nbr['natural'][kk])} / {pct(nbr['robust'][kk])}" + ("" if kk == k else f" (k={kk})")


def results_row(res, k="30", note=""):
    """One markdown row in the paper's column order, then the project's own metrics (test L_TP, neighbour agreement);
    kNN at k=30 (or the first k evaluated). Every row says how many test images each column used (row_label,
    aa_cell); the last column says which checkpoint (checkpoint_facts' selection; '-' where eval.json lacks it).
    A metric not in eval.json (not measured, or older code) is '-'."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    knn = res.get("knn")
    kk = k_shown(knn, k)
    steps_note = "" if res.get("pgd_steps", 20) == 20 else f" ({res['pgd_steps']} steps)"
    aa = aa_cell(res, pct)
    cells = [row_label(res, note), f"{res['eps'] * 255:.2f}/255",
             pct(res.get("natural")), pct(res.get("pgd")) + steps_note * ("pgd" in res),
             pct(res.get("cw")) + steps_note * ("cw" in res), aa,
             pct(knn["natural"][kk]) if kk else "-", pct(knn["robust"][kk]) if kk else "-",
             "-" if res.get("test_ltp") is None else f"{res['test_ltp']:.3f}", nbr_cell(res, pct),
             res.get("selection", "-")]
    return "| " + " | ".join(cells) + " |"


def eval_rows(ev):
    """eval.json's rows, latest first (the row --table showed before earlier ones were listed), with the note of
    each run cell when there are several: latest or earlier, and the ROW_NOTES settings in which they differ."""
    rows = [ev] + ev.get("earlier", [])[::-1]
    if len(rows) == 1:
        return [(ev, "")]
    differ = [k for k in ROW_NOTES if len({json.dumps(r.get(k)) for r in rows}) > 1]
    notes = [["earlier" if i else "latest"] + [f"{ROW_NOTES[k]} {shown(r.get(k))}" for k in differ]
             for i, r in enumerate(rows)]
    return [(r, "; " + ", ".join(n)) for r, n in zip(rows, notes)]


def run_rows(ev):
    return [results_row(r, note=note) for r, note in eval_rows(ev)]


def note_row(path, note):
    """A table row for what has no results: the path, then why (cells kept to one line, no stray '|')."""
    cell = lambda text: " ".join(str(text).replace("|", "\\|").split())
    return "| " + " | ".join([cell(path), cell(note)] + ["-"] * (TABLE_HEADER.count("---") - 2)) + " |"


def load_eval(path):
    """(eval.json's dict, None), or (None, why it is none). A file that does not start as a JSON object is read no
    further (a checkpoint given by mistake is not decoded whole); one without a row (config.json) is no eval.json."""
    try:
        with open(path, "rb") as fh:
            if fh.read(256).lstrip()[:1] != b"{":
                return None, "not JSON"
            fh.seek(0)
            ev = json.loads(fh.read().decode())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(ev, dict) or not {"run", "eps"} <= ev.keys():
        return None, "no evaluation in it"
    return ev, None


def runs_inside(folder):
    """The run folders (a config.json inside) directly in folder: a study's root."""
    with contextlib.suppress(OSError):
        return sum(os.path.isfile(os.path.join(folder, d, "config.json")) for d in os.listdir(folder))
    return 0


def table_entry(path):
    """What --table lists for one argument: (its rows, None) for a run folder or eval.json file with results, else
    (None, why there are none) and whether it is a run folder all the same (not evaluated, eval.json unreadable)."""
    f = os.path.join(path, "eval.json") if os.path.isdir(path) else path
    if os.path.isfile(f):
        ev, why = load_eval(f)
        if ev is not None:
            return run_rows(ev), None, True
        if f != path:
            return None, f"eval.json unreadable ({why})", True
        return None, f"not a run folder or eval.json ({why})", False
    if not os.path.exists(path):
        return None, "not found", False
    if not os.access(path, os.R_OK | os.X_OK):
        return None, "not a run folder (unreadable)", False
    ckpt = next((c for c in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, c))), None)
    if ckpt or os.path.isfile(os.path.join(path, "config.json")):
        return None, f"not evaluated ({f'--eval {os.path.join(path, ckpt)}' if ckpt else 'no checkpoint yet'})", True
    held = runs_inside(path)
    inside = f"; it holds {held} run folder{'s' * (held > 1)}: --table {path}/*" if held else ""
    return None, "not a run folder" + inside, False


def results_table(paths):
    """One markdown table of many runs (each path a run folder or an eval.json); what has no results gets a row
    saying why, so that one stray entry of a glob (runs/*) does not cost the table; none a run: a UserError."""
    rows, notes, any_run = [], [], False
    for p in paths:
        got, why, is_run = table_entry(p)
        rows += got or [note_row(p, why)]
        if why is not None:
            notes.append(f"{p}: {why}")
        any_run |= is_run
    if not any_run:
        raise UserError(f"--table: no run folder or eval.json among the arguments ({'; '.join(notes)})")
    return TABLE_HEADER + "\n" + "\n".join(rows)


def read_metrics(run_dir):
    """metrics.jsonl's rows, one per epoch. A last line without its newline is being written by a run in training
    and is left out; a missing file or an unreadable line is a UserError."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl (not a run folder, or no epoch of it has ended)")
    try:
        with open(path) as fh:
            lines = fh.readlines()
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path} ({type(e).__name__}: {e})")
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip() and line.endswith("\n"):
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"could not read {path} line {i} ({e})")
    return rows


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


LOSS_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))  # a run's loss terms, several runs drawn
# lambda's panel: metrics.jsonl key, legend name, line style (several runs: a colour each, these tell the series apart)
SHARE_SERIES = (("lambda", "lambda(t)", "-"), ("grad/share", "grad/share", "--"), ("share_target", "share target", ":"))


def logs_share(seeds):
    """Whether a label's runs logged what lambda's panel draws: the gradient probe, or a lambda that varies
    (--lam share:S)."""
    rows = [r for rows in seeds for r in rows]
    return any("grad/share" in r for r in rows) or len({r["lambda"] for r in rows if "lambda" in r}) > 1


def log_if_positive(ax):
    if ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()):
        ax.set_yscale("log")  # the series differ by orders of magnitude


def figure_legend(fig, axes):
    """One legend for the whole figure, below the panels (constrained layout leaves it room, so it hides no curve),
    each label once (M' and M are in both accuracy panels); as many columns as the figure's width holds."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        return
    per_entry = 0.7 + 0.075 * max(map(len, entries))  # inches: the line sample and the text at fontsize 8
    ncol = max(1, min(len(entries), int(fig.get_figwidth() / per_entry)))
    fig.set_figheight(fig.get_figheight() + 0.2 * -(-len(entries) // ncol))  # room for its rows
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=ncol, fontsize=8)


def curves_figure(curves):
    """curves: {label: [metrics.jsonl rows of each seed]} -> a figure of three panels, the mean over seeds per
    epoch: natural and PGD accuracy on the monitored test images of M' (solid) and M (dashed, when trained), and
    the training loss terms; a fourth, lambda(t) and the gradient share (and --lam share:S's target), when a run
    logged them (logs_share). Several labels: a colour each (loss terms by line style); one: a colour per term.
    One legend below the panels (figure_legend), every axis labelled, epochs ticked at integers."""
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    share = any(logs_share(seeds) for seeds in curves.values())
    fig, axes = plt.subplots(1, 3 + share, figsize=(5.3 * (3 + share), 4), layout="constrained")
    pgd_keys, one = set(), len(curves) == 1
    for i, (label, seeds) in enumerate(curves.items()):
        n = min(len(rows) for rows in seeds)  # the epochs every seed has reached
        epochs, first = [r["epoch"] for r in seeds[0][:n]], seeds[0][0]
        mean = lambda k, scale=1: [scale * statistics.mean(rows[e][k] for rows in seeds) for e in range(n)]
        colour = plt.cm.tab10(i % 10)
        pgd = next((k for k in first if k.startswith("pgd") and k.endswith("_acc")), None)
        pgd_keys.add(pgd)
        for ax, key in ((axes[0], "nat_acc"), (axes[1], pgd)):
            if key in first:
                ax.plot(epochs, mean(key, 100), color=colour, marker="o", ms=3, label=f"{label} M'")
            if key and "std_" + key in first:
                ax.plot(epochs, mean("std_" + key, 100), color=colour, ls="--", label=f"{label} M")
        for j, k in enumerate(k for k in first if k.startswith("loss/")):
            style = dict(color=plt.cm.tab10((j + 1) % 10), label=k[5:]) if one else dict(  # not the run's colour
                color=colour, ls=LOSS_STYLES[j % len(LOSS_STYLES)], label=f"{label} {k[5:]}")
            axes[2].plot(epochs, mean(k), **style)
        if share and logs_share(seeds):
            for k, name, ls in SHARE_SERIES:
                if all(k in rows[e] for rows in seeds for e in range(n)):  # a probe of one process only: not in DDP
                    target = k == "share_target"  # thin and beneath: grad/share lies on it when the control holds
                    axes[3].plot(epochs, mean(k), color=("grey" if target else "black") if one else colour, ls=ls,
                                 lw=1 if target else 1.5, marker=None if target else "s", ms=3, zorder=1 + (not target),
                                 label=name if one else f"{label} {name}")
    steps = f"PGD-{pgd_keys.pop()[3:-4]}" if len(pgd_keys) == 1 and None not in pgd_keys else "PGD"
    for ax, title in zip(axes, ("natural accuracy", f"{steps} accuracy")):
        ax.set_title(f"{title} (monitored test images)")
        ax.set_ylabel("accuracy (%)")
    axes[2].set_title("training loss terms (epoch mean)")
    axes[2].set_ylabel("loss (epoch mean)")
    if share:
        axes[3].set_title("lambda(t) and gradient share")
        axes[3].set_ylabel("lambda(t), grad/share")
    for ax in axes[2:]:
        log_if_positive(ax)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.5, 2.5
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    return fig


def plot_learning_curves(curves, path):
    """curves_figure(curves) as a PNG at path, atomically (a temp file renamed; removed if that fails) -> path."""
    fig, tmp = curves_figure(curves), f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return path


def plot_path(paths):
    """Where --plot writes, beside the runs: RUN/curves.png for one; for several, curves_<a>_vs_<b>....png in their
    common parent folder (a long list: the first name, the count and a hash of the names, so sets differ)."""
    if len(paths) == 1:
        return os.path.join(paths[0], "curves.png")
    full = [os.path.abspath(p) for p in paths]
    names = [os.path.basename(p) for p in full]
    name = "_vs_".join(names)
    if len(name) > 100:
        digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
        name = f"{names[0][:100]}_and_{len(names) - 1}_more_{digest}"
    return os.path.join(os.path.commonpath([os.path.dirname(p) for p in full]), f"curves_{name}.png")


def plot_runs(paths):
    """--plot RUN ...: one PNG of the runs' learning curves (curves_figure) at plot_path -> its path."""
    names = [os.path.basename(os.path.abspath(p)) for p in paths]
    labels = names if len(set(names)) == len(names) else paths  # same folder names: the paths tell them apart
    curves = {}
    for label, p in zip(labels, paths):
        rows = read_metrics(p)
        if not rows:
            raise UserError(f"--plot: {p} has no epoch in metrics.jsonl yet")
        curves[label] = [rows]
    out = plot_path(paths)
    try:
        return plot_learning_curves(curves, out)
    except OSError as e:
        raise UserError(f"--plot: could not write {out} ({type(e).__name__}: {e})")


# =====================================================================================
# 5. the command line
#    main(): the one argv parser and the one sys.exit of every experiment script.
# =====================================================================================
def script_prefix():
    base = os.path.basename(sys.argv[0])
    return base[4:-3] if base.startswith("exp_") and base.endswith(".py") else "run"


def main(defaults, argv=None, prefix=None):
    """Entry point of every experiment script: the only argv parsing and the only sys.exit."""
    prefix = prefix or script_prefix()
    argv = sys.argv[1:] if argv is None else list(argv)
    script = os.path.basename(sys.argv[0]) if prefix == script_prefix() else f"exp_{prefix}.py"
    try:
        given = parse_flags(defaults, argv)
        if given.get("table"):
            print(results_table(given["table"]))
            return None
        if given.get("plot"):
            path = plot_runs(given["plot"])
            print(f"wrote the learning curves of {', '.join(given['plot'])} to {path}")
            return path
        if given.get("export"):
            out = export_state_dict(*given["export"], overwrite=given.get("overwrite", False))
            print(f"wrote M' of {given['export'][0]} as a plain state_dict to {out}")
            return given["export"][1]
        if given.get("eval"):
            out_dir = os.path.dirname(os.path.abspath(given["eval"]))
            evaluate_run(given["eval"], eval_config(given), out_dir)
            return out_dir
        defaults = fit_dataset_label(defaults, given)
        cfg = make_config(defaults, given)
        run_dir = given.get("out") or os.path.join(
            given.get("runs_dir", "runs"), run_name(cfg, name_base(defaults, cfg), prefix)
        )
        if given.get("resume"):
            check_run_dir(run_dir, True, False)
            cfg = resume_config(run_dir, given)
        run(cfg, run_dir, resume=given.get("resume", False), overwrite=given.get("overwrite", False),
            command=" ".join([script] + argv))
        if distributed.is_main():
            print(f"done: results in {run_dir}; evaluate with: python {script} --eval "
                  f"{os.path.join(run_dir, checkpoint_to_evaluate(cfg))}")
        return run_dir
    except UserError as e:  # --ddp: every rank raised it; rank 0 prints (distributed.stderr)
        distributed.stderr(f"error: {e}\n")
        sys.exit(2)
    except (Diverged, SanityError) as e:
        distributed.stderr(f"error: {e}\n")
        sys.exit(1)
    except Interrupted as e:
        distributed.stderr(f"{e}\n")
        sys.exit(e.code)
