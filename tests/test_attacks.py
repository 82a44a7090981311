"""PGD: eps-ball, [0,1] box, loss increases, input-only gradients; the CW margin loss."""
import types

import pytest
import torch
import torch.nn.functional as F

import common


def tiny_model(num_classes=4):
    torch.manual_seed(0)
    return common.CNNSmall(num_classes, width=8)


@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_pgd_stays_in_ball_and_box(start):
    model = tiny_model().eval()
    x = torch.rand(8, 3, 16, 16)
    x[0] = 0.0
    x[1] = 1.0  # corners of the box
    y = torch.randint(0, 4, (8,))
    eps = 8 / 255
    x_adv = common.pgd(model, x, common.ce_sum(y), eps, 2 / 255, 5, start)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_increases_loss_and_computes_no_weight_gradients():
    model = tiny_model().eval()
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 4, (16,))
    x_adv = common.pgd(model, x, common.ce_sum(y), 0.5, 0.1, 10, "none")
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.01
    assert all(p.grad is None for p in model.parameters())


def test_training_attacks_restore_train_mode():
    model = tiny_model().train()
    cfg = types.SimpleNamespace(eps=0.031, step_size=0.007, steps=2)
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))
    for attack in (common.attack_ce, common.attack_kl):
        x_adv = attack(model, x, y, cfg)
        assert model.training and (x_adv - x).abs().max() <= 0.031 + 1e-6


def test_cw_margin_hand_case():
    z = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    # row 0: z_y - max_other = 3 - 1 = 2 -> -(2 + kappa); row 1: 2 - 5 = -3 -> -(-3 + kappa)
    assert common.cw_margin(y, kappa=1.0)(z).item() == pytest.approx(-(3.0 + 0.0))
    assert common.cw_margin(y, kappa=50.0)(z).item() == pytest.approx(-(52.0 + 47.0))
    assert common.cw_margin(y, kappa=0.0)(z).item() == pytest.approx(-2.0)
