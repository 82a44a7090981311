"""Issue 11: the baselines as their authors released them, the LAS eps, and evaluating / exporting plain state_dicts.

The references below re-implement the official code in float64, independently of common.py:
  TRADES  yaodongyu/TRADES trades.py            start x + 0.001 N(0,1), not clamped before the first step
  MART    YisenWang/MART mart.py                the same start, CE (batch mean) as the attack loss
  AT      MadryLab/cifar10_challenge pgd_attack.py   start x + U(-eps, eps), clipped to the pixel range
  LBGAT   dvlab-research/LBGAT lbgat.py         MSE(M'(x'), M(x)) + CE(M(x), y) + beta KL(M'(x') || M'(x)) / B
  WRN     RobustBench robustbench/model_zoo/architectures/wide_resnet.py (TRADES' layer names)
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import DEFAULTS, ROOT, tiny_args


def fresh_seed():
    return int(np.random.SeedSequence().entropy % 2 ** 31)


def cfg_of(**given):
    """The command line's Config for these flags (the settings' own defaults, as exp_cifar10.py has them)."""
    return common.make_config({"dataset": "cifar10"}, {"device": "cpu", **given})


def small_model(seed, num_classes=4):
    torch.manual_seed(seed)
    return common.CNNSmall(num_classes, width=8).double()


def images(seed, n=8, size=12):
    """Random images with saturated borders (0 and 1), as zero padding and real photos have: there the
    clamp of the attack's start matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    x[..., :2] = 0.0
    x[..., -2:] = 1.0
    return x, torch.randint(0, 4, (n,), generator=g)


def log_softmax64(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


# ------------------------------------------------------------------------------ 2. training attack starts
def official_first_step(method, model, x, y, eps, step):
    """One iteration of the official attack loop (model in eval mode), written from the official files."""
    model.eval()
    if method in ("trades", "mart"):
        x_adv = x + 0.001 * torch.randn_like(x)  # trades.py / mart.py: no clamp before the first step
    else:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)  # pgd_attack.py: clipped start
    x_adv.requires_grad_(True)
    z = model(x_adv)
    if method == "trades":
        with torch.no_grad():
            p_nat = torch.exp(log_softmax64(model(x)))
        loss = (p_nat * (torch.log(p_nat) - log_softmax64(z))).sum()  # KLDivLoss(size_average=False)
    elif method == "mart":
        loss = -log_softmax64(z).gather(1, y[:, None]).mean()  # F.cross_entropy, batch mean
    else:
        loss = -log_softmax64(z).gather(1, y[:, None]).sum()  # Madry's xent: summed
    grad, = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step * grad.sign()
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


@pytest.mark.parametrize("method", ["trades", "mart", "at", "alp"])
def test_first_training_attack_step_is_the_official_one(method):
    seed = fresh_seed()
    model, (x, y) = small_model(seed), images(seed + 1)
    cfg = cfg_of(method=method, steps=1)
    torch.manual_seed(seed)
    want = official_first_step(method, model, x, y, cfg.eps, cfg.step_size)
    torch.manual_seed(seed)
    ours = common.BASE_METHODS[method].attack(model, x, y, cfg)
    assert torch.equal(ours, want), f"seed {seed}: {int((ours != want).sum())} of {x.numel()} elements differ"
    if method in ("trades", "mart"):  # the first release's starts differ on these inputs: the check can fail
        cfg.baselines = "release1"
        torch.manual_seed(seed)
        old = common.BASE_METHODS[method].attack(model, x, y, cfg)
        assert (old != want).float().mean() > 0.01, f"seed {seed}"


def test_old_configs_load_with_the_first_release_baselines():
    with open(os.path.join(ROOT, "tests", "fixtures", "legacy_run", "config.json")) as fh:
        old = common.Config.from_saved(json.load(fh)["config"])
    assert old.baselines == "release1"
    new = cfg_of()
    assert new.baselines == "official"
    assert common.Config.from_saved(new.to_dict()) == new  # today's runs load as saved
