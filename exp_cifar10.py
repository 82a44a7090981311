"""CIFAR-10 experiments of the paper (Tables I and III): TRAIN on AT / TRADES / LBGAT.

Settings of the paper: M' = WRN-34-10, M = ResNet-18, PGD-10 (eps 0.031, step 0.007),
SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128, 100 epochs (lr x0.1 at 75 and 90), seed 1,
lambda = 5.  Examples:
    python exp_cifar10.py --method trades --train
    python exp_cifar10.py --method trades --lbgat --train --schedule las
    python exp_cifar10.py --quick --data-file ../shared/data/cifar10_small.npz
Copy this file and edit DEFAULTS to make a new experiment.
"""
import common

DEFAULTS = dict(
    dataset="cifar10",
    method="trades",
    lam="5",
    arch="wrn34_10",
)

if __name__ == "__main__":
    common.main(DEFAULTS)
