"""Evaluation: attacks on an undefended model, kNN score, AutoAttack, sanity checks, eval.json, --table."""
import argparse
import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import common
from conftest import DEFAULTS, refused, tiny_args


class ChannelMeans(nn.Module):
    """An undefended 3-class model: logits = scaled channel means (class = brightest channel).
    With round_input=True its forward quantises the input: zero gradients, a gradient-masked model."""

    def __init__(self, round_input=False):
        super().__init__()
        self.round_input = round_input

    def forward(self, x, return_features=False):
        if self.round_input:
            x = torch.round(x * 4) / 4
        f = x.mean(dim=(2, 3))
        z = 20 * f
        return (f, z) if return_features else z


def channel_data(n=60, seed=0, margin=0.3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 + 0.05 * torch.rand(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y] += margin  # the true channel is brighter by `margin`
    return x, y


def test_undefended_model_loses_most_accuracy_under_pgd():
    model = ChannelMeans().eval()
    x, y = channel_data(margin=0.05)
    assert (common.predict(model, x) == y).float().mean() == 1.0
    x_adv = common.attack_all(model, x, y, common.pgd_attack(0.031, 0.003, 20))
    common.check_adversarial(x_adv, x, 0.031, "pgd")
    assert (common.predict(model, x_adv) == y).float().mean() < 0.1


def test_cw_attack_breaks_undefended_model_too():
    model = ChannelMeans().eval()
    x, y = channel_data(margin=0.05)
    x_adv = common.attack_all(model, x, y, common.pgd_attack(0.031, 0.003, 20, "cw", 50.0))
    assert (common.predict(model, x_adv) == y).float().mean() < 0.1


def test_check_adversarial_fires():
    x = torch.rand(4, 3, 4, 4) * 0.5 + 0.25
    with pytest.raises(common.SanityError, match="eps-ball"):
        common.check_adversarial(x + 0.05, x, 0.031, "bad")
    with pytest.raises(common.SanityError, match=r"\[0,1\]"):
        common.check_adversarial(torch.full_like(x, 1.01), torch.ones_like(x), 0.031, "bad")


def clusters(n_per, num_classes, dim, seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_separable_clusters_score_one():
    sf, sy = clusters(40, 5, 16, 0)
    qf, qy = clusters(10, 5, 16, 0)
    qf = qf + 0.01 * torch.randn_like(qf)
    preds = common.knn_predict(sf, sy, qf, [1, 5, 30], 5)
    assert all((p == qy).all() for p in preds.values())


def test_knn_random_labels_near_chance():
    g = torch.Generator().manual_seed(1)
    sf, qf = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    sy, qy = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    acc = (common.knn_predict(sf, sy, qf, [30], 10)[30] == qy).float().mean().item()
    assert 0.05 < acc < 0.16


def test_knn_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(2)
    sf, sy = torch.randn(700, 8, generator=g), torch.randint(0, 7, (700,), generator=g)
    qf = torch.randn(300, 8, generator=g)
    full = common.knn_predict(sf, sy, qf, [5, 20], 7, chunk_q=10_000, chunk_s=10_000)
    chunked = common.knn_predict(sf, sy, qf, [5, 20], 7, chunk_q=64, chunk_s=50)
    assert all(torch.equal(full[k], chunked[k]) for k in (5, 20))


def test_knn_tie_broken_by_summed_similarity():
    # query along e0; class 0 neighbours at similarity 0.9 and 0.1, class 1 at 0.8 and 0.7: 2-2 vote, class 1 wins
    def unit(c):
        return torch.tensor([c, (1 - c * c) ** 0.5])
    sf = torch.stack([unit(0.9), unit(0.1), unit(0.8), unit(0.7), unit(-1.0)])
    sy = torch.tensor([0, 0, 1, 1, 0])
    pred = common.knn_predict(sf, sy, torch.tensor([[1.0, 0.0]]), [4], 2)[4]
    assert pred.item() == 1


def test_autoattack_runs_on_tiny_model(tmp_path):
    model = ChannelMeans().eval()
    x, y = channel_data(n=9, margin=0.2)
    log = tmp_path / "aa.log"
    robust, after, lines = common.run_autoattack(model, x, y, 0.031, 0, str(log), ["apgd-ce", "square"], fast=True)
    assert robust.shape == (9,) and robust.all()  # margin 0.2 >> eps: nothing to find
    assert set(after) == {"apgd-ce", "square"} and log.read_text()


def test_sanity_checks_fire_on_gradient_masked_model():
    x, y = channel_data(n=60, margin=0.3)
    res, warnings = {"sanity": {}}, []
    opts = argparse.Namespace(eval_step_size=0.003, eval_steps=5)
    common.sanity_checks(ChannelMeans(round_input=True).eval(), x, y, opts, res, warnings.append)
    assert any("gradient masking" in w for w in warnings)
    res, warnings = {"sanity": {}}, []
    common.sanity_checks(ChannelMeans().eval(), x, y, opts, res, warnings.append)
    assert warnings == [] and res["sanity"]["pgd_eps0.5_acc"] < 0.1


def test_square_finds_what_white_box_missed_on_masked_model():
    # near the decision boundary (margin 0.01 < eps), rounding hides the gradient from APGD, Square still wins
    model = ChannelMeans(round_input=True).eval()
    x, y = channel_data(n=12, margin=0.13)
    robust, after, _ = common.run_autoattack(model, x, y, 0.1, 0, None, ["apgd-ce", "square"], fast=True)
    assert after["square"] < after["apgd-ce"]


def test_sanity_eps0_detects_a_random_model():
    class Noisy(ChannelMeans):
        def forward(self, x, return_features=False):
            return super().forward(x + 0.5 * torch.randn_like(x), return_features)
    x, y = channel_data(n=60, margin=0.02)
    with pytest.raises(common.SanityError, match="eps=0"):
        common.sanity_checks(Noisy().eval(), x, y, argparse.Namespace(eval_step_size=0.003, eval_steps=2),
                             {"sanity": {}}, print)


def test_eval_json_schema_and_table(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--method", "trades", "--train"), prefix="test")
    common.main(DEFAULTS, ["--eval", str(out / "best.pt"), "--device", "cpu", "--eval-steps", "3", "--aa-n", "8",
                           "--aa-attacks", "apgd-ce", "--knn-k", "1,5", "--tsne"], prefix="test")
    res = json.load(open(out / "eval.json"))
    for key in ("natural", "pgd", "cw", "aa", "aa_n", "worst_case", "knn", "test_ltp", "eps", "warnings", "sanity"):
        assert key in res, key
    assert res["aa_n"] == 8 and set(res["knn"]) == {"natural", "robust"} and set(res["knn"]["natural"]) == {"1", "5"}
    assert res["worst_case_n"] == 8 and res["worst_case"] <= res["aa"]  # on the 8 images every attack saw
    assert os.path.isfile(out / "tsne_adv.png") and os.path.isfile(out / "autoattack.log")
    assert (out / "results.md").read_text().count("\n") == 1
    capsys.readouterr()
    common.main(DEFAULTS, ["--table", str(out), str(out / "eval.json")], prefix="test")
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| run | eps | Natural | PGD-20 | CW-20 | AA | kNN natural | kNN robust |")
    assert len(table) == 4 and table[2].split("|")[3].strip() == f"{100 * res['natural']:.2f}"
    with pytest.raises(SystemExit) as e:
        common.main(DEFAULTS, ["--table", str(tmp_path / "nothing")], prefix="test")
    assert e.value.code == 2


def test_progress_lines_when_not_a_terminal(monkeypatch, capsys):
    """A batch job's log gets 'desc: i/total' lines (every PROGRESS_EVERY s; here every batch); a terminal gets
    tqdm's bar and no such lines."""
    monkeypatch.setattr(common, "PROGRESS_EVERY", 0.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    model.feature_dim = 12
    x, y = torch.rand(10, 3, 2, 2), torch.randint(0, 3, (10,))
    monkeypatch.setattr(common.sys.stderr, "isatty", lambda: False, raising=False)
    out = common.attack_all(model, x, y, lambda m, xb, yb: xb.flip(0), batch_size=4, desc="PGD-20")
    assert torch.equal(out[:4], x[:4].flip(0)) and torch.equal(out[8:], x[8:].flip(0))
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(" (")[0] for l in lines] == [f"PGD-20: {i}/3 batches done" for i in range(3)]
    tick = common.Ticker("AutoAttack")
    common._ListHandler(tick).handler.emit(__import__("logging").makeLogRecord({"msg": "apgd-ce 1/2"}))
    assert capsys.readouterr().out.startswith("AutoAttack: apgd-ce 1/2 (")
    monkeypatch.setattr(common.sys.stderr, "isatty", lambda: True, raising=False)
    common.attack_all(model, x, y, lambda m, xb, yb: xb, batch_size=4, desc="PGD-20")
    assert "batches done" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ what --eval can measure, before any attack
@pytest.fixture
def plain_run(tiny_npz, tmp_path):
    """A finished run trained without --train: its checkpoint holds M' alone."""
    out = tmp_path / "plain"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--method", "at", "--epochs", "1"), prefix="test")
    return out


def no_attacks(monkeypatch):
    def attack_ran(*a, **kw):
        raise AssertionError("an attack ran before the evaluation was refused")
    monkeypatch.setattr(common, "correct_under", attack_ran)
    monkeypatch.setattr(common, "attack_all", attack_ran)


@pytest.mark.parametrize("metrics", ["nbr", "tp", "tp,nbr"])
def test_metrics_that_need_m_on_a_run_without_m_are_one_line_before_any_attack(metrics, plain_run, monkeypatch, capsys):
    no_attacks(monkeypatch)
    err = refused(["--eval", str(plain_run / "last.pt"), "--metrics", metrics, "--device", "cpu"], capsys)
    assert "compare M' with M" in err and "--train" in err
    assert not (plain_run / "eval.json").exists()


def test_metrics_that_need_m_are_said_to_be_skipped_when_others_were_asked(plain_run, capsys):
    common.main(DEFAULTS, ["--eval", str(plain_run / "last.pt"), "--metrics", "nat,pgd,nbr", "--device", "cpu",
                           "--eval-steps", "2"], prefix="test")
    out = capsys.readouterr().out
    assert "note: metrics nbr (test L_TP, neighbour agreement) compare M' with M" in out and "nbr not measured" in out
    res = json.load(open(plain_run / "eval.json"))
    assert "pgd" in res and "nbr" not in res


@pytest.mark.parametrize("flags, needle", [(["--metrics", "nat,nbr", "--nbr-k", "5000"], "--nbr-k 5000 needs more"),
                                           (["--metrics", "nat,knn", "--knn-k", "500", "--knn-train-n", "10"],
                                            "--knn-k 500 is larger than the kNN support (20 samples")])
def test_impossible_k_is_refused_before_any_attack(flags, needle, tiny_npz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--method", "at", "--train", "--epochs", "1"), prefix="test")
    no_attacks(monkeypatch)
    err = refused(["--eval", str(out / "last.pt"), "--device", "cpu", *flags], capsys)
    assert needle in err
    assert not (out / "eval.json").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_eval_is_one_line_and_leaves_eval_json_as_it_was(sig, code, plain_run, monkeypatch, capsys):
    common.main(DEFAULTS, ["--eval", str(plain_run / "last.pt"), "--metrics", "nat", "--device", "cpu"], prefix="test")
    before = (plain_run / "eval.json").read_text()
    import runs
    real = runs.evaluate_models

    def interrupted(*a, **kw):  # what a scheduler's SIGTERM (or Ctrl-C) does in the middle of the attacks
        os.kill(os.getpid(), sig)
        return real(*a, **kw)
    monkeypatch.setattr(runs, "evaluate_models", interrupted)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.main(DEFAULTS, ["--eval", str(plain_run / "last.pt"), "--metrics", "nat,pgd", "--device", "cpu"],
                    prefix="test")
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and len(err.splitlines()) == 1 and "Traceback" not in err
    assert signal.Signals(sig).name in err and "eval.json is unchanged" in err
    assert (plain_run / "eval.json").read_text() == before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored as they were
