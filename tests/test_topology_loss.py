"""The PyTorch reference of L_TP against an independent float64 NumPy computation."""
import math
import zlib

import numpy as np
import pytest
import torch

from kernels import topology_loss
from kernels.reference import topology_loss_reference


def numpy_graph(x):
    """p_{i|j} by the definition, one column at a time (loops on purpose: independent of the reference)."""
    n = len(x)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    d = 1.0 - x @ x.T
    p = np.zeros((n, n))
    for j in range(n):
        others = [k for k in range(n) if k != j]
        rho = min(d[j, k] for k in others)
        w = {i: 2.0 - d[i, j] + rho for i in others}
        total = sum(w.values())
        for i in others:
            p[i, j] = w[i] / total
    return p


def numpy_loss(f_std, f_adv, reduction="sum"):
    p, q = numpy_graph(f_std), numpy_graph(f_adv)
    n, loss = len(p), 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a, b = p[i, j], q[i, j]
            loss += (a * math.log(a) if a > 0 else 0.0) - a * math.log(max(b, 1e-12))
            loss += ((1 - a) * math.log(1 - a) if a < 1 else 0.0) - (1 - a) * math.log(max(1 - b, 1e-12))
    return loss / n if reduction == "mean" else loss


def features(n, d, kind, gen):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x.relu() if kind == "relu" else x


@pytest.mark.parametrize("n,d", [(2, 3), (3, 1), (5, 8), (17, 64), (40, 640)])
@pytest.mark.parametrize("kind", ["randn", "relu"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_numpy_float64(n, d, kind, reduction):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{n},{d},{kind}".encode()))
    fs, fa = features(n, d, kind, gen), features(n, d, kind, gen)
    got = topology_loss_reference(fs, fa, reduction).item()
    want = numpy_loss(fs.numpy(), fa.numpy(), reduction)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_columns_are_distributions():
    from kernels.reference import neighbour_graph
    p, eye = neighbour_graph(torch.randn(9, 5, dtype=torch.float64))
    assert torch.allclose(p.sum(0), torch.ones(9, dtype=torch.float64))
    assert (p[eye] == 0).all() and (p[~eye] > 0).all()


def test_identical_features_give_zero_loss():
    f = torch.randn(12, 6, dtype=torch.float64)
    assert topology_loss_reference(f, f.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert topology_loss_reference(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-10)  # scale invariant


@pytest.mark.parametrize("kind", ["randn", "relu"])
def test_gradcheck_float64(kind):
    gen = torch.Generator().manual_seed(3)
    fs = features(7, 5, kind, gen)
    fa = features(7, 5, kind, gen).add_(0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: topology_loss_reference(fs, a), (fa,))
    assert torch.autograd.gradcheck(lambda a: topology_loss_reference(fs, a, "mean"), (fa,))


def test_no_gradient_to_f_std():
    fs = torch.randn(6, 4, requires_grad=True)
    fa = torch.randn(6, 4, requires_grad=True)
    topology_loss_reference(fs, fa).backward()
    assert fs.grad is None and fa.grad is not None and fa.grad.abs().sum() > 0


def test_edge_cases_finite_and_match_numpy():
    gen = torch.Generator().manual_seed(5)
    fs = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    fa = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    fa_dup = fa.clone()
    fa_dup[1] = fa_dup[0]
    fa_zero = fa.clone()
    fa_zero[2] = 0
    for a in (fa_dup, fa_zero):
        for b in (fs, a):
            x = a.clone().requires_grad_(True)
            loss = topology_loss_reference(b, x)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            assert loss.item() == pytest.approx(numpy_loss(b.numpy(), a.numpy()), rel=1e-9, abs=1e-12)
    # N = 2: each column has one neighbour with probability 1, so the loss is 0 and finite in fp32
    two = torch.randn(2, 3, requires_grad=True)
    loss = topology_loss_reference(torch.randn(2, 3), two)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(two.grad).all()


def test_float32_q_near_one_stays_finite():
    # duplicate + antipodal rows make some q exactly 1 in fp32 (needs the 1-q clamp)
    fa = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    fs = torch.tensor([[1.0, 0.2], [0.3, 1.0], [-1.0, 0.5]])
    loss = topology_loss_reference(fs, fa)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fa.grad).all()


def test_errors_and_dispatch():
    with pytest.raises(ValueError, match="at least 2"):
        topology_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="reduction"):
        topology_loss(torch.randn(3, 4), torch.randn(3, 4), reduction="max")
    with pytest.raises(ValueError, match="same number of rows"):
        topology_loss(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="impl"):
        topology_loss(torch.randn(3, 4), torch.randn(3, 4), impl="cuda")
    fs, fa = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(topology_loss(fs, fa, impl="auto"), topology_loss_reference(fs, fa))  # CPU -> reference


def test_gradient_descent_on_f_adv_matches_the_graphs():
    """Minimising L_TP over f_adv alone drives Q towards P (the loss falls by an order of magnitude)."""
    gen = torch.Generator().manual_seed(11)
    fs = torch.randn(16, 8, generator=gen)
    fa = torch.randn(16, 8, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([fa], lr=0.05)
    start = topology_loss_reference(fs, fa).item()
    for _ in range(300):
        opt.zero_grad()
        topology_loss_reference(fs, fa).backward()
        opt.step()
    assert topology_loss_reference(fs, fa).item() < 0.1 * start
