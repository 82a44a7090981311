"""Fused Triton kernel (kernels/fused.py) against the PyTorch reference.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1); on CUDA compiled.
The reference is evaluated in float64 on the same (exactly upcast) inputs: it is the same
function, and its float32 evaluation is itself only good to ~1e-4 relative at N = 257
(cancellation in the summand), while the kernel is good to ~1e-6 (1e-5 on the ~1e-4
losses at N = 3, the conditioning of the function itself, see VALUE_ATOL).

Every kernel call runs under `poisoned_buffers()`: all buffers the kernels write (statistics,
per-column losses, gradient scratch, the gradient) start as NaN, so an element a kernel
forgets to write makes the comparison fail.

Ties: with D = 1 every cosine is exactly +-1, so rho_j has exact ties.  They do not change
the value; the gradient is exactly 0 wherever ||x|| > 1e-8 (x / ||x|| is locally constant),
and for zero rows (relu features) the tie-break does matter: both implementations take the
first row index (torch.min's documented choice), which the comparison checks.  Random
continuous features have no ties otherwise.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from kernels import topology_loss as dispatch  # noqa: E402
from kernels.reference import topology_loss_reference  # noqa: E402
import kernels.fused as tk  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")

VALUE_RTOL = 1e-5
# absolute floor of the summed loss: at N = 3 the loss can be ~1e-4, and one fp32 ulp in
# the cosines (inherent to fp32 features) moves it by ~4e-9, i.e. 1e-5 relative
VALUE_ATOL = 1e-8
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# absolute floor on ||g - g_ref|| per sqrt(element), where the true gradient is ~0 (N = 2, D = 1)
GRAD_ATOL = 1e-12
# fp16 gradients of L_TP are mostly subnormal at N >= 257 (elements ~1e-6): the half-precision
# tests scale the loss like AMP's GradScaler, which also tests the incoming gradient
HALF_GRAD_SCALE = 2.0 ** 16


def features(n, d, kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    f_std, f_adv = torch.randn(2, n, d, generator=g)
    if kind == "relu":  # non-negative post-ReLU-like features, some rows all zero at small D
        f_std, f_adv = f_std.relu(), f_adv.relu()
    return f_std.to(DEVICE, dtype), f_adv.to(DEVICE, dtype)


def reference(f_std, f_adv, reduction, grad_out=1.0):
    x = f_adv.detach().double().requires_grad_()
    loss = topology_loss_reference(f_std.double(), x, reduction)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss.detach(), x.grad


def kernel(f_std, f_adv, reduction, grad_out=1.0):
    x = f_adv.detach().clone().requires_grad_()
    with tk.poisoned_buffers():
        loss = tk.topology_loss_triton(f_std, x, reduction)
        loss.backward(torch.tensor(grad_out, device=loss.device))
    return loss.detach(), x.grad


def check(f_std, f_adv, reduction="sum", grad_out=1.0):
    loss, grad = kernel(f_std, f_adv, reduction, grad_out)
    ref_loss, ref_grad = reference(f_std, f_adv, reduction, grad_out)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == f_adv.dtype and grad.shape == f_adv.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss_err = abs(loss.double() - ref_loss).item()
    value_atol = VALUE_ATOL / (f_adv.shape[0] if reduction == "mean" else 1)
    assert loss_err <= VALUE_RTOL * abs(ref_loss).item() + value_atol, (loss.item(), ref_loss.item())
    grad_err = (grad.double() - ref_grad).norm().item()
    ref_norm = ref_grad.norm().item()
    tol = GRAD_RTOL[f_adv.dtype] * ref_norm + GRAD_ATOL * grad.numel() ** 0.5
    assert grad_err <= tol, (grad_err, ref_norm)


# The full N x D grid, each with randn and relu features and both reductions, except that the
# heavy corner (N >= 128 with D >= 512, several seconds each in the interpreter) runs two of the
# four (kind, reduction) pairs, covering both kinds and both reductions.
GRID = [(n, d, kind, red) for n in (2, 3, 17, 64, 128, 130, 257) for d in (1, 7, 64, 512, 640)
        for kind, red in (("randn", "sum"), ("relu", "mean"), ("randn", "mean"), ("relu", "sum"))
        if n < 128 or d < 512 or (kind, red) in (("randn", "sum"), ("relu", "mean"))]


@pytest.mark.parametrize("n,d,kind,reduction", GRID)
def test_matches_reference(n, d, kind, reduction):
    check(*features(n, d, kind, seed=1000 * n + d), reduction)


def test_degenerate_rows():
    f_std, f_adv = features(37, 64, "randn", seed=1)
    f_adv[3] = 0.0                       # zero row: cosines exactly 0, its rho ties everywhere
    f_adv[5] *= 1e-10                    # below the norm floor 1e-8: no gradient through the norm
    f_adv[8] = f_adv[7]                  # duplicate pair: rho ~ 0
    f_adv[10] = -f_adv[9]                # antipodal pair: d ~ 2
    f_adv[12] = f_adv[13] = f_adv[11]    # triple: exact ties in rho
    f_std[4] = 0.0
    f_std[16] = f_std[15]
    check(f_std, f_adv)


@pytest.mark.parametrize("scale", ("1e-6", "1e4", "mixed"))
def test_feature_scales(scale):
    f_std, f_adv = features(70, 48, "randn", seed=2)
    if scale == "mixed":  # per-row scales from 1e-6 to 1e4
        s = torch.logspace(-6, 4, 70, dtype=torch.float32, device=DEVICE)[:, None]
    else:
        s = float(scale)
    check(f_std * s, f_adv * s)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_inputs(dtype):
    check(*features(70, 33, "randn", seed=3, dtype=dtype), grad_out=HALF_GRAD_SCALE)


def test_poisoning_covers_every_buffer():
    """The NaN poisoning is real, and every statistic the kernels write is finite."""
    with tk.poisoned_buffers():
        assert torch.isnan(tk._buffer((3,), torch.float32, DEVICE)).all()
        f_std, f_adv = features(130, 7, "randn", seed=4)
        col_loss, saved = tk._forward(f_std, f_adv, need_grad=True)
        assert torch.isfinite(col_loss).all()
        for t in saved:
            assert torch.isfinite(t).all()
        arg = saved[7]
        assert arg.dtype == torch.int32 and ((arg >= 0) & (arg < 130)).all()
        dx = tk._backward(saved, torch.ones((), device=DEVICE), 1.0, torch.float32)
        assert torch.isfinite(dx).all()
    assert not tk._poison


def test_forward_only_and_f_std_gradient():
    f_std, f_adv = features(40, 16, "randn", seed=5)
    with torch.no_grad():
        loss = tk.topology_loss_triton(f_std, f_adv)
    ref_loss, _ = reference(f_std, f_adv, "sum")
    assert abs(loss.item() - ref_loss.item()) <= VALUE_RTOL * ref_loss.item()
    f_std = f_std.clone().requires_grad_()
    f_adv = f_adv.clone().requires_grad_()
    tk.topology_loss_triton(f_std, f_adv).backward()
    assert f_std.grad is None and f_adv.grad is not None


def test_dispatch_and_errors():
    f_std, f_adv = features(20, 8, "randn", seed=6)
    assert torch.equal(dispatch(f_std, f_adv, impl="triton"), tk.topology_loss_triton(f_std, f_adv))
    with pytest.raises(ValueError):
        tk.topology_loss_triton(f_std, f_adv, reduction="max")
    with pytest.raises(ValueError):
        tk.topology_loss_triton(f_std[:1], f_adv[:1])
    with pytest.raises(TypeError):
        tk.topology_loss_triton(f_std.double(), f_adv.double())


def test_non_contiguous_different_widths_incoming_gradient():
    f_std, _ = features(50, 24, "randn", seed=7)
    _, f_adv = features(50, 80, "randn", seed=8)
    check(f_std.t().contiguous().t(), f_adv[:, ::2], "mean", grad_out=-0.5)


@cuda_only
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("n,d", ((257, 640), (1000, 2048)))
def test_half_inputs_cuda(dtype, n, d):
    check(*features(n, d, "randn", seed=9, dtype=dtype), grad_out=HALF_GRAD_SCALE)


@cuda_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_large_n_cuda(dtype):
    check(*features(8192, 512, "relu", seed=10, dtype=dtype),
          grad_out=1.0 if dtype == torch.float32 else HALF_GRAD_SCALE)


COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.fused as tk

P, I = "*fp32", "i32"
STATS = dict(rho_p_ptr=P, den_p_ptr=P, rho_q_ptr=P, den_q_ptr=P)
for d, dx in ((640, "*fp32"), (1, "*bf16")):
    block, block_k, warps = tk._config(10_000, d)
    const = dict(BLOCK=block, BLOCK_K_P=block_k, BLOCK_K_Q=block_k)
    for fn, sig, extra in (
            (tk._stats_kernel, dict(xp_ptr=P, xq_ptr=P, **STATS, arg_q_ptr="*i32"), {}),
            (tk._loss_kernel, dict(xp_ptr=P, xq_ptr=P, **STATS, loss_ptr=P, g_ptr=P, m_ptr=P),
             dict(NEED_GRAD=True, PRECISE=True)),
            (tk._grad_kernel, dict(xp_ptr=P, xq_ptr=P, nq_ptr=P, **STATS, arg_q_ptr="*i32", g_ptr=P,
                                   m_ptr=P, gout_ptr=P, scale="fp32", acc_ptr=P, dx_ptr=dx), {})):
        c = dict(const, **extra)
        sig = dict(sig, N=I, D_P=I, D_Q=I, **{k: "constexpr" for k in c})
        kernel = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=warps))
        assert kernel.asm["cubin"], fn.__name__
        print(fn.__name__, d, "ok")
"""


@pytest.mark.skipif(CUDA, reason="the CUDA tests compile and run the kernels for real")
def test_kernels_compile_for_sm90():
    """Without a GPU, at least compile the CUDA path (libdevice logs, barriers, fp32 dots)
    ahead of time for an H100 (sm_90) with the ptxas bundled in triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
