"""Runs and evaluations that cannot lose or mislabel results (issue 10): the run-folder lock, resume after
kill -9, failed starts, signals, unwritable folders, data validation, bad numbers, merged eval files,
foreign checkpoints. Every bad input: one line on stderr, exit 2, nothing written."""
import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import runs
from conftest import DEFAULTS, ROOT, cli, read_rows, refused, run_main, tiny_args, write_npz


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-epoch run (vanilla AT, cnn_small) and its data; tests work on copies (run_copy)."""
    d = tmp_path_factory.mktemp("finished")
    npz = write_npz(d / "data.npz")
    run_main(tiny_args(npz, d / "run", "--method", "at"))
    return npz, d / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    npz, src = finished
    shutil.copytree(src, tmp_path / "run")
    return npz, tmp_path / "run"


def hold_lock(folder):
    """Lock a folder as another TRAIN process would (flock on .lock, PID inside), without common's code."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def progress(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), weights_only=False)["progress"]


def snapshot(folder):
    return {f: (os.path.getmtime(os.path.join(folder, f)), os.path.getsize(os.path.join(folder, f)))
            for f in os.listdir(folder) if f != ".lock"}


# ------------------------------------------------------------------------------------- run folders
@pytest.mark.slow
def test_a_second_process_is_locked_out_of_a_run_folder(finished, tmp_path):
    """Two runs with the same --out at the same moment: the second gets one line naming the holder."""
    npz, _ = finished
    out = tmp_path / "r"
    fd = hold_lock(out)
    try:
        r = cli(*tiny_args(npz, out, "--method", "at", "--epochs", "1"))
    finally:
        os.close(fd)
    assert r.returncode == 2, r.stderr
    assert f"in use by process {os.getpid()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(out) == [".lock"]  # nothing trained, nothing written


@pytest.mark.parametrize("mode", ["--resume", "--overwrite", "--eval"])
def test_lock_covers_resume_overwrite_and_eval(run_copy, mode, capsys):
    npz, out = run_copy
    before = snapshot(out)
    argv = {"--eval": ["--eval", str(out / "last.pt"), "--metrics", "nat"],
            "--resume": ["--data-file", npz, "--out", str(out), "--device", "cpu", "--resume"],
            "--overwrite": tiny_args(npz, out, "--method", "at", "--epochs", "3", "--overwrite")}[mode]
    fd = hold_lock(out)
    try:
        err = refused(argv, capsys)
    finally:
        os.close(fd)
    assert f"in use by process {os.getpid()}" in err
    assert snapshot(out) == before


@pytest.mark.slow
def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    folder = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runs\nwith runs.run_lock(sys.argv[1]):\n"
                               "    print('held', flush=True)\n    time.sleep(120)", str(folder)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(common.UserError, match=f"in use by process {holder.pid}"):
            with runs.run_lock(folder):
                pass
    finally:
        holder.kill()  # SIGKILL: no Python cleanup runs, the .lock file stays
        holder.wait()
    assert os.path.isfile(folder / ".lock")
    with runs.run_lock(folder):  # the kernel dropped the dead holder's lock
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(ValueError):  # an error inside: released too, and the empty folder goes again
        with runs.run_lock(tmp_path / "new" / "r"):
            raise ValueError
    assert not os.path.exists(tmp_path / "new")


class Killed(BaseException):
    """What kill -9 does to the loop: nothing after it runs (run_main() catches no BaseException)."""


@pytest.mark.parametrize("moment", ["while writing last.pt", "after last.pt, before the metrics row"])
def test_resume_after_a_kill_around_the_checkpoint(finished, tmp_path, monkeypatch, moment):
    """metrics.jsonl is never ahead of last.pt; a row the kill kept out of it is restored from last.pt."""
    npz, full = finished
    out = tmp_path / "r"
    real = common.save_checkpoint

    def dying(path, models, opts, progress, cfg, scaler=None):
        if progress["epoch"] == 2 and path.endswith("last.pt"):
            if moment == "while writing last.pt":  # last.pt half-written
                with open(f"{path}.tmp{os.getpid()}", "wb") as fh:
                    fh.write(b"half a checkpoint")
            else:
                real(path, models, opts, progress, cfg, scaler)
            raise Killed
        return real(path, models, opts, progress, cfg, scaler)
    monkeypatch.setattr(common, "save_checkpoint", dying)
    with pytest.raises(Killed):
        run_main(tiny_args(npz, out, "--method", "at"))
    (out / ".lock").write_text("999999\n")  # kill -9 leaves the lock file (not the lock) behind
    saved = 1 if moment == "while writing last.pt" else 2
    assert [r["epoch"] for r in read_rows(out)] == [1] and progress(out)["epoch"] == saved
    status = runs.run_status(out)  # what a study sees now
    monkeypatch.setattr(common, "save_checkpoint", real)
    run_main(["--data-file", npz, "--out", str(out), "--device", "cpu", "--resume"])
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in read_rows(out)] == [drop(r) for r in read_rows(full)]  # epochs 1, 2 once, as uninterrupted
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert status == ("partial" if saved == 1 else "done")


@pytest.mark.parametrize("case", ["batch larger than the data", "label = class count", "missing std checkpoint",
                                  "existing empty folder"])
def test_a_start_that_fails_leaves_no_run_folder(case, finished, tmp_path, capsys):
    npz, _ = finished
    out = tmp_path / "a" / "r"
    extra = {"batch larger than the data": ["--batch-size", "100"],
             "missing std checkpoint": ["--train", "--std-ckpt", str(tmp_path / "nothing.pt")]}.get(case, [])
    if case == "label = class count":
        npz = write_npz(tmp_path / "bad.npz", y_test=np.full(32, 4))
    if case == "existing empty folder":
        os.makedirs(out)
        extra = ["--batch-size", "100"]
    refused(tiny_args(npz, out, "--method", "at", *extra), capsys)
    if case == "existing empty folder":
        assert os.listdir(out) == []
    else:
        assert not os.path.exists(tmp_path / "a")
    # the command now works
    run_main(tiny_args(write_npz(tmp_path / "good.npz"), out, "--method", "at", "--epochs", "1"))


@pytest.mark.parametrize("case", ["triton kernel without CUDA", "bf16 on a GPU without it"])
def test_what_this_machine_lacks_is_refused_before_any_work(case, finished, tmp_path, monkeypatch, capsys):
    npz, _ = finished
    out = tmp_path / "r"
    if case == "triton kernel without CUDA":  # failed at step 1 with a traceback, after config.json existed
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        argv, needle = tiny_args(npz, out, "--method", "at", "--train", "--tp-impl", "triton"), "--tp-impl triton needs"
    else:  # a GPU older than Ampere, as torch reports it
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        argv, needle = tiny_args(npz, out, "--method", "at", "--amp", "bf16", "--device", "cuda"), "--amp bf16"
    assert needle in refused(argv, capsys)
    assert not os.path.exists(out)


def test_a_start_that_failed_before_its_first_checkpoint_restarts_with_the_same_command(finished, tmp_path,
                                                                                        monkeypatch, capsys):
    """A failure no check foresaw, at step 1: config.json and log.txt exist, no checkpoint. The same command
    starts the run again (its earlier log kept); --resume says so instead of only 'no checkpoint'."""
    npz, full = finished
    out = tmp_path / "r"
    argv = tiny_args(npz, out, "--method", "at")

    def failing_step(*a, **kw):
        raise RuntimeError("a failure no check foresaw")
    monkeypatch.setattr(common, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="no check foresaw"):
        run_main(argv)
    assert sorted(os.listdir(out)) == ["config.json", "log.txt"]
    first_log = (out / "log.txt").read_text()
    assert "without --resume" in refused(["--data-file", npz, "--out", str(out), "--device", "cpu", "--resume"], capsys)
    monkeypatch.undo()
    run_main(argv)
    log = (out / "log.txt").read_text()
    assert log.startswith(first_log) and "wrote no checkpoint; starting again" in log
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in read_rows(out)] == [drop(r) for r in read_rows(full)]
    (out / "last.pt").unlink()  # a folder with results is never restarted: metrics.jsonl would be lost
    assert "already holds a run" in refused(argv, capsys)


def test_stop_signal_handlers_are_restored_and_one_set_outside_python_is_left_alone(monkeypatch):
    def mine(*_):
        pass
    before, int_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with common.on_stop_signals(mine):
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    assert signal.getsignal(signal.SIGTERM) is before
    getsignal = signal.getsignal  # None: what Python reports for a handler installed by C code
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGTERM else getsignal(s))
    with common.on_stop_signals(mine):
        assert getsignal(signal.SIGTERM) is before and getsignal(signal.SIGINT) is mine
    assert getsignal(signal.SIGINT) is int_before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_128_plus_its_number(sig, finished, tmp_path):
    npz, _ = finished
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "exp_cifar10.py", *tiny_args(npz, out, "--method", "at", "--epochs", "1000")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(sig)
        err = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    assert p.returncode == 128 + sig, err  # 143 for SIGTERM, 130 for SIGINT
    assert "interrupted" in err.strip().splitlines()[-1] and "--resume" in err
    assert 1 <= progress(out)["epoch"] < 1000


def test_resume_of_a_finished_run_says_so_and_exits_0(run_copy, capsys):
    npz, out = run_copy
    before = snapshot(out)
    capsys.readouterr()
    run_main(["--data-file", npz, "--out", str(out), "--device", "cpu", "--resume"])  # no SystemExit: exit code 0
    assert "already finished (2 epochs)" in capsys.readouterr().out
    assert snapshot(out) == before


def test_resume_with_data_of_another_class_count_is_one_line_before_any_work(run_copy, tmp_path, capsys):
    npz, out = run_copy
    saved = json.load(open(out / "config.json"))
    saved["config"]["epochs"] = 3  # 2 of 3 epochs done: --resume would train
    (out / "config.json").write_text(json.dumps(saved))
    before = snapshot(out)
    six = write_npz(tmp_path / "six.npz", classes=6)
    err = refused(["--data-file", six, "--out", str(out), "--device", "cpu", "--resume"], capsys)
    assert "was trained on 4 classes, but the data set has 6" in err and "last.pt" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("flag", [["--lr", "0.05"], ["--epochs", "3"], ["--method", "trades"], ["--train"],
                                  ["--steps", "3"], ["--train-n", "32"]])
def test_resume_refuses_flags_that_change_the_run_but_not_where_it_runs(run_copy, flag, capsys):
    npz, out = run_copy
    err = refused(["--data-file", npz, "--out", str(out), "--resume", *flag], capsys)
    assert f"{flag[0]} " in err and "would change the run" in err
    moved = shutil.copy(npz, str(out.parent / "moved.npz"))  # --device and --data-file may change
    run_main(["--data-file", moved, "--out", str(out), "--device", "cpu", "--resume"])


def unwritable(folder):
    """Make a folder unwritable even for root (chattr +i), or by its mode; -> an undo function, or skip."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a folder read-only")
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o555)
    return lambda: os.chmod(folder, 0o755)


def limit_file_size(size=1024):  # a full disk, as a process sees it: writes past size fail (EFBIG; Python ignores
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))  # SIGXFSZ)


@contextlib.contextmanager
def full_disk_here(size=1024):
    """limit_file_size in this process, undone afterwards (the soft limit alone, which may be raised again)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit_file_size(size)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def test_a_full_disk_mid_run_is_one_line_and_metrics_stay_with_the_checkpoint(finished, tmp_path, monkeypatch,
                                                                              capsys):
    """The disk fills while epoch 2's last.pt is written: one line naming the disk, exit 2, no temp file left,
    metrics.jsonl not ahead of last.pt; --resume then ends where an uninterrupted run ends."""
    npz, full = finished
    out = tmp_path / "r"
    real = common.save_checkpoint

    def on_a_full_disk(path, models, opts, progress, cfg, scaler=None):
        if progress["epoch"] == 2 and path.endswith("last.pt"):
            with full_disk_here():
                return real(path, models, opts, progress, cfg, scaler)
        return real(path, models, opts, progress, cfg, scaler)
    monkeypatch.setattr(common, "save_checkpoint", on_a_full_disk)
    err = refused(tiny_args(npz, out, "--method", "at"), capsys)
    assert "last.pt" in err and "File too large" in err and "free on /" in err and "--resume" in err
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert [r["epoch"] for r in read_rows(out)] == [1] and progress(out)["epoch"] == 1
    monkeypatch.setattr(common, "save_checkpoint", real)
    run_main(["--data-file", npz, "--out", str(out), "--device", "cpu", "--resume"])
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in read_rows(out)] == [drop(r) for r in read_rows(full)]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["train", "eval"])
@pytest.mark.parametrize("how", ["read-only", "full"])
def test_an_unwritable_folder_is_refused_before_any_work(run_copy, tmp_path, what, how):
    npz, run_dir = run_copy
    before = snapshot(run_dir)
    # training: a data file that does not exist, so the one line must be about the folder, found first
    argv = (["--eval", str(run_dir / "last.pt")] if what == "eval"
            else tiny_args(str(tmp_path / "missing.npz"), run_dir / "new", "--method", "at"))
    undo = unwritable(run_dir) if how == "read-only" else None
    try:
        r = cli(*argv, preexec_fn=limit_file_size if how == "full" else None, timeout=300)
    finally:
        if undo:
            undo()
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "cannot" in r.stderr and "missing.npz" not in r.stderr
    assert "evaluating" not in r.stdout  # no attack started
    assert snapshot(run_dir) == before and not os.path.exists(run_dir / "new")


# ------------------------------------------------------------------------------------- data validation
BAD_DATA = {  # case -> (arrays that replace good ones, whether class_names are saved, what the line says)
    "label = class count": (lambda rng: {"y_train": np.r_[rng.integers(0, 4, 63), 4]}, True, "outside [0, 4)"),
    "negative label": (lambda rng: {"y_test": np.r_[rng.integers(0, 4, 31), -1]}, False, "outside [0, 4)"),
    "float labels": (lambda rng: {"y_train": rng.integers(0, 4, 64).astype(np.float32)}, True, "integer class indices"),
    "y shorter than x": (lambda rng: {"y_train": rng.integers(0, 4, 60)}, True, "64 images but y_train has 60"),
    "2-D y": (lambda rng: {"y_test": rng.integers(0, 4, (32, 1))}, True, "must be 1-D"),
    "empty train split": (lambda rng: {"x_train": np.zeros((0, 16, 16, 3), np.uint8), "y_train": np.zeros(0, np.int64)},
                          True, "train split is empty"),
    "empty test split": (lambda rng: {"x_test": np.zeros((0, 16, 16, 3), np.uint8), "y_test": np.zeros(0, np.int64)},
                         True, "test split is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_labels_and_shapes_are_refused_at_load(case, tmp_path, capsys):
    arrays, names, needle = BAD_DATA[case]
    npz = write_npz(tmp_path / "bad.npz", names=names, **arrays(np.random.default_rng()))
    err = refused(tiny_args(npz, tmp_path / "r", "--method", "at"), capsys)
    assert needle in err
    assert not os.path.exists(tmp_path / "r")


def test_every_loader_is_validated(tmp_path, monkeypatch):
    from test_data import write_cifar100
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    rng = np.random.default_rng()
    write_cifar100(tmp_path, rng)
    cfg = runs.make_config(DEFAULTS, {"dataset": "cifar100", "data_dir": str(tmp_path)})
    assert common.load_data(cfg, "cpu").num_classes == 100
    real = common.load_torchvision
    monkeypatch.setattr(common, "load_torchvision",
                        lambda *a: ({**real(*a)[0], "y_test": np.full(5, 100)}, real(*a)[1]))
    with pytest.raises(common.UserError, match=r"y_test holds 5 labels outside \[0, 100\)"):
        common.load_data(cfg, "cpu")
    monkeypatch.setattr(common, "load_tinyimagenet_folder", lambda root: (
        {"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.array([0, 1, 2, 3]),
         "x_test": np.zeros((2, 8, 8, 3), np.uint8), "y_test": np.array([0])}, ["a", "b", "c", "d"]))
    cfg = runs.make_config(DEFAULTS, {"dataset": "tinyimagenet", "data_dir": str(tmp_path)})
    with pytest.raises(common.UserError, match="x_test has 2 images but y_test has 1 labels"):
        common.load_data(cfg, "cpu")


def test_without_class_names_a_missing_class_is_a_warning(tmp_path, capsys):
    rng = np.random.default_rng()
    y_train = rng.choice([0, 1, 3], 64)  # class 2 only in the test split
    npz = write_npz(tmp_path / "d.npz", names=False, y_train=y_train, y_test=np.r_[0, 1, 2, 3, rng.integers(0, 4, 28)])
    data = common.load_data(runs.make_config(DEFAULTS, {"data_file": npz}), "cpu")
    assert data.num_classes == 4 and data.y_train.tolist() == y_train.tolist()
    assert "classes [2] never occur in the training labels" in capsys.readouterr().out


@pytest.mark.parametrize("flags,needle", [
    (["--steps", "-1"], "--steps must be >= 1"),
    (["--eval-steps", "0"], "--eval-steps must be >= 1"),
    (["--train-n", "-5"], "--train-n: must be >= 1"),
    (["--test-n", "0"], "--test-n: must be >= 1"),
    (["--train-n", "0"], "--train-n: must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--lr", "-0.1"], "--lr must be >= 0"),
    (["--milestones", "0,5"], "--milestones must be >= 1"),
])
def test_bad_numbers_are_refused(finished, flags, needle, tmp_path, capsys):
    npz, _ = finished
    assert needle in refused(tiny_args(npz, tmp_path / "r", "--method", "at", *flags), capsys)
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("kind,needle", [("folder", "is a directory"), ("text", "not an .npz archive"),
                                         ("npy", "not an .npz archive")])
def test_a_data_file_that_is_no_npz_says_what_it_is(kind, needle, tmp_path, capsys):
    path = tmp_path / "data"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("x_train,y_train\n1,2\n")
    else:
        np.save(open(path, "wb"), np.zeros((2, 4, 4, 3), np.uint8))
    assert needle in refused(tiny_args(str(path), tmp_path / "r"), capsys)
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("flags,needle", [(["--aa-n", "-1"], "--aa-n must be >= 0"),
                                          (["--test-n", "0"], "--test-n: must be >= 1"),
                                          (["--knn-k", "0,5"], "--knn-k must be >= 1"),
                                          (["--arch", "resnet18"], "--arch cannot apply"),
                                          (["--train-n", "8"], "--train-n cannot apply"),
                                          (["--lr", "0.5"], "--lr cannot apply")])
def test_eval_refuses_bad_numbers_and_flags_it_cannot_apply(run_copy, flags, needle, capsys):
    _, out = run_copy
    before = snapshot(out)
    assert needle in refused(["--eval", str(out / "last.pt"), *flags], capsys)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------- evaluation files
def test_eval_merges_per_metric_and_regenerates_results_md(run_copy, capsys):
    _, out = run_copy
    ev = ["--eval", str(out / "last.pt"), "--eval-steps", "2", "--knn-k", "1"]
    run_main(ev + ["--metrics", "nat,pgd,cw,knn"])
    first = json.load(open(out / "eval.json"))
    run_main(ev + ["--metrics", "nat"])  # used to replace eval.json: PGD, CW, kNN gone
    res = json.load(open(out / "eval.json"))
    for k in ("pgd", "cw", "knn", "worst_case"):
        assert res[k] == first[k], k
    assert res["natural"] == first["natural"] and "earlier" not in res
    assert len((out / "results.md").read_text().splitlines()) == 1  # regenerated, not appended
    run_main(ev + ["--metrics", "nat,pgd", "--eps", "0.05"])  # other settings: a new row, the old one kept
    res = json.load(open(out / "eval.json"))
    assert res["eps"] == 0.05 and "cw" not in res and res["earlier"][0]["cw"] == first["cw"]
    run_main(ev + ["--metrics", "nat", "--eps", "0.05"])
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 and f"| {0.031 * 255:.2f}/255 |" in md[0] and "| 12.75/255 |" in md[1]
    capsys.readouterr()
    run_main(["--table", str(out)])  # --table: the current row
    assert "| 12.75/255 |" in capsys.readouterr().out


def fake_result(rng, **changes):
    """An evaluate() result with fresh random accuracies."""
    r = {"checkpoint": "/x/run/best.pt", "run": "run", "model": "adv", "arch": "cnn_small", "epoch": 3, "eps": 0.031,
         "n_test": 100, "pgd_steps": 20, "pgd_step_size": 0.003, "cw_kappa": 50.0, "warnings": [], "sanity": {},
         "natural": rng.uniform(0.5, 0.9)}
    r.update(changes)
    r["worst_case_of"] = [m for m in ("natural", "pgd", "cw", "aa") if m in r]
    r["worst_case"] = min(r[m] for m in r["worst_case_of"])
    return r


def test_merge_eval_keeps_every_result():
    rng = np.random.default_rng()
    u = lambda: float(rng.uniform(0.1, 0.5))
    full = fake_result(rng, pgd=u(), cw=u(), aa=u(), aa_n=50, aa_attacks="standard",
                       knn={"natural": {"30": u()}, "robust": {"30": u()}}, knn_train_n=100, warnings=["w1"])
    nat = fake_result(rng, warnings=["w2"])
    merged = runs.merge_eval(full, nat, log=lambda m: None)
    assert merged["natural"] == nat["natural"] and all(merged[k] == full[k] for k in ("pgd", "cw", "aa", "aa_n", "knn"))
    assert merged["worst_case"] == full["worst_case"] and merged["warnings"] == ["w1", "w2"]
    more_k = fake_result(rng, knn={"natural": {"5": u()}, "robust": {"5": u()}}, knn_train_n=100)
    assert set(runs.merge_eval(full, more_k, log=lambda m: None)["knn"]["robust"]) == {"5", "30"}
    for change in ({"eps": 0.05}, {"n_test": 50}, {"epoch": 4}, {"checkpoint": "/x/run/last.pt"}, {"model": "std"},
                   {"pgd_steps": 10}, {"aa": u(), "aa_n": 100, "aa_attacks": "standard"}):
        new = fake_result(rng, **change)
        logged = []
        merged = runs.merge_eval(full, new, log=logged.append)
        assert merged["natural"] == new["natural"] and merged["earlier"] == [full], change
        assert "stay in 'earlier'" in logged[0]
        assert runs.merge_eval(merged, full, log=lambda m: None)["earlier"] == [full, new]  # and back again
    again = fake_result(rng, pgd=u())
    logged = []
    runs.merge_eval(full, again, log=logged.append)  # same settings measured again: replaced, and said so
    assert "measured again" in logged[0] and f"{full['pgd']:.4f} -> {again['pgd']:.4f}" in logged[0]


def test_eval_honours_test_n_and_the_row_says_n(run_copy):
    _, out = run_copy
    run_main(["--eval", str(out / "last.pt"), "--metrics", "nat", "--test-n", "8"])
    res = json.load(open(out / "eval.json"))
    assert res["n_test"] == 8
    assert "n=8" in (out / "results.md").read_text().split("|")[1]


def test_aa_on_a_subset_stores_natural_and_pgd_on_it_and_the_row_says_each_n(run_copy):
    npz, out = run_copy
    run_main(["--eval", str(out / "last.pt"), "--metrics", "nat,aa", "--aa-n", "8", "--aa-attacks", "apgd-ce",
          "--eval-steps", "2"])
    res = json.load(open(out / "eval.json"))
    model = common.build_model("cnn_small", 4)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=False)["models"]["adv"])
    x = torch.from_numpy(np.load(npz)["x_test"][:8]).permute(0, 3, 1, 2).float() / 255
    nat8 = (common.predict(model.eval(), x) == torch.from_numpy(np.load(npz)["y_test"][:8])).float().mean().item()
    sub = res["aa_subset"]
    assert res["aa_n"] == sub["n"] == 8 and sub["natural"] == pytest.approx(nat8) and 0 <= sub["pgd"] <= 1
    cells = [c.strip() for c in (out / "results.md").read_text().split("|")[1:-1]]
    assert "n=32" in cells[0]  # every column, unless it says otherwise
    assert cells[5] == (f"{100 * res['aa']:.2f} (n=8; natural {100 * sub['natural']:.2f}, "
                        f"PGD-2 {100 * sub['pgd']:.2f} on them)")


@pytest.mark.parametrize("case,needle", [
    ("bare state_dict", "--eval of a bare state_dict needs --arch"),
    ("dict without config", "is not a TRAIN checkpoint"),
    ("a list", "is not a TRAIN checkpoint (it holds a list"),
    ("not a torch file", "is not a checkpoint (torch.load cannot read it"),
    ("weights of another arch", "does not fit its saved arch cnn6"),
    ("data with another class count", "was trained on 4 classes, but the data set has 6"),
])
def test_foreign_checkpoints_are_one_line_errors(run_copy, case, needle, tmp_path, capsys):
    _, out = run_copy
    ck = torch.load(out / "last.pt", weights_only=False)
    path, extra = tmp_path / "x.pt", []
    if case == "bare state_dict":
        torch.save(ck["models"]["adv"], path)
    elif case == "dict without config":
        torch.save({k: v for k, v in ck.items() if k != "config"}, path)
    elif case == "a list":
        torch.save([1, 2], path)
    elif case == "not a torch file":
        path.write_text("hello")
    elif case == "weights of another arch":
        torch.save({**ck, "config": {**ck["config"], "arch": "cnn6"}}, path)
    else:
        torch.save(ck, path)
        extra = ["--data-file", write_npz(tmp_path / "six.npz", classes=6)]
    assert needle in refused(["--eval", str(path), "--device", "cpu", *extra], capsys)
    assert not os.path.exists(tmp_path / "eval.json")


def test_a_data_file_decides_the_dataset_label(tmp_path, capsys):
    """config.json never calls 10-class data cifar100: the script's label gives way to the file's class count;
    a --dataset typed against the file is refused in one line."""
    import exp_ablations as ab
    ten = write_npz(tmp_path / "ten.npz", classes=10)
    run_main(tiny_args(ten, tmp_path / "r", "--method", "at", "--epochs", "1"), {**DEFAULTS, "dataset": "cifar100"})
    assert json.load(open(tmp_path / "r" / "config.json"))["config"]["dataset"] == "cifar10"
    four = write_npz(tmp_path / "four.npz", classes=4)
    run_main(tiny_args(four, tmp_path / "r4", "--method", "at", "--epochs", "1"), {**DEFAULTS, "dataset": "cifar100"})
    assert json.load(open(tmp_path / "r4" / "config.json"))["config"]["dataset"] is None  # no label fits
    err = refused(tiny_args(ten, tmp_path / "bad", "--dataset", "cifar100"), capsys)
    assert "--dataset cifar100 has 100 classes but --data-file" in err and not (tmp_path / "bad").exists()
    assert ab.Study(["--data-file", ten]).base.dataset == "cifar10"  # exp_ablations' DEFAULTS say cifar100


def test_export_never_overwrites_without_being_asked(run_copy, tmp_path, capsys):
    _, out = run_copy
    target = tmp_path / "m.pt"
    target.write_text("someone's file")
    err = refused(["--export", str(out / "last.pt"), str(target)], capsys)
    assert "exists; pass --overwrite" in err and target.read_text() == "someone's file"
    run_main(["--export", str(out / "last.pt"), str(target), "--overwrite"])
    saved = torch.load(out / "last.pt", weights_only=False)["models"]["adv"]
    assert set(torch.load(target, weights_only=True)) == set(saved)


def test_a_bare_state_dict_row_names_no_epoch(tmp_path, capsys):
    import common
    npz = write_npz(tmp_path / "d.npz")
    torch.save(common.build_model("cnn_small", 4).state_dict(), tmp_path / "sd.pt")
    run_main(["--eval", str(tmp_path / "sd.pt"), "--arch", "cnn_small", "--data-file", npz, "--metrics", "nat",
              "--device", "cpu"])
    row = open(tmp_path / "results.md").read().splitlines()[-1]
    assert row.startswith("| sd.pt (sd.pt, n=32) |") and "epoch None" not in row and row.endswith("| state_dict |")
