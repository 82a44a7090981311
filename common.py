"""TRAIN (Topology-pReserving Adversarial traINing): the shared core.

Sections, in the order data flows (search for the banner "# N. name"):
  1. data        load_npz, load_torchvision, load_tinyimagenet_folder, epoch_plan, augment
  2. models      CNNSmall, ResNet (resnet18, resnet18_lbgat, preact_resnet18), WideResNet (wrn34_10),
                 MobileNetV3; registry MODELS
  3. attacks     pgd (one PGD over a loss of the logits): ce_sum, kl_to_clean, cw_margin; attack_ce, attack_kl
  4. losses      loss_at, loss_trades, loss_alp, loss_mart, loss_standard -> BASE_METHODS;
                 plugin_train (L_TP and the other RELATION_LOSSES), plugin_lbgat -> PLUGINS; AWP
  5. training    train_step (one step of Algorithm 1), train (epochs, checkpoints, resume)
  6. evaluation  evaluate (natural, PGD-20, CW-20, AutoAttack, kNN topology score, test L_TP), sanity_checks
  7. run I/O     build_parser (the CLI shared by every script), run folders (run_lock), run, evaluate_run, main
Experiment scripts (exp_*.py) hold the paper's settings and call `main(defaults)`.
Multi-GPU (--ddp under torchrun) lives in distributed.py; common.py calls it at a few marked points.
Inputs are in [0, 1] everywhere; no normalisation happens outside the models.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from kernels import topology_loss


class UserError(Exception):
    """Bad input from a person: main() prints the message on one line and exits with code 2."""


class FolderInUse(UserError):
    """Another process holds the run folder's lock (a study skips such a run and goes on)."""


class Diverged(Exception):
    """A NaN/inf loss: the run stops, the last good checkpoint is kept."""


# =====================================================================================
# 1. data
# =====================================================================================
@dataclass
class Data:
    """A whole data set as uint8 NCHW tensors on the training device."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: list = field(default_factory=list)
    x_val: torch.Tensor = None  # the validation split held out of training (--val-n), else None
    y_val: torch.Tensor = None


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
TORCHVISION_SETS = {"cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100)}


def load_npz(path):
    """Arrays with the schema of shared/data/README.md: x_* uint8 NHWC, y_* int."""
    if os.path.isdir(path):
        raise UserError(f"data file {path} is a directory; give the .npz file itself")
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found (expected an .npz with keys {', '.join(NPZ_KEYS)})")
    if not zipfile.is_zipfile(path):  # np.load would return a lone array (.npy) or try to unpickle it
        raise UserError(f"data file {path} is not an .npz archive (np.savez writes one with keys {', '.join(NPZ_KEYS)})")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise UserError(f"data file {path} lacks the keys {missing}; it needs {', '.join(NPZ_KEYS)}")
            arrays = {k: z[k] for k in NPZ_KEYS}
            names = [str(c) for c in z["class_names"]] if "class_names" in z.files else []
    except (OSError, ValueError) as e:
        raise UserError(f"could not read data file {path}: {e}")
    for k in ("x_train", "x_test"):
        a = arrays[k]
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise UserError(f"data file {path}: {k} must be uint8 NHWC with 3 channels, got {a.dtype} {a.shape}")
    return arrays, names


def load_torchvision(name, root):
    """CIFAR-10/100 through torchvision; downloads when the files are missing."""
    import torchvision
    cls_name, _ = TORCHVISION_SETS[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        sets = [cls(root, train=t, download=True) for t in (True, False)]
    except Exception as e:  # no network, broken archive, ...
        raise UserError(f"could not load {name} from {root} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"run once with internet access to download it, or pass --data-file X.npz")
    arrays = {"x_train": sets[0].data, "y_train": np.asarray(sets[0].targets),
              "x_test": sets[1].data, "y_test": np.asarray(sets[1].targets)}
    return arrays, list(sets[0].classes)


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
        raise ValueError(f"no classes in {root}: wnids.txt is empty or {os.path.join(root, 'train')} has no class folders")
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
                raise ValueError(f"{ann} line {n_line}: expected 'file<TAB>wnid...' with a known wnid, got {line.strip()[:80]!r}")
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


def resize_images(x_u8_nhwc, size, chunk=2048):
    """uint8 NHWC -> uint8 NHWC at size x size: bilinear with antialias (PIL-like when shrinking),
    e.g. Tiny ImageNet 64 -> 32 for the paper's 32x32 setting. Chunked to bound float memory."""
    x = np.asarray(x_u8_nhwc)
    out = np.empty((x.shape[0], size, size, x.shape[3]), np.uint8)
    for i in range(0, x.shape[0], chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i:i + chunk] = t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def to_device_uint8(x_nhwc, device):
    return torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)


def check_labels(arrays, names, source):
    """Every loader's arrays, checked once at load: non-empty splits, one integer label per image, each
    in [0, num_classes). num_classes: len(class_names) when the data names its classes, else max + 1.
    -> num_classes; a failure is a UserError naming the source."""
    for split in ("train", "test"):
        x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
        if len(x) == 0:
            raise UserError(f"{source}: the {split} split is empty (x_{split} has no images)")
        if y.ndim != 1:
            raise UserError(f"{source}: y_{split} must be 1-D (one label per image), got shape {y.shape}")
        if len(y) != len(x):
            raise UserError(f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{source}: y_{split} must hold integer class indices, got dtype {y.dtype}")
    ys = {split: np.asarray(arrays[f"y_{split}"]) for split in ("train", "test")}
    num_classes = len(names) if names else int(max(y.max() for y in ys.values())) + 1
    for split, y in ys.items():
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            where = f"class_names lists {num_classes} classes" if names else "labels must be >= 0"
            raise UserError(f"{source}: y_{split} holds {len(bad)} labels outside [0, {num_classes}) "
                            f"(e.g. {int(bad[0])}); {where}")
    missing = sorted(set(range(num_classes)) - set(ys["train"].tolist()))
    if missing and not names:  # max + 1 counts a class the training set never shows: say so
        tqdm.write(f"WARNING: {source}: classes {missing[:10]} never occur in the training labels; "
                   f"assuming {num_classes} classes (labels 0..{num_classes - 1})")
    return num_classes


def load_data(cfg, device):
    """Load the configured data set; subset it with --train-n / --test-n (0 = all)."""
    if cfg.data_file:
        arrays, names = load_npz(cfg.data_file)
    elif cfg.dataset == "tinyimagenet":
        root = os.path.join(cfg.data_dir, "tiny-imagenet-200")
        try:
            arrays, names = load_tinyimagenet_folder(root)
        except ValueError as e:
            raise UserError(f"{e} (get tiny-imagenet-200.zip from the Tiny ImageNet site and unzip it into "
                            f"{cfg.data_dir}, or pass --data-file X.npz)")
    else:
        arrays, names = load_torchvision(cfg.dataset, cfg.data_dir)
    num_classes = check_labels(arrays, names, f"data {cfg.data_file or cfg.dataset}")
    if cfg.train_n:
        arrays["x_train"], arrays["y_train"] = arrays["x_train"][:cfg.train_n], arrays["y_train"][:cfg.train_n]
    if cfg.test_n:
        arrays["x_test"], arrays["y_test"] = arrays["x_test"][:cfg.test_n], arrays["y_test"][:cfg.test_n]
    if cfg.image_size and arrays["x_train"].shape[1] != cfg.image_size:  # Tiny ImageNet: 64 -> 32 as in the paper
        for k in ("x_train", "x_test"):
            arrays[k] = resize_images(arrays[k], cfg.image_size)
    return Data(to_device_uint8(arrays["x_train"], device), torch.as_tensor(arrays["y_train"], dtype=torch.long, device=device),
                to_device_uint8(arrays["x_test"], device), torch.as_tensor(arrays["y_test"], dtype=torch.long, device=device),
                num_classes, names)


def hold_out_validation(data, val_n):
    """The last val_n training images become the validation split that picks best.pt (model selection on
    held-out training data as in Rice et al.'s early stopping, never on the test set); training uses the rest.
    The shared CIFAR-10 copy keeps the official training order, whose last images are about class-balanced."""
    if not val_n:
        return data
    n = len(data.x_train)
    if val_n >= n:
        raise UserError(f"--val-n {val_n} leaves no training images (the training set has {n}); lower it, or 0 for none")
    return dataclasses.replace(data, x_train=data.x_train[:n - val_n], y_train=data.y_train[:n - val_n],
                               x_val=data.x_train[n - val_n:], y_val=data.y_train[n - val_n:])


def epoch_plan(n, seed, epoch, pad=4):
    """Order and augmentation of one epoch, a pure function of (seed, epoch) so a resumed
    run replays exactly the batches an uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return perm, offsets, flips


def augment(x_u8, offsets, flips, pad=4):
    """Random crop with `pad`-pixel zero padding and horizontal flip, on the device; -> float in [0,1]."""
    b, c, h, w = x_u8.shape
    dev = x_u8.device
    xp = F.pad(x_u8, (pad, pad, pad, pad))
    offsets, flips = offsets.to(dev), flips.to(dev)
    rows = (offsets[:, 0, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out.float().div_(255)


def to_float(x_u8):
    return x_u8.float().div_(255)


# =====================================================================================
# 2. models   (every model: forward(x, return_features=False) -> logits or (features, logits))
# =====================================================================================
class Classifier(nn.Module):
    """Penultimate features from `embed`, logits from `fc`; AutoAttack sees logits only."""
    feature_dim: int

    def forward(self, x, return_features=False):
        f = self.embed(x)
        z = self.fc(f)
        return (f, z) if return_features else z


def conv_bn_relu(c_in, c_out, stride=1):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class PlainCNN(Classifier):
    """A plain conv body, global average pooling, one linear layer."""

    def __init__(self, layers, feature_dim, num_classes):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


class CNNSmall(PlainCNN):
    """A small CNN for tests and --quick runs (three conv stages, 128-d features)."""

    def __init__(self, num_classes=10, width=32):
        w = width
        layers = conv_bn_relu(3, w) + conv_bn_relu(w, 2 * w, 2) + conv_bn_relu(2 * w, 4 * w, 2)
        super().__init__(layers, 4 * w, num_classes)


class CNN6(PlainCNN):
    """A fast CIFAR net for CPU-scale studies: three stages of two conv-BN-ReLU each (widths w, 2w, 4w)
    with a 2x2 max-pool after each stage, 4w-d features. At w=16 it has ~0.1M parameters and trains
    PGD-3 AT at ~200 images/s on one CPU thread (2026-12-01, AMD EPYC), 1.6x cnn_small's speed,
    with twice its depth (six convolutions instead of three)."""

    def __init__(self, num_classes=10, width=16):
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width):
            layers += conv_bn_relu(c_in, c_out) + conv_bn_relu(c_out, c_out) + [nn.MaxPool2d(2)]
            c_in = c_out
        super().__init__(layers, c_in, num_classes)


class BasicBlock(nn.Module):

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(Classifier):
    """CIFAR ResNet (3x3 stem, no max-pool). `strides` per stage: (1,2,2,2) is the usual
    ResNet-18 (4x4 final maps on 32x32); (1,1,2,2) is LBGAT's variant (8x8 final maps)."""

    def __init__(self, block, num_blocks, num_classes=10, strides=(1, 2, 2, 2), preact=False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        c_in, stages = 64, []
        for c_out, n, stride in zip((64, 128, 256, 512), num_blocks, strides):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(c_in, c_out, s))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.linear = nn.Linear(512, num_classes)

    @property
    def fc(self):
        return self.linear

    def embed(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class WideBlock(nn.Module):
    """TRADES' WideResNet block (pre-activation); attribute names kept for checkpoint compatibility."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal_in_out = c_in == c_out
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        if not self.equal_in_out:
            x = out  # TRADES: the shortcut of a widening block sees the activated input
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equal_in_out else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(Classifier):
    """TRADES' WideResNet-34-10 (640-d features). Its unused `sub_block1` is not built, but
    checkpoints that contain it (TRADES, LBGAT) load: those keys are dropped on load."""

    def __init__(self, num_classes=10, depth=34, widen=10):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.feature_dim = ch[3]
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():  # TRADES' initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def embed(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in [k for k in state_dict if k.startswith(prefix + "sub_block1.")]:
            del state_dict[k]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MobileNetV3(Classifier):
    """MobileNetV3-Large (torchvision's layers and init) for 32x32 / 64x64 inputs, M' of Table XII.

    CIFAR change: stem stride 1 instead of 2 (total stride 16, so 32x32 ends at 2x2 instead of
    1x1). Features = the 1280-d vector after avgpool -> Linear(960, 1280) -> Hardswish, taken
    *before* torchvision's Dropout(0.2): relation losses and kNN see a deterministic representation,
    not a random mask. forward applies the dropout between features and fc, so logits equal
    torchvision's in both modes; in eval mode fc(embed(x)) is exactly the logits.
    """

    def __init__(self, num_classes=10, dropout=0.2):
        super().__init__()
        import torchvision
        tv = torchvision.models.mobilenet_v3_large(num_classes=num_classes, dropout=dropout)
        tv.features[0][0].stride = (1, 1)
        self.features, self.avgpool = tv.features, tv.avgpool
        self.pre = tv.classifier[:2]  # Linear(960, 1280) + Hardswish
        self.dropout = nn.Dropout(dropout)  # not torchvision's inplace one: it would overwrite the features
        self.fc = tv.classifier[3]
        self.feature_dim = self.fc.in_features

    def embed(self, x):
        return self.pre(self.avgpool(self.features(x)).flatten(1))

    def forward(self, x, return_features=False):
        f = self.embed(x)
        z = self.fc(self.dropout(f))
        return (f, z) if return_features else z


MODELS = {
    "cnn_small": lambda nc: CNNSmall(nc),
    "cnn6": lambda nc: CNN6(nc),
    "cnn6x2": lambda nc: CNN6(nc, width=32),  # twice the width, ~4x the FLOPs: the response study's capacity arm
    "resnet18": lambda nc: ResNet(BasicBlock, (2, 2, 2, 2), nc),
    "resnet18_lbgat": lambda nc: ResNet(BasicBlock, (2, 2, 2, 2), nc, strides=(1, 1, 2, 2)),
    "preact_resnet18": lambda nc: ResNet(PreActBlock, (2, 2, 2, 2), nc, preact=True),
    "wrn34_10": lambda nc: WideResNet(nc, 34, 10),
    "mobilenet_v3": lambda nc: MobileNetV3(nc),
}


def build_model(name, num_classes):
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes)


def load_model_state(model, state):
    """Strict load; strips the 'module.' prefix of DataParallel checkpoints."""
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def fit_weights(model, state, what, arch):
    """load_model_state for a checkpoint a person chose: weights of another class count or another arch
    are one line (UserError) instead of PyTorch's page-long RuntimeError. arch: how the model was named
    ("its saved arch X" / "--arch X"). The model is built for the data set, so its last layer's rows are
    the data set's class count."""
    if not isinstance(state, dict):
        raise UserError(f"{what} holds no weights")
    fc = getattr(getattr(model, "fc", None), "weight", None)  # the last layer: one row per class
    fc_name = next((n for n, p in model.named_parameters() if p is fc), None)
    saved = state.get(fc_name, state.get(f"module.{fc_name}"))
    if isinstance(saved, torch.Tensor) and saved.ndim == 2 and saved.shape[0] != fc.shape[0]:
        raise UserError(f"{what} was trained on {saved.shape[0]} classes, but the data set has {fc.shape[0]}")
    try:
        load_model_state(model, state)
    except (RuntimeError, AttributeError) as e:
        raise UserError(f"{what} does not fit {arch}: {' '.join(str(e).split())[:300]}")


class Normalized(nn.Module):
    """(x - mean) / std in front of a model that was trained on normalised inputs (some public checkpoints):
    attacks and eps stay in [0,1] pixel space. Only --eval of a bare state_dict uses it."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model, self.feature_dim = model, model.feature_dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x, return_features=False):
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype), return_features)


# =====================================================================================
# 3. attacks   (one PGD over a loss of the logits; gradients w.r.t. the input only)
# =====================================================================================
def ce_sum(y):
    return lambda z: F.cross_entropy(z, y, reduction="sum")


def kl_to_clean(p_clean):
    """TRADES' attack loss: KL(p_clean || softmax(z)), summed over the batch."""
    return lambda z: F.kl_div(F.log_softmax(z, dim=1), p_clean, reduction="sum")


def cw_margin(y, kappa=50.0):
    """CW-inf loss -clamp(z_y - max_{k != y} z_k + kappa, min=0), summed; any number of classes."""
    def loss(z):
        z_y = z.gather(1, y[:, None]).squeeze(1)
        z_other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(dim=1)
        return -(z_y - z_other + kappa).clamp_min(0).sum()
    return loss


class eval_mode:
    """Context: model.eval() and its parameters frozen inside (attacks craft against the inference-mode
    model and need input gradients only: a compiled backward that also computes weight gradients was
    2.2x slower on the CPU), mode and requires_grad restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        for p in self.frozen:
            p.requires_grad_(True)


def pgd(model, x, loss_fn, eps, step_size, steps, start="uniform"):
    """L-inf PGD maximising loss_fn(model(x')) over the eps-ball around x intersected with [0,1].

    start: "uniform" (random in the eps-ball, clamped to [0,1]: Madry), "normal-raw" (x + 0.001 N(0,1), not
    clamped before the first step: TRADES' trades.py, MART's mart.py), "normal" (the same start clamped: this
    project's first release) or "none".
    """
    x = x.detach()
    if start == "uniform":
        x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
    elif start in ("normal", "normal-raw"):
        x_adv = x + 0.001 * torch.randn_like(x)
    else:
        x_adv = x.clone()
    if start != "normal-raw":
        x_adv = x_adv.clamp(0, 1)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.clamp(0, 1).detach()  # as the official code: x' in [0,1] even after 0 steps (else a no-op)


def official(cfg):
    """False for runs of the first release (--baselines release1), whose attack starts and TRADES + LBGAT loss
    differed from the official code. getattr: the attacks are also called with bare (eps, step_size, steps)."""
    return getattr(cfg, "baselines", "official") == "official"


def attack_ce(model, x, y, cfg):
    """The training attack of at / alp: Madry et al.'s PGD (MadryLab/cifar10_challenge, pgd_attack.py): summed CE,
    start x + U(-eps, eps) clipped to [0,1]. (ALP's own code is not public in PyTorch; Kannan et al. use Madry's.)"""
    with eval_mode(model):
        return pgd(model, x, ce_sum(y), cfg.eps, cfg.step_size, cfg.steps, "uniform")


def attack_mart(model, x, y, cfg):
    """MART's training attack (YisenWang/MART, mart.py): batch-mean CE from x + 0.001 N(0,1), not clamped before
    the first step. The first release used attack_ce's uniform start."""
    if not official(cfg):
        return attack_ce(model, x, y, cfg)
    with eval_mode(model):
        return pgd(model, x, lambda z: F.cross_entropy(z, y), cfg.eps, cfg.step_size, cfg.steps, "normal-raw")


def attack_kl(model, x, y, cfg):
    """TRADES' training attack (yaodongyu/TRADES, trades.py; also LBGAT's lbgat.py): maximise the summed
    KL(M'(x) || M'(x')) from x + 0.001 N(0,1), not clamped before the first step (the first release clamped it)."""
    with eval_mode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        return pgd(model, x, kl_to_clean(p_clean), cfg.eps, cfg.step_size, cfg.steps,
                   "normal-raw" if official(cfg) else "normal")


# =====================================================================================
# 4. losses and methods
#    A base method = its own training attack + named loss terms of M'.
#    Plug-ins (train, lbgat) add terms on top of any base method. The step sums all terms.
# =====================================================================================
LOW_PRECISION = (torch.float16, torch.bfloat16)  # autocast outputs; losses see them in fp32


class StepState:
    """What one training step knows; forward passes are computed once and shared by all terms.
    M (model_std) runs without gradients when it is not trained (a frozen pre-trained M).
    gather: None, or (--ddp --tp-scope global) distributed.gather_rows, which relation_inputs applies."""
    gather = None

    def __init__(self, model_adv, x, y, x_adv, model_std=None, std_trainable=True, heads=None, amp=contextlib.nullcontext):
        self.model_adv, self.model_std, self.x, self.y, self.x_adv = model_adv, model_std, x, y, x_adv
        self.std_trainable = std_trainable
        self.heads = heads  # trainable heads of a relation loss (e.g. CRD's projections), else None
        self.amp = amp  # context of the forward passes (--amp: autocast); the losses always run in fp32
        self._cache = {}

    def _once(self, key, fn):
        if key not in self._cache:
            with self.amp():
                out = fn()
            self._cache[key] = tuple(t.float() if t.dtype in LOW_PRECISION else t for t in out)
        return self._cache[key]

    def adv_out(self):
        """(features, logits) of M'(x')."""
        return self._once("adv", lambda: self.model_adv(self.x_adv, return_features=True))

    def nat_out(self):
        """(features, logits) of M'(x)."""
        return self._once("nat", lambda: self.model_adv(self.x, return_features=True))

    def std_out(self):
        """(features, logits) of the standard model M(x)."""
        def run():
            with torch.set_grad_enabled(self.std_trainable and torch.is_grad_enabled()):
                return self.model_std(self.x, return_features=True)
        return self._once("std", run)


def loss_at(s, cfg):
    """Vanilla AT (Madry et al.): CE on PGD examples."""
    return {"ce_adv": F.cross_entropy(s.adv_out()[1], s.y)}


def trades_kl(z_adv, z_nat):
    """KL(softmax(z_nat) || softmax(z_adv)), batchmean (TRADES' robust term)."""
    return F.kl_div(F.log_softmax(z_adv, dim=1), F.softmax(z_nat, dim=1), reduction="batchmean")


def loss_trades(s, cfg):
    """TRADES (Zhang et al.; yaodongyu/TRADES, trades.py): CE(M'(x), y) + beta KL(M'(x) || M'(x'))."""
    z_nat, z_adv = s.nat_out()[1], s.adv_out()[1]
    return {"ce_nat": F.cross_entropy(z_nat, s.y), "trades_kl": cfg.beta * trades_kl(z_adv, z_nat)}


def loss_alp(s, cfg):
    """Adversarial logit pairing (Kannan et al.): 0.5 CE(x) + 0.5 CE(x') + w * MSE(logits), MSE
    averaged over all logit entries as in the reference implementation's mean_squared_error."""
    z_nat, z_adv = s.nat_out()[1], s.adv_out()[1]
    return {"ce_nat": 0.5 * F.cross_entropy(z_nat, s.y), "ce_adv": 0.5 * F.cross_entropy(z_adv, s.y),
            "alp_pair": cfg.alp_weight * F.mse_loss(z_adv, z_nat)}


def mart_terms(z_adv, z_nat, y, beta):
    """MART (Wang et al. 2020), as in its official code (YisenWang/MART, mart.py; same small constants)."""
    p_adv = F.softmax(z_adv, dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    y_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # most likely wrong class
    bce = F.cross_entropy(z_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), y_wrong)
    p_nat = F.softmax(z_nat, dim=1)
    p_true = p_nat.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(dim=1)
    return {"mart_bce": bce, "mart_kl": beta * (kl * (1.0000001 - p_true)).mean()}


def loss_mart(s, cfg):
    return mart_terms(s.adv_out()[1], s.nat_out()[1], s.y, cfg.beta)


def attack_none(model, x, y, cfg):
    """Standard training sees natural images only."""
    return x


def loss_standard(s, cfg):
    """Standard training (no adversary): CE on natural images; trains the M of Tables VII / X."""
    return {"ce_nat": F.cross_entropy(s.nat_out()[1], s.y)}


@dataclass
class Method:
    """A base method: its training attack (model, x, y, cfg) -> x' and its loss (StepState, cfg) -> terms."""
    attack: object
    loss: object


BASE_METHODS = {
    "at": Method(attack_ce, loss_at),
    "trades": Method(attack_kl, loss_trades),
    "alp": Method(attack_ce, loss_alp),
    "mart": Method(attack_mart, loss_mart),
    "standard": Method(attack_none, loss_standard),
}


def ramp_a(t, total):
    """a(t) = 2 / (1 + exp(-10 t / T)) - 1, the paper's lambda warm-up (t 1-based epoch)."""
    return 2.0 / (1.0 + math.exp(-10.0 * t / total)) - 1.0


@dataclass(frozen=True)
class Lambda:
    """lambda(t) of TRAIN, parsed once from --lam: '5' is the constant 5, '20a' is 20 * a(t).
    `text` keeps what was typed (run names and config.json show it); equality ignores it."""
    c: float
    ramped: bool
    text: str = field(compare=False)

    @classmethod
    def parse(cls, text):
        if isinstance(text, Lambda):
            return text
        s = str(text).strip()
        ramped = s.endswith("a")
        try:
            c = float(s[:-1] if ramped else s)
        except ValueError:
            raise ValueError(f"lambda must be a number like 5 or a number followed by 'a' like 20a, got {text!r}")
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"lambda must be a finite non-negative number, got {text!r}")
        return cls(c, ramped, s)

    def at(self, epoch, total):
        """(a(t), lambda(t)) for epoch t (1-based) of `total`."""
        a = ramp_a(epoch, total) if self.ramped else 1.0
        return a, self.c * a

    def __str__(self):
        return self.text


def relation_feature(s, cfg):
    """f' of M' that the relation loss reads: on x' (--tp-input adv) or on x (nat)."""
    return (s.adv_out() if cfg.tp_input == "adv" else s.nat_out())[0]


def relation_inputs(s, cfg):
    """(f of M on x, detached; f' of M' on x' (--tp-input adv) or on x (nat))."""
    f_std = s.std_out()[0].detach()
    f_adv = relation_feature(s, cfg)
    if s.gather is not None:  # --ddp: the relation over the global batch (distributed.py)
        f_std, f_adv = s.gather(f_std), s.gather(f_adv)
    return f_std, f_adv


def cosine_distances(f):
    """d_ij = 1 - cos(f_i, f_j), the paper's Eq. 7."""
    z = F.normalize(f, dim=1)
    return 1.0 - z @ z.t()


def rkd_loss(f_std, f_adv, eps=1e-12):
    """RKD-distance (Park et al. 2019) with the paper's cosine distance d_ij (Eq. 7) as psi.

    P = {d_ij}, Q = {d'_ij} (Eq. 6); each matrix is divided by the mean of its off-diagonal
    entries (RKD's scale normalisation: f and f' live in spaces of unrelated scale); F of Eq. 5 is
    the mean over ordered pairs i != j of smooth_l1(d'_ij, d_ij) (Huber, beta 1, as RKD). The
    normaliser of M' keeps its gradient, as in RKD's code; RKD's mean also counts the zero
    diagonal, here pairs i == j are left out of both means.
    """
    n = f_std.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=f_std.device)
    d = cosine_distances(f_std)[off]
    d_adv = cosine_distances(f_adv)[off]
    d = d / d.mean().clamp_min(eps)
    d_adv = d_adv / d_adv.mean().clamp_min(eps)
    return F.smooth_l1_loss(d_adv, d, beta=1.0)


def relation_rkd(s, cfg):
    """Vanilla AT + RKD (Table VI): absolute relationship preservation, Eqs. 5-7 (see rkd_loss)."""
    f_std, f_adv = relation_inputs(s, cfg)
    return rkd_loss(f_std, f_adv)


class CRDHeads(nn.Module):
    """CRD's two trainable embeddings (Tian et al. 2020): M' features and M features -> dim."""

    def __init__(self, dim_std, dim_adv, dim=128):
        super().__init__()
        self.std = nn.Linear(dim_std, dim)
        self.adv = nn.Linear(dim_adv, dim)


def crd_loss(f_std, f_adv, heads, temp):
    """In-batch CRD: InfoNCE over the batch (CRD's memory bank of 16384 negatives replaced by the
    other samples of the batch). Row i: positive = M's sample i, negatives = M's other samples."""
    z_adv = F.normalize(heads.adv(f_adv), dim=1)
    z_std = F.normalize(heads.std(f_std), dim=1)
    logits = z_adv @ z_std.t() / temp
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def relation_crd(s, cfg):
    """Vanilla AT + CRD (Table VI); the heads (s.heads, a CRDHeads) are trained, M is not."""
    f_std, f_adv = relation_inputs(s, cfg)
    return crd_loss(f_std, f_adv, s.heads, cfg.crd_temp)


def supcon_loss(f, labels, temp):
    """SupCon (Khosla et al. 2020, L_out): anchors = rows of f (L2-normalised), positives = the
    other rows with the same label, denominator = all other rows. Mean over anchors with >= 1
    positive. No temp / base_temp factor (Khosla's code has it; it only rescales the loss)."""
    z = F.normalize(f, dim=1)
    sim = z @ z.t() / temp
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp_min(1)
    return per_anchor[n_pos > 0].mean()


def relation_mca(s, cfg):
    """MCA (Yang et al. 2021) as in Table VI: SupCon on M' features of x and x' (2N anchors, so
    every anchor has at least its other view as positive). Looks at M' alone: --tp-input and M are
    unused (its Relation record says needs_std=False)."""
    f = torch.cat([s.nat_out()[0], s.adv_out()[0]])
    return supcon_loss(f, torch.cat([s.y, s.y]), cfg.mca_temp)


def relation_tp(s, cfg):
    """L_TP of the paper (kernels/): relative neighbour-graph preservation."""
    f_std, f_adv = relation_inputs(s, cfg)
    return topology_loss(f_std, f_adv, reduction=cfg.tp_reduction, impl=cfg.tp_impl)


@dataclass
class Relation:
    """A relation-preserving loss usable by --train (--relation): loss(StepState, cfg) -> 0-dim tensor;
    needs_std: it compares with M (False: it looks at M' alone); heads: a class nn.Module(dim_std,
    dim_adv) of trainable heads it needs, or None."""
    loss: object
    needs_std: bool = True
    heads: object = None


RELATION_LOSSES = {"tp": Relation(relation_tp), "rkd": Relation(relation_rkd), "crd": Relation(relation_crd, heads=CRDHeads),
                   "mca": Relation(relation_mca, needs_std=False)}


def plugin_train(s, cfg, epoch):
    """TRAIN: lambda(t) * L_TP(f.detach(), f'), f' from M'(x') (--tp-input adv) or M'(x) (nat);
    --relation swaps L_TP for another relation loss (Table VI). The term is named after it."""
    return {cfg.relation: cfg.lam.at(epoch, cfg.epochs)[1] * RELATION_LOSSES[cfg.relation].loss(s, cfg)}


GRAD_PROBE_STEPS = 4  # the last steps of each epoch on which gradient_probe measures (metrics.jsonl "grad/...")


def gradient_probe(s, robust, cfg, epoch):
    """How hard the relation term pulls on M''s features f' (relation_feature) against the base method's
    loss L_robust: the norms of dL_robust/df' and of dL_TP/df' (unweighted), share = lambda(t) ||dL_TP/df'|| /
    ||dL_robust/df'||, and the cosine of the two gradients. Detached 0-dim tensors (no host sync)."""
    f = relation_feature(s, cfg)
    raw = RELATION_LOSSES[cfg.relation].loss(s, cfg)
    g_rob, g_tp = (torch.autograd.grad(loss, f, retain_graph=True, allow_unused=True)[0] for loss in (robust, raw))
    g_rob, g_tp = ((torch.zeros_like(f) if g is None else g.detach()).flatten() for g in (g_rob, g_tp))
    n_rob, n_tp = g_rob.norm(), g_tp.norm()
    tiny = torch.finfo(f.dtype).tiny
    return {"grad/robust_norm": n_rob, "grad/tp_norm": n_tp,
            "grad/share": cfg.lam.at(epoch, cfg.epochs)[1] * n_tp / n_rob.clamp_min(tiny),
            "grad/cos": (g_rob @ g_tp) / (n_rob * n_tp).clamp_min(tiny)}


# -------------------------------------------------------------------------------------
# AWP (Wu et al. 2020), as in its official AT-AWP / TRADES-AWP code
#    Per step:  diff = awp_diff(model, proxy, proxy_opt, base_loss)   # after crafting x'
#               add_into_weights(model, diff, +gamma)                   # perturb
#               forward, loss, backward, optimizer.step()               # gradient at w + v
#               add_into_weights(model, diff, -gamma)                   # restore
#    Restoring after the step (as the official code does) means the update is computed at the
#    perturbed point w + v and applied, then exactly the same v is removed: w <- w - lr * g(w + v).
#    gamma: 0.01 (AT-AWP), 0.005 (TRADES-AWP); proxy_opt: SGD(proxy.parameters(), lr=0.01).
AWP_EPS = 1e-20


def awp_diff(model, proxy, proxy_opt, loss_fn):
    """One ascent step of the base loss on a copy of `model`; -> {name: v} for each weight with
    dim > 1 (conv / linear), v = (w_proxy - w) * ||w|| / ||w_proxy - w|| layer-wise (so
    ||v|| = ||w|| and gamma is a relative size). `loss_fn(m)` is the base method's loss of model m.
    `model` (weights, grads, BN statistics) is left untouched."""
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    loss = -loss_fn(proxy)
    proxy_opt.zero_grad(set_to_none=True)
    loss.backward()
    proxy_opt.step()
    moved = dict(proxy.named_parameters())
    diff = {}
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() <= 1 or "weight" not in name:  # biases and BN affine stay unperturbed
                continue
            d = moved[name] - w
            diff[name] = w.norm() / (d.norm() + AWP_EPS) * d
    return diff


def add_into_weights(model, diff, coeff):
    """w += coeff * diff[name] for the named weights (coeff = +gamma perturbs, -gamma restores)."""
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name in diff:
                w.add_(diff[name], alpha=coeff)


def awp_gamma(cfg):
    """AWP's perturbation size: the AWP paper's 0.005 for TRADES, 0.01 for AT-style methods."""
    if cfg.awp_gamma is not None:
        return cfg.awp_gamma
    return 0.005 if cfg.method == "trades" else 0.01


class AWP:
    """--awp: the plug-in that perturbs M''s weights around its update. It owns its scratch copy of M'
    (proxy) and the proxy's optimiser (plain SGD lr 0.01, as AWP's code); neither is checkpointed:
    the proxy is reloaded from M' at every step."""

    def __init__(self, proxy, cfg):
        self.proxy, self.gamma, self.warmup = proxy, awp_gamma(cfg), cfg.awp_warmup
        self.opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
        self.diff = None

    def perturb(self, model, method, x, y, x_adv, cfg, epoch):
        """After crafting x': ascend the base loss in weight space and move M' there (from the warm-up on)."""
        if epoch <= self.warmup:
            return
        base_loss = lambda m: sum(method.loss(StepState(m, x, y, x_adv), cfg).values())
        self.diff = awp_diff(model, self.proxy, self.opt, base_loss)
        add_into_weights(model, self.diff, self.gamma)

    def restore(self, model):
        """After the optimiser step: remove exactly the perturbation added (AWP's code does the same)."""
        if self.diff is not None:
            add_into_weights(model, self.diff, -self.gamma)
            self.diff = None


def plugin_lbgat(s, cfg, epoch):
    """LBGAT guidance gamma * MSE(M'(x') logits, M(x) logits); updates both models, as in LBGAT (lbgat.py)."""
    return {"lbgat_mse": cfg.gamma * F.mse_loss(s.adv_out()[1], s.std_out()[1])}


def loss_lbgat_trades(s, cfg):
    """TRADES + LBGAT as LBGAT released it (dvlab-research/LBGAT, lbgat.py): M''s own term is beta KL(M'(x) || M'(x'))
    only, with no CE(M'(x), y); the CE is on M (train_step's ce_std) and plugin_lbgat adds gamma MSE(M'(x'), M(x)).
    Total: CE(M(x), y) + gamma MSE + beta KL (lbgat.py has gamma = 1)."""
    return {"trades_kl": cfg.beta * trades_kl(s.adv_out()[1], s.nat_out()[1])}


def loss_lbgat0(s, cfg):
    """LBGAT0 as released (lbgat.py with beta 0, LBGAT's sh/train_lbgat0_cifar100.sh): no term of M' besides the guidance."""
    return {}


# --lbgat replaces the loss of M' where LBGAT's code does: TRADES -> lbgat.py's loss, AT with --lbgat0 -> LBGAT0
# (lbgat.py with beta 0, so with its KL attack). AT + LBGAT otherwise keeps the paper's Eq. 15 (CE on M'(x')).
LBGAT_METHODS = {"trades": Method(attack_kl, loss_lbgat_trades), "lbgat0": Method(attack_kl, loss_lbgat0)}


def method_of(cfg):
    """The Method M' trains with: its base method, or LBGAT's replacement of it (LBGAT_METHODS)."""
    if cfg.lbgat and cfg.lbgat0:
        return LBGAT_METHODS["lbgat0"]
    if cfg.lbgat and cfg.method == "trades" and official(cfg):
        return LBGAT_METHODS["trades"]
    return BASE_METHODS[cfg.method]


def std_arch_of(cfg):
    """M's architecture: --std-arch, else LBGAT's teacher for --lbgat runs (ResNet-18 with stage strides 1,1,2,2,
    LBGAT's models/resnetcifar.py ResNet18_cifar: resnet18_lbgat) and ResNet-18 otherwise."""
    return cfg.std_arch or ("resnet18_lbgat" if cfg.lbgat else "resnet18")


PLUGINS = {"train": plugin_train, "lbgat": plugin_lbgat}


def active_plugins(cfg):
    return [name for name in PLUGINS if getattr(cfg, name)]


def needs_std_model(cfg):
    """The standard model M exists only when a term uses it (plain AT/TRADES train M' alone)."""
    return cfg.lbgat or (cfg.train and RELATION_LOSSES[cfg.relation].needs_std)


# =====================================================================================
# 5. training
# =====================================================================================
@dataclass
class Models:
    """The networks of one run. adv = M'; std = M (when a term uses it); heads = a relation loss's
    trainable heads; awp = the AWP plug-in (its proxy copy of M' is never saved). std_frozen: M is a
    fixed pre-trained model (TRAIN* of Table X): no optimiser, eval mode, no gradient. ddp: under --ddp,
    {name: DistributedDataParallel} of the trained models, for train_step's loss forwards (distributed.wrap)."""
    adv: nn.Module
    std: nn.Module = None
    heads: nn.Module = None
    awp: AWP = None
    std_frozen: bool = False
    ddp: dict = None

    def saved(self):
        """{name: module} of what a checkpoint holds (names as in checkpoints since the first release)."""
        return {k: m for k, m in (("adv", self.adv), ("std", self.std), ("heads", self.heads)) if m is not None}

    def trained(self):
        """{name: module} of what the optimisers update."""
        return {k: m for k, m in self.saved().items() if not (k == "std" and self.std_frozen)}

    def set_train_mode(self):
        for k, m in self.saved().items():
            m.train(k in self.trained())  # a frozen M stays in eval mode


def build_models(cfg, num_classes, device):
    adv = build_model(cfg.arch, num_classes).to(device)
    std = build_model(std_arch_of(cfg), num_classes).to(device) if needs_std_model(cfg) else None
    heads = None
    relation = RELATION_LOSSES[cfg.relation]
    if cfg.train and relation.heads is not None:
        dim_std = (std or adv).feature_dim
        heads = relation.heads(dim_std, adv.feature_dim).to(device)
    awp = AWP(build_model(cfg.arch, num_classes).to(device), cfg) if cfg.awp else None
    return Models(adv, std, heads, awp, std_frozen=std is not None and cfg.freeze_std)


def lr_at(cfg, epoch):
    """Step schedule: lr x0.1 from each milestone epoch on (1-based, as in TRADES/LBGAT)."""
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def make_optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)


def build_optimizers(models, cfg):
    """One SGD per trained model: {name: optimiser}, names as in Models.trained()."""
    return {k: make_optimizer(m, cfg) for k, m in models.trained().items()}


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_context(cfg, device_type):
    """--amp: a factory of the autocast context of training's forward passes (attack included)."""
    dtype = AMP_DTYPES[cfg.amp]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


def train_step(models, opts, x, y, cfg, epoch, scaler=None, probe=False):
    """One step of Algorithm 1: attack, forward, all loss terms, one backward, every optimiser.
    Returns the detached terms; a non-finite one is the caller's to notice (check_finite), so the
    step never waits for the device. scaler: fp16's GradScaler, else None. probe: also return
    gradient_probe's "grad/..." values (not loss terms) before the update."""
    method = method_of(cfg)
    amp = amp_context(cfg, x.device.type)
    with amp():
        x_adv = method.attack(models.adv, x, y, cfg)
    if models.awp is not None:
        models.awp.perturb(models.adv, method, x, y, x_adv, cfg, epoch)
    net = models.ddp or {}  # --ddp: the loss forwards go through DDP (the attack above uses the bare M')
    s = StepState(net.get("adv", models.adv), x, y, x_adv, net.get("std", models.std),
                  std_trainable=not models.std_frozen, heads=models.heads, amp=amp)
    s.gather = distributed.relation_gather(cfg)
    terms = method.loss(s, cfg)
    measured = gradient_probe(s, sum(terms.values()), cfg, epoch) if probe else {}
    for name in active_plugins(cfg):
        terms.update(PLUGINS[name](s, cfg, epoch))
    if "std" in models.trained():
        terms["ce_std"] = F.cross_entropy(s.std_out()[1], y)  # M learns from natural images only
    total = sum(terms.values())
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    (scaler.scale(total) if scaler else total).backward()
    for o in opts.values():
        scaler.step(o) if scaler else o.step()
    if scaler:
        scaler.update()
    if models.awp is not None:  # as in AWP's code: the step is taken at the perturbed point, then undone
        models.awp.restore(models.adv)
    return {**{k: v.detach() for k, v in terms.items()}, **measured}


def check_finite(sums, epoch):
    """Diverged if a loss term was NaN/inf in any step summed so far (NaN and inf survive summing);
    one read of the device, done every CHECK_EVERY steps and before every checkpoint. Returns the sums
    (--ddp: their mean over the ranks, which every rank checks, so all ranks raise together)."""
    sums = distributed.mean_over_ranks(sums)
    values = torch.stack([v for v in sums.values()])
    if not bool(torch.isfinite(values).all()):
        bad = [k for k, v in sums.items() if not torch.isfinite(v)]
        raise Diverged(f"non-finite loss in epoch {epoch} (terms {bad}); lower --lr or --lam")
    return sums


CHECK_EVERY = 20  # steps between two reads of the loss sums (each read waits for the device)


def accelerate(models, cfg):
    """The fast-path settings that touch the models: channels_last, torch.compile (nn.Module.compile:
    state_dict keys unchanged), cudnn.benchmark."""
    if cfg.cudnn_benchmark and torch.device(cfg.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    for m in models.trained().values():
        if cfg.channels_last:
            m.to(memory_format=torch.channels_last)
        if cfg.compile and m is not models.heads:
            m.compile()
    return models


def monitored_accuracies(named_models, x, y, cfg, seed):
    """{prefix + "nat_acc", prefix + "pgd<k>_acc"} of each (prefix, model) on x; the randomness is forked from
    `seed` so monitoring neither depends on nor disturbs the training stream."""
    attack = pgd_attack(cfg.eps, cfg.eval_step_size, cfg.eval_steps)
    acc = lambda model, atk=None: correct_under(model, x, y, atk)[1].float().mean().item()
    out = {}
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        for prefix, model in named_models:
            out[f"{prefix}nat_acc"] = acc(model)
            out[f"{prefix}pgd{cfg.eval_steps}_acc"] = acc(model, attack)
    return out


def epoch_eval(models, data, cfg, epoch):
    """Per-epoch monitoring of M' (and M) on the first --eval-n test images: reported, never used to pick best.pt
    when a validation split exists."""
    named = [("", models.adv)] + ([("std_", models.std)] if models.std is not None else [])
    return monitored_accuracies(named, to_float(data.x_test[:cfg.eval_n]), data.y_test[:cfg.eval_n], cfg,
                                cfg.seed + 7919 * epoch)


def val_eval(models, data, cfg, epoch):
    """Per-epoch accuracies of M' on the validation split (val_nat_acc, val_pgd<k>_acc); {} without one."""
    if data.x_val is None:
        return {}
    return monitored_accuracies([("val_", models.adv)], to_float(data.x_val), data.y_val, cfg, cfg.seed + 7919 * epoch + 1)


def selection_metric(cfg):
    """The metrics.jsonl column best.pt is picked by: PGD accuracy on the validation split, or with --val-n 0
    (and in every run before validation splits existed) on the monitored test images."""
    return f"{'val_' if cfg.val_n else ''}pgd{cfg.eval_steps}_acc"


def checkpoint_to_evaluate(cfg):
    """best.pt when it was picked on held-out training data; else last.pt (a best.pt picked on test images
    would be model selection on the test set; a standard model's PGD accuracy picks nothing useful)."""
    return "best.pt" if cfg.val_n and cfg.method != "standard" else "last.pt"


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(st):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(path, write):
    """write(tmp) to a temp file next to path, then rename it to path: a killed process leaves the old file or
    the new one, never half of one (remove_stale_temps tidies a leftover name.tmpPID)."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path, models, opts, progress, cfg, scaler=None):
    """Atomic (save_atomic)."""
    state = {"models": {k: m.state_dict() for k, m in models.saved().items()},
             "optimizers": {k: o.state_dict() for k, o in opts.items()},
             "progress": progress, "rng": rng_states(), "config": cfg.to_dict(), "world_size": distributed.world_size()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    save_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise UserError(f"could not read checkpoint {path}: {type(e).__name__}: {e}")


def checkpoint_kind(ck):
    """What a loaded .pt holds: "run" (one of ours: config, models, progress), "state_dict" (bare weights as public
    releases ship them: TRADES, LBGAT, RobustBench; possibly under "state_dict" / "model", 'module.' prefixes
    allowed) or "other"."""
    if isinstance(ck, dict) and all(isinstance(ck.get(k), dict) for k in ("config", "models", "progress")):
        return "run"
    return "state_dict" if bare_state_dict(ck) is not None else "other"


def bare_state_dict(ck):
    """The {name: tensor} weights of a bare checkpoint, else None."""
    inner = ck.get("state_dict", ck.get("model", ck)) if isinstance(ck, dict) else None
    if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
        return inner
    return None


def check_known_checkpoint(ck, path):
    """A run checkpoint or a bare state_dict: anything else is one line. Returns the kind."""
    kind = checkpoint_kind(ck)
    if kind == "other":
        what = f"a dict with keys {sorted(ck)[:6]}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise UserError(f"{path} is not a TRAIN checkpoint (it holds {what}; ours hold config, models, progress) "
                        "nor a bare state_dict")
    return kind


def checkpoint_progress(path):
    """A checkpoint's progress (epoch, step) without reading its weights: memory-mapped, cheap for any size."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["progress"]
    except Exception as e:
        raise UserError(f"could not read checkpoint {path}: {type(e).__name__}: {e}")


def load_std_checkpoint(models, cfg, device):
    """--std-ckpt: M from a finished run (a `--method standard` run's trained model is its "adv" slot) or
    from a bare state_dict (e.g. a public standard model of --std-arch)."""
    if models.std is None:
        raise UserError("--std-ckpt needs a standard model: add --train or --lbgat")
    ck = load_checkpoint(cfg.std_ckpt, device)
    if check_known_checkpoint(ck, cfg.std_ckpt) == "state_dict":
        state = bare_state_dict(ck)
    else:
        state = ck["models"].get("adv" if ck["config"].get("method") == "standard" else "std")
        if state is None:
            raise UserError(f"--std-ckpt {cfg.std_ckpt} holds no standard model")
    fit_weights(models.std, state, f"--std-ckpt {cfg.std_ckpt}", f"--std-arch {std_arch_of(cfg)}")


@contextlib.contextmanager
def diverged_note(run_dir, last):
    """A Diverged run says which checkpoint is the last good one, on record in log.txt (main prints it)."""
    try:
        yield
    except Diverged as e:
        kept = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was written yet"
        if distributed.is_main():
            with open(os.path.join(run_dir, "log.txt"), "a") as fh:
                fh.write(f"diverged: {e}; {kept}\n")
        raise Diverged(f"{e}; {kept}") from None


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped a run after saving last.pt; `code` is the shell's exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopFlag:
    """Ctrl-C or SIGTERM (what cluster schedulers send before killing a job) sets the flag; the loop
    saves a checkpoint at the next step boundary and stops. A second Ctrl-C interrupts at once."""
    requested = False
    signal_number = signal.SIGINT

    def __enter__(self):
        StopFlag.requested = False
        self.old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is not None:  # None: installed outside Python; leave it alone
                self.old[sig] = old
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame):
        if StopFlag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        StopFlag.requested, StopFlag.signal_number = True, signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step"
                   + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""))

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)

    @staticmethod
    def exit_code():
        return 128 + int(StopFlag.signal_number)


def train(cfg, run_dir, data, resume=False, log=print, on_start=None):
    """The epoch loop: train, monitor, checkpoint (last.pt every epoch, best.pt by selection_metric).
    on_start() runs once the models, optimisers and batches are known to work, before the first step
    (run() creates the run folder's files there). Returns the models; raises Interrupted after saving
    last.pt when a signal asked it to stop."""
    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    models = build_models(cfg, data.num_classes, device)
    if cfg.std_ckpt:
        load_std_checkpoint(models, cfg, device)
    opts = build_optimizers(models, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    progress = {"epoch": 0, "step": 0, "sums": {}, "best": -1.0}
    last, best = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    if resume:
        ck = load_checkpoint(last, device)
        for k, m in models.saved().items():
            load_model_state(m, ck["models"][k])
        for k, o in opts.items():
            o.load_state_dict(ck["optimizers"][k])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        progress = ck["progress"]
        set_rng_states(ck["rng"])
        if cfg.train and cfg.tp_scope == "local" and ck.get("world_size", 1) != distributed.world_size():
            raise UserError(f"--tp-scope local builds L_TP per process: resume {last} with the {ck.get('world_size', 1)} "
                            f"processes it was trained with, not {distributed.world_size()}")
        log(f"resumed from {last}: epoch {progress['epoch']} done, {progress['step']} steps into the next")
    n_batches = len(data.x_train) // cfg.batch_size  # drop the last incomplete batch (L_TP needs N >= 2)
    if n_batches == 0:
        raise UserError(f"the training set ({len(data.x_train)} images) is smaller than one batch ({cfg.batch_size})")
    if on_start:
        on_start()
    accelerate(models, cfg)
    distributed.wrap(models, cfg)

    def save(path, progress):  # --ddp: rank 0 alone writes the run folder
        if distributed.is_main():
            save_checkpoint(path, models, opts, progress, cfg, scaler)
    log(f"{cfg.method}{''.join(' +' + p for p in active_plugins(cfg))}: M'={cfg.arch}"
        + (f", M={std_arch_of(cfg)}" if models.std is not None else "") + f", {len(data.x_train)} train / "
        f"{len(data.x_test)} test images, {data.num_classes} classes, eps {cfg.eps:.4f}, device {device}")
    if models.ddp is not None:
        log(distributed.describe(cfg))
    with StopFlag():
        for epoch in tqdm(range(progress["epoch"] + 1, cfg.epochs + 1), desc="epochs", initial=progress["epoch"],
                          total=cfg.epochs, disable=distributed.bar_disable()):
            t0 = time.time() - progress["sums"].get("_seconds", 0.0)
            lr = lr_at(cfg, epoch)
            for o in opts.values():
                for g in o.param_groups:
                    g["lr"] = lr
            models.set_train_mode()
            # the epoch's plan and the loss sums live on the device: no host sync inside the step loop
            perm, offsets, flips = (t.to(device) for t in epoch_plan(len(data.x_train), cfg.seed, epoch))
            sums = {k: torch.tensor(v, dtype=torch.float64, device=device)
                    for k, v in progress["sums"].items() if k != "_seconds"}
            bar = tqdm(range(progress["step"], n_batches), desc=f"epoch {epoch}", leave=False,
                       disable=distributed.bar_disable())
            with diverged_note(run_dir, last):
                for b in bar:
                    idx = distributed.shard(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])  # --ddp: 1/G of it
                    distributed.seed_step(cfg, epoch, b)
                    x = augment(data.x_train[idx], offsets[idx], flips[idx])
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    probe = cfg.train and models.ddp is None and b >= n_batches - GRAD_PROBE_STEPS
                    terms = train_step(models, opts, x, data.y_train[idx], cfg, epoch, scaler, probe)
                    distributed.sync_buffers(models, cfg)
                    for k, v in terms.items():
                        sums[k] = sums[k] + v if k in sums else v.double()
                    if (b + 1) % CHECK_EVERY == 0:
                        check_finite(sums, epoch)
                    if distributed.any_rank(StopFlag.requested) and b + 1 < n_batches:
                        saved = {k: v.item() for k, v in check_finite(sums, epoch).items()}
                        save(last, {**progress, "epoch": epoch - 1, "step": b + 1,
                                    "sums": {**saved, "_seconds": time.time() - t0}})
                        raise Interrupted(f"interrupted: saved {last} (epoch {epoch}, step {b + 1}/{n_batches}); "
                                          "continue with --resume", StopFlag.exit_code())
                sums = check_finite(sums, epoch)
            a, lam = cfg.lam.at(epoch, cfg.epochs)
            row = {"epoch": epoch, "lr": lr, "a": a, "lambda": lam if cfg.train else 0.0}
            row.update({f"loss/{k}": v.item() / n_batches for k, v in sums.items() if not k.startswith("grad/")})
            row["loss/total"] = sum(v for k, v in row.items() if k.startswith("loss/"))
            # the mean over the probed steps (the last GRAD_PROBE_STEPS of the epoch)
            row.update({k: v.item() / min(GRAD_PROBE_STEPS, n_batches) for k, v in sums.items() if k.startswith("grad/")})
            row.update(epoch_eval(models, data, cfg, epoch))
            row.update(val_eval(models, data, cfg, epoch))
            row["seconds"] = time.time() - t0
            metric = row[selection_metric(cfg)]
            is_best = metric > progress["best"]
            progress = {"epoch": epoch, "step": 0, "sums": {}, "best": max(metric, progress["best"])}
            if distributed.is_main():
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            save(last, progress)
            if is_best:  # says what it was picked on (eval.json and --table report it)
                save(best, {**progress, "selected_on": "val" if cfg.val_n else "test"})
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if distributed.any_rank(StopFlag.requested) and epoch < cfg.epochs:
                raise Interrupted(f"interrupted after epoch {epoch}: {last} saved; continue with --resume",
                                  StopFlag.exit_code())
    return models


# =====================================================================================
# 6. evaluation   (M' in eval mode, fp32, inputs in [0,1]; per-example results so attacks can be combined)
# =====================================================================================
class SanityError(Exception):
    """An evaluation invariant broke (adversarial example outside the eps-ball, eps=0 changes accuracy):
    the numbers cannot be trusted, so the evaluation stops."""


EVAL_METRICS = ("nat", "pgd", "cw", "aa", "knn", "tp", "nbr")


@torch.no_grad()
def predict(model, x, batch_size=500):
    """Predictions of a model on float images (already in [0,1])."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features_of(model, x, batch_size=500):
    return torch.cat([model(x[i:i + batch_size], return_features=True)[0].float() for i in range(0, len(x), batch_size)])


PROGRESS_EVERY = 30.0  # seconds between two progress lines when stderr is not a terminal


class Ticker:
    """Progress for a log file: when stderr is not a terminal (a batch job, `> log`), where tqdm's bars are
    off, print(f"{desc}: {message}") at most once every PROGRESS_EVERY seconds; silent on a terminal."""

    def __init__(self, desc):
        self.desc, self.on = desc, not sys.stderr.isatty()
        self.start = self.last = time.time()

    def __call__(self, message):
        now = time.time()
        if self.on and now - self.last >= PROGRESS_EVERY:
            self.last = now
            print(f"{self.desc}: {message} ({now - self.start:.0f} s)", flush=True)


def progress(iterable, desc, total=None):
    """tqdm's bar on a terminal; elsewhere a Ticker line ("i/total done") every PROGRESS_EVERY seconds."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, total=total, leave=False)
        return
    total = len(iterable) if total is None else total
    tick = Ticker(desc)
    for i, item in enumerate(iterable):
        tick(f"{i}/{total} batches done")
        yield item


def attack_all(model, x, y, attack, batch_size=500, desc="attack"):
    """attack(model, xb, yb) -> xb' over the whole set, in batches, with progress (bar or log lines)."""
    out = torch.empty_like(x)
    for i in progress(range(0, len(x), batch_size), desc):
        out[i:i + batch_size] = attack(model, x[i:i + batch_size], y[i:i + batch_size])
    return out


def correct_under(model, x, y, attack=None, batch_size=500, desc="attack"):
    """The one accuracy path of monitoring and evaluation: x' = attack(model, x, y) in batches (x itself
    when attack is None), model in eval mode -> (x', per-example correctness of model(x'))."""
    with eval_mode(model):
        x_used = x if attack is None else attack_all(model, x, y, attack, batch_size, desc)
        return x_used, predict(model, x_used, batch_size) == y


def check_adversarial(x_adv, x, eps, name):
    """Every adversarial example lies within eps (L-inf) of its input and inside [0,1]."""
    dist = (x_adv - x).abs().flatten(1).amax(1)
    if dist.max() > eps + 1e-6:
        raise SanityError(f"{name}: {int((dist > eps + 1e-6).sum())} examples lie outside the eps-ball "
                          f"(max L-inf {dist.max():.6f} > eps {eps:.6f})")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise SanityError(f"{name}: adversarial examples leave [0,1] (range {x_adv.min():.4f}..{x_adv.max():.4f})")


def pgd_attack(eps, step_size, steps, loss="ce", kappa=50.0):
    """The evaluation's PGD-k: CE or CW margin loss, uniform random start (TRADES / CAT protocol)."""
    def attack(model, x, y):
        fn = ce_sum(y) if loss == "ce" else cw_margin(y, kappa)
        return pgd(model, x, fn, eps, step_size, steps, "uniform")
    return attack


class _ListHandler:
    """Collects pyautoattack's log lines (it reports per-attack robust accuracy only through logging), or
    hands each to `sink` (e.g. a Ticker)."""

    def __init__(self, sink=None):
        import logging
        self.lines = []
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = lambda record: (sink or self.lines.append)(record.getMessage())


def run_autoattack(model, x, y, eps, seed, log_path=None, attacks=None, batch_size=500, device="cpu", fast=False):
    """AutoAttack through pyautoattack: version "standard" (APGD-CE, APGD-T, FAB-T, Square), or a
    custom attack list. Returns (per-example robust flags, robust accuracy after each attack, log lines).
    fast=True shrinks iterations and queries (tests only)."""
    import logging
    from pyautoattack import AutoAttack
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom" if attacks else "standard",
                    attacks=attacks, device=device, seed=seed)
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    if n_classes <= aa.apgd_targeted.n_target_classes:  # targeted attacks need n_target_classes < classes
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = n_classes - 1
    if fast:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = 10
        aa.square.n_queries = 100
    logger = logging.getLogger("auto-attack")
    collector = _ListHandler()
    handlers = [collector.handler, _ListHandler(Ticker("AutoAttack")).handler]  # its latest line every ~30 s
    if log_path:
        fh = logging.FileHandler(log_path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(fh)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    for h in handlers:
        logger.addHandler(h)
    try:
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
    check_adversarial(x_adv, x, eps, "AutoAttack")
    robust = predict(model, x_adv) == y
    after = {}
    for line in collector.lines:
        if line.startswith("robust accuracy after "):
            name, rest = line[len("robust accuracy after "):].split(":", 1)
            after[name.strip().lower()] = float(rest.split("%")[0]) / 100
    return robust, after, collector.lines


def knn_predict(support_f, support_y, query_f, ks, num_classes, chunk_q=1024, chunk_s=16384):
    """Cosine-similarity kNN: majority vote of the k nearest support samples, ties broken by summed
    similarity. Chunked over queries and support, so Q x S similarities are never held at once.
    Returns {k: predictions}."""
    kmax = max(ks)
    if kmax > len(support_f):
        raise UserError(f"--knn-k {kmax} is larger than the support set ({len(support_f)} samples)")
    sf, qf = F.normalize(support_f.float(), dim=1), F.normalize(query_f.float(), dim=1)
    preds = {k: [] for k in ks}
    for q0 in range(0, len(qf), chunk_q):
        q = qf[q0:q0 + chunk_q]
        best_v = q.new_empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for s0 in range(0, len(sf), chunk_s):
            v, i = (q @ sf[s0:s0 + chunk_s].t()).topk(min(kmax, len(sf) - s0), dim=1)
            best_v, pos = torch.cat([best_v, v], 1).topk(min(kmax, best_v.shape[1] + v.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + s0], 1).gather(1, pos)
        for k in ks:
            labels = support_y[best_i[:, :k]]
            votes = torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, labels, torch.ones_like(best_v[:, :k]))
            sims = torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, labels, best_v[:, :k])
            # |summed similarity| <= k, so dividing by 2k+1 breaks ties without overturning a vote
            preds[k].append((votes + sims / (2 * k + 1)).argmax(1))
    return {k: torch.cat(v) for k, v in preds.items()}


def topology_scores(model, data, x_test_nat, x_test_adv, attack, ks, support_n=0, batch_size=500):
    """The paper's kNN topology score (Sec. III-B): support = training images, natural + PGD-20
    (labels kept); queries = test natural ("natural") and test PGD-20 ("robust") images."""
    n = support_n or len(data.x_train)
    x_tr, y_tr = to_float(data.x_train[:n]), data.y_train[:n]
    x_tr_adv = attack_all(model, x_tr, y_tr, attack, batch_size, desc="kNN support PGD")
    support = torch.cat([features_of(model, x_tr, batch_size), features_of(model, x_tr_adv, batch_size)])
    support_y = torch.cat([y_tr, y_tr])
    y = data.y_test[:len(x_test_nat)]
    out = {}
    for name, xq in (("natural", x_test_nat), ("robust", x_test_adv)):
        preds = knn_predict(support, support_y, features_of(model, xq, batch_size), ks, data.num_classes)
        out[name] = {str(k): (p == y).float().mean().item() for k, p in preds.items()}
    return out


def cosine_neighbours(f, k, chunk=1024):
    """Indices of each row's k nearest other rows by cosine similarity, nearest first: [n, k]."""
    z = F.normalize(f.float(), dim=1)
    out = []
    for i in range(0, len(z), chunk):
        sim = z[i:i + chunk] @ z.t()
        rows = torch.arange(i, min(i + chunk, len(z)), device=z.device)
        sim[rows - i, rows] = -float("inf")  # a point is not its own neighbour
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def neighbour_agreement(f_ref, f, ks):
    """Topology preservation measured directly: for each sample, the fraction of its k nearest neighbours
    (cosine, among the other samples) in f's space that are also among its k nearest in f_ref's; the mean
    over samples, {str(k): value}. Chance level for unrelated spaces is k / (n - 1)."""
    kmax = max(ks)
    if kmax >= len(f):
        raise UserError(f"--nbr-k {kmax} needs more than {kmax} test images (there are {len(f)})")
    a, b = cosine_neighbours(f_ref, kmax), cosine_neighbours(f, kmax)
    out = {}
    for k in ks:
        shared = (a[:, :k, None] == b[:, None, :k]).any(2).sum(1)
        out[str(k)] = shared.float().mean().item() / k
    return out


@torch.no_grad()
def test_topology_loss(models, x_nat, x_adv, cfg, batch_size=128):
    """Mean over test batches of 128 of L_TP between M (natural) and M' features (x' or x, as trained)."""
    values = []
    for i in range(0, len(x_nat) - 1, batch_size):
        xs = x_nat[i:i + batch_size]
        if len(xs) < 2:
            break
        xa = (x_adv if cfg.tp_input == "adv" else x_nat)[i:i + batch_size]
        f_std = models.std(xs, return_features=True)[0]
        f_adv = models.adv(xa, return_features=True)[0]
        values.append(topology_loss(f_std, f_adv, reduction=cfg.tp_reduction, impl=cfg.tp_impl).item())
    return float(np.mean(values))


def tsne_plot(model, data, x_adv, path, title, seed=1, n=512, max_classes=10, adv_label="PGD-20"):
    """t-SNE of penultimate features (paper's Figs. 2, 5): natural circles, PGD-20 crosses, colour = class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    g = torch.Generator().manual_seed(seed)
    y_all = data.y_test[:len(x_adv)].cpu()
    classes = torch.arange(data.num_classes)
    if data.num_classes > max_classes:  # CIFAR-100: 10 random classes
        classes = classes[torch.randperm(data.num_classes, generator=g)[:max_classes]]
    idx = torch.nonzero(torch.isin(y_all, classes)).squeeze(1)
    idx = idx[torch.randperm(len(idx), generator=g)[:n]]
    dev_idx = idx.to(x_adv.device)
    f_nat = features_of(model, to_float(data.x_test[dev_idx])).cpu()
    f_adv = features_of(model, x_adv[dev_idx]).cpu()
    emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(idx) - 1)).fit_transform(
        torch.cat([f_nat, f_adv]).numpy())
    y = y_all[idx].numpy()
    colours = {int(c): plt.cm.tab10(i % 10) for i, c in enumerate(classes)}
    fig, ax = plt.subplots(figsize=(7, 7))
    m = len(idx)
    ax.scatter(emb[:m, 0], emb[:m, 1], c=[colours[int(c)] for c in y], marker="o", s=12)
    ax.scatter(emb[m:, 0], emb[m:, 1], c=[colours[int(c)] for c in y], marker="x", s=12)
    ax.scatter([], [], c="grey", marker="o", label="natural")
    ax.scatter([], [], c="grey", marker="x", label=adv_label)
    ax.legend(loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def aa_subset_scores(model, x, y, correct, pgd, batch_size):
    """Natural and PGD accuracy on the n images AutoAttack saw, so its column compares like with like;
    PGD runs on them here when the evaluation did not run it on every image."""
    n = len(x)
    pgd_ok = correct["pgd"][:n] if "pgd" in correct else correct_under(model, x, y, pgd, batch_size, desc="PGD on AA's")[1]
    return {"n": n, "natural": correct["natural"][:n].float().mean().item(), "pgd": pgd_ok.float().mean().item()}


STATE_DICT_FLAGS = ("arch", "dataset", "mean", "std")  # what --eval needs to know of a bare state_dict


def eval_run_config(ck, ecfg, path):
    """The settings --eval works with: the run's own (its data may have moved; --test-n subsets), or for a bare
    state_dict those the flags give (state_dict_config)."""
    if check_known_checkpoint(ck, path) == "state_dict":
        return state_dict_config(ecfg)
    given = [f"--{k}" for k in STATE_DICT_FLAGS if getattr(ecfg, k) is not None]
    if given:
        raise UserError(f"--eval uses the settings saved with the checkpoint: {', '.join(given)} cannot apply "
                        "(they describe a bare state_dict)")
    run_cfg = Config.from_saved(ck["config"])
    for k in ("data_file", "data_dir", "test_n"):
        if getattr(ecfg, k) is not None:
            setattr(run_cfg, k, getattr(ecfg, k))
    return run_cfg


def state_dict_config(ecfg):
    """Settings for a bare state_dict: M' = --arch on --dataset / --data-file (--data-dir, --test-n); eps: --eps,
    else the paper's 0.031 (the schedule's default)."""
    if not ecfg.arch:
        raise UserError("--eval of a bare state_dict needs --arch (e.g. wrn34_10) and --dataset or --data-file")
    if (ecfg.mean is None) != (ecfg.std is None) or (ecfg.mean is not None and (
            len(ecfg.mean) != 3 or len(ecfg.std) != 3 or min(ecfg.std) <= 0)):
        raise UserError("--mean and --std go together: three numbers each (per RGB channel), std > 0")
    given = {k: getattr(ecfg, k) for k in ("arch", "dataset", "data_file", "data_dir", "test_n") if getattr(ecfg, k)}
    cfg = make_config({}, {**given, "device": ecfg.device})
    if not cfg.data_file and not cfg.dataset:
        raise UserError("--eval of a bare state_dict needs --dataset or --data-file")
    return cfg


def eval_models(ck, run_cfg, ecfg, num_classes, device, path):
    """The models of a run checkpoint, or M' alone from a bare state_dict (behind Normalized with --mean / --std);
    in eval mode."""
    if checkpoint_kind(ck) == "run":
        models = build_models(run_cfg, num_classes, device)
        for k, m in models.saved().items():
            fit_weights(m, ck["models"].get(k), f"checkpoint {path} ({k})",
                        "its saved arch " + {"adv": run_cfg.arch, "std": std_arch_of(run_cfg)}.get(k, "relation heads"))
            m.eval()
        return models
    model = build_model(run_cfg.arch, num_classes).to(device)
    fit_weights(model, bare_state_dict(ck), path, f"--arch {run_cfg.arch}")
    if ecfg.mean is not None:
        model = Normalized(model, ecfg.mean, ecfg.std).to(device)
    return Models(model.eval())


def checkpoint_facts(ck, path):
    """eval.json's run, epoch and selection: 'best-by-val' / 'best-by-test' (a best.pt picked on the validation split /
    on monitored test images, as every best.pt before validation splits existed), 'last', or 'state_dict'."""
    path = os.path.abspath(path)
    if checkpoint_kind(ck) == "state_dict":
        return {"run": os.path.basename(path), "epoch": None, "selection": "state_dict"}
    on = ck["progress"].get("selected_on") or ("test" if os.path.basename(path) == "best.pt" else None)
    return {"run": os.path.basename(os.path.dirname(path)), "epoch": ck["progress"]["epoch"],
            "selection": f"best-by-{on}" if on else "last"}


def export_state_dict(ckpt_path, out_path):
    """--export CKPT FILE: M' of a run checkpoint as a plain state_dict ({name: tensor}, no 'module.'), the form public
    releases take. A wrn34_10 loads strictly into RobustBench's WideResNet(depth=34, widen_factor=10)
    (robustbench/model_zoo/architectures/wide_resnet.py) and into TRADES' models/wideresnet.py except that class's
    unused sub_block1 (load_state_dict(..., strict=False) there)."""
    ck = load_checkpoint(ckpt_path, "cpu")
    if check_known_checkpoint(ck, ckpt_path) != "run":
        raise UserError(f"--export: {ckpt_path} is a bare state_dict already")
    try:
        save_atomic(out_path, lambda tmp: torch.save(ck["models"]["adv"], tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a missing folder as a RuntimeError
        raise UserError(f"--export: could not write {out_path}: {e}")
    return out_path


def evaluate(ckpt_path, ecfg, out_dir=None, log=print):
    """Every metric of the paper's tables for one checkpoint -> a dict (eval.json's content).

    ecfg: an EvalConfig. out_dir: where the AutoAttack log and the t-SNE picture go (None: no files);
    write_eval() stores the results. Raises UserError, SanityError."""
    device = torch.device(ecfg.device)
    ck = load_checkpoint(ckpt_path, device)
    run_cfg = eval_run_config(ck, ecfg, ckpt_path)
    data = load_data(run_cfg, device)
    models = eval_models(ck, run_cfg, ecfg, data.num_classes, device, ckpt_path)
    if ecfg.eval_model == "std" and models.std is None:
        raise UserError(f"--eval-model std: this checkpoint holds no standard model ({', '.join(models.saved())})")
    model = models.adv if ecfg.eval_model == "adv" else models.std
    metrics = set(ecfg.metrics)
    seed_everything(ecfg.seed)
    eps = run_cfg.eps if ecfg.eps is None else ecfg.eps
    x, y = to_float(data.x_test), data.y_test
    bs = ecfg.eval_batch_size
    res = {"checkpoint": os.path.abspath(ckpt_path), **checkpoint_facts(ck, ckpt_path),
           "model": ecfg.eval_model, "arch": run_cfg.arch if ecfg.eval_model == "adv" else std_arch_of(run_cfg),
           "eps": eps, "eps_255": eps * 255, "n_test": len(x),
           "pgd_steps": ecfg.eval_steps, "pgd_step_size": ecfg.eval_step_size, "cw_kappa": ecfg.cw_kappa,
           "warnings": [], "sanity": {}}
    log(f"evaluating {ckpt_path} ({res['arch']}, epoch {res['epoch']}) on {len(x)} test images, "
        f"eps {eps:.4f} ({eps * 255:.2f}/255)")

    def warn(msg):
        res["warnings"].append(msg)
        log(f"WARNING: {msg}")

    correct = {"natural": correct_under(model, x, y, None, bs)[1]}
    res["natural"] = correct["natural"].float().mean().item()
    if ecfg.eval_model == "adv" and models.std is not None:  # M's natural accuracy, next to M''s
        res["std_natural"] = correct_under(models.std, x, y, None, bs)[1].float().mean().item()
    pgd20 = pgd_attack(eps, ecfg.eval_step_size, ecfg.eval_steps)
    x_pgd = None
    if metrics & {"pgd", "knn", "tp", "nbr"} or ecfg.tsne:
        x_pgd, correct["pgd"] = correct_under(model, x, y, pgd20, bs, desc=f"PGD-{ecfg.eval_steps}")
        check_adversarial(x_pgd, x, eps, f"PGD-{ecfg.eval_steps}")
        res["pgd"] = correct["pgd"].float().mean().item()
    if "cw" in metrics:
        x_cw, correct["cw"] = correct_under(model, x, y, pgd_attack(eps, ecfg.eval_step_size, ecfg.eval_steps, "cw",
                                                                    ecfg.cw_kappa), bs, desc=f"CW-{ecfg.eval_steps}")
        check_adversarial(x_cw, x, eps, f"CW-{ecfg.eval_steps}")
        res["cw"] = correct["cw"].float().mean().item()
        del x_cw
    if "aa" in metrics:
        n = min(ecfg.aa_n, len(x)) or len(x)
        log_path = os.path.join(out_dir, "autoattack.log") if out_dir else None
        robust, after, _ = run_autoattack(model, x[:n], y[:n], eps, ecfg.seed, log_path, ecfg.aa_attacks or None, bs,
                                          str(device))
        correct["aa"] = torch.cat([robust, torch.zeros(len(x) - n, dtype=torch.bool, device=robust.device)])
        res.update(aa=robust.float().mean().item(), aa_n=n, aa_attacks=ecfg.aa_attacks or "standard", aa_after=after)
        res["aa_subset"] = aa_subset_scores(model, x[:n], y[:n], correct, pgd20, bs)
        names = list(after)
        if "square" in after and len(names) > 1 and after["square"] < after[names[names.index("square") - 1]]:
            warn(f"Square (black-box) found errors the white-box attacks missed "
                 f"({after[names[names.index('square') - 1]]:.2%} -> {after['square']:.2%}): possible gradient masking")
    # worst case per example across every attack that ran, on the images all of them saw
    n_all = res.get("aa_n", len(x))
    worst = torch.stack([c[:n_all] for c in correct.values()]).all(0)
    res["worst_case"] = worst.float().mean().item()
    res["worst_case_n"] = n_all
    res["worst_case_of"] = list(correct)
    for name, c in correct.items():
        if name != "natural" and (c[:n_all] & ~worst).any():
            res["sanity"][f"{name}_robust_but_broken_elsewhere"] = int((c[:n_all] & ~worst).sum())
    sanity_checks(model, x, y, ecfg, res, warn)
    if "knn" in metrics:
        res["knn"] = topology_scores(model, data, x, x_pgd, pgd20, ecfg.knn_k, ecfg.knn_train_n, bs)
        res["knn_train_n"] = min(ecfg.knn_train_n or len(data.x_train), len(data.x_train))
    if "tp" in metrics and models.std is not None:
        res["test_ltp"] = test_topology_loss(models, x, x_pgd, run_cfg)
    if "nbr" in metrics and models.std is not None:  # M' on x and on x', against M on x
        f_std = features_of(models.std, x, bs)
        res["nbr"] = {"natural": neighbour_agreement(f_std, features_of(model, x, bs), ecfg.nbr_k),
                      "robust": neighbour_agreement(f_std, features_of(model, x_pgd, bs), ecfg.nbr_k)}
    if ecfg.tsne and out_dir:
        title = (f"{res['arch']} ({ecfg.eval_model}) natural {res['natural']:.2%}, "
                 f"PGD-{ecfg.eval_steps} {res['pgd']:.2%}")
        res["tsne"] = tsne_plot(model, data, x_pgd, os.path.join(out_dir, f"tsne_{ecfg.eval_model}.png"), title,
                                ecfg.seed, adv_label=f"PGD-{ecfg.eval_steps}")
    return res


# eval.json: the flat dict of evaluate() for one "row" (checkpoint file and epoch, model, eps, PGD steps, number of
# test images), merged over evaluations of that row; rows evaluated under other settings are kept in "earlier".
ROW_KEYS = ("model", "epoch", "eps", "pgd_steps", "pgd_step_size", "n_test")
EVAL_FORMAT = 2  # 2: merged rows, results.md regenerated from eval.json
# metric -> the settings beyond the row's that define its value (a change starts a new row)
METRIC_SETTINGS = {"natural": (), "std_natural": (), "pgd": (), "cw": ("cw_kappa",), "aa": ("aa_n", "aa_attacks"),
                   "knn": ("knn_train_n",), "test_ltp": (), "nbr": ()}


def same_row(old, new):
    """Whether new's values can stand next to old's in one row: same checkpoint, row settings, and the
    same settings for every metric both measured."""
    if os.path.basename(old.get("checkpoint", "")) != os.path.basename(new["checkpoint"]):
        return False
    if any(old.get(k) != new.get(k) for k in ROW_KEYS):
        return False
    both = [m for m in METRIC_SETTINGS if m in old and m in new]
    return all(old.get(k) == new.get(k) for m in both for k in METRIC_SETTINGS[m])


def merge_eval(old, new, log=print):
    """eval.json after an evaluation: new's metrics over old's when they share a row (what new did not
    measure stays), else new becomes the row and old moves to "earlier". Nothing is dropped."""
    if not old:
        return dict(new)
    earlier = old.get("earlier", [])
    old = {k: v for k, v in old.items() if k not in ("earlier", "legacy_rows", "format")}
    if not same_row(old, new):
        log(f"eval.json: the results of {row_label(old)} at eps {old.get('eps', 0) * 255:.2f}/255 stay in 'earlier'")
        return {**new, "earlier": earlier + [old]}
    again = [m for m in METRIC_SETTINGS if m in old and m in new and m not in ("knn", "nbr") and old[m] != new[m]]
    if again:
        log("eval.json: measured again with the same settings: "
            + ", ".join(f"{m} {old[m]:.4f} -> {new[m]:.4f}" for m in again))
    warnings = old.get("warnings", [])
    merged = {**old, **new, "warnings": warnings + [w for w in new["warnings"] if w not in warnings],
              "sanity": {**old.get("sanity", {}), **new["sanity"]}}
    for m in ("knn", "nbr"):  # other k: both kept
        if m in old and m in new:
            merged[m] = {q: {**old[m].get(q, {}), **new[m][q]} for q in new[m]}
    if len(old.get("worst_case_of", [])) > len(new["worst_case_of"]):  # the worst case over more attacks stays
        merged.update({k: old[k] for k in ("worst_case", "worst_case_n", "worst_case_of") if k in old})
    return {**merged, **({"earlier": earlier} if earlier else {})}


def read_json(path):
    """A JSON file written by us, or None when absent; an unreadable one is a UserError (never overwritten)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path} ({type(e).__name__}: {e}); move it away to write a new one")


def write_text(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def write_atomic(path, text):
    """A text file, atomically (save_atomic)."""
    save_atomic(path, lambda tmp: write_text(tmp, text))


def write_eval(res, run_dir, log=print):
    """Merge res into run_dir's eval.json (merge_eval) and regenerate results.md from it, one line per row
    of eval.json. A results.md of the older code (appended rows) is kept: its lines become "legacy_rows"."""
    path, md = os.path.join(run_dir, "eval.json"), os.path.join(run_dir, "results.md")
    old = read_json(path)
    legacy = (old or {}).get("legacy_rows")
    if "format" not in (old or {}) and os.path.isfile(md):  # a results.md of the code that appended rows
        with open(md) as fh:
            legacy = [line.rstrip("\n") for line in fh if line.strip()]
    merged = {**merge_eval(old, res, log), "format": EVAL_FORMAT}
    if legacy:
        merged["legacy_rows"] = legacy
    write_atomic(path, json.dumps(merged, indent=2))
    rows = (legacy or []) + [results_row(r) for r in merged.get("earlier", []) + [merged]]
    write_atomic(md, "\n".join(rows) + "\n")
    log(TABLE_HEADER + "\n" + results_row(merged))
    return merged


def sanity_checks(model, x, y, ecfg, res, warn, n=500):
    """eps = 0 must leave accuracy at natural (else: randomness or a bug); a large eps must drive
    PGD accuracy near 0 (else: gradient masking)."""
    x, y = x[:n], y[:n]
    nat = correct_under(model, x, y)[1]
    zero = correct_under(model, x, y, pgd_attack(0.0, ecfg.eval_step_size, ecfg.eval_steps))[1]
    if not torch.equal(zero, nat):
        raise SanityError(f"PGD with eps=0 changed {int((zero != nat).sum())} predictions: the model is not deterministic "
                          "in eval mode, or the attack is broken")
    big = correct_under(model, x, y, pgd_attack(0.5, 0.05, ecfg.eval_steps))[1]
    res["sanity"]["pgd_eps0.5_acc"] = acc = big.float().mean().item()
    res["sanity"]["eps0_equals_natural"] = True
    if acc > 0.1:
        warn(f"PGD at eps 0.5 still leaves {acc:.1%} accuracy (expected near 0): possible gradient masking")


TABLE_HEADER = ("| run | eps | Natural | PGD-20 | CW-20 | AA | kNN natural | kNN robust | checkpoint |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row_label(res):
    """The run cell: run, model, checkpoint file and epoch, and the number of test images of every column."""
    return (res["run"] + ("" if res.get("model", "adv") == "adv" else " (M)")
            + f" ({os.path.basename(res.get('checkpoint', '?'))}, epoch {res.get('epoch')}, n={res.get('n_test')})")


def aa_cell(res, pct):
    """AA accuracy; when it ran on fewer images than the row: its n, and natural / PGD accuracy on those images."""
    if res.get("aa") is None or res["aa_n"] == res["n_test"]:
        return pct(res.get("aa"))
    sub = res.get("aa_subset")
    on_them = f"; natural {pct(sub['natural'])}, PGD-{res['pgd_steps']} {pct(sub['pgd'])} on them" if sub else ""
    return f"{pct(res['aa'])} (n={res['aa_n']}{on_them})"


def results_row(res, k="30"):
    """One markdown row in the paper's column order; kNN at k=30 (or the first k evaluated). Every row says
    how many test images each column used (row_label, aa_cell); the last
    column says which checkpoint (checkpoint_facts' selection; '-' in eval.json files written before it existed)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    knn = res.get("knn") or {}
    kk = k if k in knn.get("natural", {}) else next(iter(knn.get("natural", {})), None)
    steps_note = "" if res.get("pgd_steps", 20) == 20 else f" ({res['pgd_steps']} steps)"
    aa = aa_cell(res, pct)
    cells = [row_label(res), f"{res['eps'] * 255:.2f}/255",
             pct(res.get("natural")), pct(res.get("pgd")) + steps_note * ("pgd" in res),
             pct(res.get("cw")) + steps_note * ("cw" in res), aa,
             pct(knn["natural"][kk]) if kk else "-", pct(knn["robust"][kk]) if kk else "-",
             res.get("selection", "-")]
    return "| " + " | ".join(cells) + " |"


def results_table(paths):
    """One markdown table of many runs: each path a run folder or an eval.json."""
    rows = []
    for p in paths:
        f = os.path.join(p, "eval.json") if os.path.isdir(p) else p
        if not os.path.isfile(f):
            raise UserError(f"--table: {p} has no eval.json (evaluate it first with --eval {p}/best.pt)")
        with open(f) as fh:
            rows.append(results_row(json.load(fh)))
    return TABLE_HEADER + "\n" + "\n".join(rows)


# =====================================================================================
# 7. settings, run I/O and CLI
#    Config (a training run) and EvalConfig (--eval) are dataclasses whose fields carry their CLI help,
#    default and kind: the one source of the parser, run names, resume checks and config.json.
# =====================================================================================
def parse_number(text):
    """'0.031' or '8/255' -> float."""
    try:
        if "/" in str(text):
            num, den = str(text).split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number like 0.031 or 8/255, got {text!r}")


def lam_arg(text):
    try:
        return Lambda.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def count_arg(text):
    """--train-n / --test-n N: N >= 1 images (0, the default, means all: leave the flag out for that)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of images, got {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n} (leave the flag out to use all images)")
    return n


def float_list(text):
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def int_list(text):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def name_list(allowed):
    def parse(text):
        names = [v.strip() for v in str(text).split(",") if v.strip()]
        bad = [v for v in names if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return names
    return parse


RUN, PLACE, CLI = "run", "place", "cli"


def setting(default, help, kind=RUN, in_name=True, **cli):
    """A settings field: its default, its --help text, its kind and its argparse options (type, choices...).
    kind RUN: defines what is trained (in the run name when not default, unless in_name=False; must match
    on --resume and when a study reuses a folder). PLACE: where it runs or reads from (may change on
    --resume). CLI: an action of the command line, never saved."""
    meta = {"help": help, "kind": kind, "in_name": in_name, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    """Every setting of a training run. One field = one flag (--name-with-dashes); exp_*.py scripts
    change the defaults (their DEFAULTS dict), --quick and --schedule fill in presets."""
    dataset: str = setting(None, "cifar10/cifar100 (torchvision, downloaded to --data-dir) or tinyimagenet "
                           "(--data-dir/tiny-imagenet-200); also the data of --eval of a bare state_dict", in_name=False, choices=sorted(TORCHVISION_SETS) + ["tinyimagenet"])
    image_size: int = setting(0, "resize images to this size first (0 = keep; Tiny ImageNet: 32)", type=int)
    data_dir: str = setting("./data", "where torchvision data sets / tiny-imagenet-200 live", PLACE)
    data_file: str = setting("", "an .npz with x_train, y_train, x_test, y_test (uint8 NHWC) instead of torchvision", PLACE)
    train_n: int = setting(0, "use the first N >= 1 training images (not given: all)", type=count_arg)
    val_n: int = setting(1000, "hold the last N training images (after --train-n) out as the validation split that "
                         "picks best.pt (0 = none: best.pt is then picked on monitored test images; evaluate last.pt)",
                         type=int)
    test_n: int = setting(0, "use the first N >= 1 test images (not given: all)", type=count_arg)
    method: str = setting("trades", "base method (standard = natural training)", in_name=False, choices=sorted(BASE_METHODS))
    baselines: str = setting("official", "training attack starts and TRADES + LBGAT's loss: official (as the authors' "
                             "code, README) or release1 (this project's first release; runs saved before this setting "
                             "existed load as release1)", choices=["official", "release1"])
    train: bool = setting(False, "add TRAIN's topology-preserving loss lambda * L_TP")
    lbgat: bool = setting(False, "add LBGAT's logit guidance gamma * MSE(M'(x'), M(x)); with --method trades: "
                          "LBGAT's loss (no CE on M'), see README")
    lbgat0: bool = setting(False, "with --method at --lbgat: LBGAT's released LBGAT0 (lbgat.py with beta 0: TRADES' KL "
                           "attack, no CE on M') instead of the paper's Eq. 15")
    lam: Lambda = setting(Lambda.parse("5"), "lambda: a number (5) or <c>a (20a) = c * a(t), a(t) = 2/(1+exp(-10t/T)) - 1",
                          type=lam_arg)
    relation: str = setting("tp", "relation loss used by --train (tp = L_TP)", choices=sorted(RELATION_LOSSES))
    tp_input: str = setting("adv", "features of M' in L_TP: M'(x') (adv, the paper) or M'(x) (nat)", choices=["adv", "nat"])
    tp_reduction: str = setting("sum", "L_TP reduction (sum = Eq. 14; mean divides by the batch size)",
                                choices=["sum", "mean"])
    tp_impl: str = setting("auto", "L_TP implementation: torch reference, triton kernel, or auto",
                           choices=["auto", "torch", "triton"])
    crd_temp: float = setting(0.1, "temperature of --relation crd", type=float)
    mca_temp: float = setting(0.1, "temperature of --relation mca", type=float)
    std_ckpt: str = setting("", "load M from a finished run's checkpoint (e.g. a --method standard run) or a bare "
                            "state_dict of --std-arch (e.g. a public standard model)")
    freeze_std: bool = setting(False, "keep M fixed (TRAIN* of Table X): no optimiser, eval mode")
    awp: bool = setting(False, "add adversarial weight perturbation (Wu et al. 2020) to M'")
    awp_gamma: float = setting(None, "AWP size (unset: 0.005 for trades, 0.01 otherwise)", type=float)
    awp_warmup: int = setting(0, "AWP starts after this many epochs", type=int)
    beta: float = setting(6.0, "TRADES / MART beta", type=float)
    gamma: float = setting(1.0, "LBGAT guidance weight", type=float)
    alp_weight: float = setting(0.5, "ALP logit-pairing weight", type=float)
    arch: str = setting("wrn34_10", "adversarial model M' (with --eval of a bare state_dict: its architecture)",
                        choices=sorted(MODELS))
    std_arch: str = setting(None, "standard model M (unset: resnet18; with --lbgat LBGAT's teacher resnet18_lbgat)",
                            choices=sorted(MODELS))
    eps: float = setting(None, "L-inf radius, 0.031 or 8/255 (unset: from --schedule: paper 0.031, las 8/255); "
                         "with --eval: unset = the run's own", type=parse_number)
    step_size: float = setting(0.007, "training attack step", type=parse_number)
    steps: int = setting(10, "training attack steps", type=int)
    eval_steps: int = setting(20, "PGD steps of the per-epoch monitoring and of --eval", type=int)
    eval_step_size: float = setting(0.003, "PGD step of the monitoring and of --eval", type=parse_number)
    eval_n: int = setting(1000, "test images monitored each epoch", type=int)
    schedule: str = setting("paper", "paper: 100 epochs, lr x0.1 at 75, 90, wd 2e-4, eps 0.031; las (LAS-AT, Tables "
                            "III/IV): 110 epochs, 100, 105, wd 5e-4, eps 8/255",
                            choices=sorted(["paper", "las"]))
    epochs: int = setting(None, "training epochs (unset: from --schedule)", type=int)
    milestones: list = setting(None, "epochs where lr x0.1, e.g. 75,90 (unset: from --schedule)", type=int_list)
    lr: float = setting(0.1, "SGD learning rate", type=float)
    momentum: float = setting(0.9, "SGD momentum", type=float)
    wd: float = setting(None, "weight decay (unset: from --schedule)", type=float)
    batch_size: int = setting(128, "training batch size", type=int)
    seed: int = setting(1, "seed of python, numpy and torch (runs repeat exactly on one machine)", type=int)
    amp: str = setting("off", "autocast of training's forward passes and attack (losses stay fp32; fp16 adds a "
                       "GradScaler); evaluation is always fp32", choices=sorted(AMP_DTYPES))
    channels_last: bool = setting(False, "channels_last memory format for models and batches", PLACE)
    compile: bool = setting(False, "torch.compile the trained models (nn.Module.compile)", PLACE)
    cudnn_benchmark: bool = setting(False, "torch.backends.cudnn.benchmark on CUDA", PLACE)
    fast: bool = setting(False, "the fast path: --amp bf16 --channels-last --compile --cudnn-benchmark "
                         "(GPU runs; not yet measured on a GPU, see README)", PLACE)
    device: str = setting(default_device(), "training device", PLACE)
    # Multi-GPU (distributed.py). ddp and sync_bn say how the global batch is spread over processes, not
    # what is trained: PLACE, so a run may resume on another number of GPUs. tp_scope local changes L_TP
    # itself (per-process graphs) and is named; global, the default, is the single-process loss.
    ddp: bool = setting(False, "multi-GPU under torchrun: torchrun --nproc_per_node G <script> ... --ddp; --batch-size "
                        "stays the global batch, each process takes 1/G of it (README: Fast path and multi-GPU)", PLACE)
    tp_scope: str = setting("global", "--ddp: L_TP over the global batch (global: features gathered from every process) "
                            "or over each process's shard (local: a coarser graph, ~G times smaller with sum reduction)",
                            choices=["global", "local"])
    sync_bn: bool = setting(False, "--ddp: SyncBatchNorm, batch statistics over the global batch (CUDA only)", PLACE)
    quick: bool = setting(False, "minutes-long CPU smoke run: cnn_small, subsets, few epochs and steps", in_name=False)

    def to_dict(self):
        """JSON-ready: what config.json and checkpoints store."""
        return {f.name: str(v) if isinstance(v, Lambda) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_saved(cls, saved):
        """A run's saved settings over today's defaults: settings added since then take their default, or the
        value that reproduces how the run was trained (FIRST_RELEASE); keys that are no settings any more (old
        runs saved CLI actions too) are ignored."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{**FIRST_RELEASE, **{k: v for k, v in saved.items() if k in known}})
        cfg.lam = Lambda.parse(cfg.lam)
        return cfg

    def run_settings(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["kind"] == RUN}


@dataclass
class EvalConfig:
    """Settings of --eval CKPT. Unset (None) eps / data / test_n: those the run was trained with. arch / dataset /
    mean / std: only for a bare state_dict (a public checkpoint), which carries no settings."""
    eps: float = setting(None, "", type=parse_number)
    eval_steps: int = setting(20, "", type=int)
    eval_step_size: float = setting(0.003, "", type=parse_number)
    eval_model: str = setting("adv", "evaluate M' (adv) or the standard model M (std)", choices=["adv", "std"])
    metrics: list = setting(list(EVAL_METRICS), "subset of " + ",".join(EVAL_METRICS), type=name_list(EVAL_METRICS))
    cw_kappa: float = setting(50.0, "CW margin kappa", type=float)
    aa_n: int = setting(0, "AutoAttack on the first n test images (0 = all)", type=int)
    aa_attacks: list = setting([], "custom AutoAttack list instead of the standard version",
                               type=name_list(("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")))
    knn_k: list = setting([30], "k of the kNN topology score, e.g. 5,10,20,30,40,50", type=int_list)
    knn_train_n: int = setting(0, "kNN support: the first n training images (0 = all), natural + PGD-20", type=int)
    nbr_k: list = setting([10, 30], "k of the neighbour agreement (metric nbr: M' vs M kNN graphs on the test "
                          "images)", type=int_list)
    tsne: bool = setting(False, "also save a t-SNE picture of natural and PGD-20 features")
    eval_batch_size: int = setting(500, "batch size of the evaluation attacks", type=int)
    seed: int = setting(1, "", type=int)
    device: str = setting(default_device(), "", PLACE)
    data_file: str = setting(None, "", PLACE)
    data_dir: str = setting(None, "", PLACE)
    test_n: int = setting(None, "", type=count_arg)
    arch: str = setting(None, "")  # --arch, --dataset: flags of Config; here they describe a bare state_dict
    dataset: str = setting(None, "")
    mean: list = setting(None, "a bare state_dict's input normalisation (x - mean) / std: per-channel mean, e.g. "
                         "0.4914,0.4822,0.4465", type=float_list)
    std: list = setting(None, "... and per-channel std, e.g. 0.2471,0.2435,0.2616", type=float_list)


@dataclass
class Actions:
    """What the command line asks for, beyond the settings; never saved."""
    eval: str = setting("", "evaluate a checkpoint: natural, PGD-20, CW-20, AutoAttack, kNN, test L_TP", CLI, metavar="CKPT")
    table: list = setting(None, "print one markdown table of evaluated runs", CLI, nargs="+", metavar="RUN")
    export: list = setting(None, "write CKPT's M' as a plain state_dict to FILE (TRADES' / RobustBench's WideResNet "
                           "key names for wrn34_10)", CLI, nargs=2, metavar=("CKPT", "FILE"))
    out: str = setting("", "run folder (default: <runs-dir>/<name from the non-default flags>)", CLI)
    runs_dir: str = setting("runs", "where run folders are made", CLI)
    resume: bool = setting(False, "continue the run in its folder from last.pt", CLI)
    overwrite: bool = setting(False, "replace an existing run folder's files", CLI)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


# Settings --quick changes: a minutes-long CPU run that exercises the whole pipeline.
QUICK = {"arch": "cnn_small", "std_arch": "cnn_small", "epochs": 5, "milestones": [4], "train_n": 3072, "val_n": 500,
         "test_n": 1000, "eval_n": 1000, "steps": 3, "eval_steps": 5, "batch_size": 128}
# Settings --fast changes (flags given explicitly still win).
FAST = {"amp": "bf16", "channels_last": True, "compile": True, "cudnn_benchmark": True}
# --schedule fills these where unset; LAS-AT (Tables III/IV) trains and evaluates at eps 8/255
SCHEDULES = {"paper": {"epochs": 100, "milestones": [75, 90], "wd": 2e-4, "eps": 0.031},
             "las": {"epochs": 110, "milestones": [100, 105], "wd": 5e-4, "eps": 8 / 255}}
# Settings added after the first release, with the value that reproduces a run saved before them (its config.json
# lacks the key), so that such a run resumes exactly as it was trained; new runs get the field's default.
FIRST_RELEASE = {"val_n": 0, "baselines": "release1"}
GROUPS = ((Config, "run settings"), (EvalConfig, "evaluation (--eval CKPT; unset: the run's own eps and data)"),
          (Actions, "run folder, tables"))


def shown(v):
    if isinstance(v, bool) or v is None:
        return "off" if v is False else "unset" if v is None else "on"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v) if v != "" else "''"


def build_parser(defaults):
    """Every flag from the dataclasses' fields; a flag not given stays out of the namespace, so
    main() knows exactly what the user said. --help shows each default (the script's, if it sets one)."""
    p = Parser(description="TRAIN: topology-preserving adversarial training (see README.md)")
    seen = set()
    for cls, title in GROUPS:
        group = p.add_argument_group(title)
        for f in fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = defaults.get(f.name, f.default if f.default_factory is MISSING else f.default_factory())
            kw = dict(f.metadata["cli"])
            if f.type is bool or f.type == "bool":
                kw["action"] = "store_true"
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (default: {shown(default)})", **kw)
    return p


def parse_flags(defaults, argv=None):
    """argv -> {setting: value} of the flags given (the only place argv is parsed; exit 2 on bad flags)."""
    return vars(build_parser(defaults).parse_args(argv))


def make_config(defaults, given):
    """Config from: field defaults < the script's DEFAULTS < the --quick / --fast presets < the flags given, then
    --schedule fills epochs / milestones / wd / eps where still unset."""
    names = {f.name for f in fields(Config)}
    values = dict(defaults)
    if given.get("quick", defaults.get("quick")):
        values.update(QUICK)
    if given.get("fast", defaults.get("fast")):
        values.update(FAST)
    values.update({k: v for k, v in given.items() if k in names})
    cfg = Config(**values)
    for k, v in SCHEDULES[cfg.schedule].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.lam = Lambda.parse(cfg.lam)
    return cfg


def validate(cfg):
    """Settings that parse but cannot run: one line, exit 2."""
    check_device_and_unit(cfg, ("eps", "step_size", "eval_step_size"))
    for k in ("epochs", "batch_size", "eval_n"):
        if getattr(cfg, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1")
    validate_fidelity(cfg)
    if cfg.batch_size < 2 and cfg.train:
        raise UserError("--batch-size must be >= 2 with --train (L_TP compares samples)")
    if not cfg.data_file and not cfg.dataset:
        raise UserError("give --dataset or --data-file")
    if cfg.freeze_std and not cfg.std_ckpt:
        raise UserError("--freeze-std needs --std-ckpt (a frozen random M would teach nothing)")
    problem = distributed.setting_problem(cfg)
    if problem:
        raise UserError(problem)
    check_lowest(cfg)


# The lowest value of each numeric setting of Config and EvalConfig (lists: of each entry); where 0 is
# allowed it means "all" or "off", as the flag's help says.
LOWEST = {"image_size": 0, "train_n": 0, "val_n": 0, "test_n": 0, "steps": 1, "eval_steps": 1, "awp_warmup": 0, "seed": 0,
          "milestones": 1, "lr": 0, "momentum": 0, "wd": 0, "beta": 0, "gamma": 0, "alp_weight": 0, "awp_gamma": 0,
          "aa_n": 0, "knn_k": 1, "nbr_k": 1, "knn_train_n": 0, "eval_batch_size": 1, "cw_kappa": 0}


def check_lowest(settings):
    """Numeric settings of a Config / EvalConfig below their LOWEST value (e.g. --steps -1): one line."""
    for f in fields(settings):
        v = getattr(settings, f.name)
        if f.name in LOWEST and v is not None and any(x < LOWEST[f.name] for x in (v if isinstance(v, list) else [v])):
            raise UserError(f"--{f.name.replace('_', '-')} must be >= {LOWEST[f.name]}, got {shown(v)}")
    if settings.seed >= 2 ** 32:  # numpy's limit
        raise UserError(f"--seed must be < 2**32, got {settings.seed}")


def validate_eval(ecfg):
    """EvalConfig settings that parse but cannot run: one line, exit 2."""
    check_lowest(ecfg)
    check_device_and_unit(ecfg, ("eps", "eval_step_size"))


def check_device_and_unit(settings, unit_keys):
    """Of a Config or an EvalConfig: its --device exists here, and each of unit_keys that is set lies in [0, 1]."""
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {settings.device} but CUDA is not available; use --device cpu")
    for k in unit_keys:
        if getattr(settings, k) is not None and not 0 <= getattr(settings, k) <= 1:
            raise UserError(f"--{k.replace('_', '-')} must lie in [0, 1] (inputs are in [0, 1])")


def validate_fidelity(cfg):
    """The settings of issue 11 that parse but cannot run."""
    if cfg.lbgat0 and not cfg.lbgat:
        raise UserError("--lbgat0 needs --lbgat (it is a variant of LBGAT)")
    if cfg.lbgat0 and cfg.method != "at":
        raise UserError("--lbgat0 replaces the loss of --method at (with --method trades it is --beta 0)")
    if cfg.lbgat0 and cfg.awp:
        raise UserError("--awp needs a loss of M' to ascend; --lbgat0 has none besides LBGAT's guidance")


def name_part(name, v):
    if isinstance(v, bool):
        return name.replace("_", "-") if v else f"no-{name.replace('_', '-')}"
    text = ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
    return f"{name.replace('_', '-')}-{text.replace('/', '-')}"


def run_name(cfg, base, prefix=""):
    """[<prefix>_]<method>[_<flag>[-<value>]...]: the run-defining settings in which cfg differs from
    base (sorted by name), then _quick. The one naming scheme of scripts and studies."""
    parts = ([prefix] if prefix else []) + [cfg.method]
    for f in sorted(fields(Config), key=lambda f: f.name):
        v = getattr(cfg, f.name)
        if f.metadata["kind"] == RUN and f.metadata["in_name"] and v != getattr(base, f.name):
            parts.append(name_part(f.name, v))
    if cfg.quick:
        parts.append("quick")
    return "_".join(parts)


def name_base(defaults, cfg):
    """What a run is named against: the script's defaults under the same --quick and --schedule (so
    their presets stay out of the name), with the default schedule (so a changed one is named)."""
    base = make_config(defaults, {"quick": cfg.quick, "schedule": cfg.schedule})
    base.schedule = defaults.get("schedule", Config.schedule)  # the field's default
    return base


RUN_FILES = ("config.json", "metrics.jsonl", "log.txt", "last.pt", "best.pt", "eval.json", "results.md")


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("torchvision", "triton", "pyautoattack"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except OSError:
        return None


def check_run_dir(run_dir, resume, overwrite):
    """Refuse an existing run without resume / overwrite, and a resume without a checkpoint."""
    if resume:
        if not os.path.isfile(os.path.join(run_dir, "last.pt")):
            raise UserError(f"--resume: no checkpoint {os.path.join(run_dir, 'last.pt')} to resume from")
        return
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if existing and not overwrite:
        raise UserError(f"run folder {run_dir} already holds a run ({', '.join(existing)}); "
                        "pass --resume to continue it, --overwrite to replace it, or --out elsewhere")


def init_run_dir(run_dir):
    """Create the folder and clear an old run's files (only reached with --overwrite)."""
    os.makedirs(run_dir, exist_ok=True)
    for f in RUN_FILES:
        if os.path.exists(os.path.join(run_dir, f)):
            os.remove(os.path.join(run_dir, f))


def run_status(run_dir):
    """'missing', 'partial' (resume it) or 'done' (last.pt holds the final epoch: metrics.jsonl may hold a
    row the checkpoint does not, when a process was killed between the two)."""
    last = os.path.join(run_dir, "last.pt")
    if not os.path.isfile(last) or not os.path.isfile(os.path.join(run_dir, "config.json")):
        return "missing"
    return "done" if checkpoint_progress(last)["epoch"] >= load_run_config(run_dir).epochs else "partial"


def load_run_config(run_dir):
    """The Config a run folder was trained with (its config.json)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as fh:
            return Config.from_saved(json.load(fh)["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"could not read the run settings {path}: {type(e).__name__}: {e}")


def resume_config(run_dir, given):
    """On --resume the run's own settings stand; flags given may only say where it runs (PLACE) or
    repeat the run's values: a flag that would change the run is refused."""
    cfg = load_run_config(run_dir)
    for k in distributed.LAUNCH_SETTINGS:  # --ddp, --sync-bn: how this resume is launched, off unless given
        setattr(cfg, k, False)
    kinds = {f.name: f.metadata["kind"] for f in fields(Config)}
    for k, v in given.items():
        if kinds.get(k) == PLACE:
            setattr(cfg, k, v)
        elif kinds.get(k) == RUN and v != getattr(cfg, k) and k != "quick":
            raise UserError(f"--resume: --{k.replace('_', '-')} {shown(v)} would change the run (it was trained with "
                            f"{shown(getattr(cfg, k))}); only where it runs (--device, --data-file, --data-dir) may change")
    return cfg


def make_logger(run_dir):
    path = os.path.join(run_dir, "log.txt")

    def log(msg):
        tqdm.write(msg)
        with open(path, "a") as fh:
            fh.write(msg + "\n")
    return log


# Run folders: one process at a time (run_lock), checked before any work (check_writable), tidied after a
# kill -9 (remove_stale_temps, drop_metrics_after), files written only once training starts (start_run_dir).
@contextlib.contextmanager
def run_lock(run_dir):
    """Hold <run_dir>/.lock (an exclusive fcntl.flock; the file names our PID) while training, resuming,
    overwriting or evaluating there: a second process gets one line naming the holder (UserError). The
    kernel drops the lock when the process ends, even on kill -9, so a stale .lock blocks nothing.
    Folders this call had to create are removed again when nothing else was written into them."""
    made = missing_dirs(run_dir)
    try:
        fd = acquire_lock(run_dir)
    except BaseException:
        remove_empty_dirs(made)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while still held: see acquire_lock's retry
            os.remove(os.path.join(run_dir, ".lock"))
        remove_empty_dirs(made)
        os.close(fd)


def missing_dirs(path):
    """The folders of path that do not exist yet, deepest first."""
    out, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        out.append(p)
        p = os.path.dirname(p)
    return out


def remove_empty_dirs(dirs):
    for d in dirs:  # deepest first; stop at the first one that holds something
        try:
            os.rmdir(d)
        except OSError:
            break


def acquire_lock(run_dir):
    """-> the fd of <run_dir>/.lock, flock'ed. If the holder removed the file between our open and our
    flock (run_lock's release), the lock we got is on a dead file: open it again."""
    path = os.path.join(run_dir, ".lock")
    for _ in range(100):
        try:
            os.makedirs(run_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use {run_dir} as a run folder ({e.strerror or e}); choose another --out / --runs-dir")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"run folder {run_dir} is in use by process {read_pid(path)} (it holds {path}); "
                            "wait until that process ends, or use another folder") from None
        if same_file(fd, path):
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as e:
                os.close(fd)
                raise UserError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
            return fd
        os.close(fd)
    raise UserError(f"could not lock {path}: other processes keep replacing it")


def same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_pid(path):
    try:
        with open(path) as fh:
            return fh.read().strip() or "?"
    except OSError:
        return "?"


PROBE_BYTES = 1 << 16


def check_writable(folder):
    """Write, sync and delete a 64 KiB probe file: a read-only or full folder is refused here, before data
    are loaded or attacks run, not after minutes of work."""
    probe = os.path.join(folder, f".probe{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}); free space there or choose another folder") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def remove_stale_temps(run_dir, log):
    """name.tmpPID files (save_atomic) of a process that died while writing: stale,
    since we hold the folder's lock."""
    for name in sorted(os.listdir(run_dir)):
        base, _, pid = name.rpartition(".tmp")
        if base in RUN_FILES and pid.isdigit():
            os.remove(os.path.join(run_dir, name))
            log(f"removed {name}, left by a process that died while writing it")


def metrics_epoch(line):
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):  # a torn last line of a killed process
        return None


def drop_metrics_after(run_dir, epoch, log):
    """metrics.jsonl rows past the checkpoint's epoch (a process killed between appending a row and saving
    last.pt): the resumed run writes those epochs again, so they would be there twice."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    keep = [line for line in lines if metrics_epoch(line) is not None and metrics_epoch(line) <= epoch]
    if len(keep) < len(lines):
        write_atomic(path, "".join(line if line.endswith("\n") else line + "\n" for line in keep))
        log(f"metrics.jsonl: dropped {len(lines) - len(keep)} rows past epoch {epoch}, the epoch of last.pt")


def already_finished(run_dir, cfg):
    """--resume of a run whose last.pt holds its final epoch: nothing to do (exit 0), said on one line."""
    done = checkpoint_progress(os.path.join(run_dir, "last.pt"))["epoch"]
    if done >= cfg.epochs:
        print(f"{run_dir}: already finished ({done} epochs); nothing to resume")
    return done >= cfg.epochs


def start_run_dir(run_dir, cfg, resume, command, log):
    """The run folder's files, written once training is sure to start: a new run's config.json (after
    --overwrite cleared the old run's files); a resumed run drops what a killed process left behind."""
    if not resume:
        init_run_dir(run_dir)
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump({"config": cfg.to_dict(), "versions": versions(), "git_commit": git_commit(), "command": command,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh, indent=2)
    log(f"run folder: {run_dir}")
    remove_stale_temps(run_dir, log)
    if resume:
        drop_metrics_after(run_dir, checkpoint_progress(os.path.join(run_dir, "last.pt"))["epoch"], log)


def run(cfg, run_dir, resume=False, overwrite=False, command=""):
    """Train one run in run_dir -> run_dir. resume: continue from last.pt there (pass the run's own
    Config, load_run_config); overwrite: replace the run there. The folder is locked throughout
    (run_lock); its files appear only once the settings, the folder, the data, the models and the batch
    size have been checked, so a start that fails leaves nothing. Raises UserError, Diverged, Interrupted."""
    validate(cfg)
    with distributed.process_group(cfg), contextlib.ExitStack() as held:  # --ddp: torchrun's processes

        def claim():  # --ddp: rank 0 alone locks and checks the folder; every rank gets its answer or error
            held.enter_context(run_lock(run_dir))
            check_run_dir(run_dir, resume, overwrite)
            if resume and already_finished(run_dir, cfg):
                return True
            check_writable(run_dir)
            return False
        if distributed.main_decides(claim):
            return run_dir
        data = load_data(cfg, torch.device(cfg.device))  # bad data -> error before anything is written
        data = hold_out_validation(data, cfg.val_n)
        log = make_logger(run_dir) if distributed.is_main() else distributed.quiet
        train(cfg, run_dir, data, resume=resume, log=log,
              on_start=lambda: distributed.is_main() and start_run_dir(run_dir, cfg, resume, command, log))
    return run_dir


def evaluate_run(ckpt, ecfg, out_dir, log=print):
    """--eval: evaluate ckpt and merge the results into out_dir's eval.json / results.md (write_eval),
    holding out_dir's lock; a folder that cannot take them is refused before any attack runs."""
    validate_eval(ecfg)
    if not os.path.isfile(ckpt):
        raise UserError(f"checkpoint {ckpt} not found")
    with run_lock(out_dir):
        check_writable(out_dir)
        remove_stale_temps(out_dir, log)
        return write_eval(evaluate(ckpt, ecfg, out_dir, log), out_dir, log)


def eval_config(given):
    """EvalConfig from the flags given with --eval; a flag that cannot apply to a saved run is refused."""
    names = {f.name for f in fields(EvalConfig)}
    wrong = sorted(k for k in given if k not in names and k != "eval")
    if wrong:
        raise UserError(f"--eval uses the settings saved with the checkpoint: "
                        f"{', '.join('--' + k.replace('_', '-') for k in wrong)} cannot apply")
    return EvalConfig(**{k: v for k, v in given.items() if k in names})


def script_prefix():
    base = os.path.basename(sys.argv[0])
    return base[4:-3] if base.startswith("exp_") and base.endswith(".py") else "run"


def main(defaults, argv=None, prefix=None):
    """Entry point of every experiment script: the only argv parsing and the only sys.exit."""
    prefix = prefix or script_prefix()
    argv = sys.argv[1:] if argv is None else list(argv)
    script = os.path.basename(sys.argv[0]) if prefix == script_prefix() else f"exp_{prefix}.py"
    try:
        given = parse_flags(defaults, argv)
        if given.get("table"):
            print(results_table(given["table"]))
            return None
        if given.get("export"):
            print(f"wrote M' of {given['export'][0]} as a plain state_dict to {export_state_dict(*given['export'])}")
            return given["export"][1]
        if given.get("eval"):
            out_dir = os.path.dirname(os.path.abspath(given["eval"]))
            evaluate_run(given["eval"], eval_config(given), out_dir)
            return out_dir
        cfg = make_config(defaults, given)
        run_dir = given.get("out") or os.path.join(given.get("runs_dir", "runs"), run_name(cfg, name_base(defaults, cfg), prefix))
        if given.get("resume"):
            check_run_dir(run_dir, True, False)
            cfg = resume_config(run_dir, given)
        run(cfg, run_dir, resume=given.get("resume", False), overwrite=given.get("overwrite", False),
            command=" ".join([script] + argv))
        if distributed.is_main():
            print(f"done: results in {run_dir}; evaluate with: python {script} --eval "
                  f"{os.path.join(run_dir, checkpoint_to_evaluate(cfg))}")
        return run_dir
    except UserError as e:  # --ddp: every rank raised it; rank 0 prints (distributed.stderr)
        distributed.stderr(f"error: {e}\n")
        sys.exit(2)
    except (Diverged, SanityError) as e:
        distributed.stderr(f"error: {e}\n")
        sys.exit(1)
    except Interrupted as e:
        distributed.stderr(f"{e}\n")
        sys.exit(e.code)
