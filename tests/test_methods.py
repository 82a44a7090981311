"""Loss terms against their formulas, one step of every method, lambda / lr schedules."""
import argparse
import math

import numpy as np
import pytest
import torch

import common
import runs
from conftest import make_config


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_trades_kl_hand_case():
    z_nat = torch.tensor([[0.0, 0.0]])
    z_adv = torch.tensor([[math.log(3.0), 0.0]])  # p_adv = (3/4, 1/4)
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert common.trades_kl(z_adv, z_nat).item() == pytest.approx(want, rel=1e-6)


def test_mart_matches_formula():
    rng = np.random.default_rng(1)
    z_adv, z_nat = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    y = np.array([0, 1, 2, 3, 1])
    pa, pn = softmax(z_adv), softmax(z_nat)
    ce = -np.log(pa[np.arange(5), y]).mean()
    wrong = np.where(np.eye(4)[y] > 0, -np.inf, pa).max(axis=1)
    bce = ce - np.log(1 - wrong).mean()
    kl = (pn * np.log(pn / pa)).sum(axis=1)
    robust = 6.0 * (kl * (1 - pn[np.arange(5), y])).mean()
    t = common.mart_terms(torch.tensor(z_adv), torch.tensor(z_nat), torch.tensor(y), 6.0)
    assert t["mart_bce"].item() == pytest.approx(bce, rel=1e-3)
    assert t["mart_kl"].item() == pytest.approx(robust, rel=1e-3)


def cfg_for(method, **kw):
    """The CLI's defaults (every field the code reads), with small attacks and the given overrides."""
    return make_config(**{"method": method, "steps": 2, "tp_impl": "torch", **kw})


def test_alp_terms_hand_case():
    class Fixed(torch.nn.Module):  # logits = mean colour per channel, features = the same
        def forward(self, x, return_features=False):
            f = x.mean(dim=(2, 3))
            return (f, f) if return_features else f
    x = torch.zeros(2, 3, 4, 4)
    y = torch.tensor([0, 1])
    # bypass the attack: ALP's loss given x' (logits 0 on x, 0.5 on x'); 3 logits per sample, so
    # CE = log 3 on both, and the squared logit gap is 0.25 everywhere
    s = common.StepState(Fixed(), x, y, torch.full_like(x, 0.5))
    want = {"ce_nat": 0.5 * math.log(3), "ce_adv": 0.5 * math.log(3), "alp_pair": 0.7 * 0.25}
    terms = common.BASE_METHODS["alp"].loss(s, cfg_for("alp", alp_weight=0.7))
    assert set(terms) == set(want)
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("text,want", [("5", (5.0, False)), ("20a", (20.0, True)), ("0", (0.0, False)),
                                       ("2.5a", (2.5, True))])
def test_parse_lam(text, want):
    lam = common.Lambda.parse(text)
    assert (lam.c, lam.ramped) == want and str(lam) == text


@pytest.mark.parametrize("bad", ["abc", "a", "-1", "5b", "nan", ""])
def test_parse_lam_rejects(bad):
    with pytest.raises(ValueError):
        common.Lambda.parse(bad)


def test_lambda_schedule():
    cfg = cfg_for("trades", lam="20a", epochs=100)
    for t in (1, 10, 50, 100):
        a = 2 / (1 + math.exp(-10 * t / 100)) - 1
        assert cfg.lam.at(t, cfg.epochs) == pytest.approx((a, 20 * a))
    assert cfg_for("at", lam="5").lam.at(3, 100) == (1.0, 5.0)
    assert cfg.lam.at(100, 100)[0] == pytest.approx(0.99991, abs=1e-5)


def test_lr_schedule():
    cfg = argparse.Namespace(lr=0.1, milestones=[75, 90])
    assert [round(common.lr_at(cfg, e), 6) for e in (1, 74, 75, 89, 90, 100)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}


def changed(model, snap):
    return any(not torch.equal(v, snap[k]) for k, v in model.state_dict().items() if k in snap and "running" not in k)


@pytest.mark.parametrize("method", sorted(common.BASE_METHODS))
@pytest.mark.parametrize("train,lbgat", [(False, False), (True, False), (False, True), (True, True)])
def test_one_step_every_method(method, train, lbgat):
    torch.manual_seed(0)
    cfg = cfg_for(method, train=train, lbgat=lbgat, lr=0.05, momentum=0.9, wd=2e-4)
    cfg.std_arch = cfg.arch = "cnn_small"
    models = common.build_models(cfg, 4, torch.device("cpu"))
    assert (models.std is not None) == (train or lbgat)
    opts = common.build_optimizers(models, cfg)
    snaps = {k: snapshot(m) for k, m in models.saved().items()}
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    terms = common.train_step(models, opts, x, y, cfg, epoch=1)
    assert (("tp" in terms) == train and ("lbgat_mse" in terms) == lbgat
            and ("ce_std" in terms) == (models.std is not None))
    assert all(torch.isfinite(v) for v in terms.values())
    for k, m in models.saved().items():
        assert changed(m, snaps[k]), f"{k} model did not change"


def grads_after(term_fn, models):
    for m in models.values():
        m.zero_grad(set_to_none=True)
    term_fn().backward()
    return {k: [p.grad for p in m.parameters()] for k, m in models.items()}


def test_tp_updates_adversarial_model_only_and_lbgat_both():
    torch.manual_seed(0)
    cfg = cfg_for("at", train=True, lbgat=True)
    models = {k: common.CNNSmall(4, width=8) for k in ("adv", "std")}
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))

    def state():
        return common.StepState(models["adv"], x, y, x + 0.01, models["std"])
    g = grads_after(lambda: common.plugin_train(state(), cfg, 1)["tp"], models)
    assert all(gr is None for gr in g["std"]) and any(gr is not None and gr.abs().sum() > 0 for gr in g["adv"])
    g = grads_after(lambda: common.plugin_lbgat(state(), cfg, 1)["lbgat_mse"], models)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in g["std"])


def test_tp_input_nat_uses_natural_features():
    torch.manual_seed(0)
    models = {k: common.CNNSmall(4, width=8) for k in ("adv", "std")}
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    s = common.StepState(models["adv"], x, y, (x + 0.2).clamp(0, 1), models["std"])
    adv = common.plugin_train(s, cfg_for("at", tp_input="adv"), 1)["tp"]
    nat = common.plugin_train(s, cfg_for("at", tp_input="nat"), 1)["tp"]
    want = 5 * common.topology_loss(s.std_out()[0].detach(), s.nat_out()[0])
    assert nat.item() == pytest.approx(want.item()) and adv.item() != pytest.approx(nat.item())


@pytest.mark.parametrize("relation", sorted(common.RELATION_LOSSES))
@pytest.mark.parametrize("awp", [False, True])
def test_one_step_relations_and_awp(relation, awp):
    torch.manual_seed(0)
    cfg = cfg_for("trades", train=True, relation=relation, awp=awp, awp_warmup=0, lr=0.05)
    cfg.std_arch = cfg.arch = "cnn_small"
    models = common.build_models(cfg, 4, torch.device("cpu"))
    assert (models.std is not None) == (relation != "mca") and (models.heads is not None) == (relation == "crd")
    assert (models.awp is not None) == awp
    opts = common.build_optimizers(models, cfg)
    assert set(opts) == set(models.saved())  # one optimiser per saved model; AWP's proxy has its own
    snaps = {k: snapshot(m) for k, m in models.saved().items()}
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    terms = common.train_step(models, opts, x, y, cfg, epoch=1)
    assert relation in terms and all(torch.isfinite(v) for v in terms.values())
    for k, m in models.saved().items():
        assert changed(m, snaps[k]), k


def test_awp_step_equals_step_at_perturbed_weights_then_restored(monkeypatch):
    """With AWP the update is computed at w + gamma v and v is removed afterwards (AWP's code)."""
    torch.manual_seed(0)
    cfg = cfg_for("at", awp=True, awp_warmup=0, awp_gamma=0.01, lr=0.1, momentum=0.0, wd=0.0, steps=0, eps=0.0)
    cfg.arch = "cnn_small"
    models = common.build_models(cfg, 4, torch.device("cpu"))
    models.adv.eval()  # no BN statistics drift, so the two paths can be compared exactly-ish
    opts = common.build_optimizers(models, cfg)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    w0 = {k: v.clone() for k, v in models.adv.state_dict().items()}
    captured = {}
    real = common.awp_diff

    def spy(*a, **kw):
        captured["diff"] = real(*a, **kw)
        return captured["diff"]
    monkeypatch.setattr(common, "awp_diff", spy)
    common.train_step(models, opts, x, y, cfg, epoch=1)
    # by hand: gradient of CE at w + gamma v, SGD step, then minus gamma v == plain step from w
    ref = common.build_model("cnn_small", 4).eval()
    ref.load_state_dict(w0)
    common.add_into_weights(ref, captured["diff"], 0.01)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p -= 0.1 * p.grad
    common.add_into_weights(ref, captured["diff"], -0.01)
    for n, p in models.adv.named_parameters():
        assert torch.allclose(p, dict(ref.named_parameters())[n], atol=1e-6), n


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_keeps_losses_in_fp32(amp, monkeypatch):
    """--amp: forwards under autocast, but every loss term (L_TP included) sees fp32 features."""
    torch.manual_seed(0)
    cfg = cfg_for("trades", train=True, amp=amp, lr=0.05)
    cfg.std_arch = cfg.arch = "cnn_small"
    models = common.build_models(cfg, 4, torch.device("cpu"))
    seen = []
    real = common.topology_loss
    monkeypatch.setattr(common, "topology_loss", lambda f, g, **kw: seen.append((f.dtype, g.dtype)) or real(f, g, **kw))
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    terms = common.train_step(models, common.build_optimizers(models, cfg), torch.rand(8, 3, 16, 16),
                              torch.randint(0, 4, (8,)), cfg, epoch=1, scaler=scaler)
    assert seen == [(torch.float32, torch.float32)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_fast_preset_and_explicit_flags_win():
    cfg = runs.make_config(dict(dataset="cifar10"), {"fast": True, "compile": False})
    assert (cfg.amp, cfg.channels_last, cfg.cudnn_benchmark, cfg.compile) == ("bf16", True, True, False)
    assert runs.make_config(dict(dataset="cifar10"), {}).amp == "off"


def test_attacks_freeze_weights_and_restore_them():
    model = common.CNNSmall(4, width=8)
    frozen_inside = []
    with common.eval_mode(model):
        frozen_inside = [p.requires_grad for p in model.parameters()]
        assert not model.training
    assert not any(frozen_inside) and all(p.requires_grad for p in model.parameters()) and model.training
