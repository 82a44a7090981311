"""Whole runs on a tiny generated data set: files, exact resume, NaN stop, bad input -> exit 2."""
import json
import os
from dataclasses import fields

import numpy as np
import pytest
import torch

import common
import runs
from conftest import ROOT, cli, run_main, tiny_args


def weights(run_dir):
    ck = torch.load(os.path.join(run_dir, "last.pt"), weights_only=False)
    return ck["models"], ck["optimizers"], ck["progress"]


def test_run_writes_its_files(tiny_npz, tmp_path):
    out = tmp_path / "r"
    run_main(tiny_args(tiny_npz, out, "--method", "at", "--train", "--lam", "20a"))
    assert {"config.json", "metrics.jsonl", "log.txt", "last.pt", "best.pt"} <= set(os.listdir(out))
    cfg = json.load(open(out / "config.json"))
    assert cfg["config"]["lam"] == "20a" and cfg["versions"]["torch"] == torch.__version__ and "git_commit" in cfg
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"lr", "a", "lambda", "loss/ce_adv", "loss/tp", "loss/ce_std", "nat_acc", "pgd2_acc", "std_nat_acc",
                "seconds"} <= set(r)
        assert r["lambda"] == pytest.approx(20 * (2 / (1 + np.exp(-10 * r["epoch"] / 2)) - 1))
    ck = torch.load(out / "last.pt", weights_only=False)
    assert set(ck["models"]) == {"adv", "std"} and ck["progress"]["epoch"] == 2 and "torch" in ck["rng"]


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and at the end of epoch 1 (4 steps per epoch)
def test_resume_reproduces_uninterrupted_run(tiny_npz, tmp_path, monkeypatch, stop_after):
    extra = ("--method", "trades", "--train", "--lbgat")
    run_main(tiny_args(tiny_npz, tmp_path / "full", *extra))
    calls = {"n": 0}
    real_step = common.train_step

    def interrupting_step(*a, **kw):  # what Ctrl-C does: ask the loop to stop after this step
        calls["n"] += 1
        if calls["n"] == stop_after:
            common.StopFlag.requested = True
        return real_step(*a, **kw)
    monkeypatch.setattr(common, "train_step", interrupting_step)
    with pytest.raises(SystemExit) as e:  # an interrupted run exits 130, as a shell does after Ctrl-C
        run_main(tiny_args(tiny_npz, tmp_path / "cut", *extra))
    assert e.value.code == 130
    progress = weights(tmp_path / "cut")[2]
    assert (progress["epoch"], progress["step"]) == ((0, 3) if stop_after == 3 else (1, 0))
    monkeypatch.setattr(common, "train_step", real_step)
    run_main(tiny_args(tiny_npz, tmp_path / "cut", "--resume", *extra))
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in full[0]:
        for name, v in full[0][k].items():
            assert torch.equal(v, cut[0][k][name]), f"{k}.{name} differs after resume"
    m_full = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    m_cut = [json.loads(l) for l in open(tmp_path / "cut" / "metrics.jsonl")]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in m_full] == [drop(r) for r in m_cut]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_npz, tmp_path, monkeypatch):
    real = common.BASE_METHODS["at"]
    state = {"poison": False}

    def poisoned(s, cfg):
        terms = real.loss(s, cfg)
        if state["poison"]:
            terms["ce_adv"] = terms["ce_adv"] * float("nan")
        return terms
    monkeypatch.setitem(common.BASE_METHODS, "at", common.Method(real.attack, poisoned))
    real_eval = common.epoch_eval

    def eval_then_poison(*a, **kw):  # epoch 1 trains normally, epoch 2 diverges
        state["poison"] = True
        return real_eval(*a, **kw)
    monkeypatch.setattr(common, "epoch_eval", eval_then_poison)
    with pytest.raises(SystemExit) as e:
        run_main(tiny_args(tiny_npz, tmp_path / "nan", "--method", "at"))
    assert e.value.code == 1
    assert weights(tmp_path / "nan")[2]["epoch"] == 1
    with open(tmp_path / "nan" / "log.txt") as fh:
        assert (f"epoch 2 (terms ['ce_adv']); lower --lr or --lam; "
                f"the last good checkpoint is {tmp_path / 'nan' / 'last.pt'}" in fh.read())


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--method", "fgsm"], "invalid choice"),
    (["--arch", "vgg"], "invalid choice"),
    (["--lam", "abc"], "lambda must be"),
    (["--eps", "8/0"], "expected a number"),
    (["--data-file", "/nonexistent/x.npz", "--device", "cpu"], "not found"),
])
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    r = cli(*args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x")  # nothing is written for bad input


@pytest.mark.slow
def test_existing_run_dir_is_not_overwritten(tiny_npz, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "config.json").write_text("precious")
    r = cli("--data-file", tiny_npz, "--out", str(out), "--device", "cpu")
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "config.json").read_text() == "precious"
    r = cli("--data-file", tiny_npz, "--out", str(tmp_path / "none"), "--device", "cpu", "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_augment_matches_manual_crop_and_flip():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [4, 4], [8, 3]])
    flips = torch.tensor([False, True, False])
    out = common.augment(x, offsets, flips)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(3):
        r, c = offsets[i].tolist()
        want = padded[i, :, r:r + 8, c:c + 8]
        if flips[i]:
            want = want.flip(2)
        assert torch.equal(out[i], want.float() / 255)
    assert torch.equal(out[1], x[1].flip(2).float() / 255)  # centre crop + flip


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    a, b = common.epoch_plan(50, 1, 3), common.epoch_plan(50, 1, 3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], common.epoch_plan(50, 1, 4)[0])
    assert sorted(a[0].tolist()) == list(range(50)) and a[1].min() >= 0 and a[1].max() <= 8


def test_npz_schema_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(common.UserError, match="lacks the keys"):
        common.load_npz(str(bad))
    bad2 = tmp_path / "bad2.npz"
    np.savez(bad2, x_train=np.zeros((2, 4, 4, 3), np.float32), y_train=np.zeros(2),
             x_test=np.zeros((2, 4, 4, 3), np.uint8), y_test=np.zeros(2))
    with pytest.raises(common.UserError, match="uint8 NHWC"):
        common.load_npz(str(bad2))


LEGACY = os.path.join(ROOT, "tests", "fixtures", "legacy_run")  # made by the code of 2026-11-30 (before Config)
LEGACY_ARGS = ("--arch", "cnn_small", "--std-arch", "cnn_small", "--epochs", "2", "--batch-size", "16", "--steps", "1",
               "--eval-steps", "1", "--eval-n", "16", "--method", "trades", "--train", "--lam", "20a",
               "--baselines", "release1")  # the first release's TRADES attack start (Config.from_saved fills it in)


def test_a_run_folder_of_the_first_release_resumes_exactly_and_evaluates(tiny_npz, tmp_path):
    """The fixture stopped after epoch 1 of 2 (tiny_npz's data, same generator). Resumed by today's code, it
    must end exactly where today's code ends when it continues from the same epoch-1 state (weights,
    optimisers, RNG) in a folder of today's format. Both epoch 2s run on this CPU: the fixture's epoch 1 was
    computed on another, so a fresh run from scratch may differ from it in the last bits (CPUs round
    differently), which says nothing about the old format."""
    old = tmp_path / "old"
    import shutil
    shutil.copytree(LEGACY, old)
    assert json.load(open(old / "config.json"))["config"]["_data_file_given"]  # really the old format
    run_main(["--data-file", tiny_npz, "--out", str(old), "--device", "cpu", "--resume"])
    fresh = tmp_path / "fresh"  # today's folder, then the fixture's epoch-1 state put into its last.pt
    run_main(["--data-file", tiny_npz, "--out", str(fresh), "--device", "cpu", *LEGACY_ARGS])
    today = torch.load(fresh / "last.pt", weights_only=False)
    legacy = torch.load(os.path.join(LEGACY, "last.pt"), weights_only=False)
    torch.save({**today, **{k: legacy[k] for k in ("models", "optimizers", "progress", "rng")}}, fresh / "last.pt")
    shutil.copyfile(os.path.join(LEGACY, "metrics.jsonl"), fresh / "metrics.jsonl")
    run_main(["--data-file", tiny_npz, "--out", str(fresh), "--device", "cpu", "--resume"])
    (m_old, o_old, p_old), (m_new, o_new, p_new) = weights(old), weights(fresh)
    assert p_old["epoch"] == p_new["epoch"] == 2
    for k in m_new:
        for name, v in m_new[k].items():
            assert torch.equal(v, m_old[k][name]), f"{k}.{name}"
    assert set(o_old) == set(o_new) == {"adv", "std"}
    for k in o_new:  # SGD momentum buffers too
        for i, st in o_new[k]["state"].items():
            assert torch.equal(st["momentum_buffer"], o_old[k]["state"][i]["momentum_buffer"]), f"{k} param {i}"
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    rows_old = [drop(json.loads(l)) for l in open(old / "metrics.jsonl")]
    assert len(rows_old) == 2 and rows_old == [drop(json.loads(l)) for l in open(fresh / "metrics.jsonl")]
    run_main(["--eval", str(old / "last.pt"), "--data-file", tiny_npz, "--device", "cpu", "--metrics", "nat,pgd,tp",
         "--eval-steps", "2"])
    res = json.load(open(old / "eval.json"))
    assert res["epoch"] == 2 and 0 <= res["natural"] <= 1 and res["eps"] == pytest.approx(0.031)
    assert "test_ltp" in res and "std_natural" in res


@pytest.mark.slow
def test_help_shows_every_flag_with_help_and_default():
    r = cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for f in [*fields(runs.Config), *fields(runs.EvalConfig), *fields(runs.Actions)]:
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default: ") >= len({f.name for f in fields(runs.Config)})
    assert "--lam LAM" in text and "(default: 5)" in text and "(default: wrn34_10; --quick: cnn_small)" in text


def test_quick_replaces_the_papers_settings_not_a_scripts_own_choice(capsys):
    paper = dict(dataset="cifar10", method="trades", lam="5", arch="wrn34_10")  # exp_cifar10.py's DEFAULTS
    copied = {**paper, "arch": "cnn6", "epochs": 3}  # a copied script whose author chose cnn6 and 3 epochs
    assert runs.make_config(paper, {"quick": True}).arch == "cnn_small"
    cfg = runs.make_config(copied, {"quick": True})
    assert (cfg.arch, cfg.epochs, cfg.std_arch, cfg.train_n) == ("cnn6", 3, "cnn_small", runs.QUICK["train_n"])
    assert runs.make_config(copied, {"quick": True, "arch": "resnet18"}).arch == "resnet18"  # a flag wins
    name = runs.run_name(cfg, runs.name_base(copied, cfg), "copy")
    assert name == "copy_trades_arch-cnn6_quick"  # the name says the net that was trained
    assert runs.run_name(runs.make_config(paper, {"quick": True}), runs.make_config(paper, {"quick": True})) == \
        "trades_quick"
    help_of = lambda defaults: " ".join(runs.build_parser(defaults).format_help().split())
    assert "(default: wrn34_10; --quick: cnn_small)" in help_of(paper)
    assert "(default: cnn6)" in help_of(copied) and "(default: 3)" in help_of(copied)
    assert "use the first N >= 1 training images (default: all; --quick: 3072)" in help_of(paper)
    assert "(default: 1000; --quick: 500)" in help_of(paper) and "(default: off; --fast: bf16)" in help_of(paper)


# ------------------------------------------------------------------------------ paths that results record
def test_results_record_paths_relative_to_the_repository(tmp_path, monkeypatch):
    inside = os.path.join(runs.REPO, "runs", "x", "last.pt")
    beside = os.path.join(os.path.dirname(runs.REPO), "shared", "data", "cifar10.npz")
    assert runs.recorded_path(inside) == os.path.join("runs", "x", "last.pt")
    assert runs.recorded_path(beside) == os.path.join("..", "shared", "data", "cifar10.npz")
    far = "/" + os.path.join("opt", "elsewhere", "d.npz")
    assert runs.recorded_path(far) == far  # another machine's own folder stays as it is
    monkeypatch.chdir(tmp_path)  # relative paths of results resolve against the repository, not the cwd
    for p in (inside, beside, far):
        assert runs.resolved_path(runs.recorded_path(p)) == os.path.normpath(p)


def test_a_run_inside_the_repository_records_no_absolute_path(tiny_npz, tmp_path):
    """config.json's data_file and eval.json's checkpoint named the developer's folders; now relative."""
    data = os.path.join(runs.REPO, "runs", f"_test_{os.getpid()}_data.npz")
    out = os.path.join(runs.REPO, "runs", f"_test_{os.getpid()}_run")
    os.makedirs(os.path.dirname(data), exist_ok=True)
    import shutil
    shutil.copyfile(tiny_npz, data)
    try:
        run_main(tiny_args(data, out, "--method", "at", "--epochs", "1"))
        run_main(["--eval", os.path.join(out, "last.pt"), "--metrics", "nat", "--device", "cpu"])
        texts = [json.dumps(json.load(open(os.path.join(out, "config.json")))["config"]),
                 open(os.path.join(out, "eval.json")).read()]  # config.json's "command" is what was typed
        for t in texts:
            assert runs.REPO not in t and "/tmp" not in t
        assert json.loads(texts[0])["data_file"] == os.path.relpath(data, runs.REPO)
        assert json.loads(texts[1])["checkpoint"] == os.path.relpath(os.path.join(out, "last.pt"), runs.REPO)
        assert runs.load_run_config(out).data_file == data  # read back: opens from any working directory
        run_main(tiny_args(data, out, "--method", "at", "--epochs", "1", "--resume"))  # and resumes (finished)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.remove(data)
