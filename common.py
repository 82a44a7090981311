"""TRAIN (Topology-pReserving Adversarial traINing): the research core, in the order of the paper.

Sections (search for the banner "# N. name"):
  1. data        load_npz, load_torchvision, load_tinyimagenet_folder (tinyimagenet.py), epoch_plan, augment
  2. models      CNNSmall, CNN6, ResNet (resnet18, resnet18_lbgat, preact_resnet18), WideResNet (wrn34_10),
                 MobileNetV3; registry MODELS
  3. attacks     pgd (one PGD over a loss of the logits): ce_sum, kl_to_clean, cw_margin; attack_ce, attack_kl
  4. losses      loss_at, loss_trades, loss_alp, loss_mart, loss_standard -> BASE_METHODS (records: Method);
                 plugin_train (L_TP and the other RELATION_LOSSES), plugin_lbgat -> PLUGINS; AWP; gradient_probe
  5. training    train_step (one step of Algorithm 1), train (epochs, checkpoints, resume)
  6. evaluation  evaluate_models (natural, PGD-20, CW-20, AutoAttack, kNN topology score, test L_TP, neighbour
                 agreement), sanity_checks
The harness (settings, the command line, run folders, eval.json, tables) is runs.py, which imports this module
and never the reverse; `main(defaults)` below hands an experiment script over to it. A new method, relation
loss or model is one function plus one registry line, here or in an experiment script (exp_example_method.py).
Multi-GPU (--ddp under torchrun) lives in distributed.py; common.py calls it at a few marked points.
Inputs are in [0, 1] everywhere; no normalisation happens outside the models.
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from kernels import topology_loss
from tinyimagenet import load_tinyimagenet_folder


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
        raise UserError(f"data file {path} is not an .npz archive "
                        f"(np.savez writes one with keys {', '.join(NPZ_KEYS)})")
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
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"could not load {name} from {root} ({type(e).__name__}: {first}); "
                        f"run once with internet access to download it, or pass --data-file X.npz")
    arrays = {"x_train": sets[0].data, "y_train": np.asarray(sets[0].targets),
              "x_test": sets[1].data, "y_test": np.asarray(sets[1].targets)}
    return arrays, list(sets[0].classes)


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
    labels = {k: torch.as_tensor(arrays[k], dtype=torch.long, device=device) for k in ("y_train", "y_test")}
    return Data(to_device_uint8(arrays["x_train"], device), labels["y_train"],
                to_device_uint8(arrays["x_test"], device), labels["y_test"], num_classes, names)


def hold_out_validation(data, val_n):
    """The last val_n training images become the validation split that picks best.pt (model selection on
    held-out training data as in Rice et al.'s early stopping, never on the test set); training uses the rest.
    The shared CIFAR-10 copy keeps the official training order, whose last images are about class-balanced."""
    if not val_n:
        return data
    n = len(data.x_train)
    if val_n >= n:
        raise UserError(f"--val-n {val_n} leaves no training images (the training set has {n}); "
                        "lower it, or 0 for none")
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
    images = torch.arange(b, device=dev)[:, None, None, None]
    out = xp[images, torch.arange(c, device=dev)[None, :, None, None], rows, cols]
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
        self.layer = nn.Sequential(*[WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

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


def input_grad(model, x_adv, loss_fn):
    """d loss_fn(model(x_adv)) / d x_adv, for its sign. fp16 logits (--amp fp16): fp16's narrow range let TRADES'
    KL gradient near x (~1e-6 per logit) underflow to 0 in the backward, and sign-PGD stood still (issue 19), so
    each sample's logit gradient is taken in fp32 and scaled to max |.| = 1 (CE's own scale, which fp16 carries)
    before the fp16 backward. A positive per-sample scale keeps every sign: the attacked model is in eval mode,
    so a sample's input gradient depends on its own logits only. fp32 and bf16 (fp32's range) are untouched."""
    z = model(x_adv)
    if z.dtype != torch.float16:
        return torch.autograd.grad(loss_fn(z), x_adv)[0]
    z32 = z.detach().float().requires_grad_(True)
    g, = torch.autograd.grad(loss_fn(z32), z32)
    g = g / g.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    return torch.autograd.grad(z, x_adv, g.to(z.dtype))[0]


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
            x_adv = x_adv.detach() + step_size * input_grad(model, x_adv, loss_fn).sign()
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
    gather: None, or (--ddp --tp-scope global) distributed.gather_rows, which relation_inputs applies.
    lam: this step's lambda when train_step set it (--lam share:S), else None (cfg.lam's value)."""
    gather = None
    lam = None

    def __init__(self, model_adv, x, y, x_adv, model_std=None, std_trainable=True, heads=None,
                 amp=contextlib.nullcontext):
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

    def relation(self, cfg):
        """The unweighted relation loss of --relation (L_TP by default), computed once per step (per its settings)."""
        key = ("relation", cfg.relation, cfg.tp_input, cfg.tp_reduction, cfg.tp_impl, cfg.crd_temp, cfg.mca_temp)
        if key not in self._cache:
            self._cache[key] = RELATION_LOSSES[cfg.relation].loss(self, cfg)
        return self._cache[key]


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


def loss_lbgat_trades(s, cfg):
    """TRADES + LBGAT as LBGAT released it (dvlab-research/LBGAT, lbgat.py): M''s own term is beta KL(M'(x) || M'(x'))
    only, with no CE(M'(x), y); the CE is on M (train_step's ce_std) and plugin_lbgat adds gamma MSE(M'(x'), M(x)).
    Total: CE(M(x), y) + gamma MSE + beta KL (lbgat.py has gamma = 1)."""
    return {"trades_kl": cfg.beta * trades_kl(s.adv_out()[1], s.nat_out()[1])}


def loss_lbgat0(s, cfg):
    """LBGAT0 as released (lbgat.py with beta 0, LBGAT's sh/train_lbgat0_cifar100.sh): no term of M' besides
    the guidance."""
    return {}


@dataclass
class Method:
    """A base method: its training attack (model, x, y, cfg) -> x', its loss (StepState, cfg) -> terms of M',
    and what varies with it. awp_gamma: --awp's default perturbation size (the AWP paper: 0.005 for TRADES,
    0.01 for AT-style losses). lbgat: the Method that replaces it under --lbgat where LBGAT's code does (None:
    it keeps its own loss and adds LBGAT's guidance); lbgat0: the Method of --lbgat --lbgat0 (None: refused).
    adversarial: it trains against an attack (False: standard training, whose best.pt no PGD accuracy picks)."""
    attack: object
    loss: object
    awp_gamma: float = 0.01
    lbgat: "Method" = None
    lbgat0: "Method" = None
    adversarial: bool = True


# LBGAT's code replaces TRADES' loss (lbgat.py) and, as LBGAT0 (lbgat.py with beta 0, so with its KL attack), AT's;
# AT + LBGAT otherwise keeps the paper's Eq. 15 (CE on M'(x')).
BASE_METHODS = {
    "at": Method(attack_ce, loss_at, lbgat0=Method(attack_kl, loss_lbgat0)),
    "trades": Method(attack_kl, loss_trades, awp_gamma=0.005, lbgat=Method(attack_kl, loss_lbgat_trades)),
    "alp": Method(attack_ce, loss_alp),
    "mart": Method(attack_mart, loss_mart),
    "standard": Method(attack_none, loss_standard, adversarial=False),
}


def ramp_a(t, total):
    """a(t) = 2 / (1 + exp(-10 t / T)) - 1, the paper's lambda warm-up (t 1-based epoch)."""
    return 2.0 / (1.0 + math.exp(-10.0 * t / total)) - 1.0


@dataclass(frozen=True)
class Lambda:
    """lambda(t) of TRAIN, parsed once from --lam: '5' is the constant 5, '20a' is 20 * a(t); 'share:0.15' (and
    'share:0.15a') is no constant but a target: the gradient share S(t) that ShareLambda keeps lambda(t) at.
    `text` keeps what was typed (run names and config.json show it); equality ignores it."""
    c: float
    ramped: bool
    text: str = field(compare=False)
    share: bool = False

    @classmethod
    def parse(cls, text):
        if isinstance(text, Lambda):
            return text
        s = str(text).strip()
        share = s.startswith("share:")
        body = s[len("share:"):] if share else s
        ramped = body.endswith("a")
        try:
            c = float(body[:-1] if ramped else body)
        except ValueError:
            if share:
                raise ValueError(f"--lam share:S needs a gradient share S > 0 like share:0.15 or share:0.15a, "
                                 f"got {text!r}")
            raise ValueError(f"lambda must be a number like 5, a number followed by 'a' like 20a, or share:S like "
                             f"share:0.15, got {text!r}")
        if not math.isfinite(c) or c < 0 or (share and c == 0):
            raise ValueError(f"--lam share:S needs a finite gradient share S > 0, got {text!r}" if share else
                             f"lambda must be a finite non-negative number, got {text!r}")
        return cls(c, ramped, s, share)

    def at(self, epoch, total):
        """(a(t), value(t)) for epoch t (1-based) of `total`: value = lambda(t), or with share: the target S(t)."""
        a = ramp_a(epoch, total) if self.ramped else 1.0
        return a, self.c * a

    def __str__(self):
        return self.text


# Per-step decay of ShareLambda's moving average of r = ||g_TP|| / ||g_robust||. 0 (the default): lambda from this
# step's r alone, so every step's share is exactly S. Smoothing was measured on the contract's tiny runs (tests/
# test_share.py, 2026-12-07): decay 0.5 / 0.8 / 0.9 let the epoch's mean share stray 28% / 44% / >100% from S where r
# jumps (an lr-0.1 loss spike, 16 steps an epoch); averaging the norms instead of r overshoots by their spread.
SHARE_EMA = 0.0
SHARE_LAMBDA_MAX = 1e3  # ShareLambda's ceiling: a vanishing ||dL_TP/df'|| must not send lambda to infinity


class ShareLambda:
    """--lam share:S: lambda(t) = S(t) / EMA(r), r = ||dL_TP/df'|| / ||dL_robust/df'|| on M''s features f', so that
    the gradient share lambda r (gradient_probe's grad/share) is S(t) whatever the batch, the nets or the stage of
    training; the TP gradient at f' is rescaled to S times the robust one, as audiocraft's loss Balancer and
    GradNorm rescale losses by their gradient norms at a shared output. With SHARE_EMA = 0 the average is this
    step's r (exact share on every step); a decay > 0 smooths lambda at the cost of the share straying where r moves
    fast (see SHARE_EMA). Both norms are measured on every step (autograd.grad on f' only: no parameter gradients,
    no second L_TP forward), under --ddp over the global batch (gradient_norms), so every rank uses one lambda.
    Warm-up: the average is bias-corrected (divided by the EMA of ones, as Adam's moments are): step 1 uses its
    own r, step k a weighted mean of the first k. The state travels in last.pt: a resumed run continues exactly."""

    def __init__(self, device):
        self.ema = torch.zeros(2, dtype=torch.float64, device=device)  # EMA of (r, 1)

    def update(self, n_rob, n_tp, target):
        """Fold this step's norms in -> lambda of this step (0-dim float64 tensor, on the device: no host sync)."""
        tiny = torch.finfo(torch.float64).tiny
        r = n_tp.detach().double() / n_rob.detach().double().clamp_min(tiny)
        self.ema.mul_(SHARE_EMA).add_(torch.stack([r, torch.ones_like(r)]), alpha=1 - SHARE_EMA)
        mean_r = self.ema[0] / self.ema[1]
        return (target / mean_r.clamp_min(tiny)).clamp(max=SHARE_LAMBDA_MAX)

    def state_dict(self):
        return {"ema": self.ema.clone()}

    def load_state_dict(self, state):
        self.ema.copy_(state["ema"])


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
    dim_adv) of trainable heads it needs, or None; ddp: it reads its features through relation_inputs,
    which gathers the global batch under --ddp (False: refused with --ddp)."""
    loss: object
    needs_std: bool = True
    heads: object = None
    ddp: bool = True


RELATION_LOSSES = {"tp": Relation(relation_tp), "rkd": Relation(relation_rkd),
                   "crd": Relation(relation_crd, heads=CRDHeads, ddp=False),
                   "mca": Relation(relation_mca, needs_std=False, ddp=False)}


def plugin_train(s, cfg, epoch):
    """TRAIN: lambda(t) * L_TP(f.detach(), f'), f' from M'(x') (--tp-input adv) or M'(x) (nat);
    --relation swaps L_TP for another relation loss (Table VI). The term is named after it.
    lambda(t): --lam's constant or ramp, or (share:S) the step's ShareLambda value that train_step put in s.lam."""
    lam = cfg.lam.at(epoch, cfg.epochs)[1] if s.lam is None else s.lam
    return {cfg.relation: lam * s.relation(cfg)}


GRAD_PROBE_STEPS = 4  # the last steps of each epoch on which gradient_probe measures (metrics.jsonl "grad/...");
# a --lam share:S run measures on every step, and its grad/... are means over the whole epoch


def gradient_norms(s, robust, cfg):
    """(||dL_robust/df'||, ||dL_TP/df'||, their dot product) on M''s features f' (relation_feature), L_TP
    unweighted; under --ddp over the global batch (distributed.norms_over_ranks). Detached 0-dim tensors."""
    f = relation_feature(s, cfg)
    g_rob, g_tp = (torch.autograd.grad(loss, f, retain_graph=True, allow_unused=True)[0]
                   for loss in (robust, s.relation(cfg)))
    g_rob, g_tp = ((torch.zeros_like(f) if g is None else g.detach()).flatten() for g in (g_rob, g_tp))
    return distributed.norms_over_ranks(g_rob.norm(), g_tp.norm(), g_rob @ g_tp)


def probe_values(n_rob, n_tp, dot, lam):
    """metrics.jsonl's grad/...: both norms, share = lambda ||dL_TP/df'|| / ||dL_robust/df'||, and the cosine."""
    tiny = torch.finfo(n_rob.dtype).tiny
    return {"grad/robust_norm": n_rob, "grad/tp_norm": n_tp, "grad/share": lam * n_tp / n_rob.clamp_min(tiny),
            "grad/cos": dot / (n_rob * n_tp).clamp_min(tiny)}


def gradient_probe(s, robust, cfg, epoch):
    """How hard the relation term pulls on M''s features f' against the base method's loss L_robust, at the
    constant (or ramped) lambda(t) of --lam (probe_values). Detached 0-dim tensors (no host sync)."""
    return probe_values(*gradient_norms(s, robust, cfg), cfg.lam.at(epoch, cfg.epochs)[1])


SHARE_WINDOW = ("results/response.md: shares of ~0.03-0.2 helped or were level, 0.7 hurt, 2.5-3 cost 8-10 points "
                "natural; --lam share:S keeps the share at S (README: Choosing lambda)")


def share_warning(cfg, row):
    """The warning of a constant (or ramped) lambda whose epoch-mean gradient share exceeds 1 (L_TP pulls on f'
    harder than the robust loss), else None."""
    share = row.get("grad/share")
    if not cfg.train or cfg.lam.share or share is None or not share > 1:
        return None
    return (f"--lam {cfg.lam}: the topology term pulls harder than the robust loss (gradient share {share:.2f} "
            f"in epoch {row['epoch']}, metrics.jsonl grad/share); {SHARE_WINDOW}")


def share_lambda_step(share, s, robust, cfg, epoch, probe):
    """--lam share:S, every step: measure both norms, fold them into `share` (ShareLambda), set s.lam (in the
    relation loss's dtype) -> the measurements: "lambda/step" (summed for the epoch's mean) and, when probing,
    grad/... at the lambda actually used."""
    n_rob, n_tp, dot = gradient_norms(s, robust, cfg)
    lam = share.update(n_rob, n_tp, cfg.lam.at(epoch, cfg.epochs)[1])
    s.lam = lam.to(s.relation(cfg).dtype)
    return {"lambda/step": lam, **(probe_values(n_rob, n_tp, dot, s.lam) if probe else {})}


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
    """AWP's perturbation size: --awp-gamma, else the base method's (Method.awp_gamma)."""
    return cfg.awp_gamma if cfg.awp_gamma is not None else BASE_METHODS[cfg.method].awp_gamma


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


def method_of(cfg):
    """The Method M' trains with: its base method, or LBGAT's replacement of it (Method.lbgat, .lbgat0;
    --baselines release1 keeps the base loss as this project's first release did)."""
    base = BASE_METHODS[cfg.method]
    if cfg.lbgat and cfg.lbgat0:
        return base.lbgat0
    if cfg.lbgat and base.lbgat is not None and official(cfg):
        return base.lbgat
    return base


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
    {name: DistributedDataParallel} of the trained models, for train_step's loss forwards (distributed.wrap).
    share: --lam share:S's ShareLambda (its state is saved in checkpoints beside the models), else None."""
    adv: nn.Module
    std: nn.Module = None
    heads: nn.Module = None
    awp: AWP = None
    std_frozen: bool = False
    ddp: dict = None
    share: ShareLambda = None

    def saved(self):
        """{name: module} of what a checkpoint holds (the names checkpoints store them under)."""
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
    share = ShareLambda(device) if cfg.train and cfg.lam.share else None
    return Models(adv, std, heads, awp, std_frozen=std is not None and cfg.freeze_std, share=share)


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


def amp_note(cfg, device):
    """The start line's warning, or None: fp16 autocast on a CPU works but lacks fast kernels there. A warning,
    not a refusal: the results are right (a GPU run's fp16 numerics can be checked on a CPU), only slow."""
    if cfg.amp == "fp16" and device.type == "cpu":
        return ("--amp fp16 on a CPU: training is ~15x slower than --amp off (no fast fp16 kernels there; measured "
                "2026-12-02); prefer --amp off or bf16 on a CPU")
    return None


def train_step(models, opts, x, y, cfg, epoch, scaler=None, probe=False):
    """One step of Algorithm 1: attack, forward, all loss terms, one backward, every optimiser.
    Returns the detached terms; a non-finite one is the caller's to notice (check_finite), so the
    step never waits for the device. scaler: fp16's GradScaler, else None. probe: also return
    gradient_probe's "grad/..." values (not loss terms) before the update; with --lam share:S also the
    step's lambda ("lambda/step")."""
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
    if models.share is not None:  # lambda of this step from this step's gradient norms (every step)
        measured = share_lambda_step(models.share, s, sum(terms.values()), cfg, epoch, probe)
    else:
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
    return monitored_accuracies([("val_", models.adv)], to_float(data.x_val), data.y_val, cfg,
                                cfg.seed + 7919 * epoch + 1)


def selection_metric(cfg):
    """The metrics.jsonl column best.pt is picked by: PGD accuracy on the validation split, or with --val-n 0
    on the monitored test images."""
    return f"{'val_' if cfg.val_n else ''}pgd{cfg.eval_steps}_acc"


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
    the new one, never half of one (remove_stale_temps tidies a leftover name.tmpPID). A write that fails (a
    full disk) removes its temp file at once: it would only take more of the space that is missing."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def torch_save_file(obj, path):
    """torch.save through a Python file object: a failed write then stays chained to the OSError that says why
    (ENOSPC: a full disk); torch.save to a path name reports only 'unexpected pos' from its C++ writer."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(path, models, opts, progress, cfg, scaler=None):
    """Atomic (save_atomic)."""
    state = {"models": {k: m.state_dict() for k, m in models.saved().items()},
             "optimizers": {k: o.state_dict() for k, o in opts.items()},
             "progress": progress, "rng": rng_states(), "config": cfg.to_dict(), "world_size": distributed.world_size()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if models.share is not None:
        state["share"] = models.share.state_dict()
    save_atomic(path, lambda tmp: torch_save_file(state, tmp))


def load_checkpoint(path, device):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is no checkpoint of ours
            raise UserError(f"{path} is not a checkpoint (torch.load cannot read it: {type(e).__name__})")
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


def load_std_checkpoint(models, cfg, device):
    """--std-ckpt: M from a finished run (a `--method standard` run's trained model is its "adv" slot) or
    from a bare state_dict (e.g. a public standard model of --std-arch)."""
    if models.std is None:
        raise UserError("--std-ckpt needs a standard model: add --train or --lbgat")
    ck = load_checkpoint(cfg.std_ckpt, device)
    if check_known_checkpoint(ck, cfg.std_ckpt) == "state_dict":
        state = bare_state_dict(ck)
    else:
        trained_by = BASE_METHODS.get(ck["config"].get("method"))  # a standard run's model is its "adv" slot
        state = ck["models"].get("adv" if trained_by is not None and not trained_by.adversarial else "std")
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


@contextlib.contextmanager
def on_stop_signals(handler):
    """Ctrl-C and SIGTERM (what cluster schedulers send before killing a job) go to handler(signum, frame) inside
    the block; the previous handlers come back after it. A handler installed outside Python (getsignal: None)
    is left alone, as Python could not restore it."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class StopFlag:
    """Ctrl-C or SIGTERM sets the flag; the loop saves a checkpoint at the next step boundary and stops.
    A second Ctrl-C interrupts at once."""
    requested = False
    signal_number = signal.SIGINT

    def __enter__(self):
        StopFlag.requested = False
        self.signals = on_stop_signals(self._handler)
        self.signals.__enter__()
        return self

    def _handler(self, signum, _frame):
        if StopFlag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        StopFlag.requested, StopFlag.signal_number = True, signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step"
                   + (" (Ctrl-C again to abort)" if signum == signal.SIGINT else ""))

    def __exit__(self, *exc):
        return self.signals.__exit__(*exc)

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
        for k, m in models.saved().items():  # data of another class count: one line, as --eval says it
            fit_weights(m, ck["models"].get(k), f"--resume: checkpoint {last} ({k})",
                        "its saved arch " + {"adv": cfg.arch, "std": std_arch_of(cfg)}.get(k, "relation heads"))
        for k, o in opts.items():
            o.load_state_dict(ck["optimizers"][k])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if models.share is not None:
            models.share.load_state_dict(ck["share"])
        progress = ck["progress"]
        set_rng_states(ck["rng"])
        if cfg.train and cfg.tp_scope == "local" and ck.get("world_size", 1) != distributed.world_size():
            raise UserError(f"--tp-scope local builds L_TP per process: resume {last} with the "
                            f"{ck.get('world_size', 1)} processes it was trained with, not {distributed.world_size()}")
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
    if note := amp_note(cfg, device):
        log(note)
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
                    probe = cfg.train and (models.share is not None or b >= n_batches - GRAD_PROBE_STEPS)
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
            if "lambda/step" in sums:  # --lam share:S: lambda is the epoch's mean, lam the target share S(t)
                row.update({"lambda": sums["lambda/step"].item() / n_batches, "share_target": lam})
            row.update({f"loss/{k}": v.item() / n_batches for k, v in sums.items() if "/" not in k})
            row["loss/total"] = sum(v for k, v in row.items() if k.startswith("loss/"))
            # the mean over the probed steps: the last GRAD_PROBE_STEPS of the epoch, or every step of a share run
            # (which measures the norms on every step anyway)
            probed = n_batches if models.share is not None else min(GRAD_PROBE_STEPS, n_batches)
            row.update({k: v.item() / probed for k, v in sums.items() if k.startswith("grad/")})
            row.update(epoch_eval(models, data, cfg, epoch))
            row.update(val_eval(models, data, cfg, epoch))
            row["seconds"] = time.time() - t0
            metric = row[selection_metric(cfg)]
            is_best = metric > progress["best"]
            warned = progress.get("warned")  # share_warning's text, said once per run (checkpoints carry it)
            new_warning = None if warned else share_warning(cfg, row)
            # the epoch's row travels in last.pt: a process that dies before appending it to metrics.jsonl
            # loses nothing (runs.sync_metrics puts it there on --resume)
            progress = {"epoch": epoch, "step": 0, "sums": {}, "best": max(metric, progress["best"]), "row": row,
                        "warned": warned or new_warning}
            if is_best:  # says what it was picked on (eval.json and --table report it); before last.pt, whose
                # "best" would otherwise claim a best.pt that a failed write never made
                save(best, {**progress, "selected_on": "val" if cfg.val_n else "test"})
            save(last, progress)
            if distributed.is_main():  # after last.pt: metrics.jsonl is never ahead of the checkpoint
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if new_warning:
                log(f"warning: {new_warning}")
            if distributed.any_rank(StopFlag.requested) and epoch < cfg.epochs:
                raise Interrupted(f"interrupted after epoch {epoch}: {last} saved; continue with --resume",
                                  StopFlag.exit_code())
    if progress.get("warned"):
        log(f"summary: {progress['warned']}")
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
    return torch.cat([model(x[i:i + batch_size], return_features=True)[0].float()
                      for i in range(0, len(x), batch_size)])


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
            votes = torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, labels,
                                                                                  torch.ones_like(best_v[:, :k]))
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
    pgd_ok = (correct["pgd"][:n] if "pgd" in correct
              else correct_under(model, x, y, pgd, batch_size, desc="PGD on AA's")[1])
    return {"n": n, "natural": correct["natural"][:n].float().mean().item(), "pgd": pgd_ok.float().mean().item()}


def sanity_checks(model, x, y, ecfg, res, warn, n=500):
    """eps = 0 must leave accuracy at natural (else: randomness or a bug); a large eps must drive
    PGD accuracy near 0 (else: gradient masking)."""
    x, y = x[:n], y[:n]
    nat = correct_under(model, x, y)[1]
    zero = correct_under(model, x, y, pgd_attack(0.0, ecfg.eval_step_size, ecfg.eval_steps))[1]
    if not torch.equal(zero, nat):
        raise SanityError(f"PGD with eps=0 changed {int((zero != nat).sum())} predictions: "
                          "the model is not deterministic in eval mode, or the attack is broken")
    big = correct_under(model, x, y, pgd_attack(0.5, 0.05, ecfg.eval_steps))[1]
    res["sanity"]["pgd_eps0.5_acc"] = acc = big.float().mean().item()
    res["sanity"]["eps0_equals_natural"] = True
    if acc > 0.1:
        warn(f"PGD at eps 0.5 still leaves {acc:.1%} accuracy (expected near 0): possible gradient masking")


def evaluate_models(models, data, eps, ecfg, run_cfg, res, out_dir=None, log=print):
    """Every metric of the paper's tables for M' (or M with ecfg.eval_model "std") of `models` (eval mode) on
    data's test images at radius eps, added to res (which names the model: "arch", "epoch") and returned.
    ecfg: the evaluation settings (metrics, attacks, k); run_cfg: how the models were trained (test L_TP uses
    its reduction and input). out_dir: where the AutoAttack log and the t-SNE picture go (None: no files).
    Raises SanityError."""
    model = models.adv if ecfg.eval_model == "adv" else models.std
    metrics = set(ecfg.metrics)
    seed_everything(ecfg.seed)
    x, y = to_float(data.x_test), data.y_test
    bs = ecfg.eval_batch_size
    res = {**res, "warnings": [], "sanity": {}}

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
                                          str(x.device))
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


def main(defaults, argv=None, prefix=None):
    """Entry point of every experiment script. The command line, settings and run folders live in runs.py
    (imported here, so that a script needs `import common` alone)."""
    import runs
    return runs.main(defaults, argv, prefix)
