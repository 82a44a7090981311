"""--amp fp16: the training attacks must be as strong as in fp32 (issue 19, item 6). fp16 has a narrow exponent
range: TRADES' KL gradient near x (~1e-6 per logit) underflowed to 0 inside the network's backward, and sign-PGD
took no step there."""
import types

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import run_main, tiny_args

ATTACKS = {"attack_ce": common.attack_ce, "attack_kl": common.attack_kl, "attack_mart": common.attack_mart}


def attack_under(amp, attack, model, x, y, zero_fracs):
    """x' of attack under --amp amp (same start: same seed); zero_fracs gets each step's share of exactly-zero
    input-gradient entries."""
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kw):
        grads = real(outputs, inputs, *args, **kw)
        if isinstance(inputs, torch.Tensor) and inputs.shape == x.shape:  # the input gradient, not the logits'
            zero_fracs.append((grads[0] == 0).float().mean().item())
        return grads
    cfg = types.SimpleNamespace(eps=0.031, step_size=0.007, steps=5, baselines="official")
    torch.manual_seed(1)
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=common.AMP_DTYPES[amp], enabled=amp != "off"):
        mp.setattr(torch.autograd, "grad", spy)
        return attack(model, x, y, cfg)


def attack_losses(model, x, y, x_adv):
    """fp32 CE and KL(M'(x) || M'(x')) of the finished attack, batch means."""
    with torch.no_grad():
        z, z_nat = model(x_adv), model(x)
    kl = F.kl_div(F.log_softmax(z, 1), F.softmax(z_nat, 1), reduction="batchmean")
    return F.cross_entropy(z, y).item(), kl.item()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_fp16_attack_is_as_strong_as_fp32(name):
    """A fresh model (small logit gradients: the first steps of a run): the fp16 attack's input gradients are
    not zero and its final loss matches fp32's."""
    torch.manual_seed(0)
    model = common.CNNSmall(4, width=8).eval()
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 4, (16,))
    got = {}
    for amp in ("off", "fp16"):
        zeros = []
        x_adv = attack_under(amp, ATTACKS[name], model, x, y, zeros)
        got[amp] = (max(zeros), *attack_losses(model, x, y, x_adv))
    (_, ce32, kl32), (zero16, ce16, kl16) = got["off"], got["fp16"]
    assert zero16 < 0.01, got
    assert kl16 == pytest.approx(kl32, rel=0.2) and ce16 == pytest.approx(ce32, rel=1e-3), got


def test_fp16_on_a_cpu_says_once_that_it_is_slow(tiny_npz, tmp_path, capsys):
    """--amp fp16 works on a CPU but is ~15x slower there: one line at the start says so; bf16 says nothing."""
    for amp in ("fp16", "bf16"):
        run_main(tiny_args(tiny_npz, tmp_path / amp, "--amp", amp, "--epochs", "1", "--train-n", "32"))
        with open(tmp_path / amp / "log.txt") as fh:
            slow = [line for line in fh if "slower" in line]
        assert len(slow) == (amp == "fp16"), slow
        assert capsys.readouterr().out.count("--amp fp16 on a CPU") == (amp == "fp16")
