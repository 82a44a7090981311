"""CIFAR-100 experiments of the paper (Tables II and IV): TRAIN on AT / TRADES / LBGAT.

As exp_cifar10.py, but lambda = 20a: 20 * a(t) with a(t) = 2 / (1 + exp(-10 t / T)) - 1.
    python exp_cifar100.py --method trades --train --lam 20a
torchvision downloads CIFAR-100 to --data-dir (default ./data) on first use.
"""
import common

DEFAULTS = dict(
    dataset="cifar100",
    method="trades",
    lam="20a",
    arch="wrn34_10",
)

if __name__ == "__main__":
    common.main(DEFAULTS)
