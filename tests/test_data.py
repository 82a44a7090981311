"""The torchvision CIFAR path (CIFAR-100 is not available offline here): a generated miniature of
torchvision's cifar-100-python/ folder, md5 checks switched off, must load as the npz path does."""
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

import common
import runs

DEFAULTS = dict(dataset="cifar100", method="trades", lam="20a", arch="wrn34_10", std_arch="resnet18")


def write_cifar100(root, rng, n_train=12, n_test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    sets = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # torchvision stores CHW rows
        y = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.reshape(n, -1), "fine_labels": y, "coarse_labels": [0] * n}, f)
        sets[name] = (x, y)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return sets


def cfg_for(*argv):
    return runs.make_config(DEFAULTS, runs.parse_flags(DEFAULTS, list(argv)))


def test_cifar100_folder_loads_like_the_npz_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    sets = write_cifar100(tmp_path, np.random.default_rng())
    data = common.load_data(cfg_for("--data-dir", str(tmp_path), "--train-n", "10"), "cpu")
    assert data.num_classes == 100 and len(data.class_names) == 100
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape == (10, 3, 32, 32)
    assert torch.equal(data.x_train, torch.from_numpy(sets["train"][0][:10]))
    assert torch.equal(data.x_test, torch.from_numpy(sets["test"][0]))
    assert data.y_train.tolist() == sets["train"][1][:10] and data.y_test.tolist() == sets["test"][1]


def test_cifar100_offline_is_a_user_error(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise URLError("Name or service not known")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    with pytest.raises(common.UserError, match="could not load cifar100.*--data-file"):
        common.load_data(cfg_for("--data-dir", str(tmp_path)), "cpu")
