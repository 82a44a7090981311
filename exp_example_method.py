"""A new experiment that brings its own base method: vanilla AT with a label-smoothed cross-entropy.

Copy this file to try a method of your own: write its loss (and, if it needs one, its attack), register it
in common.BASE_METHODS, and run it by name. The command line, run names, resume, evaluation and tables
pick it up from the registry, as for the paper's methods:
    python exp_example_method.py --method at_ls --train                 # AT-LS + TRAIN, the paper's settings
    python exp_example_method.py --quick --data-file ../shared/data/cifar10_small.npz
    python exp_example_method.py --eval runs/example_method_at_ls_quick/best.pt
A relation loss registers the same way (common.RELATION_LOSSES["name"] = common.Relation(fn)) and a model
too (common.MODELS["name"] = lambda num_classes: MyNet(num_classes)); see README, "Make a new experiment".
"""
import torch.nn.functional as F

import common

SMOOTHING = 0.1  # label-smoothing weight of the CE on PGD examples


def loss_at_ls(s, cfg):
    """AT with label smoothing: CE(M'(x'), y) against targets (1 - SMOOTHING) one-hot + SMOOTHING / C."""
    return {"ce_adv_ls": F.cross_entropy(s.adv_out()[1], s.y, label_smoothing=SMOOTHING)}


# AT's PGD on the CE as its training attack; AWP's default size as for AT
common.BASE_METHODS["at_ls"] = common.Method(common.attack_ce, loss_at_ls)

DEFAULTS = dict(
    dataset="cifar10",
    method="at_ls",
    lam="5",
    arch="wrn34_10",
)

if __name__ == "__main__":
    common.main(DEFAULTS)
