"""Fused Triton kernel (kernels/fused.py) against the PyTorch reference.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1); on CUDA compiled.
The reference is evaluated in float64 on the same (exactly upcast) inputs: it is the same
function, and its float32 evaluation is itself only good to ~1e-4 relative at N = 257
(cancellation in the summand), while the kernel is good to ~1e-6 (1e-5 on the ~1e-4
losses at N = 3, the conditioning of the function itself, see VALUE_ATOL).

Every kernel call runs under `poisoned_buffers()`: all buffers the kernels write (statistics,
per-column losses, gradient scratch, the gradient) start as NaN, so an element a kernel
forgets to write makes the comparison fail.

Launch grid: small N on CUDA splits the summed index of every pass across a second grid
axis (kernels/fused.py, _cuda_config).  The interpreter's own config uses one program of big
tiles, so the split paths are run here by forcing small tiles and several splits
(`launch_config`), on shapes whose splits end in partial tiles.

Ties: with D = 1 every cosine is exactly +-1, so rho_j has exact ties.  They do not change
the value; the gradient is exactly 0 wherever ||x|| > 1e-8 (x / ||x|| is locally constant),
and for zero rows (relu features) the tie-break does matter: both implementations take the
first row index (torch.min's documented choice), which the comparison checks.  Random
continuous features have no ties otherwise.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import kernels  # noqa: E402
from kernels import topology_loss as dispatch  # noqa: E402
from kernels.reference import topology_loss_reference  # noqa: E402
import kernels.fused as tk  # noqa: E402

pytestmark = pytest.mark.slow  # the kernel grid runs under the Triton interpreter on a CPU

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
# precision="tf32" (CUDA only; the interpreter computes ieee): emulating TF32 in float64 on the
# CPU (inputs of the Gram products truncated to 10 mantissa bits, as the tensor cores do) moved
# the loss by up to 1.9e-3 relative and the gradient by up to 1.7e-2 (N = 2048, D = 640: arg-min
# flips of rho at near-ties; 1.2e-2 at N = 1000, D = 2048); about 3x that here.  Only N <= 2048
# was emulated, hence only N <= 2048 is tested.
TF32_VALUE_RTOL = 5e-3
TF32_GRAD_RTOL = 5e-2


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


def kernel(f_std, f_adv, reduction, grad_out=1.0, precision="ieee"):
    x = f_adv.detach().clone().requires_grad_()
    with tk.poisoned_buffers():
        loss = tk.topology_loss_triton(f_std, x, reduction, precision=precision)
        loss.backward(torch.tensor(grad_out, device=loss.device))
    return loss.detach(), x.grad


def check(f_std, f_adv, reduction="sum", grad_out=1.0, precision="ieee"):
    loss, grad = kernel(f_std, f_adv, reduction, grad_out, precision)
    ref_loss, ref_grad = reference(f_std, f_adv, reduction, grad_out)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == f_adv.dtype and grad.shape == f_adv.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    tf32 = precision == "tf32"
    loss_err = abs(loss.double() - ref_loss).item()
    value_atol = VALUE_ATOL / (f_adv.shape[0] if reduction == "mean" else 1)
    value_rtol = max(VALUE_RTOL, TF32_VALUE_RTOL if tf32 else 0.0)
    assert loss_err <= value_rtol * abs(ref_loss).item() + value_atol, (loss.item(), ref_loss.item())
    grad_err = (grad.double() - ref_grad).norm().item()
    ref_norm = ref_grad.norm().item()
    grad_rtol = max(GRAD_RTOL[f_adv.dtype], TF32_GRAD_RTOL if tf32 else 0.0)
    tol = grad_rtol * ref_norm + GRAD_ATOL * grad.numel() ** 0.5
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


# (block, splits) forced on top of the default config: splits that end in a partial tile, one
# tile per split, and a request of 4 splits that normalises to 3 (5 tiles: 2 + 2 + 1)
SPLIT_CONFIGS = [None, (16, 4)]


def degenerate_features():
    f_std, f_adv = features(37, 64, "randn", seed=1)
    f_adv[3] = 0.0                       # zero row: cosines exactly 0, its rho ties everywhere
    f_adv[5] *= 1e-10                    # below the norm floor 1e-8: no gradient through the norm
    f_adv[8] = f_adv[7]                  # duplicate pair: rho ~ 0
    f_adv[10] = -f_adv[9]                # antipodal pair: d ~ 2
    f_adv[12] = f_adv[13] = f_adv[11]    # triple: exact ties in rho
    f_adv[33] = f_adv[30] = f_adv[2]     # ties across 16-row tiles, hence across splits
    f_std[4] = 0.0
    f_std[16] = f_std[15]
    return f_std, f_adv


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_degenerate_rows(config):
    with forced(config):
        check(*degenerate_features())


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_rho_tie_across_splits(config):
    """A tie for rho_j whose tie-break moves the gradient: column j = e_0 is at distance
    exactly 1 from the orthogonal row b = e_1 (split 0) and from the zero row a (split 2),
    every other row is farther (negative first coordinate).  The reference takes k*_j = b,
    the earlier row; taking a would add -R_j xn_j to a's gradient instead of b's."""
    f_std, f_adv = features(50, 8, "randn", seed=15)
    f_adv[:, 0] = -f_adv[:, 0].abs() - 0.1
    j, b, a = 20, 5, 40
    f_adv[j] = 0.0
    f_adv[j, 0] = 1.0
    f_adv[b] = 0.0
    f_adv[b, 1] = 2.0
    f_adv[a] = 0.0
    with forced(config):
        check(f_std, f_adv)


def forced(config):
    """Context: the given (block, splits) launch config, or the automatic one for None."""
    return tk.launch_config(*config) if config else contextlib.nullcontext()


@pytest.mark.parametrize("block,splits,n,d,kind,reduction", [
    (16, 3, 17, 7, "randn", "sum"),     # 2 tiles: 2 splits, the second with 1 row
    (16, 4, 50, 1, "relu", "sum"),      # D = 1: exact rho ties everywhere, zero rows, 4 splits
    (16, 4, 70, 33, "randn", "mean"),   # 5 tiles: normalised to 3 splits (2 + 2 + 1 tiles)
    (32, 8, 130, 24, "relu", "mean"),   # 5 tiles of 32, the last with 2 rows: 5 splits
    (16, 2, 2, 5, "randn", "sum"),      # N = 2: a single tile, 1 split
])
def test_split_grid_matches_reference(block, splits, n, d, kind, reduction):
    with tk.launch_config(block, splits):
        assert tk._config(n, torch.device(DEVICE)).splits == tk._normalise_splits(n, block, splits)
        check(*features(n, d, kind, seed=10 * n + d + splits), reduction, grad_out=0.7)


def test_normalised_splits_are_never_empty():
    for n in (2, 15, 16, 17, 70, 130, 1000, 4099):
        for block in (16, 32):
            tiles = -(-n // block)
            for want in range(1, 40):
                s = tk._normalise_splits(n, block, want)
                per = -(-tiles // s)
                assert 1 <= s <= min(want, tiles)
                assert (s - 1) * per < tiles       # the last split still has a tile
                assert -(-tiles // per) == s       # the kernels recompute the same ranges


def test_cuda_grid_fills_the_gpu():
    """The CUDA launch heuristic (a pure function of N and the SM count): N = 128 gets all
    64 programs its 16 x 16 tiles allow instead of 4, and every N <= 4096 reaches at least
    half the SMs; large N needs no split."""
    for sms in (132, 108, 78):
        for n in (128, 129, 256, 512, 1000, 1024, 2048, 4096, 8192, 65536):
            cfg = tk._cuda_config(n, sms)
            tiles = -(-n // cfg.block)
            programs = tiles * cfg.splits
            assert cfg.splits == tk._normalise_splits(n, cfg.block, cfg.splits)
            assert 1 <= cfg.splits <= tk.MAX_SPLITS
            assert programs >= min(tiles * tiles, sms // 2), (n, sms, cfg)
            if tiles >= sms:
                assert cfg.splits == 1
    assert tk._cuda_config(128, 132).block == 16
    assert tk._cuda_config(128, 132).splits == 8


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


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_poisoning_covers_every_buffer(config):
    """The NaN poisoning is real, and every statistic the kernels write is finite."""
    with tk.poisoned_buffers(), forced(config):
        assert torch.isnan(tk._buffer((3,), torch.float32, DEVICE)).all()
        f_std, f_adv = features(130 if config is None else 70, 7, "randn", seed=4)
        n = f_adv.shape[0]
        col_loss, saved = tk._forward(f_std, f_adv, need_grad=True, precision="ieee")
        assert torch.isfinite(col_loss).all()
        tensors = [t for t in saved if isinstance(t, torch.Tensor)]
        assert len(tensors) == 10
        for t in tensors:
            assert torch.isfinite(t).all()
        arg = saved[7]
        assert arg.dtype == torch.int32 and ((arg >= 0) & (arg < n)).all()
        dx = tk._backward(saved, torch.ones((), device=DEVICE), 1.0, torch.float32)
        assert torch.isfinite(dx).all()
    assert not tk._poison and tk._override is None


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_deterministic(config):
    """Two runs give bit-identical losses and gradients (the splits are summed in order, no
    atomics).  Trivial in the interpreter; on CUDA it runs the real grid at N = 1000."""
    n, d = (1000, 256) if CUDA else (40, 24)
    f_std, f_adv = features(n, d, "randn", seed=11)
    with forced(config):
        (l1, g1), (l2, g2) = kernel(f_std, f_adv, "sum"), kernel(f_std, f_adv, "sum")
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


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
    with pytest.raises(ValueError, match="precision"):
        tk.topology_loss_triton(f_std, f_adv, precision="fp16")
    with pytest.raises(ValueError, match="impl"):
        dispatch(f_std, f_adv, impl="cuda")


def test_auto_picks_reference_below_crossover(monkeypatch):
    """impl="auto": the reference below CROSSOVER_N, off CUDA, without triton, or while the
    crossover is not measured (None); the fused kernel on CUDA from CROSSOVER_N on."""
    assert kernels.CROSSOVER_N is None or (isinstance(kernels.CROSSOVER_N, int)
                                           and kernels.CROSSOVER_N >= 2)
    monkeypatch.setattr(kernels, "triton_available", lambda device_type: True)
    monkeypatch.setattr(kernels, "CROSSOVER_N", None)
    assert kernels.choose_impl("auto", 65536, "cuda") == "torch"
    monkeypatch.setattr(kernels, "CROSSOVER_N", 512)
    assert kernels.choose_impl("auto", 511, "cuda") == "torch"
    assert kernels.choose_impl("auto", 512, "cuda") == "triton"
    assert kernels.choose_impl("auto", 65536, "cpu") == "torch"
    assert kernels.choose_impl("torch", 65536, "cuda") == "torch"   # explicit overrides
    assert kernels.choose_impl("triton", 2, "cpu") == "triton"
    monkeypatch.setattr(kernels, "triton_available", lambda device_type: False)
    assert kernels.choose_impl("auto", 65536, "cuda") == "torch"


def test_auto_dispatch_runs_the_chosen_impl(monkeypatch):
    """The dispatcher calls what choose_impl picks, with the caller's arguments."""
    calls = []
    monkeypatch.setattr(kernels, "topology_loss_reference", lambda *a: calls.append(("torch", a)))
    monkeypatch.setattr(tk, "topology_loss_triton", lambda *a: calls.append(("triton", a)))
    f_std, f_adv = features(40, 16, "randn", seed=12)
    for impl in ("torch", "triton"):
        monkeypatch.setattr(kernels, "choose_impl", lambda i, n, dt, impl=impl: impl)
        dispatch(f_std, f_adv, "mean", precision="tf32")
    assert [c[0] for c in calls] == ["torch", "triton"]
    assert calls[0][1] == (f_std, f_adv, "mean") and calls[1][1] == (f_std, f_adv, "mean", "tf32")


def test_tf32_option():
    """tf32 runs and, where it applies (CUDA), stays within the tf32 tolerance; in the
    interpreter it computes ieee, bit for bit."""
    f_std, f_adv = features(70, 33, "randn", seed=13)
    check(f_std, f_adv, precision="tf32")
    if not CUDA:
        assert torch.equal(kernel(f_std, f_adv, "sum", precision="tf32")[1],
                           kernel(f_std, f_adv, "sum", precision="ieee")[1])


def test_bench_crossover_suggestion():
    """The bench's crossover rule on made-up timings: fused must win for every D at N and at
    every larger N; an eager OOM counts as a fused win, a missing fused time does not."""
    from kernels.bench import suggest_crossover
    ns, ds = (128, 512, 2048, 65536), (512, 640)

    def table(fused_ms, eager_ms):
        return {(n, d): {"eager": eager_ms(n, d), "fused ieee": fused_ms(n, d)} for n in ns for d in ds}
    oom = "OOM (skipped)"
    big = lambda n, d: oom if n == 65536 else 1.0
    assert suggest_crossover(table(lambda n, d: 0.5 if n >= 512 else 2.0, big), ns, ds) == 512
    # D = 640 still loses at N = 512: crossover 2048
    assert suggest_crossover(table(lambda n, d: 0.5 if n >= 2048 or d == 512 else 2.0, big), ns, ds) == 2048
    # fused wins at 128 but loses at 512: only from 2048 on
    assert suggest_crossover(table(lambda n, d: 2.0 if n == 512 else 0.5, big), ns, ds) == 2048
    # never faster: no suggestion, unless eager runs out of memory at the largest N
    assert suggest_crossover(table(lambda n, d: 2.0, lambda n, d: 1.0), ns, ds) is None
    assert suggest_crossover(table(lambda n, d: 2.0, big), ns, ds) == 65536
    # skipped at the largest N: no suggestion
    assert suggest_crossover(table(lambda n, d: "skipped" if n == 65536 else 0.5, big), ns, ds) is None
    assert suggest_crossover(table(lambda n, d: 0.5, big), ns, ds) == 128


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
@pytest.mark.parametrize("n,d,kind", ((257, 640, "relu"), (1000, 2048, "randn"), (2048, 640, "randn")))
def test_tf32_cuda(n, d, kind):
    check(*features(n, d, kind, seed=14), precision="tf32")


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
PART = dict(min_p_ptr=P, sum_p_ptr=P, min_q_ptr=P, sum_q_ptr=P)


def compile(fn, sig, const, warps):
    sig = dict(sig, **{k: "constexpr" for k in const})
    kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    assert kernel.asm["cubin"], fn.__name__
    print(fn.__name__, const, "ok")


# the small-N and the large-N CUDA configs, each with one precision and one gradient dtype
for n, precision, dx in ((128, "ieee", "*fp32"), (10_000, "tf32", "*bf16")):
    cfg = tk._cuda_config(n, 132)
    tiles = dict(BLOCK=cfg.block, BLOCK_K_P=32, BLOCK_K_Q=32, PRECISION=precision)
    dims = dict(N=I, D_P=I, D_Q=I)
    compile(tk._stats_kernel, dict(xp_ptr=P, xq_ptr=P, **PART, arg_q_ptr="*i32", **dims),
            tiles, cfg.warps)
    compile(tk._loss_kernel, dict(xp_ptr=P, xq_ptr=P, **STATS, loss_ptr=P, g_ptr=P, m_ptr=P, **dims),
            dict(tiles, NEED_GRAD=True, PRECISE=True), cfg.warps)
    # a split count of 1 reaches the kernels as a constant (Triton specialises ints equal to 1)
    splits = dict(SPLITS=1) if cfg.splits == 1 else {}
    compile(tk._grad_kernel, dict(xp_ptr=P, xq_ptr=P, **STATS, arg_q_ptr="*i32", g_ptr=P, m_ptr=P,
                                  acc_ptr=P, **dims, SPLITS=I), dict(tiles, **splits), cfg.warps)
    compile(tk._grad_finish_kernel, dict(xq_ptr=P, nq_ptr=P, acc_ptr=P, gout_ptr=P, scale="fp32",
                                         dx_ptr=dx, N=I, D_Q=I, SPLITS=I),
            dict(BLOCK=cfg.block, BLOCK_K_Q=32, **splits), cfg.warps)
compile(tk._stats_reduce_kernel, dict(**PART, arg_q_part_ptr="*i32", **STATS, arg_q_ptr="*i32",
                                      N=I, SPLITS=I), dict(BLOCK=tk.REDUCE_BLOCK), 4)
"""


@pytest.mark.skipif(CUDA, reason="the CUDA tests compile and run the kernels for real")
def test_kernels_compile_for_sm90():
    """Without a GPU, at least compile the CUDA path (libdevice logs, barriers, ieee and tf32
    dots, both launch configs) ahead of time for an H100 (sm_90) with the ptxas bundled in
    triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
