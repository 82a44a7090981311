"""Tiny ImageNet folder parsing, caching and errors on a generated miniature tree; resizing."""
import os

import numpy as np
import pytest

import common
import tinyimagenet


WNIDS = ["n02", "n01", "n03"]  # unsorted on purpose: labels must follow the sorted order


def make_tin(root, wnids_file=True, gray=True):
    from PIL import Image
    rng = np.random.default_rng(0)
    sorted_ids = sorted(WNIDS)
    for w in WNIDS:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(4):
            level = 60 * sorted_ids.index(w) + 20  # class sets the mean brightness
            a = rng.integers(level - 10, level + 10, (64, 64, 3)).astype(np.uint8)
            Image.fromarray(a).save(d / f"{w}_{j}.JPEG", quality=95)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for j, w in enumerate(WNIDS * 2):
        name = f"val_{j}.JPEG"
        a = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
        im = Image.fromarray(a)
        if gray and j == 0:
            im = im.convert("L")
        im.save(root / "val" / "images" / name)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    if wnids_file:
        (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return root


@pytest.mark.parametrize("wnids_file", [True, False])
def test_tinyimagenet_parse(tmp_path, wnids_file):
    from PIL import Image
    root = make_tin(tmp_path / "tiny-imagenet-200", wnids_file=wnids_file)
    arrays, names = tinyimagenet.load_tinyimagenet_folder(str(root), cache=False)
    assert names == ["n01", "n02", "n03"]
    assert arrays["x_train"].shape == (12, 64, 64, 3) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (6, 64, 64, 3)
    assert arrays["y_train"].dtype == np.int64 and arrays["y_test"].dtype == np.int64
    assert arrays["y_train"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert arrays["y_test"].tolist() == [1, 0, 2, 1, 0, 2]
    means = [arrays["x_train"][arrays["y_train"] == c].mean() for c in range(3)]
    assert means[0] < means[1] < means[2]  # images went to their own class
    g = arrays["x_test"][0]  # the grayscale one: three equal channels
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])
    with Image.open(root / "val" / "images" / "val_1.JPEG") as im:
        assert np.array_equal(arrays["x_test"][1], np.asarray(im.convert("RGB")))
    assert not (root / tinyimagenet.TINYIMAGENET_CACHE).exists()


def test_tinyimagenet_cache_reused_and_refreshed(tmp_path, monkeypatch):
    import PIL.Image
    root = make_tin(tmp_path / "tiny-imagenet-200")
    arrays, names = tinyimagenet.load_tinyimagenet_folder(str(root))
    cache = root / tinyimagenet.TINYIMAGENET_CACHE
    assert cache.exists() and not [p for p in os.listdir(root) if ".tmp" in p]
    real_open = PIL.Image.open

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is fresh")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    again, names2 = tinyimagenet.load_tinyimagenet_folder(str(root))
    assert names2 == names and all(np.array_equal(again[k], arrays[k]) for k in arrays)
    # a class folder changed after the cache was written: decode again
    t = os.path.getmtime(cache) + 10
    os.utime(root / "train" / "n02" / "images", (t, t))
    with pytest.raises(AssertionError, match="decoded"):
        tinyimagenet.load_tinyimagenet_folder(str(root))
    monkeypatch.setattr(PIL.Image, "open", real_open)
    old = os.stat(cache).st_mtime_ns
    fresh, _ = tinyimagenet.load_tinyimagenet_folder(str(root))
    assert np.array_equal(fresh["x_train"], arrays["x_train"])
    assert os.stat(cache).st_mtime_ns != old  # rewritten
    with np.load(cache) as z:
        assert sorted(z.files) == ["class_names", "x_test", "x_train", "y_test", "y_train"]


def test_tinyimagenet_corrupt_cache_is_rebuilt(tmp_path):
    root = make_tin(tmp_path / "tiny-imagenet-200")
    arrays, _ = tinyimagenet.load_tinyimagenet_folder(str(root))
    (root / tinyimagenet.TINYIMAGENET_CACHE).write_bytes(b"not a zip")
    again, _ = tinyimagenet.load_tinyimagenet_folder(str(root))
    assert np.array_equal(again["x_test"], arrays["x_test"])


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        tinyimagenet.load_tinyimagenet_folder(str(tmp_path / "nope"))
    root = make_tin(tmp_path / "a")
    os.remove(root / "val" / "val_annotations.txt")
    with pytest.raises(ValueError, match="val_annotations.txt is missing"):
        tinyimagenet.load_tinyimagenet_folder(str(root))
    root = make_tin(tmp_path / "b")
    for w in WNIDS:
        for n in os.listdir(root / "train" / w / "images"):
            os.remove(root / "train" / w / "images" / n)
    with pytest.raises(ValueError, match="no images"):
        tinyimagenet.load_tinyimagenet_folder(str(root))
    root = make_tin(tmp_path / "c")
    os.remove(root / "val" / "images" / "val_2.JPEG")
    with pytest.raises(ValueError, match="val_2.JPEG"):
        tinyimagenet.load_tinyimagenet_folder(str(root))
    root = make_tin(tmp_path / "d")
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="line 7"):
        tinyimagenet.load_tinyimagenet_folder(str(root))
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="train is missing"):
        tinyimagenet.load_tinyimagenet_folder(str(tmp_path / "e"))


def test_resize_images():
    from PIL import Image
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    out = common.resize_images(x, 32)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(x[1]).resize((32, 32), Image.BILINEAR)).astype(int)
    assert np.abs(out[1].astype(int) - ref).max() <= 1  # antialiased bilinear = PIL's
    flat = np.full((2, 64, 64, 3), 77, np.uint8)
    assert (common.resize_images(flat, 32, chunk=1) == 77).all()
