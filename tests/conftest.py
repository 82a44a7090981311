import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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
