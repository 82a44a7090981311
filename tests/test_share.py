"""--lam share:S (common.ShareLambda): the moving average against an independent float64 computation, the
contract (measured grad/share within +-25% of S in every epoch after the first, for every base method and
relation loss) on tiny runs, exact resume, what runs record, the warning of a constant lambda, bad values.
DDP equality with one process: tests/test_ddp.py (case trades+share)."""
import json
import os

import numpy as np
import pytest
import torch

import common
import runs
from conftest import make_config, read_rows, refused, run_main, tiny_args, write_npz

S = 0.2


@pytest.mark.parametrize("decay", [None, 0.8])  # the default (common.SHARE_EMA), and a smoothing one
def test_share_lambda_matches_a_float64_moving_average(decay, monkeypatch):
    if decay is not None:
        monkeypatch.setattr(common, "SHARE_EMA", decay)
    rng = np.random.default_rng()  # fresh norms on every run
    n = int(rng.integers(5, 40))
    n_rob, n_tp = rng.uniform(0.01, 3.0, n), rng.uniform(0.01, 3.0, n)
    target = rng.uniform(0.05, 2.0)
    share = common.ShareLambda(torch.device("cpu"))
    beta = common.SHARE_EMA
    for k in range(n):
        got = share.update(torch.tensor(n_rob[k], dtype=torch.float32), torch.tensor(n_tp[k], dtype=torch.float32),
                           target).item()
        w = beta ** np.arange(k, -1, -1)  # weights of steps 0..k
        r = (n_tp[:k + 1].astype(np.float32).astype(np.float64) / n_rob[:k + 1].astype(np.float32).astype(np.float64))
        want = target / (np.sum(w * r) / np.sum(w))
        assert got == pytest.approx(min(want, common.SHARE_LAMBDA_MAX), rel=1e-9)
    first = common.ShareLambda(torch.device("cpu")).update(torch.tensor(2.0), torch.tensor(0.5), 0.3).item()
    assert first == pytest.approx(0.3 * 2.0 / 0.5)  # step 1: its own ratio (no warm-up bias)
    assert common.ShareLambda(torch.device("cpu")).update(torch.tensor(1.0), torch.tensor(0.0), 0.3).item() \
        == common.SHARE_LAMBDA_MAX  # L_TP without gradient: the ceiling, not infinity


@pytest.fixture(scope="module")
def share_npz(tmp_path_factory):
    """Fixed data (the contract is a tolerance on a training run: same data, same run on one machine)."""
    np.random.seed(5)
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 544)
    x = (rng.integers(0, 256, (544, 16, 16, 3)) * 0.5 + y[:, None, None, None] * 40).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("share") / "d.npz"
    np.savez(path, x_train=x[:512], y_train=y[:512], x_test=x[512:], y_test=y[512:])
    return str(path)


CONTRACT = {"at": ("--method", "at"), "trades": ("--method", "trades"), "mart": ("--method", "mart"),
            "alp": ("--method", "alp"), "trades+lbgat": ("--method", "trades", "--lbgat"),
            "at+lbgat": ("--method", "at", "--lbgat"),
            "rkd": ("--method", "at", "--relation", "rkd"), "crd": ("--method", "at", "--relation", "crd"),
            "mca": ("--method", "at", "--relation", "mca"), "share-ramp": ("--method", "trades", "--lam", f"share:{S}a")}


@pytest.mark.parametrize("case", list(CONTRACT))
def test_measured_share_stays_within_25_percent_of_the_target(case, share_npz, tmp_path):
    out = tmp_path / "r"
    run_main(tiny_args(share_npz, out, "--train", "--lam", f"share:{S}", "--epochs", "4", "--batch-size", "32",
                       *CONTRACT[case]))
    rows = read_rows(out)
    assert len(rows) == 4
    for r in rows:
        target = S * (r["a"] if case == "share-ramp" else 1.0)
        assert r["share_target"] == pytest.approx(target)
        if r["epoch"] > 1:
            assert abs(r["grad/share"] / target - 1) <= 0.25, (case, [x["grad/share"] for x in rows])
        assert 0 < r["lambda"] < common.SHARE_LAMBDA_MAX
    # lambda adapts: it is not one constant over the run
    assert len({round(r["lambda"], 6) for r in rows}) == 4


def test_a_constant_lambda_does_not_keep_the_share(share_npz, tmp_path):
    """The control of the test above: the same runs with a constant lambda leave the share where it falls,
    so the +-25% contract is something the share lambda does, not a property of these tiny runs."""
    out = tmp_path / "c"
    run_main(tiny_args(share_npz, out, "--train", "--lam", "0.2", "--epochs", "4", "--batch-size", "32",
                       "--method", "at"))
    shares = [r["grad/share"] for r in read_rows(out)]
    assert max(abs(s / S - 1) for s in shares[1:]) > 0.25, shares


def test_a_share_run_records_its_target_and_names_it(share_npz, tmp_path):
    cfg = make_config(train=True, lam="share:0.15")
    assert runs.name_part("lam", cfg.lam) == "lam-share0.15"  # no ':' in folder names (Windows checkouts)
    assert runs.run_name(cfg, make_config()).endswith("lam-share0.15_train")
    out = tmp_path / "r"
    run_main(tiny_args(share_npz, out, "--train", "--lam", "share:0.15", "--method", "at"))
    assert json.load(open(out / "config.json"))["config"]["lam"] == "share:0.15"
    rows = read_rows(out)
    assert all({"lambda", "share_target", "grad/share", "grad/robust_norm", "loss/tp"} <= set(r) for r in rows)
    assert not any(k.startswith("loss/lambda") for k in rows[0])  # lambda is a measurement, not a loss term
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["share"]["ema"][1].item() > 0  # the moving average's state travels in the checkpoint


@pytest.mark.parametrize("stop_after", [5, 16])  # mid-epoch 1, and at the end of epoch 1 (16 steps per epoch)
def test_a_share_run_resumes_exactly(share_npz, tmp_path, monkeypatch, stop_after):
    extra = ("--method", "trades", "--train", "--lam", "share:0.2", "--batch-size", "32")
    run_main(tiny_args(share_npz, tmp_path / "full", *extra))
    calls = {"n": 0}
    real_step = common.train_step

    def interrupting_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == stop_after:
            common.StopFlag.requested = True
        return real_step(*a, **kw)
    monkeypatch.setattr(common, "train_step", interrupting_step)
    with pytest.raises(SystemExit):
        run_main(tiny_args(share_npz, tmp_path / "cut", *extra))
    monkeypatch.setattr(common, "train_step", real_step)
    run_main(tiny_args(share_npz, tmp_path / "cut", "--resume", *extra))
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert torch.equal(full["share"]["ema"], cut["share"]["ema"])
    for k in full["models"]:
        for name, v in full["models"][k].items():
            assert torch.equal(v, cut["models"][k][name]), f"{k}.{name} differs after resume"
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in read_rows(tmp_path / "full")] == [drop(r) for r in read_rows(tmp_path / "cut")]


def test_a_constant_lambda_that_pulls_harder_than_the_robust_loss_is_warned_once(share_npz, tmp_path, capsys):
    out = tmp_path / "w"
    run_main(tiny_args(share_npz, out, "--train", "--lam", "50", "--method", "at", "--epochs", "3"))
    rows = read_rows(out)
    assert all(r["grad/share"] > 1 for r in rows)
    log = open(out / "log.txt").read()
    assert log.count("warning: --lam 50: the topology term pulls harder than the robust loss") == 1
    assert "gradient share" in log and "results/response.md" in log and "--lam share:S" in log
    assert "summary: --lam 50" in log.splitlines()[-1] or any(l.startswith("summary: --lam 50")
                                                               for l in log.splitlines())
    quiet = tmp_path / "q"
    run_main(tiny_args(share_npz, quiet, "--train", "--lam", "share:2", "--method", "at", "--epochs", "2"))
    assert "warning: --lam" not in open(quiet / "log.txt").read()  # a share run is at its share by choice


@pytest.mark.parametrize("value", ["share:", "share:-1", "share:x", "share:0", "share:nan", "share:0.1b"])
def test_malformed_share_values_are_one_line(value, tiny_npz, tmp_path, capsys):
    err = refused(tiny_args(tiny_npz, tmp_path / "r", "--train", "--lam", value), capsys)
    assert "--lam" in err and "share" in err
    assert not os.path.exists(tmp_path / "r")


def test_share_with_lbgat0_is_refused(tiny_npz, tmp_path, capsys):
    err = refused(tiny_args(tiny_npz, tmp_path / "r", "--method", "at", "--lbgat", "--lbgat0", "--train",
                            "--lam", "share:0.1"), capsys)
    assert "--lbgat0" in err and "share" in err
