"""Tiny ImageNet experiments of the paper (Table V): AT, ALP, TRADES, each +- LBGAT / TRAIN.

200 classes; images resized from 64x64 to 32x32 as in the paper (--image-size 64 keeps them native),
random crop with 4-pixel padding + flip, other settings as on CIFAR.  The data come from the standard
folder layout, ./data/tiny-imagenet-200/{train,val} (decoded once and cached as an .npz there), or
from --data-file (e.g. ../shared/data/tinyimagenet_mini.npz, a real 2,000 / 1,000-image sample):
    python exp_tinyimagenet.py --method trades --train
    python exp_tinyimagenet.py --method alp --lbgat --train
    python exp_tinyimagenet.py --quick --data-file ../shared/data/tinyimagenet_mini.npz --method trades --train
The paper gives no lambda for Tiny ImageNet ("others are the same as CIFAR"); we use CIFAR-100's
20a (many classes), an assumption: pass --lam to change it.
"""
import common

DEFAULTS = dict(
    dataset="tinyimagenet",
    image_size=32,
    method="trades",
    lam="20a",
    arch="wrn34_10",
)

if __name__ == "__main__":
    common.main(DEFAULTS)
