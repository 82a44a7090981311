"""exp_ablations.py: each study's --quick --dry-run lists the right runs; the time study runs on CPU;
standard training and a frozen pre-trained M behave as Tables VII / X need."""
import os

import pytest
import torch

import common
import exp_ablations as ab
from test_runs import DEFAULTS, tiny_args

EXPECTED = {
    "relation": [["--method", "at"], ["--method", "at", "--train", "--relation", "mca"],
                 ["--method", "at", "--train", "--relation", "rkd"], ["--method", "at", "--train", "--relation", "crd"],
                 ["--method", "at", "--train"]],
    "batch-size": [["--train", "--batch-size", b] for b in ("128", "256", "384")],
    "lambda": [["--train", "--lam", lam] for lam in ("0", "5a", "10a", "20a", "50a")],
    "beta-sweep": [["--method", "trades", "--beta", str(b)] for b in range(1, 7)],
    "mobilenet": [["--arch", "mobilenet_v3", "--method", m] + t for m in ("at", "trades") for t in ([], ["--train"])],
}


@pytest.mark.parametrize("study", sorted(ab.STUDIES))
def test_dry_run_lists_the_runs(study, capsys, tmp_path):
    ab.main(["--study", study, "--quick", "--dry-run", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    runs = [l for l in out if l.startswith("[missing]")]
    listed = ab.STUDIES[study](True, lambda a: ab.run_dir_of(a, ["--runs-dir", str(tmp_path)], True))
    assert len(runs) == len(listed) and out[0].startswith(f"study {study}: {len(listed)} runs")
    for line, (_, args, _) in zip(runs, listed):
        assert " ".join(args + ["--runs-dir"]) in line and "--quick" in line
    if study in EXPECTED:
        assert [args for _, args, _ in listed] == EXPECTED[study]
    assert not os.listdir(tmp_path)  # a dry run makes nothing


def test_study_specific_runs():
    small, large = ab.backbones(quick=False)
    assert (small, large) == ("resnet18", "wrn34_10")
    runs = ab.study_std_backbone(False, None)
    assert [a for _, a, _ in runs] == [["--method", "standard", "--arch", "resnet18"], ["--train", "--std-arch", "resnet18"],
                                      ["--method", "standard", "--arch", "wrn34_10"], ["--train", "--std-arch", "wrn34_10"]]
    runs = ab.study_pretrained_std(False, lambda a: "/runs/" + ab.slug(a))
    star = runs[2][1]
    assert star[star.index("--std-ckpt") + 1] == "/runs/method-standard_arch-resnet18/last.pt" and "--freeze-std" in star


def test_time_study_runs_on_cpu(capsys):
    table = ab.main(["--study", "time", "--quick", "--steps-only", "1", "--warmup", "0", "--device", "cpu",
                     "--batch-size", "16"])
    lines = table.splitlines()
    assert lines[0].startswith("Training time on CPU") and len(lines) == 4 + len(ab.TIME_CONFIGS)
    rows = {l.split("|")[1].strip(): l for l in lines[4:]}
    assert set(rows) == {label for label, _, _ in ab.TIME_CONFIGS}
    assert rows["TRADES + TRAIN"].rstrip(" |").endswith("%")


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


def test_study_refuses_a_folder_with_other_settings(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "QUICK_ARGS", ab.QUICK_ARGS + ["--batch-size", "16", "--steps", "1", "--eval-steps", "1"])
    args = ["--data-file", tiny_npz, "--device", "cpu", "--runs-dir", str(tmp_path)]
    ab.main(["--study", "lambda", "--quick", "--dry-run"] + args)  # nothing yet: fine
    run_dir = ab.run_dir_of(["--train", "--lam", "0"], args, True)
    os.makedirs(run_dir)
    common.main(DEFAULTS, ["--train", "--lam", "0", "--out", run_dir, "--epochs", "1", "--batch-size", "16", "--steps", "1",
                           "--eval-steps", "1"] + args + ["--quick"])  # 1 epoch, the study wants 2
    with pytest.raises(common.UserError, match="other settings"):
        ab.main(["--study", "lambda", "--quick", "--dry-run"] + args)


def test_a_diverged_run_keeps_its_row_and_the_study_goes_on(tiny_npz, tmp_path, monkeypatch):
    real = common.BASE_METHODS["at"]

    def nan_loss(s, cfg):
        terms = real.loss(s, cfg)
        terms["ce_adv"] = terms["ce_adv"] * float("nan")
        return terms
    monkeypatch.setitem(common.BASE_METHODS, "nanat", common.Method(real.attack, nan_loss))
    monkeypatch.setitem(ab.STUDIES, "toy", lambda quick, dir_of: [("diverges", ["--method", "nanat"], "nat"),
                                                                  ("fine", ["--method", "at"], "nat")])
    monkeypatch.setattr(ab, "QUICK_ARGS", ab.QUICK_ARGS + ["--batch-size", "16", "--steps", "1", "--eval-steps", "1",
                                                           "--epochs", "1", "--milestones", "1"])
    args = ["--data-file", tiny_npz, "--device", "cpu", "--runs-dir", str(tmp_path)]
    fine_ckpt = os.path.join(ab.run_dir_of(["--method", "at"], args, True), "last.pt")
    for attempt in range(2):  # the second time: the diverged run is tried again, the finished one reused
        with pytest.raises(SystemExit) as e:
            ab.main(["--study", "toy", "--quick"] + args)
        assert e.value.code == 1
        if attempt == 0:
            first_mtime = os.path.getmtime(fine_ckpt)
    assert os.path.getmtime(fine_ckpt) == first_mtime
    with open(os.path.join(ab.study_root(args, True), "toy.md")) as fh:
        lines = fh.read().splitlines()
    assert lines[2] == "| diverges | diverged | - | - | - |"
    assert lines[3].startswith("| fine | ") and "diverged" not in lines[3] and len(lines) == 4
    with open(os.path.join(ab.run_dir_of(["--method", "nanat"], args, True), "log.txt")) as fh:
        text = fh.read()
    assert "diverged: non-finite loss in epoch 1" in text and "no checkpoint was written yet" in text
