"""The tests' one toolbox: data writers, the tiny run's flags, a Config builder, and the ways to run a script
(in process: run_main / refused; as a person would: cli). Tests marked slow (the kernel grid under the Triton
interpreter, DDP processes, command-line runs in subprocesses) are left out by `pytest -m "not slow"`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: kernel grid under the interpreter, DDP processes, subprocess CLI runs")


@pytest.fixture
def tiny_npz(tmp_path):
    """A generated data set with the shared/ schema: 16x16 images whose class sets the mean colour."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.float64) * 0.5
        x += (y[:, None, None, None] * 40)
        return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = make(64)
    x_te, y_te = make(32)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             class_names=np.array(["a", "b", "c", "d"]))
    return str(path)


# A test experiment script's defaults, and the flags of a seconds-long run on the tiny_npz data (64 training
# images: no validation split unless a test asks for one, after tiny_args or in its DEFAULTS).
DEFAULTS = dict(dataset="cifar10", method="trades", lam="5", arch="wrn34_10", val_n=0)


def tiny_args(npz, out, *extra):
    return ["--data-file", npz, "--out", str(out), "--arch", "cnn_small", "--std-arch", "cnn_small",
            "--epochs", "2", "--batch-size", "16", "--steps", "2", "--eval-steps", "2", "--eval-n", "16",
            "--device", "cpu", "--val-n", "0", *extra]


def write_npz(path, n_train=64, n_test=32, classes=4, names=True, **override):
    """Fresh random 16x16 images and labels with the shared/ schema (every class in the training set);
    override replaces arrays."""
    rng = np.random.default_rng()
    y_tr, y_te = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    y_tr[:classes] = np.arange(classes)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 16, 16, 3), dtype=np.uint8), "y_train": y_tr,
              "x_test": rng.integers(0, 256, (n_test, 16, 16, 3), dtype=np.uint8), "y_test": y_te}
    arrays.update(override)
    if names:
        arrays["class_names"] = np.array([f"c{i}" for i in range(classes)])
    np.savez(path, **arrays)
    return str(path)


def make_config(defaults=None, **settings):
    """The command line's Config (runs.make_config: field defaults < defaults < --quick/--fast < settings) on
    the CPU; defaults: a script's DEFAULTS (default: CIFAR-10 with every setting at its field default)."""
    import runs
    return runs.make_config(defaults or {"dataset": "cifar10"}, {"device": "cpu", **settings})


def run_main(argv, defaults=DEFAULTS, prefix="test"):
    """An experiment script with these DEFAULTS, run in this process (common.main)."""
    import common
    return common.main(defaults, argv, prefix=prefix)


def refused(argv, capsys, defaults=DEFAULTS):
    """run_main(argv) must exit 2 with one line on stderr and no traceback; -> that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(argv, defaults)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def cli(*args, script="exp_cifar10.py", cwd=ROOT, **kw):
    """A script run as a person runs it: a subprocess in the repository; -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, **kw)


def read_rows(run_dir):
    """metrics.jsonl of a run folder, one dict per epoch."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]
