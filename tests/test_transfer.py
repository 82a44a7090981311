"""The transfer study (exp_ablations.transfer_study): the registered design, the lr rule and the trade-off line on
hand-made numbers, and a tiny study that runs every arm, keeps its results, commits nothing it was not asked to,
and rebuilds its tables from the kept files alone."""
import json
import os
import shutil

import pytest

import common
import exp_ablations as ab
import runs
from test_response import TINY


def test_the_design_is_the_registered_one():
    planned = ab.transfer_runs()
    assert [arm for arm, _ in planned[:3]] == ["lr"] * 3 and [st["lr"] for _, st in planned[:3]] == [0.1, 0.2, 0.4]
    assert all(st["seed"] == 1 and st["batch_size"] == 512 and str(st["lam"]) == "0" for _, st in planned[:3])
    scale = [st for arm, st in planned if arm == "scale"]
    assert sorted((str(st["lam"]), st["beta"], st["seed"]) for st in scale) == sorted(
        (lam, beta, s) for s in (7, 8, 9) for lam, beta in (("0", 6.0), ("0.1", 6.0), ("share:0.15", 6.0), ("0", 3.0)))
    assert all(st["batch_size"] == 128 and "lr" not in st for st in scale)
    batch = [st for arm, st in planned if arm == "batch"]
    assert sorted((str(st["lam"]), st["seed"]) for st in batch) == sorted(
        [(lam, s) for s in (7, 8, 9) for lam in ("0", "0.1", "share:0.15")] + [("0.025", 7), ("0.025", 8)])
    assert all(st["batch_size"] == 512 and st["lr"] == ab.PENDING and st["beta"] == 6.0 for st in batch)
    assert all(st["method"] == "trades" and st["train"] for _, st in planned)
    ts = ab.TransferStudy([])
    cfg = ts.study.config(ab.transfer_settings("share:0.15", 7))
    assert (cfg.train_n, cfg.val_n, cfg.test_n, cfg.epochs, cfg.milestones, cfg.steps, cfg.step_size, cfg.beta,
            cfg.baselines, cfg.tp_reduction, cfg.arch, cfg.std_arch, str(cfg.lam)) == (
        25000, 1000, 0, 8, [6, 7], 3, 0.01, 6.0, "official", "sum", "cnn6", "cnn6", "share:0.15")
    ecfgs = ts.eval_configs()
    assert ecfgs[0].test_n is None and set(ecfgs[0].metrics) == {"nat", "pgd", "tp", "nbr"}
    assert ecfgs[1].test_n == 1000 and {"cw", "aa", "knn"} <= set(ecfgs[1].metrics)
    assert ecfgs[1].aa_attacks == ["apgd-ce", "apgd-dlr"] and ecfgs[1].aa_n == 1000


def test_lr_rule_on_hand_made_scores():
    assert ab.select_lr({0.1: 0.5})[0] is None
    assert ab.select_lr({0.1: 0.50, 0.2: 0.61, 0.4: 0.60})[0] == 0.2
    assert ab.select_lr({0.1: 0.61, 0.2: 0.61, 0.4: 0.60})[0] == 0.1  # a tie goes to the smaller lr


def test_the_trade_off_line_against_hand_computation():
    b6 = {"natural": 0.40, "pgd": 0.25, "natural_1k": 0.41, "aa": 0.20}
    b3 = {"natural": 0.50, "pgd": 0.20, "natural_1k": 0.52, "aa": 0.14}  # beta 3: +10 natural, -5 PGD
    on = {"natural": 0.45, "pgd": 0.225, "natural_1k": 0.465, "aa": 0.17}  # on both lines
    assert ab.above_line(on, b6, b3, "pgd") == pytest.approx(0.0, abs=1e-9)
    assert ab.above_line(on, b6, b3, "aa") == pytest.approx(0.0, abs=1e-9)
    up = {**on, "pgd": 0.235}
    assert ab.above_line(up, b6, b3, "pgd") == pytest.approx(1.0)  # 1 point above the line
    assert ab.above_line({**on, "aa": None}, b6, b3, "aa") is None


def tiny_transfer(monkeypatch, tiny_npz):
    monkeypatch.setattr(ab, "TRANSFER_TRAIN", {**ab.TRANSFER_TRAIN, **TINY, "data_file": tiny_npz})
    monkeypatch.setattr(ab, "RESPONSE_EVAL", {"knn_k": [30], "knn_train_n": 16, "nbr_k": [3, 5], "aa_n": 8,
                                              "aa_attacks": ["apgd-ce"]})
    monkeypatch.setattr(ab, "TRANSFER_EVAL", [ab.TRANSFER_EVAL[0], {**ab.TRANSFER_EVAL[1], "test_n": 16}])
    monkeypatch.setattr(ab, "TRANSFER_BIG", 32)
    monkeypatch.setattr(ab, "TRANSFER_SEEDS", [7])
    monkeypatch.setattr(ab, "TRANSFER_SCALED_SEEDS", [7])
    monkeypatch.setattr(ab, "TRANSFER_MINUTES", {(16, "full"): 1, (32, "full"): 1, (32, "val"): 1})
    monkeypatch.setattr(ab, "transfer_settings", lambda lam, seed, batch=16, beta=6.0, lr=None: {
        "method": "trades", "train": True, "lam": lam if lam == ab.PENDING else common.Lambda.parse(lam), "seed": seed,
        "batch_size": batch, "beta": beta, **({} if lr is None else {"lr": lr})})


@pytest.mark.slow
def test_a_tiny_transfer_study_runs_keeps_and_rebuilds(tiny_npz, tmp_path, monkeypatch, capsys):
    tiny_transfer(monkeypatch, tiny_npz)
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    args = ["--runs-dir", str(runs_dir)]
    text = ab.transfer_study(ab.TRANSFER_ARMS, args, False, print, results_root=str(results))
    ts = ab.TransferStudy(args, str(results))
    lr_star, _ = ab.select_lr(ts.scores())
    assert lr_star in ab.TRANSFER_LRS and f"lr* = {lr_star:g}" in text
    kept = sorted(p for p in os.listdir(results) if os.path.isdir(results / p))
    assert len(kept) == len(ab.transfer_runs()) == 3 + 4 + 4
    for name in kept:  # the lr runs are never evaluated on the test set
        files = sorted(os.listdir(results / name))
        lr_run = "seed" not in name  # seed 1, the default: only the lr runs
        assert files == (["config.json", "metrics.jsonl"] if lr_run else ["config.json", "eval.json", "metrics.jsonl"])
    share_run = next(results / n for n in kept if "share0.15" in n and "batch" not in n)
    ev = json.load(open(share_run / "eval.json"))
    assert {ev["n_test"]} | {r["n_test"] for r in ev.get("earlier", [])} == {32, 16}  # all test images, the first 16
    assert "| TRADES + TRAIN (share 0.15), batch 16 | 7 |" in text and "above the PGD-20 line" in text
    assert (results / "transfer.png").is_file()
    # a run stopped in its evaluation (after the all-images row, before the first-16 one) and never kept: listed as
    # trained, not done; the next pass evaluates and keeps it without training it again
    run_dir = runs_dir / "transfer_cpu" / share_run.name
    stamp = os.stat(run_dir / "last.pt").st_mtime_ns
    json.dump({**next(r for r in ev["earlier"] if r["n_test"] == 32), "format": 2}, open(run_dir / "eval.json", "w"))
    shutil.rmtree(share_run)
    capsys.readouterr()
    ab.transfer_study(ab.TRANSFER_ARMS, args, True, print, results_root=str(results))
    left = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[") and not l.startswith("[done]")]
    assert len(left) == 1 and left[0].startswith("[trained]") and left[0].endswith(share_run.name)
    with runs.run_lock(str(run_dir)):  # another process evaluates it now: skipped, not an error
        ab.transfer_study(ab.TRANSFER_ARMS, args, False, print, results_root=str(results))
    assert "another process is running it; skipped" in capsys.readouterr().out and not share_run.exists()
    ab.transfer_study(ab.TRANSFER_ARMS, args, False, print, results_root=str(results))
    again = json.load(open(share_run / "eval.json"))
    assert {again["n_test"]} | {r["n_test"] for r in again.get("earlier", [])} == {32, 16}
    assert os.stat(run_dir / "last.pt").st_mtime_ns == stamp
    capsys.readouterr()
    shutil.rmtree(runs_dir)  # a new machine: nothing is retrained, the tables come back the same
    ab.transfer_study(ab.TRANSFER_ARMS, args, True, print, results_root=str(results))
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("[done]") for line in out) == len(ab.transfer_runs())
    assert ab.transfer_study(ab.TRANSFER_ARMS, args, False, print, results_root=str(results), report_only=True) == text
    assert not runs_dir.exists()


def test_dry_run_lists_every_run_with_minutes(tmp_path, capsys):
    ab.main(["--study", "transfer", "--dry-run", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    listed = [l for l in out if l.startswith("[")]
    assert len(listed) == len(ab.transfer_runs()) == 26
    assert all("core-min" in l for l in listed) and out[-1].startswith("design: ~")
    assert not os.listdir(tmp_path)
