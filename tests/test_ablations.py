"""exp_ablations.py: each study's --quick --dry-run lists the right runs; the time study runs on CPU;
standard training and a frozen pre-trained M behave as Tables VII / X need; the evidence study's tables."""
import os
import statistics

import pytest
import torch

import common
import runs
import exp_ablations as ab
from conftest import DEFAULTS, tiny_args

EXPECTED = {
    "relation": [{"method": "at"}, {"method": "at", "train": True, "relation": "mca"},
                 {"method": "at", "train": True, "relation": "rkd"}, {"method": "at", "train": True, "relation": "crd"},
                 {"method": "at", "train": True}],
    "batch-size": [{"train": True, "batch_size": b} for b in (128, 256, 384)],
    "lambda": [{"train": True, "lam": common.Lambda.parse(lam)} for lam in ("0", "5a", "10a", "20a", "50a")],
    "beta-sweep": [{"method": "trades", "beta": float(b)} for b in range(1, 7)],
    "mobilenet": [{"arch": "mobilenet_v3", "method": m, **t} for m in ("at", "trades") for t in ({}, {"train": True})],
}


@pytest.mark.parametrize("study", sorted(ab.STUDIES))
def test_dry_run_lists_the_runs(study, capsys, tmp_path):
    ab.main(["--study", study, "--quick", "--dry-run", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    runs = [l for l in out if l.startswith("[missing]")]
    st = ab.Study(["--runs-dir", str(tmp_path)], quick=True)
    listed = ab.STUDIES[study](True, st.dir_of)
    assert len(runs) == len(listed) and out[0].startswith(f"study {study}: {len(listed)} runs")
    for line, (label, settings, _) in zip(runs, listed):
        assert line.startswith(f"[missing] {label}: ") and line.endswith(" -> " + st.dir_of(settings))
        cfg = st.config(settings)
        assert cfg.quick and cfg.epochs == 2 and cfg.train_n == 1024  # the study's quick scale
    assert len({st.dir_of(s) for _, s, _ in listed}) == len(listed)  # one folder per run
    if study in EXPECTED:
        assert [settings for _, settings, _ in listed] == EXPECTED[study]
    assert not os.listdir(tmp_path)


def test_evidence_variants_run_on_their_seeds_unless_named():
    runs = ab.evidence_runs(None, [1, 2, 3])
    assert sorted(s for k, _, s, _, _ in runs if k == "at_train_lam20a") == ab.EVIDENCE_VARIANT_SEEDS
    assert sorted(s for k, _, s, _, _ in runs if k == "at_train") == [1, 2, 3]
    named = ab.evidence_runs(["at_train_nat"], [2, 3])
    assert [(k, s, st["tp_input"]) for k, _, s, st, _ in named] == [("at_train_nat", 2, "nat"),
                                                                     ("at_train_nat", 3, "nat")]
    assert all(("at", v) in ab.EVIDENCE_PAIRS for v in ab.EVIDENCE_VARIANTS)  # a dry run makes nothing


def test_study_folders_use_the_run_naming_scheme(tmp_path):
    st = ab.Study(["--runs-dir", str(tmp_path), "--data-file", "/x/cifar10_small.npz", "--lr", "0.05"], quick=True)
    assert st.root == os.path.join(str(tmp_path), "ablations_quick_data-file-cifar10_small_lr-0.05")
    assert (os.path.basename(st.dir_of({"method": "at", "train": True, "relation": "mca"}))
            == "at_relation-mca_train_quick")
    assert st.config({}).lr == 0.05  # passed-through flags reach every run ...
    assert st.config({"lr": 0.2}).lr == 0.2  # ... and a study's own setting wins over them
    with pytest.raises(common.UserError, match="--resume cannot be passed"):
        ab.Study(["--resume"])


def test_study_specific_runs():
    small, large = ab.backbones(quick=False)
    assert (small, large) == ("resnet18", "wrn34_10")
    runs = ab.study_std_backbone(False, None)
    assert [s for _, s, _ in runs] == [{"method": "standard", "arch": "resnet18"},
                                      {"train": True, "std_arch": "resnet18"},
                                      {"method": "standard", "arch": "wrn34_10"},
                                      {"train": True, "std_arch": "wrn34_10"}]
    runs = ab.study_pretrained_std(False, lambda s: "/runs/" + "_".join(f"{k}-{v}" for k, v in s.items()))
    star = runs[2][1]
    assert star["std_ckpt"] == "/runs/method-standard_arch-resnet18/last.pt" and star["freeze_std"]


def test_time_study_runs_on_cpu(capsys):
    table = ab.main(["--study", "time", "--quick", "--steps-only", "1", "--warmup", "0", "--device", "cpu",
                     "--batch-size", "16"])
    lines = table.splitlines()
    configs = ab.TIME_CONFIGS["methods"]
    assert lines[0].startswith("Training time on CPU") and len(lines) == 4 + len(configs)
    rows = {l.split("|")[1].strip(): l for l in lines[4:]}
    assert set(rows) == {label for label, _, _ in configs}
    assert rows["TRADES + TRAIN"].rstrip(" |").endswith("%") and "| TRADES |" in rows["TRADES + TRAIN"]
    assert "| TRADES + TRAIN |" in rows["TRADES + TRAIN, share:0.15"]


def test_time_study_compares_fast_paths_of_one_configuration(capsys):
    table = ab.main(["--study", "time", "--time-configs", "fast-paths", "--quick", "--steps-only", "1", "--warmup",
                     "0", "--device", "cpu", "--batch-size", "8", "--method", "trades", "--train", "--lam", "0.1"])
    rows = {l.split("|")[1].strip(): l for l in table.splitlines()[4:]}
    assert set(rows) == {"as given", "channels_last", "compile", "channels_last + compile"}
    assert all(rows[k].rstrip(" |").endswith("%") for k in rows if k != "as given")


def test_standard_method_and_frozen_pretrained_std(tiny_npz, tmp_path):
    std_dir = tmp_path / "std"
    common.main(DEFAULTS, tiny_args(tiny_npz, std_dir, "--method", "standard", "--epochs", "1"), prefix="t")
    std_ck = torch.load(std_dir / "last.pt", weights_only=False)
    assert set(std_ck["models"]) == {"adv"}  # standard training: one model, no attack
    star = tmp_path / "star"
    common.main(DEFAULTS, tiny_args(tiny_npz, star, "--method", "at", "--train", "--std-ckpt", str(std_dir / "last.pt"),
                                    "--freeze-std", "--epochs", "1"), prefix="t")
    ck = torch.load(star / "last.pt", weights_only=False)
    assert "std" not in ck["optimizers"]
    for k, v in std_ck["models"]["adv"].items():  # M is exactly the pre-trained model, BN statistics included
        assert torch.equal(v, ck["models"]["std"][k]), k
    with pytest.raises(SystemExit) as e:  # --freeze-std without --std-ckpt
        common.main(DEFAULTS, tiny_args(tiny_npz, tmp_path / "bad", "--train", "--freeze-std"), prefix="t")
    assert e.value.code == 2
    bare = tmp_path / "public_std.pt"  # a bare state_dict (a public standard model) works as --std-ckpt too
    torch.save({"state_dict": {f"module.{k}": v for k, v in std_ck["models"]["adv"].items()}}, bare)
    common.main(DEFAULTS, tiny_args(tiny_npz, tmp_path / "star2", "--method", "at", "--train", "--std-ckpt", str(bare),
                                    "--freeze-std", "--epochs", "1"), prefix="t")
    ck2 = torch.load(tmp_path / "star2" / "last.pt", weights_only=False)
    assert all(torch.equal(v, ck2["models"]["std"][k]) for k, v in std_ck["models"]["adv"].items())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SystemExit) as e:
        common.main(DEFAULTS, tiny_args(tiny_npz, tmp_path / "bad2", "--method", "at", "--train", "--std-ckpt",
                                        str(tmp_path / "list.pt"), "--freeze-std"), prefix="t")
    assert e.value.code == 2 and not (tmp_path / "bad2").exists()


TINY_STUDY = {**ab.STUDY_QUICK, "batch_size": 16, "steps": 1, "eval_steps": 1}


def test_study_refuses_a_folder_with_other_settings(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "STUDY_QUICK", TINY_STUDY)
    args = ["--data-file", tiny_npz, "--device", "cpu", "--runs-dir", str(tmp_path)]
    ab.main(["--study", "lambda", "--quick", "--dry-run"] + args)  # nothing yet: fine
    st = ab.Study(args, quick=True)
    settings = {"train": True, "lam": common.Lambda.parse("0")}
    runs.run(ab.Study(args + ["--epochs", "1"], quick=True).config(settings), st.dir_of(settings))  # 1 epoch, not 2
    with pytest.raises(common.UserError, match=r"other settings \(epochs\)"):
        ab.main(["--study", "lambda", "--quick", "--dry-run"] + args)


def test_a_diverged_run_keeps_its_row_and_the_study_goes_on(tiny_npz, tmp_path, monkeypatch):
    real = common.BASE_METHODS["at"]

    def nan_loss(s, cfg):
        terms = real.loss(s, cfg)
        terms["ce_adv"] = terms["ce_adv"] * float("nan")
        return terms
    monkeypatch.setitem(common.BASE_METHODS, "nanat", common.Method(real.attack, nan_loss))
    monkeypatch.setitem(ab.STUDIES, "toy", lambda quick, dir_of: [("diverges", {"method": "nanat"}, ["nat"]),
                                                                  ("fine", {"method": "at"}, ["nat"])])
    monkeypatch.setattr(ab, "STUDY_QUICK", {**TINY_STUDY, "epochs": 1, "milestones": [1]})
    args = ["--data-file", tiny_npz, "--device", "cpu", "--runs-dir", str(tmp_path)]
    st = ab.Study(args, quick=True)
    fine_ckpt = os.path.join(st.dir_of({"method": "at"}), "last.pt")
    for attempt in range(2):  # the second time: the diverged run is tried again, the finished one reused
        with pytest.raises(ab.StudyFailed, match="1 of 2 runs failed"):
            ab.main(["--study", "toy", "--quick"] + args)
        if attempt == 0:
            first_mtime = os.path.getmtime(fine_ckpt)
    assert os.path.getmtime(fine_ckpt) == first_mtime
    with open(os.path.join(st.root, "toy.md")) as fh:
        lines = fh.read().splitlines()
    assert lines[2] == "| diverges | diverged | - | - | - |"
    assert lines[3].startswith("| fine | ") and "diverged" not in lines[3] and len(lines) == 4
    with open(os.path.join(st.dir_of({"method": "nanat"}), "log.txt")) as fh:
        text = fh.read()
    assert "diverged: non-finite loss in epoch 1" in text and "no checkpoint was written yet" in text


# ------------------------------------------------------------------------------ the evidence study
def fake_eval(rng, with_std):
    r = {"natural": rng.uniform(0.3, 0.7), "pgd": rng.uniform(0.1, 0.4), "cw": rng.uniform(0.1, 0.4),
         "aa": rng.uniform(0.1, 0.4), "knn": {"natural": {"30": rng.uniform(0.3, 0.7)},
                                              "robust": {"30": rng.uniform(0.1, 0.4)}}}
    if with_std:
        r.update(test_ltp=rng.uniform(0.1, 2.0), std_natural=rng.uniform(0.5, 0.8))
    return r


def cells(table, first):
    """The cells of the row whose first cell is `first` (the first such row)."""
    row = next(l for l in table.splitlines() if l.startswith(f"| {first} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_evidence_tables_against_hand_computation():
    import random
    rng = random.Random()  # fresh numbers on every run
    results = {k: {s: fake_eval(rng, k.endswith("train")) for s in (1, 2, 3)} for k in ("at", "at_train", "trades")}
    del results["trades"][3]  # a missing seed is left out, not faked
    table = ab.evidence_tables(results)
    at = cells(table, "AT")
    nat = [100 * results["at"][s]["natural"] for s in (1, 2, 3)]
    assert at[1] == "3" and at[2] == f"{statistics.mean(nat):.2f} ± {statistics.stdev(nat):.2f}"
    assert at[-2:] == ["-", "-"]  # no M, so no test L_TP and no M accuracy
    ltp = [results["at_train"][s]["test_ltp"] for s in (1, 2, 3)]
    assert cells(table, "AT + TRAIN")[-2] == f"{statistics.mean(ltp):.2f} ± {statistics.stdev(ltp):.2f}"
    assert cells(table, "TRADES")[1] == "2"
    gain = cells(table, "AT + TRAIN vs AT")
    diffs = [100 * (results["at_train"][s]["pgd"] - results["at"][s]["pgd"]) for s in (1, 2, 3)]
    assert gain[1] == "3" and gain[3] == (f"{statistics.mean(diffs):.2f} ± {statistics.stdev(diffs):.2f} "
                                          f"({sum(d > 0 for d in diffs)}/3)")
    knn_diffs = [100 * (results["at_train"][s]["knn"]["robust"]["30"] - results["at"][s]["knn"]["robust"]["30"])
                 for s in (1, 2, 3)]
    assert gain[7].startswith(f"{statistics.mean(knn_diffs):.2f} ± ")
    paired = [l for l in table.splitlines() if l.startswith("| AT + TRAIN vs AT | ")]
    assert len(paired) == 4  # the gain row + one row per seed
    assert (f"| 2 | {100 * results['at'][2]['natural']:.2f} → "
            f"{100 * results['at_train'][2]['natural']:.2f} |" in paired[2])
    assert "TRADES + TRAIN vs" not in table  # no pair without both sides


def test_evidence_dry_run_lists_both_scales(capsys, tmp_path):
    ab.main(["--study", "evidence", "--dry-run", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    n = ((len(ab.EVIDENCE_CONFIGS) - len(ab.EVIDENCE_VARIANTS)) * len(ab.EVIDENCE_SEEDS)
         + len(ab.EVIDENCE_VARIANTS) * len(ab.EVIDENCE_VARIANT_SEEDS))
    assert len(out) == 2 * n
    assert all("M'=cnn6" in l and "PGD-3" in l for l in out if l.startswith("[cpu]"))
    assert sum(l.startswith("[gpu]") and "M'=preact_resnet18 M=resnet18" in l and "PGD-10" in l for l in out) == n
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ every run flag reaches the runs
def cli_value(f, default):
    """A command-line value of Config field f that differs from `default` (None: a store_true flag)."""
    kw = f.metadata["cli"]
    if f.type is bool or f.type == "bool":
        return None
    choices = kw.get("choices")
    choices = choices() if callable(choices) else choices
    if choices:
        return next(c for c in choices if c != default)
    typ = kw.get("type")
    if typ is runs.lam_arg:
        return "share:0.3" if str(default) != "share:0.3" else "0.3"
    if typ in (int, runs.count_arg):
        return str((default or 0) + 3)
    if typ in (float, runs.parse_number):
        return "0.0123"
    if typ is runs.int_list:
        return "3,4"
    return "some/where.npz"


@pytest.mark.parametrize("name", [f.name for f in runs.fields(runs.Config) if f.name not in ("quick",)])
def test_every_run_flag_given_to_a_study_reaches_its_runs(name, tmp_path):
    """exp_ablations.py's parser allowed abbreviations: --steps 5 was taken as its own --steps-only 5 and never
    reached the runs. Each Config flag given in full must be passed on and land in the runs' settings (what
    config.json records)."""
    f = next(f for f in runs.fields(runs.Config) if f.name == name)
    flag = "--" + name.replace("_", "-")
    value = cli_value(f, getattr(ab.Study([], quick=True).base, name))
    argv = ["--study", "lambda", "--quick", "--dry-run", flag] + ([] if value is None else [value])
    args, passthrough = ab.build_parser().parse_known_args(argv)
    assert flag in passthrough, f"{flag} was swallowed by exp_ablations.py's own flags: {vars(args)}"
    given = runs.parse_flags(ab.DEFAULTS, passthrough)
    base = ab.Study(passthrough, quick=True).base
    assert getattr(base, name) == given[name], f"{flag} did not reach the study's runs"
    saved = runs.recorded_config(base)[name]  # config.json's "config"
    assert saved == (runs.recorded_path(given[name]) if name in runs.PATH_SETTINGS
                     else str(given[name]) if name == "lam" else given[name])


def test_steps_reaches_the_runs_and_the_time_study(capsys, tmp_path):
    ab.main(["--study", "lambda", "--quick", "--steps", "5", "--dry-run", "--runs-dir", str(tmp_path)])
    listed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[missing]")]
    assert listed and all("_steps-5" in l for l in listed)
    with pytest.raises(SystemExit) as e:  # a prefix of a study flag is no flag of it
        ab.build_parser().parse_args(["--study", "time", "--steps-o", "2"])
    assert e.value.code == 2
    table = ab.main(["--study", "time", "--quick", "--steps", "2", "--steps-only", "1", "--warmup", "0",
                     "--device", "cpu", "--arch", "cnn_small", "--std-arch", "cnn_small", "--batch-size", "4"])
    assert "PGD-2," in table


def test_time_study_runs_with_a_data_file_of_another_class_count(tmp_path, capsys):
    """It added --dataset cifar100 itself and then refused a 10-class --data-file; it times random tensors."""
    from conftest import write_npz
    npz = write_npz(tmp_path / "ten.npz", classes=10, n_train=40)
    for extra in ([], ["--dataset", "cifar10"]):
        table = ab.main(["--study", "time", "--quick", "--steps-only", "1", "--warmup", "0", "--device", "cpu",
                         "--batch-size", "4", "--data-file", npz, *extra])
        assert table.startswith("Training time on CPU")
        assert "--data-file not used" in capsys.readouterr().out


@pytest.mark.parametrize("text, where", [("import common\ndef f(:\n    pass\n", "line 2: SyntaxError"),
                                         ("import common\nx = 1\nraise RuntimeError('boom')\n",
                                          "line 3: RuntimeError at import: boom")])
def test_extend_with_a_broken_script_is_one_line(text, where, tmp_path, capsys):
    script = tmp_path / "exp_broken.py"
    script.write_text(text)
    from conftest import ROOT, cli
    r = cli("--study", "lambda", "--quick", "--dry-run", "--extend", str(script), script="exp_ablations.py")
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(script) in err and where in err


def test_extend_says_what_it_takes_from_the_script(tmp_path, capsys):
    script = tmp_path / "exp_mine.py"
    script.write_text("import common\nfrom exp_example_method import loss_at_ls\n"
                      "common.BASE_METHODS['at_ls2'] = common.Method(common.attack_ce, loss_at_ls)\n"
                      "DEFAULTS = dict(dataset='cifar10', method='at_ls2', arch='cnn6', lam='5')\n")
    try:
        ab.main(["--study", "lambda", "--quick", "--dry-run", "--extend", str(script), "--method", "at_ls2",
                 "--runs-dir", str(tmp_path / "runs")])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"--extend {script}: registered ") and "method at_ls2" in out[0]
        assert "the study keeps its own settings" in out[0]
        assert "--arch cnn6" in out[0] and "--dataset cifar10" in out[0]
        assert all("arch-cnn6" not in line for line in out[1:])  # taken from the flags, not from the DEFAULTS
    finally:
        common.BASE_METHODS.pop("at_ls2", None)
