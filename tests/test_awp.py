"""AWP: layer-wise perturbation, exact restore, the perturbation increases the loss."""

import torch
import torch.nn.functional as F

import common


def awp_setup(dtype):
    torch.manual_seed(0)
    model = common.CNNSmall(4, width=8).to(dtype).train()
    proxy = common.CNNSmall(4, width=8).to(dtype)
    opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
    x, y = torch.rand(8, 3, 8, 8, dtype=dtype), torch.randint(0, 4, (8,))
    return model, proxy, opt, lambda m: F.cross_entropy(m(x), y)


def test_awp_diff_leaves_model_alone_and_is_layerwise_sized():
    model, proxy, opt, loss_fn = awp_setup(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diff = common.awp_diff(model, proxy, opt, loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    weights = {n for n, p in model.named_parameters() if p.dim() > 1}
    assert set(diff) == weights and len(weights) == 4  # 3 convs + fc; no bias / BN
    params = dict(model.named_parameters())
    for n, d in diff.items():
        assert torch.allclose(d.norm(), params[n].norm())


def test_awp_restore_is_exact_up_to_rounding():
    """(w + g v) - g v == w exactly in real arithmetic; in floats each of the two adds rounds, so
    |error| <= ~2 ulp of the larger magnitude: ~1e-16 relative in float64, ~1e-7 in float32."""
    for dtype, eps in ((torch.float64, 2.0 ** -52), (torch.float32, 2.0 ** -23)):
        model, proxy, opt, loss_fn = awp_setup(dtype)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        diff = common.awp_diff(model, proxy, opt, loss_fn)
        common.add_into_weights(model, diff, 0.01)
        moved = {k: v.clone() for k, v in model.state_dict().items()}
        common.add_into_weights(model, diff, -0.01)
        for k, v in model.state_dict().items():
            if k in diff:
                assert not torch.equal(moved[k], before[k])
                scale = torch.maximum(before[k].abs(), moved[k].abs())
                assert ((v - before[k]).abs() <= 2 * eps * scale).all()
            else:
                assert torch.equal(v, before[k])  # biases, BN: never touched


def test_awp_perturbation_increases_the_loss():
    model, proxy, opt, loss_fn = awp_setup(torch.float64)
    with torch.no_grad():
        base = loss_fn(model).item()
    diff = common.awp_diff(model, proxy, opt, loss_fn)
    for gamma in (0.005, 0.01):
        common.add_into_weights(model, diff, gamma)
        with torch.no_grad():
            assert loss_fn(model).item() > base
        common.add_into_weights(model, diff, -gamma)


# ------------------------------------------------------------------------------ Tiny ImageNet
