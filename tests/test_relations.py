"""Relation-preserving losses of Table VI (rkd, crd, mca) against float64 NumPy; gradients reach M' only."""
import argparse

import numpy as np
import torch

import common


def cfg(**kw):
    base = dict(tp_input="adv", crd_temp=0.1, mca_temp=0.1)
    base.update(kw)
    return argparse.Namespace(**base)



def step_state(heads=None, seed=0, n=6):
    torch.manual_seed(seed)
    adv, std = common.CNNSmall(4, width=8), common.CNNSmall(4, width=8)
    x = torch.rand(n, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 3][:n])
    s = common.StepState(adv, x, y, (x + 0.03 * torch.randn_like(x)).clamp(0, 1), std, heads=heads)
    return s, adv, std


def assert_grads_to_adv_only(s, adv, std, loss):
    loss.backward()
    assert all(p.grad is None for p in std.parameters())  # M detached
    body = [p for p in adv.body.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body)


def np_cos_dist(f):
    z = f / np.linalg.norm(f, axis=1, keepdims=True)
    return 1 - z @ z.T


def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5)


def test_rkd_value_by_hand():
    rng = np.random.default_rng(1)
    fs, fa = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))
    off = ~np.eye(4, dtype=bool)
    d, da = np_cos_dist(fs)[off], np_cos_dist(fa)[off]
    want = np_smooth_l1(da / da.mean(), d / d.mean()).mean()
    got = common.rkd_loss(torch.tensor(fs), torch.tensor(fa))
    assert got.dtype == torch.float64 and abs(got.item() - want) < 1e-12


def test_rkd_zero_when_identical_and_scale_free():
    torch.manual_seed(0)
    f = torch.randn(8, 16)
    assert common.rkd_loss(f, f).item() < 1e-12
    assert common.rkd_loss(f, 3.0 * f).item() < 1e-12  # cosine distances ignore scale
    assert common.rkd_loss(f, torch.randn(8, 16)).item() > 1e-3


def test_relation_rkd_grads_and_tp_input():
    s, adv, std = step_state()
    loss = common.relation_rkd(s, cfg())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_grads_to_adv_only(s, adv, std, loss)
    s, adv, std = step_state()
    common.relation_rkd(s, cfg(tp_input="nat"))
    assert "nat" in s._cache and "adv" not in s._cache


def np_crd(fs, fa, ws, bs, wa, ba, t):
    za, zs = fa @ wa.T + ba, fs @ ws.T + bs
    za /= np.linalg.norm(za, axis=1, keepdims=True)
    zs /= np.linalg.norm(zs, axis=1, keepdims=True)
    logits = za @ zs.T / t
    m = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
    return (lse - np.diag(logits)).mean()


def test_crd_value_by_hand():
    torch.manual_seed(0)
    heads = common.CRDHeads(3, 5, dim=4).double()
    rng = np.random.default_rng(2)
    fs, fa = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))
    want = np_crd(fs, fa, heads.std.weight.detach().numpy(), heads.std.bias.detach().numpy(),
                  heads.adv.weight.detach().numpy(), heads.adv.bias.detach().numpy(), 0.1)
    got = common.crd_loss(torch.tensor(fs), torch.tensor(fa), heads, 0.1)
    assert abs(got.item() - want) < 1e-12


def test_crd_identical_features_tied_heads():
    """No zero minimum: with f' = f and tied heads each row's positive is its maximum (cos 1), so
    the loss lies in [log(1 + (N-1) e^{-2/T}), log N) and beats any mismatched pairing."""
    torch.manual_seed(0)
    n, t = 8, 0.1
    heads = common.CRDHeads(16, 16)
    heads.adv.load_state_dict(heads.std.state_dict())
    f = torch.randn(n, 16)
    with torch.no_grad():
        same = common.crd_loss(f, f, heads, t).item()
        shuffled = common.crd_loss(f.roll(1, 0), f, heads, t).item()
    assert np.log(1 + (n - 1) * np.exp(-2 / t)) <= same < np.log(n)
    assert same < shuffled


def test_relation_crd_grads_heads_and_adv_only():
    heads = common.CRDHeads(32, 32)
    s, adv, std = step_state(heads=heads)
    loss = common.relation_crd(s, cfg())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_grads_to_adv_only(s, adv, std, loss)
    assert all(p.grad is not None for p in heads.parameters())  # both heads are trained
    assert common.RELATION_LOSSES["crd"].heads is common.CRDHeads and common.RELATION_LOSSES["tp"].heads is None


def np_supcon(f, y, t):
    z = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = z @ z.T / t
    out = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        pos = [p for p in others if y[p] == y[i]]
        if not pos:
            continue
        den = np.log(np.exp(sim[i, others]).sum())
        out.append(-np.mean([sim[i, p] - den for p in pos]))
    return np.mean(out)


def test_supcon_value_by_hand():
    rng = np.random.default_rng(3)
    f, y = rng.normal(size=(7, 4)), np.array([0, 1, 0, 2, 1, 0, 3])  # label 2, 3: no positive
    got = common.supcon_loss(torch.tensor(f), torch.tensor(y), 0.1)
    assert abs(got.item() - np_supcon(f, y, 0.1)) < 1e-12


def test_supcon_minimum():
    """No zero either: each anchor with |P| positives pays >= log |P|; with one positive per anchor
    the loss falls towards 0 as pairs coincide and the rest spread apart."""
    t = 0.1
    f = torch.cat([torch.eye(4), torch.eye(4)]).double()  # views equal, classes orthogonal
    y = torch.arange(4).repeat(2)
    want = np.log(1 + 6 * np.exp(-1 / t))
    assert abs(common.supcon_loss(f, y, t).item() - want) < 1e-12
    y_two = torch.tensor([0, 0, 1, 1]).repeat(2)  # 3 positives per anchor now
    assert common.supcon_loss(f, y_two, t).item() > np.log(3) - 1e-9


def test_relation_mca_uses_both_views_and_no_std():
    s, adv, std = step_state()
    loss = common.relation_mca(s, cfg())
    assert "nat" in s._cache and "adv" in s._cache and "std" not in s._cache
    f = torch.cat([s.nat_out()[0], s.adv_out()[0]])
    assert torch.allclose(loss, common.supcon_loss(f, torch.cat([s.y, s.y]), 0.1))
    assert_grads_to_adv_only(s, adv, std, loss)
    assert not common.RELATION_LOSSES["mca"].needs_std and common.RELATION_LOSSES["tp"].needs_std


# ------------------------------------------------------------------------------ AWP
