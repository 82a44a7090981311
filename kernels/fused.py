"""Fused Triton kernel of the topology loss L_TP, forward and backward.

Computes the function of kernels/reference.py (the single source of truth) without ever
writing an N x N matrix to global memory.  Notation: xn = x / max(||x||, 1e-8) row-wise (an
fp32 N x D buffer, made with the reference's own operations), d = 1 - xn xn^T,
w_ij = (2 - d_ij) + rho_j, S_j = sum_{i!=j} w_ij, p_ij = w_ij / S_j from f_std and q_ij
likewise from f_adv; t(p, q) is the summand of L.

  _stats_kernel   per (column block, row split): partial rho_j, its arg-min k*_j (Q only)
                  and sum_i (2 - d_ij), for P and Q
  _stats_reduce   per column block: combines the splits into rho_j, k*_j and S_j
  _loss_kernel    per (column block, row split): partial sum_i t(p_ij, q_ij); when a gradient
                  is wanted also g_j = sum_i G_ij and m_j = sum_i G_ij q_ij, with G = dL/dq
  _grad_kernel    per (row block, column split): partial gn = dL/dxn
  _grad_finish    per row block: sums the splits of gn and goes back through the norm

Grid: axis 0 walks blocks of the output index, axis 1 splits the other (summed) index into
contiguous ranges of whole tiles, so that small N still launches enough programs to fill the
GPU (see _cuda_config).  Each split writes its own slice of a [splits, N] (or [splits, N, D])
buffer and a second pass sums the slices in split order: no atomics, so the result is
deterministic (bit-identical run to run for a given N, D and launch config).

Backward: dL/dw_ij = (G_ij - m_j) / S_j =: W_ij, and rho_j = d_{k*_j j} collects
R_j = sum_{i!=j} W_ij = (g_j - (N-1) m_j) / S_j, so dL/dc_ij = B_ij = W_ij - [i = k*_j] R_j.
With c = Xn Xn^T, gn_i = dL/dxn_i = sum_j (B_ij + B_ji) xn_j; B_ji comes from the same tile
because d is symmetric.  Finally dx_i = (gn_i - (gn_i . xn_i) xn_i) / ||x_i||, or gn_i / 1e-8
where ||x_i|| < 1e-8 (the clamp stops the gradient through the norm).

Numerics: precision="ieee" (the default) makes every tl.dot a true fp32 product; "tf32" lets
the tensor cores round the dot inputs to TF32 (10-bit mantissa; fp32 accumulation either
way).  That applies to the Gram tiles and to the backward's E @ Xn product alike, since one
fp32 dot left at ieee would dominate the time.  Emulating TF32 in float64 on the CPU moved
the loss by up to ~2e-3 relative and the gradient by up to ~2e-2 (N = 2048, mostly arg-min
flips of rho at near-ties): tf32 stays opt-in until a GPU run confirms it (BENCH.md).  The
interpreter always computes ieee.  Away from the clamps the summand is evaluated as
p log1p((p-q)/q) + (1-p) log1p((q-p)/(1-q)) and G as (q-p) / (q (1-q)): the textbook form
loses about N / (p-q)^2 ulps to cancellation, which costs the float32 reference itself up to
~1e-4 relative error at N = 257 (the tests compare against the reference in float64).
"""
import contextlib
import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.language.extra import libdevice

from .reference import EPS_NORM, EPS_PROB, check_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32")
# ieee until a GPU run shows tf32 accurate enough and faster (python -m kernels.bench, BENCH.md)
DEFAULT_PRECISION = "ieee"
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
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """d_ij = 1 - <xn_i, xn_j> for a tile of normalised rows (fp32 accumulation, loop over D).

    Every kernel goes through here with the same tile shape and precision, so a given (i, j)
    gets bit-identical values in all passes."""
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
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return 1.0 - acc


@triton.jit
def _split_range(N, BLOCK: tl.constexpr):
    """[start, stop) of the summed index for this program's split (grid axis 1): contiguous
    whole tiles, so tiles start at multiples of BLOCK as in every other pass.  The host
    chooses the split count so that no split is empty (_normalise_splits)."""
    per = tl.cdiv(tl.cdiv(N, BLOCK), tl.num_programs(1)) * BLOCK
    start = tl.program_id(1) * per
    return start, tl.minimum(start + per, N)


@triton.jit
def _split_sum(ptr, idx, mask, N, SPLITS):
    """sum_s ptr[s, idx] of a [SPLITS, N] buffer, in split order (deterministic)."""
    acc = tl.load(ptr + idx, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(ptr + s * N + idx, mask=mask, other=0.0)
    return acc


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _stats_kernel(xp_ptr, xq_ptr,
                  min_p_ptr, sum_p_ptr, min_q_ptr, sum_q_ptr, arg_q_ptr,
                  N, D_P, D_Q,
                  BLOCK: tl.constexpr, BLOCK_K_P: tl.constexpr, BLOCK_K_Q: tl.constexpr,
                  PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    start, stop = _split_range(N, BLOCK)
    min_p = tl.full((BLOCK,), float("inf"), tl.float32)
    min_q = tl.full((BLOCK,), float("inf"), tl.float32)
    arg_q = tl.zeros((BLOCK,), tl.int32)
    sum_p = tl.zeros((BLOCK,), tl.float32)
    sum_q = tl.zeros((BLOCK,), tl.float32)
    for r0 in range(start, stop, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        valid = (rows[:, None] < N) & cmask[None, :] & (rows[:, None] != cols[None, :])
        d_p = _distances(xp_ptr, rows, cols, N, D_P, BLOCK, BLOCK, BLOCK_K_P, PRECISION)
        d_q = _distances(xq_ptr, rows, cols, N, D_Q, BLOCK, BLOCK, BLOCK_K_Q, PRECISION)
        min_p = tl.minimum(min_p, tl.min(tl.where(valid, d_p, float("inf")), axis=0))
        tile_min, tile_arg = tl.min(tl.where(valid, d_q, float("inf")), axis=0, return_indices=True)
        # strict < keeps the earliest row on ties, as torch.min does on the CPU
        better = tile_min < min_q
        arg_q = tl.where(better, r0 + tile_arg, arg_q)
        min_q = tl.where(better, tile_min, min_q)
        sum_p += tl.sum(tl.where(valid, 2.0 - d_p, 0.0), axis=0)
        sum_q += tl.sum(tl.where(valid, 2.0 - d_q, 0.0), axis=0)
    out = tl.program_id(1) * N + cols  # this split's slice of the [splits, N] buffers
    tl.store(min_p_ptr + out, min_p, mask=cmask)
    tl.store(sum_p_ptr + out, sum_p, mask=cmask)
    tl.store(min_q_ptr + out, min_q, mask=cmask)
    tl.store(sum_q_ptr + out, sum_q, mask=cmask)
    tl.store(arg_q_ptr + out, arg_q, mask=cmask)


@triton.jit
def _stats_reduce_kernel(min_p_ptr, sum_p_ptr, min_q_ptr, sum_q_ptr, arg_q_part_ptr,
                         rho_p_ptr, den_p_ptr, rho_q_ptr, den_q_ptr, arg_q_ptr,
                         N, SPLITS, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    min_p = tl.load(min_p_ptr + cols, mask=cmask, other=0.0)
    min_q = tl.load(min_q_ptr + cols, mask=cmask, other=0.0)
    arg_q = tl.load(arg_q_part_ptr + cols, mask=cmask, other=0)
    for s in range(1, SPLITS):
        min_p = tl.minimum(min_p, tl.load(min_p_ptr + s * N + cols, mask=cmask, other=0.0))
        m = tl.load(min_q_ptr + s * N + cols, mask=cmask, other=0.0)
        better = m < min_q  # splits hold increasing rows: strict < keeps the earliest on ties
        arg_q = tl.where(better, tl.load(arg_q_part_ptr + s * N + cols, mask=cmask, other=0), arg_q)
        min_q = tl.where(better, m, min_q)
    n1 = (N - 1).to(tl.float32)
    tl.store(rho_p_ptr + cols, min_p, mask=cmask)
    tl.store(den_p_ptr + cols, _split_sum(sum_p_ptr, cols, cmask, N, SPLITS) + n1 * min_p, mask=cmask)
    tl.store(rho_q_ptr + cols, min_q, mask=cmask)
    tl.store(den_q_ptr + cols, _split_sum(sum_q_ptr, cols, cmask, N, SPLITS) + n1 * min_q, mask=cmask)
    tl.store(arg_q_ptr + cols, arg_q, mask=cmask)


@triton.jit
def _loss_kernel(xp_ptr, xq_ptr,
                 rho_p_ptr, den_p_ptr, rho_q_ptr, den_q_ptr,
                 loss_ptr, g_ptr, m_ptr,
                 N, D_P, D_Q,
                 BLOCK: tl.constexpr, BLOCK_K_P: tl.constexpr, BLOCK_K_Q: tl.constexpr,
                 PRECISION: tl.constexpr, NEED_GRAD: tl.constexpr, PRECISE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    start, stop = _split_range(N, BLOCK)
    rho_p = tl.load(rho_p_ptr + cols, mask=cmask, other=0.0)
    den_p = tl.load(den_p_ptr + cols, mask=cmask, other=1.0)
    rho_q = tl.load(rho_q_ptr + cols, mask=cmask, other=0.0)
    den_q = tl.load(den_q_ptr + cols, mask=cmask, other=1.0)
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_g = tl.zeros((BLOCK,), tl.float32)
    acc_m = tl.zeros((BLOCK,), tl.float32)
    for r0 in range(start, stop, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        valid = (rows[:, None] < N) & cmask[None, :] & (rows[:, None] != cols[None, :])
        d_p = _distances(xp_ptr, rows, cols, N, D_P, BLOCK, BLOCK, BLOCK_K_P, PRECISION)
        d_q = _distances(xq_ptr, rows, cols, N, D_Q, BLOCK, BLOCK, BLOCK_K_Q, PRECISION)
        p = tl.math.div_rn((2.0 - d_p) + rho_p[None, :], den_p[None, :])
        q = tl.math.div_rn((2.0 - d_q) + rho_q[None, :], den_q[None, :])
        acc_loss += tl.sum(tl.where(valid, _summand(p, q, PRECISE), 0.0), axis=0)
        if NEED_GRAD:
            g = tl.where(valid, _dsummand_dq(p, q), 0.0)
            acc_g += tl.sum(g, axis=0)
            acc_m += tl.sum(g * q, axis=0)
    out = tl.program_id(1) * N + cols  # this split's slice of the [splits, N] buffers
    tl.store(loss_ptr + out, acc_loss, mask=cmask)
    if NEED_GRAD:
        tl.store(g_ptr + out, acc_g, mask=cmask)
        tl.store(m_ptr + out, acc_m, mask=cmask)


@triton.jit
def _grad_kernel(xp_ptr, xq_ptr,
                 rho_p_ptr, den_p_ptr, rho_q_ptr, den_q_ptr, arg_q_ptr, g_ptr, m_ptr,
                 acc_ptr, N, D_P, D_Q, SPLITS,
                 BLOCK: tl.constexpr, BLOCK_K_P: tl.constexpr, BLOCK_K_Q: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Partial gn of this program's rows over its split of the columns, into acc[split]."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    start, stop = _split_range(N, BLOCK)
    n1 = (N - 1).to(tl.float32)
    # statistics of the columns indexed by this program's rows (for the B_ji half)
    rho_p_r = tl.load(rho_p_ptr + rows, mask=rmask, other=0.0)
    den_p_r = tl.load(den_p_ptr + rows, mask=rmask, other=1.0)
    rho_q_r = tl.load(rho_q_ptr + rows, mask=rmask, other=0.0)
    den_q_r = tl.load(den_q_ptr + rows, mask=rmask, other=1.0)
    arg_r = tl.load(arg_q_ptr + rows, mask=rmask, other=-1)
    m_r = _split_sum(m_ptr, rows, rmask, N, SPLITS)
    big_r_r = (_split_sum(g_ptr, rows, rmask, N, SPLITS) - n1 * m_r) / den_q_r
    r_off = rows.to(tl.int64) * D_Q
    acc_ptr += tl.program_id(1).to(tl.int64) * N * D_Q  # this split's N x D slice

    # gn_I = sum_J E_IJ xn_J, accumulated in fp32 scratch rows owned by this program
    for c0 in range(start, stop, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < N
        rho_p_c = tl.load(rho_p_ptr + cols, mask=cmask, other=0.0)
        den_p_c = tl.load(den_p_ptr + cols, mask=cmask, other=1.0)
        rho_q_c = tl.load(rho_q_ptr + cols, mask=cmask, other=0.0)
        den_q_c = tl.load(den_q_ptr + cols, mask=cmask, other=1.0)
        arg_c = tl.load(arg_q_ptr + cols, mask=cmask, other=-1)
        m_c = _split_sum(m_ptr, cols, cmask, N, SPLITS)
        big_r_c = (_split_sum(g_ptr, cols, cmask, N, SPLITS) - n1 * m_c) / den_q_c
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        d_p = _distances(xp_ptr, rows, cols, N, D_P, BLOCK, BLOCK, BLOCK_K_P, PRECISION)
        d_q = _distances(xq_ptr, rows, cols, N, D_Q, BLOCK, BLOCK, BLOCK_K_Q, PRECISION)
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
            prev = tl.load(ptrs, mask=omask & (c0 > start), other=0.0)  # the first tile initialises
            tl.store(ptrs, tl.dot(e, x, prev, input_precision=PRECISION), mask=omask)
        # the next tile reads back these rows, possibly through other threads
        tl.debug_barrier()


@triton.jit
def _load_gn(acc_ptr, offs, omask, ND, SPLITS):
    """gn = sum over the splits' N x D slices of the scratch buffer, in split order."""
    gn = tl.load(acc_ptr + offs, mask=omask, other=0.0)
    for s in range(1, SPLITS):
        gn += tl.load(acc_ptr + s * ND + offs, mask=omask, other=0.0)
    return gn


@triton.jit
def _grad_finish_kernel(xq_ptr, nq_ptr, acc_ptr, gout_ptr, scale, dx_ptr, N, D_Q, SPLITS,
                        BLOCK: tl.constexpr, BLOCK_K_Q: tl.constexpr):
    """Back through xn = x / max(||x||, eps): dx = (gn - (gn . xn) xn) / ||x||, or gn / eps
    below the floor, where the clamp stops the gradient through the norm."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    r_off = rows.to(tl.int64) * D_Q
    nd = N.to(tl.int64) * D_Q
    norm = tl.load(nq_ptr + rows, mask=rmask, other=1.0)
    through_norm = norm >= _EPS_NORM
    dot = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, D_Q, BLOCK_K_Q):
        ks = k0 + tl.arange(0, BLOCK_K_Q)
        omask = rmask[:, None] & (ks[None, :] < D_Q)
        gn = _load_gn(acc_ptr, r_off[:, None] + ks[None, :], omask, nd, SPLITS)
        x = tl.load(xq_ptr + r_off[:, None] + ks[None, :], mask=omask, other=0.0)
        dot += tl.sum(gn * x, axis=1)
    dot = tl.where(through_norm, dot, 0.0)
    gscale = tl.load(gout_ptr) * scale / tl.maximum(norm, _EPS_NORM)
    for k0 in range(0, D_Q, BLOCK_K_Q):
        ks = k0 + tl.arange(0, BLOCK_K_Q)
        omask = rmask[:, None] & (ks[None, :] < D_Q)
        gn = _load_gn(acc_ptr, r_off[:, None] + ks[None, :], omask, nd, SPLITS)
        x = tl.load(xq_ptr + r_off[:, None] + ks[None, :], mask=omask, other=0.0)
        dx = (gn - dot[:, None] * x) * gscale[:, None]
        tl.store(dx_ptr + r_off[:, None] + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------- launch config

class LaunchConfig(NamedTuple):
    """One config for all passes (every pass must compute a given d_ij identically)."""
    block: int   # BLOCK x BLOCK tiles of d
    warps: int
    splits: int  # programs along grid axis 1: the summed index cut into this many ranges


SMALL_N = 256      # up to here 16 x 16 tiles (more programs), above 32 x 32
MAX_SPLITS = 16    # caps the [splits, N, D] gradient scratch
REDUCE_BLOCK = 128  # columns per program of the 1-D split-combining pass

_override = None


@contextlib.contextmanager
def launch_config(block, splits, warps=4):
    """Test hook: force the tile size and the split count (normalised as the automatic
    choice is), to run the split paths in the interpreter."""
    global _override
    old, _override = _override, LaunchConfig(block, warps, splits)
    try:
        yield
    finally:
        _override = old


def _normalise_splits(n, block, splits):
    """Largest split count <= splits that leaves no split empty (each must write its slice)."""
    tiles = triton.cdiv(n, block)
    splits = max(1, min(splits, tiles))
    return triton.cdiv(tiles, triton.cdiv(tiles, splits))


def _cuda_config(n, sms):
    """16 x 16 tiles and 4 warps for small N, 32 x 32 tiles and 8 warps above; rows split so
    that columns blocks x splits reaches the SM count (N = 128: 8 x 8 = 64 programs instead of
    4; N = 1024: 32 x 5).  32 x 32 tiles with K chunks of 32 compile for sm_90 without
    register spills (64 x 64 spill).  Not yet timed on a GPU."""
    block, warps = (16, 4) if n <= SMALL_N else (32, 8)
    tiles = triton.cdiv(n, block)
    splits = min(MAX_SPLITS, triton.cdiv(sms, tiles))
    return LaunchConfig(block, warps, _normalise_splits(n, block, splits))


@functools.lru_cache(maxsize=None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(n, device):
    """The launch config for N rows.  No autotuning: the gradient kernel accumulates into
    its output and the interpreter cannot autotune.  The interpreter's cost is per operation,
    not per element, hence one program of big tiles there (up to N = 128) and no split."""
    if _override is not None:
        o = _override
        return o._replace(splits=_normalise_splits(n, o.block, o.splits))
    if INTERPRET:
        return LaunchConfig(max(16, min(128, triton.next_power_of_2(n))), 4, 1)
    return _cuda_config(n, _num_sms(device.index if device.index is not None else torch.cuda.current_device()))


def _block_k(d):
    """K chunk of the dot loops: 32 on CUDA (no spills), as wide as D in the interpreter."""
    return max(16, min(1024, triton.next_power_of_2(d))) if INTERPRET else 32


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


def _normalise(x):
    """Rows x / max(||x||, eps) in fp32 and the norms, with the reference's exact operations
    (D = 1 then gives cosines of exactly +-1, as there)."""
    x = x.detach().to(torch.float32)
    norm = x.norm(dim=1, keepdim=True)
    return (x / norm.clamp_min(EPS_NORM)).contiguous(), norm.reshape(-1).contiguous()


def _check_precision(precision):
    precision = DEFAULT_PRECISION if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"topology_loss_triton: precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _statistics(xp, xq, cfg, precision):
    """rho, S for P and Q and the arg-min k* of Q: split pass, then the combining pass."""
    n, dev, f32 = xq.shape[0], xq.device, torch.float32
    min_p, sum_p, min_q, sum_q = (_buffer((cfg.splits, n), f32, dev) for _ in range(4))
    arg_part = _buffer((cfg.splits, n), torch.int32, dev)
    _stats_kernel[(triton.cdiv(n, cfg.block), cfg.splits)](
        xp, xq, min_p, sum_p, min_q, sum_q, arg_part, n, xp.shape[1], xq.shape[1],
        BLOCK=cfg.block, BLOCK_K_P=_block_k(xp.shape[1]), BLOCK_K_Q=_block_k(xq.shape[1]),
        PRECISION=precision, num_warps=cfg.warps)
    rho_p, den_p, rho_q, den_q = (_buffer((n,), f32, dev) for _ in range(4))
    arg_q = _buffer((n,), torch.int32, dev)
    _stats_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK),)](
        min_p, sum_p, min_q, sum_q, arg_part, rho_p, den_p, rho_q, den_q, arg_q,
        n, cfg.splits, BLOCK=REDUCE_BLOCK, num_warps=4)
    return rho_p, den_p, rho_q, den_q, arg_q


def _forward(f_std, f_adv, need_grad, precision):
    """Launch the forward kernels.  Returns (per-split, per-column loss [splits, N], what the
    backward needs)."""
    xp, _ = _normalise(f_std)
    xq, nq = _normalise(f_adv)
    n, dev = xq.shape[0], xq.device
    cfg = _config(n, dev)
    rho_p, den_p, rho_q, den_q, arg_q = _statistics(xp, xq, cfg, precision)
    col_loss = _buffer((cfg.splits, n), torch.float32, dev)
    g, m = ((_buffer((cfg.splits, n), torch.float32, dev) for _ in range(2)) if need_grad
            else (col_loss, col_loss))
    _loss_kernel[(triton.cdiv(n, cfg.block), cfg.splits)](
        xp, xq, rho_p, den_p, rho_q, den_q, col_loss, g, m, n, xp.shape[1], xq.shape[1],
        BLOCK=cfg.block, BLOCK_K_P=_block_k(xp.shape[1]), BLOCK_K_Q=_block_k(xq.shape[1]),
        PRECISION=precision, NEED_GRAD=need_grad, PRECISE=not INTERPRET, num_warps=cfg.warps)
    return col_loss, (xp, xq, nq, rho_p, den_p, rho_q, den_q, arg_q, g, m, cfg, precision)


def _backward(saved, grad_out, scale, dtype):
    xp, xq, nq, rho_p, den_p, rho_q, den_q, arg_q, g, m, cfg, precision = saved
    n, d_q = xq.shape
    bk_q = _block_k(d_q)
    scratch = _buffer((cfg.splits, n, d_q), torch.float32, xq.device)
    _grad_kernel[(triton.cdiv(n, cfg.block), cfg.splits)](
        xp, xq, rho_p, den_p, rho_q, den_q, arg_q, g, m, scratch,
        n, xp.shape[1], d_q, cfg.splits,
        BLOCK=cfg.block, BLOCK_K_P=_block_k(xp.shape[1]), BLOCK_K_Q=bk_q,
        PRECISION=precision, num_warps=cfg.warps)
    dx = _buffer((n, d_q), dtype, xq.device)
    gout = grad_out.detach().to(torch.float32).reshape(1).contiguous()
    _grad_finish_kernel[(triton.cdiv(n, cfg.block),)](
        xq, nq, scratch, gout, scale, dx, n, d_q, cfg.splits,
        BLOCK=cfg.block, BLOCK_K_Q=bk_q, num_warps=cfg.warps)
    return dx


class _TopologyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_std, f_adv, scale, precision):
        need_grad = ctx.needs_input_grad[1]
        col_loss, saved = _forward(f_std, f_adv, need_grad, precision)
        if need_grad:
            ctx.saved, ctx.scale, ctx.dtype = saved, scale, f_adv.dtype
        return col_loss.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return None, _backward(ctx.saved, grad_out, ctx.scale, ctx.dtype), None, None


def topology_loss_triton(f_std, f_adv, reduction="sum", precision=None):
    """L_TP(f_std, f_adv) -> 0-dim float32 tensor, differentiable in f_adv only.

    Same function as kernels.reference.topology_loss_reference; features fp32, fp16 or bf16
    (accumulation in fp32, gradient in f_adv's dtype) on CUDA, or on the CPU under
    TRITON_INTERPRET=1.  precision: "ieee" or "tf32" for the dot products (None =
    DEFAULT_PRECISION); see the module docstring."""
    check_inputs(f_std, f_adv, reduction)
    precision = _check_precision(precision)
    for name, f in (("f_std", f_std), ("f_adv", f_adv)):
        if f.dtype not in DTYPES:
            raise TypeError(f"topology_loss_triton: {name} must be float32, float16 or bfloat16, "
                            f"got {f.dtype} (use the reference for float64)")
    if f_std.device != f_adv.device:
        raise ValueError(f"topology_loss_triton: f_std on {f_std.device} but f_adv on {f_adv.device}")
    scale = 1.0 / f_adv.shape[0] if reduction == "mean" else 1.0
    return _TopologyLoss.apply(f_std, f_adv, scale, precision)
