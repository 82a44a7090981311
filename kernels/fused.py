"""Fused Triton kernel of the topology loss L_TP, forward and backward.

Computes the function of kernels/reference.py (the single source of truth) without ever
writing an N x N matrix to global memory.  Notation: xn = x / max(||x||, 1e-8) row-wise (an
fp32 N x D buffer, made with the reference's own operations), d = 1 - xn xn^T,
w_ij = (2 - d_ij) + rho_j, S_j = sum_{i!=j} w_ij, p_ij = w_ij / S_j from f_std and q_ij
likewise from f_adv; t(p, q) is the summand of L.

  _stats_kernel  per column block: rho_j, its arg-min k*_j (Q only) and S_j, for P and Q
  _loss_kernel   per column block: sum_i t(p_ij, q_ij); when a gradient is wanted also
                 g_j = sum_i G_ij and m_j = sum_i G_ij q_ij, with G = dL/dq
  _grad_kernel   per row block:    dL/df_adv

Backward: dL/dw_ij = (G_ij - m_j) / S_j =: W_ij, and rho_j = d_{k*_j j} collects
R_j = sum_{i!=j} W_ij = (g_j - (N-1) m_j) / S_j, so dL/dc_ij = B_ij = W_ij - [i = k*_j] R_j.
With c = Xn Xn^T, gn_i = dL/dxn_i = sum_j (B_ij + B_ji) xn_j; B_ji comes from the same tile
because d is symmetric.  Finally dx_i = (gn_i - (gn_i . xn_i) xn_i) / ||x_i||, or gn_i / 1e-8
where ||x_i|| < 1e-8 (the clamp stops the gradient through the norm).

Numerics: all products are fp32 ("ieee", no TF32).  Away from the clamps the summand is
evaluated as p log1p((p-q)/q) + (1-p) log1p((q-p)/(1-q)) and G as (q-p) / (q (1-q)): the
textbook form loses about N / (p-q)^2 ulps to cancellation, which costs the float32
reference itself up to ~1e-4 relative error at N = 257 (the tests compare against the
reference evaluated in float64).
"""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.language.extra import libdevice

from .reference import EPS_NORM, EPS_PROB, check_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EPS_PROB = tl.constexpr(EPS_PROB)
_LOG_EPS_PROB = tl.constexpr(math.log(EPS_PROB))
_EPS_NORM = tl.constexpr(EPS_NORM)


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _log(x, PRECISE: tl.constexpr):
    # tl.log may lower to an approximate instruction on the GPU, libdevice's is accurate to
    # 1 ulp; the interpreter has no libdevice, but numpy's log is accurate.
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _log1p(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log1p(x)
    else:
        u = 1.0 + x  # Kahan's log1p from an accurate log
        return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _summand(p, q, PRECISE: tl.constexpr):
    """t(p, q) = xlogy(p, p) - p log max(q, eps) + xlogy(1-p, 1-p) - (1-p) log max(1-q, eps).

    Arguments of the branch not taken are replaced by harmless values (no inf/NaN anywhere)."""
    q_ok = q >= _EPS_PROB
    r_ok = (1.0 - q) >= _EPS_PROB
    p_in = (p > 0.0) & (p < 1.0)
    clamped = (tl.where(p > 0.0, p * _log(tl.where(p > 0.0, p, 1.0), PRECISE), 0.0)
               - p * tl.where(q_ok, _log(tl.where(q_ok, q, 1.0), PRECISE), _LOG_EPS_PROB)
               + tl.where(p < 1.0, (1.0 - p) * _log1p(tl.where(p < 1.0, -p, 0.0), PRECISE), 0.0)
               - (1.0 - p) * tl.where(r_ok, _log1p(tl.where(r_ok, -q, 0.0), PRECISE), _LOG_EPS_PROB))
    smooth_ok = q_ok & r_ok & p_in
    ps = tl.where(smooth_ok, p, 0.5)
    qs = tl.where(smooth_ok, q, 0.5)
    smooth = (ps * _log1p(tl.math.div_rn(ps - qs, qs), PRECISE)
              + (1.0 - ps) * _log1p(tl.math.div_rn(qs - ps, 1.0 - qs), PRECISE))
    return tl.where(smooth_ok, smooth, clamped)


@triton.jit
def _dsummand_dq(p, q):
    """G = dt/dq; zero through a clamped log, as torch's clamp_min backward."""
    q_ok = q >= _EPS_PROB
    r_ok = (1.0 - q) >= _EPS_PROB
    qs = tl.where(q_ok & r_ok, q, 0.5)
    clamped = (tl.where(q_ok, -tl.math.div_rn(p, tl.where(q_ok, q, 1.0)), 0.0)
               + tl.where(r_ok, tl.math.div_rn(1.0 - p, tl.where(r_ok, 1.0 - q, 1.0)), 0.0))
    smooth = tl.math.div_rn(qs - p, qs * (1.0 - qs))
    return tl.where(q_ok & r_ok, smooth, clamped)


@triton.jit
def _distances(x_ptr, rows, cols, N, D,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """d_ij = 1 - <xn_i, xn_j> for a tile of normalised rows (fp32, loop over D in chunks).

    Every kernel goes through here with the same tile shape, so a given (i, j) gets
    bit-identical values in all passes."""
    r_off = rows.to(tl.int64) * D
    c_off = cols.to(tl.int64) * D
    rmask = rows < N
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(x_ptr + r_off[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(x_ptr + c_off[None, :] + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return 1.0 - acc


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _stats_kernel(xp_ptr, xq_ptr,
                  rho_p_ptr, den_p_ptr, rho_q_ptr, den_q_ptr, arg_q_ptr,
                  N, D_P, D_Q,
                  BLOCK: tl.constexpr, BLOCK_K_P: tl.constexpr, BLOCK_K_Q: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    min_p = tl.full((BLOCK,), float("inf"), tl.float32)
    min_q = tl.full((BLOCK,), float("inf"), tl.float32)
    arg_q = tl.zeros((BLOCK,), tl.int32)
    sum_p = tl.zeros((BLOCK,), tl.float32)
    sum_q = tl.zeros((BLOCK,), tl.float32)
    for r0 in range(0, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        valid = (rows[:, None] < N) & cmask[None, :] & (rows[:, None] != cols[None, :])
        d_p = _distances(xp_ptr, rows, cols, N, D_P, BLOCK, BLOCK, BLOCK_K_P)
        d_q = _distances(xq_ptr, rows, cols, N, D_Q, BLOCK, BLOCK, BLOCK_K_Q)
        min_p = tl.minimum(min_p, tl.min(tl.where(valid, d_p, float("inf")), axis=0))
        tile_min, tile_arg = tl.min(tl.where(valid, d_q, float("inf")), axis=0, return_indices=True)
        # strict < keeps the earliest row on ties, as torch.min does on the CPU
        better = tile_min < min_q
        arg_q = tl.where(better, r0 + tile_arg, arg_q)
        min_q = tl.where(better, tile_min, min_q)
        sum_p += tl.sum(tl.where(valid, 2.0 - d_p, 0.0), axis=0)
        sum_q += tl.sum(tl.where(valid, 2.0 - d_q, 0.0), axis=0)
    n1 = (N - 1).to(tl.float32)
    tl.store(rho_p_ptr + cols, min_p, mask=cmask)
    tl.store(den_p_ptr + cols, sum_p + n1 * min_p, mask=cmask)
    tl.store(rho_q_ptr + cols, min_q, mask=cmask)
    tl.store(den_q_ptr + cols, sum_q + n1 * min_q, mask=cmask)
    tl.store(arg_q_ptr + cols, arg_q, mask=cmask)


@triton.jit
def _loss_kernel(xp_ptr, xq_ptr,
                 rho_p_ptr, den_p_ptr, rho_q_ptr, den_q_ptr,
                 loss_ptr, g_ptr, m_ptr,
                 N, D_P, D_Q,
                 BLOCK: tl.constexpr, BLOCK_K_P: tl.constexpr, BLOCK_K_Q: tl.constexpr,
                 NEED_GRAD: tl.constexpr, PRECISE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    rho_p = tl.load(rho_p_ptr + cols, mask=cmask, other=0.0)
    den_p = tl.load(den_p_ptr + cols, mask=cmask, other=1.0)
    rho_q = tl.load(rho_q_ptr + cols, mask=cmask, other=0.0)
    den_q = tl.load(den_q_ptr + cols, mask=cmask, other=1.0)
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_g = tl.zeros((BLOCK,), tl.float32)
    acc_m = tl.zeros((BLOCK,), tl.float32)
    for r0 in range(0, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        valid = (rows[:, None] < N) & cmask[None, :] & (rows[:, None] != cols[None, :])
        d_p = _distances(xp_ptr, rows, cols, N, D_P, BLOCK, BLOCK, BLOCK_K_P)
        d_q = _distances(xq_ptr, rows, cols, N, D_Q, BLOCK, BLOCK, BLOCK_K_Q)
        p = tl.math.div_rn((2.0 - d_p) + rho_p[None, :], den_p[None, :])
        q = tl.math.div_rn((2.0 - d_q) + rho_q[None, :], den_q[None, :])
        acc_loss += tl.sum(tl.where(valid, _summand(p, q, PRECISE), 0.0), axis=0)
        if NEED_GRAD:
            g = tl.where(valid, _dsummand_dq(p, q), 0.0)
            acc_g += tl.sum(g, axis=0)
            acc_m += tl.sum(g * q, axis=0)
    tl.store(loss_ptr + cols, acc_loss, mask=cmask)
    if NEED_GRAD:
        tl.store(g_ptr + cols, acc_g, mask=cmask)
        tl.store(m_ptr + cols, acc_m, mask=cmask)


@triton.jit
def _grad_kernel(xp_ptr, xq_ptr, nq_ptr,
                 rho_p_ptr, den_p_ptr, rho_q_ptr, den_q_ptr, arg_q_ptr, g_ptr, m_ptr,
                 gout_ptr, scale, acc_ptr, dx_ptr,
                 N, D_P, D_Q,
                 BLOCK: tl.constexpr, BLOCK_K_P: tl.constexpr, BLOCK_K_Q: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    n1 = (N - 1).to(tl.float32)
    # statistics of the columns indexed by this program's rows (for the B_ji half)
    rho_p_r = tl.load(rho_p_ptr + rows, mask=rmask, other=0.0)
    den_p_r = tl.load(den_p_ptr + rows, mask=rmask, other=1.0)
    rho_q_r = tl.load(rho_q_ptr + rows, mask=rmask, other=0.0)
    den_q_r = tl.load(den_q_ptr + rows, mask=rmask, other=1.0)
    arg_r = tl.load(arg_q_ptr + rows, mask=rmask, other=-1)
    m_r = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    big_r_r = (tl.load(g_ptr + rows, mask=rmask, other=0.0) - n1 * m_r) / den_q_r
    r_off = rows.to(tl.int64) * D_Q

    # gn_I = sum_J E_IJ xn_J, accumulated in fp32 scratch rows owned by this program
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < N
        rho_p_c = tl.load(rho_p_ptr + cols, mask=cmask, other=0.0)
        den_p_c = tl.load(den_p_ptr + cols, mask=cmask, other=1.0)
        rho_q_c = tl.load(rho_q_ptr + cols, mask=cmask, other=0.0)
        den_q_c = tl.load(den_q_ptr + cols, mask=cmask, other=1.0)
        arg_c = tl.load(arg_q_ptr + cols, mask=cmask, other=-1)
        m_c = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        big_r_c = (tl.load(g_ptr + cols, mask=cmask, other=0.0) - n1 * m_c) / den_q_c
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        d_p = _distances(xp_ptr, rows, cols, N, D_P, BLOCK, BLOCK, BLOCK_K_P)
        d_q = _distances(xq_ptr, rows, cols, N, D_Q, BLOCK, BLOCK, BLOCK_K_Q)
        # B_ij: entry i of column j
        p = tl.math.div_rn((2.0 - d_p) + rho_p_c[None, :], den_p_c[None, :])
        q = tl.math.div_rn((2.0 - d_q) + rho_q_c[None, :], den_q_c[None, :])
        e = (_dsummand_dq(p, q) - m_c[None, :]) / den_q_c[None, :]
        e -= tl.where(rows[:, None] == arg_c[None, :], big_r_c[None, :], 0.0)
        # B_ji: entry j of column i, with d_ji = d_ij
        p = tl.math.div_rn((2.0 - d_p) + rho_p_r[:, None], den_p_r[:, None])
        q = tl.math.div_rn((2.0 - d_q) + rho_q_r[:, None], den_q_r[:, None])
        e += (_dsummand_dq(p, q) - m_r[:, None]) / den_q_r[:, None]
        e -= tl.where(cols[None, :] == arg_r[:, None], big_r_r[:, None], 0.0)
        e = tl.where(valid, e, 0.0)
        c_off = cols.to(tl.int64) * D_Q
        for k0 in range(0, D_Q, BLOCK_K_Q):
            ks = k0 + tl.arange(0, BLOCK_K_Q)
            kmask = ks < D_Q
            x = tl.load(xq_ptr + c_off[:, None] + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                        other=0.0)
            ptrs = acc_ptr + r_off[:, None] + ks[None, :]
            omask = rmask[:, None] & kmask[None, :]
            prev = tl.load(ptrs, mask=omask & (c0 > 0), other=0.0)  # the first tile initialises
            tl.store(ptrs, tl.dot(e, x, prev, input_precision="ieee"), mask=omask)
        # the next tile reads back these rows, possibly through other threads
        tl.debug_barrier()

    # back through xn = x / max(||x||, eps): dx = (gn - (gn . xn) xn) / ||x||, or gn / eps
    # below the floor, where the clamp stops the gradient through the norm
    norm = tl.load(nq_ptr + rows, mask=rmask, other=1.0)
    through_norm = norm >= _EPS_NORM
    dot = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, D_Q, BLOCK_K_Q):
        ks = k0 + tl.arange(0, BLOCK_K_Q)
        omask = rmask[:, None] & (ks[None, :] < D_Q)
        gn = tl.load(acc_ptr + r_off[:, None] + ks[None, :], mask=omask, other=0.0)
        x = tl.load(xq_ptr + r_off[:, None] + ks[None, :], mask=omask, other=0.0)
        dot += tl.sum(gn * x, axis=1)
    dot = tl.where(through_norm, dot, 0.0)
    gscale = tl.load(gout_ptr) * scale / tl.maximum(norm, _EPS_NORM)
    for k0 in range(0, D_Q, BLOCK_K_Q):
        ks = k0 + tl.arange(0, BLOCK_K_Q)
        omask = rmask[:, None] & (ks[None, :] < D_Q)
        gn = tl.load(acc_ptr + r_off[:, None] + ks[None, :], mask=omask, other=0.0)
        x = tl.load(xq_ptr + r_off[:, None] + ks[None, :], mask=omask, other=0.0)
        dx = (gn - dot[:, None] * x) * gscale[:, None]
        tl.store(dx_ptr + r_off[:, None] + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------- host side

_poison = False


@contextlib.contextmanager
def poisoned_buffers():
    """Test hook: every buffer the kernels write starts as NaN (index buffers as -1), so an
    element a kernel fails to write shows up in the loss or the gradient."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


def _buffer(shape, dtype, device):
    if _poison:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _config(n, d):
    """(BLOCK, BLOCK_K, num_warps), the same for all three kernels so that every pass
    computes a given d_ij identically.

    One fixed config: no autotuning, because the gradient kernel accumulates into its output
    and the interpreter cannot autotune.  On CUDA, 32 x 32 tiles with K chunks of 32 and
    8 warps compile for sm_90 without register spills (64 x 64 tiles spill 0.3-2.6 KB per
    thread in the loss and gradient kernels; K chunks of 16 spill a little).  Not yet timed
    on a GPU.  The interpreter's cost is per operation, not per element, hence few big
    tiles there."""
    if INTERPRET:
        return (max(16, min(128, triton.next_power_of_2(n))),
                max(16, min(1024, triton.next_power_of_2(d))), 4)
    return 32, 32, 8


def _normalise(x):
    """Rows x / max(||x||, eps) in fp32 and the norms, with the reference's exact operations
    (D = 1 then gives cosines of exactly +-1, as there)."""
    x = x.detach().to(torch.float32)
    norm = x.norm(dim=1, keepdim=True)
    return (x / norm.clamp_min(EPS_NORM)).contiguous(), norm.reshape(-1).contiguous()


def _forward(f_std, f_adv, need_grad):
    """Launch the two forward kernels.  Returns (per-column loss, what the backward needs)."""
    xp, _ = _normalise(f_std)
    xq, nq = _normalise(f_adv)
    n, dev = xq.shape[0], xq.device
    block, bk_p, warps = _config(n, xp.shape[1])
    bk_q = _config(n, xq.shape[1])[1]
    f32 = torch.float32
    rho_p, den_p, rho_q, den_q, col_loss = (_buffer((n,), f32, dev) for _ in range(5))
    arg_q = _buffer((n,), torch.int32, dev)
    g, m = (_buffer((n,), f32, dev) for _ in range(2)) if need_grad else (col_loss, col_loss)
    grid = (triton.cdiv(n, block),)
    common = dict(BLOCK=block, BLOCK_K_P=bk_p, BLOCK_K_Q=bk_q, num_warps=warps)
    _stats_kernel[grid](xp, xq, rho_p, den_p, rho_q, den_q, arg_q,
                        n, xp.shape[1], xq.shape[1], **common)
    _loss_kernel[grid](xp, xq, rho_p, den_p, rho_q, den_q, col_loss, g, m,
                       n, xp.shape[1], xq.shape[1], NEED_GRAD=need_grad, PRECISE=not INTERPRET,
                       **common)
    return col_loss, (xp, xq, nq, rho_p, den_p, rho_q, den_q, arg_q, g, m)


def _backward(saved, grad_out, scale, dtype):
    xp, xq, nq, rho_p, den_p, rho_q, den_q, arg_q, g, m = saved
    n, d_q = xq.shape
    block, bk_p, warps = _config(n, xp.shape[1])
    bk_q = _config(n, d_q)[1]
    scratch = _buffer((n, d_q), torch.float32, xq.device)
    dx = _buffer((n, d_q), dtype, xq.device)
    gout = grad_out.detach().to(torch.float32).reshape(1).contiguous()
    _grad_kernel[(triton.cdiv(n, block),)](
        xp, xq, nq, rho_p, den_p, rho_q, den_q, arg_q, g, m,
        gout, scale, scratch, dx, n, xp.shape[1], d_q,
        BLOCK=block, BLOCK_K_P=bk_p, BLOCK_K_Q=bk_q, num_warps=warps)
    return dx


class _TopologyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_std, f_adv, scale):
        need_grad = ctx.needs_input_grad[1]
        col_loss, saved = _forward(f_std, f_adv, need_grad)
        if need_grad:
            ctx.saved, ctx.scale, ctx.dtype = saved, scale, f_adv.dtype
        return col_loss.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return None, _backward(ctx.saved, grad_out, ctx.scale, ctx.dtype), None


def topology_loss_triton(f_std, f_adv, reduction="sum"):
    """L_TP(f_std, f_adv) -> 0-dim float32 tensor, differentiable in f_adv only.

    Same function as kernels.reference.topology_loss_reference; features fp32, fp16 or bf16
    (accumulation in fp32, gradient in f_adv's dtype) on CUDA, or on the CPU under
    TRITON_INTERPRET=1."""
    check_inputs(f_std, f_adv, reduction)
    for name, f in (("f_std", f_std), ("f_adv", f_adv)):
        if f.dtype not in DTYPES:
            raise TypeError(f"topology_loss_triton: {name} must be float32, float16 or bfloat16, "
                            f"got {f.dtype} (use the reference for float64)")
    if f_std.device != f_adv.device:
        raise ValueError(f"topology_loss_triton: f_std on {f_std.device} but f_adv on {f_adv.device}")
    scale = 1.0 / f_adv.shape[0] if reduction == "mean" else 1.0
    return _TopologyLoss.apply(f_std, f_adv, scale)
