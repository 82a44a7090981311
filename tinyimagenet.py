"""Tiny ImageNet read from its official unzipped folder (tiny-imagenet-200/), with a decoded-array cache.

A module of its own beside common.py: parsing the folder layout and keeping the cache fresh is file-format
plumbing; common.load_data is the one caller (--dataset tinyimagenet), and the research code sees the same
uint8 arrays as from any other data set. Decoding needs Pillow (torchvision brings it).
"""
import os

import numpy as np

TINYIMAGENET_CACHE = "tinyimagenet_cache.npz"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _tin_wnids(root):
    """Sorted class ids: from wnids.txt when present, else the train/ subfolders."""
    path = os.path.join(root, "wnids.txt")
    if os.path.isfile(path):
        with open(path) as f:
            wnids = sorted({line.strip() for line in f if line.strip()})
    else:
        wnids = sorted(d for d in os.listdir(os.path.join(root, "train"))
                       if os.path.isdir(os.path.join(root, "train", d)))
    if not wnids:
        raise ValueError(f"no classes in {root}: wnids.txt is empty or {os.path.join(root, 'train')} "
                         "has no class folders")
    return wnids


def _tin_files(root, wnids):
    """[(path, label)] of the train split and of the val split (= the test split)."""
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        d = os.path.join(root, "train", w, "images")
        if not os.path.isdir(d):
            raise ValueError(f"class folder {d} is missing")
        train += [(os.path.join(d, n), index[w]) for n in sorted(os.listdir(d)) if n.lower().endswith(IMAGE_SUFFIXES)]
    ann = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise ValueError(f"{ann} is missing (it maps the val images to their classes)")
    test = []
    with open(ann) as f:
        for n_line, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise ValueError(f"{ann} line {n_line}: expected 'file<TAB>wnid...' with a known wnid, "
                                 f"got {line.strip()[:80]!r}")
            test.append((os.path.join(root, "val", "images", parts[0]), index[parts[1]]))
    if not train:
        raise ValueError(f"no images in {os.path.join(root, 'train', '*', 'images')}")
    if not test:
        raise ValueError(f"{ann} lists no images")
    return train, test


def _decode(items, size=64):
    """PIL decode to uint8 RGB NHWC; grayscale/CMYK images are converted, odd sizes resized."""
    from PIL import Image
    x = np.empty((len(items), size, size, 3), np.uint8)
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # a few Tiny ImageNet JPEGs are grayscale
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                x[i] = np.asarray(im)
        except (OSError, SyntaxError) as e:  # missing / truncated / not an image
            raise ValueError(f"could not read image {path} ({type(e).__name__}: {e})")
    return x, np.array([label for _, label in items], np.int64)


def _tin_source_mtime(root, wnids):
    """Newest mtime of the folders and lists that define the data set. Not root's own mtime:
    writing the cache into root bumps it, which would make every cache look stale."""
    paths = [os.path.join(root, "wnids.txt"), os.path.join(root, "train"), os.path.join(root, "val"),
             os.path.join(root, "val", "images"), os.path.join(root, "val", "val_annotations.txt")]
    for w in wnids:
        paths += [os.path.join(root, "train", w), os.path.join(root, "train", w, "images")]
    return max(os.path.getmtime(p) for p in paths if os.path.exists(p))


def _tin_read_cache(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            names = [str(c) for c in z["class_names"]]
    except (OSError, ValueError, KeyError, EOFError):  # unreadable / partial cache: decode again
        return None
    return arrays, names


def load_tinyimagenet_folder(root, cache=True):
    """Tiny ImageNet from its unzipped layout (tiny-imagenet-200/): train/<wnid>/images/*.JPEG,
    val/images/*.JPEG + val/val_annotations.txt, wnids.txt (optional). The val split is the test
    split; labels index the sorted wnids. -> ({x_train, y_train, x_test, y_test}, wnids), x uint8
    NHWC 64x64. The decoded arrays are cached in <root>/tinyimagenet_cache.npz and reused while no
    class folder / list is newer. Problems raise ValueError with a one-line message."""
    if not os.path.isdir(root):
        raise ValueError(f"Tiny ImageNet folder {root} not found")
    if not os.path.isdir(os.path.join(root, "train")):
        raise ValueError(f"{os.path.join(root, 'train')} is missing")
    wnids = _tin_wnids(root)
    cache_path = os.path.join(root, TINYIMAGENET_CACHE)
    if cache and os.path.isfile(cache_path) and os.path.getmtime(cache_path) >= _tin_source_mtime(root, wnids):
        cached = _tin_read_cache(cache_path)
        if cached is not None and cached[1] == wnids:
            return cached
    train, test = _tin_files(root, wnids)
    x_train, y_train = _decode(train)
    x_test, y_test = _decode(test)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if cache:
        tmp = f"{cache_path}.tmp{os.getpid()}"
        try:  # temp + rename: a killed run never leaves a half-written cache behind
            with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz"
                np.savez(f, class_names=np.array(wnids), **arrays)
            os.replace(tmp, cache_path)
        except OSError:  # read-only data folder: work without a cache
            if os.path.exists(tmp):
                os.remove(tmp)
    return arrays, wnids
