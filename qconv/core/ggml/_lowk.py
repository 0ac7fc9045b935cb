"""The 2- and 3-bit super-block ggml types Q2_K and Q3_K.

Reproduces, bit for bit, what ``ggml_quantize_chunk`` writes for them in llama.cpp's
``ggml/src/ggml-quants.c``:

* Q2_K without an imatrix: ``quantize_row_q2_K_ref`` (16 sub-blocks of 16, ``make_qkx2_quants``
  with weights ``|x|`` and the *absolute* error, ``use_mad``; 4-bit scales and mins relative to
  the largest); with one: ``quantize_row_q2_K_impl`` (weights ``qw*sqrt(sigma2 + x^2)``,
  ``make_qkx3_quants``, scales and mins chosen by ``make_qp_quants``).
* Q3_K without an imatrix: ``quantize_row_q3_K_ref`` (symmetric ``make_q3_quants`` with its
  coordinate-descent refinement, 6-bit scales relative to the largest); with one:
  ``quantize_row_q3_K_impl`` (``make_qx_quants`` weighted by ``qw*sqrt(sigma2 + x^2)``, and again
  over the 16 sub-block scales for the 6-bit scales).

Layout trick (as in :mod:`._kquants`): the 16-element sub-blocks of a chunk are transposed to
``[16, S]``, so each per-element C step is one numpy operation over ``S`` sub-blocks and each C
accumulation is :func:`seq_sum` (rows added in element order). The sequential refinement loops
(make_q3_quants, make_qp_quants) walk the 16 elements in Python, each step a vector operation
over all sub-blocks still changing.
"""

from __future__ import annotations

import numpy as np

from ._common import (F32, fp16_bits, nearest_int, nearest_int_u8, quiet, scratch, seq_sum, signed_absmax,
                      superblock_sum_sq, transposed)
from ._kernel import Kernel
from ._search import GROUP_MAX_EPS, importance_weights, qkx, qp, qx, qx_L, search_L_affine

QK_K = 256
_N = 16  # elements per sub-block (both types)


def _search_weights(xb: np.ndarray, qw: np.ndarray, X: np.ndarray,
                    sigma2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The impl paths' ``weight[l] = qw[l]*sqrtf(sigma2 + x^2)`` ``[16, S]`` and each sub-block's
    ``sw[j] = sum weight`` (``[B, 16]``), from each super-block's ``sigma2`` ``[B]``."""
    W = importance_weights(X, transposed(qw, _N, "QW"), np.repeat(sigma2, QK_K // _N))
    return W, seq_sum(W).reshape(xb.shape[0], QK_K // _N)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6`` for each
    128-element half ``j``: ``L`` ``[B, 256]`` (values 0..3) -> ``[B, 64]``."""
    Lr = L.reshape(L.shape[0], 2, 4, 32)
    qs = Lr[:, :, 0] | (Lr[:, :, 1] << 2) | (Lr[:, :, 2] << 4) | (Lr[:, :, 3] << 6)
    return qs.reshape(L.shape[0], 64)


# --------------------------------------------------------------------------------------------
# Q2_K
# --------------------------------------------------------------------------------------------

def _q2_k_put(xb: np.ndarray, out: np.ndarray, sc: np.ndarray, d16: np.ndarray, dmin16: np.ndarray,
              search: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Re-quantize with the fp16 super-scales and the 4-bit ``sc`` (``[B, 16]`` uint8, scale in the
    low nibble, min in the high one) and write the blocks. ``search``: make_qkx's ``(l_iscale,
    l_min, flat)``, giving the levels that sub-blocks with ``d == 0`` keep."""
    B = xb.shape[0]
    d = d16.view(np.float16).astype(F32)[:, None] * (sc & 0xF).astype(F32)     # [B, 16]
    dm = dmin16.view(np.float16).astype(F32)[:, None] * (sc >> 4).astype(F32)
    zero = d == 0
    x3 = xb.reshape(B, 16, _N)
    v = np.add(x3, dm[:, :, None], dtype=F32)
    v /= np.where(zero, F32(1.0), d)[:, :, None]  # d == 0 sub-blocks are replaced below
    L = nearest_int_u8(v, 0, 3).reshape(B, QK_K)
    if zero.any():
        idx = np.flatnonzero(zero.ravel())
        l_iscale, l_min, flat = search
        L.reshape(B * 16, _N)[idx] = search_L_affine(
            xb.reshape(B * 16, _N)[idx], l_iscale[idx], l_min[idx], flat[idx], 3)
    out[:, 0:16] = sc
    out[:, 16:80] = _pack_2bit(L)
    out[:, 80:82] = d16.view(np.uint8).reshape(B, 2)
    out[:, 82:84] = dmin16.view(np.uint8).reshape(B, 2)


def _q2_k_levels(v: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``nearest_int((15/top) * v)`` for the sub-blocks of super-blocks whose ``top > 0`` (int32
    ``[B, 16]``; 0 elsewhere, where C writes no level)."""
    pos = top > 0
    iscale = np.where(pos, F32(15.0) / top, F32(0.0)).astype(F32)
    return np.where(pos[:, None], nearest_int(iscale[:, None] * v), 0)


@quiet
def q2_k(xb: np.ndarray, out: np.ndarray) -> None:
    """``quantize_row_q2_K_ref``."""
    B = xb.shape[0]
    X = transposed(xb, _N)
    W = np.abs(X, out=scratch("QW", X.shape))
    scale, the_min, l_iscale, l_min, flat = qkx(X, W, 3, -0.5, 0.1, 15, use_mad=True)
    scales = scale.reshape(B, 16)
    mins = the_min.reshape(B, 16)
    # C: `if (scale > max_scale) max_scale = scale` from 0, so NaN scales are skipped (fmax)
    max_scale = np.fmax(np.fmax.reduce(scales, axis=1), F32(0.0))
    max_min = np.fmax(np.fmax.reduce(mins, axis=1), F32(0.0))
    # `y.scales[j] = l; y.scales[j] |= (l << 4)`: int levels stored into uint8_t (wrapping)
    sc = ((_q2_k_levels(scales, max_scale) | (_q2_k_levels(mins, max_min) << 4)) & 0xFF).astype(np.uint8)
    d16 = np.where(max_scale > 0, fp16_bits(max_scale / F32(15.0)), np.uint16(0))
    dmin16 = np.where(max_min > 0, fp16_bits(max_min / F32(15.0)), np.uint16(0))
    _q2_k_put(xb, out, sc, d16, dmin16, (l_iscale, l_min, flat))


@quiet
def q2_k_w(xb: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms: np.ndarray | None = None) -> None:
    """``quantize_row_q2_K_impl`` (its ``sigma2`` is ``sumx2/QK_K``, without Q3_K's factor 2)."""
    B = xb.shape[0]
    X = transposed(xb, _N)
    W, sw = _search_weights(xb, qw, X, np.divide(superblock_sum_sq(xb), F32(QK_K), dtype=F32))
    scale, the_min, l_iscale, l_min, flat = qkx(X, W, 3, -0.9, 0.05, 36)
    dm, Ls = qp(scale.reshape(B, 16), sw, 15)
    mm, Lm = qp(the_min.reshape(B, 16), sw, 15)
    sc = Ls | (Lm << 4)  # uint8_t arithmetic, as in C
    _q2_k_put(xb, out, sc, fp16_bits(dm), fp16_bits(mm), (l_iscale, l_min, flat))


# --------------------------------------------------------------------------------------------
# Q3_K
# --------------------------------------------------------------------------------------------

def _make_q3(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(16, 4, x, L, do_rmse=true)`` for the ``S`` sub-blocks of ``X`` ``[16, S]``.

    Returns ``(scale [S], L [16, S] float32)``, ``L`` the C output (``l + 4`` in 0..7; 0 for an
    all-(near-)zero sub-block). The five refinement rounds visit the elements in order, each
    step depending on the last; a sub-block left unchanged by a round is final (the next round
    would repeat it exactly), so each round only works on the sub-blocks the previous one changed.
    """
    nmax = 4
    amax, mx = signed_absmax(X, axis=0)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1.0), mx)  # keep the zero sub-blocks finite; masked at the end
    iscale = np.divide(F32(-nmax), mx, dtype=F32)
    W = np.multiply(X, X, out=scratch("W", X.shape))     # w = x*x
    WX = np.multiply(W, X, out=scratch("WX", X.shape))   # w*x
    L = scratch("L3", X.shape)
    np.multiply(X, iscale, out=L)
    np.subtract(nearest_int_u8(L, -nmax, nmax - 1, nmax), F32(nmax), out=L, dtype=F32)
    tmp = scratch("tmp", X.shape)
    sumlx = seq_sum(np.multiply(WX, L, out=tmp))          # sum (w*x)*l
    np.multiply(W, L, out=tmp)
    tmp *= L
    suml2 = seq_sum(tmp)                                  # sum (w*l)*l

    idx = np.flatnonzero(~zero)
    for _ in range(5):
        if not idx.size:
            break
        full = idx.size == X.shape[1]
        Xa, Wa, WXa, La = (A if full else A[:, idx] for A in (X, W, WX, L))
        sx, s2 = sumlx[idx], suml2[idx]
        changed = np.zeros(idx.size, dtype=bool)
        for i in range(X.shape[0]):
            x, w, wx, li = Xa[i], Wa[i], WXa[i], La[i]
            slx = sx - wx * li
            sl2 = s2 - (w * li) * li
            new_l = np.clip(nearest_int(x * sl2 / slx), -nmax, nmax - 1).astype(F32)
            ok = (slx > 0) & (new_l != li)
            slx += wx * new_l
            sl2 += (w * new_l) * new_l
            ok &= (sl2 > 0) & ((slx * slx) * s2 > (sx * sx) * sl2)
            np.putmask(li, ok, new_l)
            np.putmask(sx, ok, slx)
            np.putmask(s2, ok, sl2)
            changed |= ok
        if not full:
            L[:, idx] = La
        sumlx[idx] = sx
        suml2[idx] = s2
        idx = idx[changed]

    scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(F32)
    scale[zero] = 0
    L += F32(nmax)
    L[:, zero] = 0
    return scale, L


def _q3_k_put(xb: np.ndarray, out: np.ndarray, ls: np.ndarray, d16: np.ndarray, L_search: np.ndarray) -> None:
    """Pack the 6-bit scales ``ls`` (``[B, 16]``, 0..63 = scale + 32), re-quantize with ``d16`` and
    them, and write the blocks. ``L_search`` ``[B*16, 16]`` uint8: the levels (0..7) that
    sub-blocks with ``d == 0`` keep."""
    B = xb.shape[0]
    ls = ls.astype(np.uint8)
    sc = np.zeros((B, 12), dtype=np.uint8)
    sc[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    for k in range(4):
        sc[:, 8:12] |= (ls[:, 4 * k:4 * k + 4] >> 4) << (2 * k)
    d = d16.view(np.float16).astype(F32)[:, None] * (ls.astype(F32) - F32(32.0))   # [B, 16]
    zero = d == 0
    v = np.divide(xb.reshape(B, 16, _N), np.where(zero, F32(1.0), d)[:, :, None], dtype=F32)
    L = nearest_int_u8(v, -4, 3, 4)
    if zero.any():
        idx = np.flatnonzero(zero.ravel())
        L.reshape(B * 16, _N)[idx] = L_search[idx]
    L = L.reshape(B, QK_K)
    # the high bit of the first 32 levels goes to bit 0 of hmask[0..31], the next 32 to bit 1, ...
    L8 = L.reshape(B, 8, 32)
    hmask = np.zeros((B, 32), dtype=np.uint8)
    for k in range(8):
        hmask |= ((L8[:, k] >> 2) & 1) << k
    out[:, 0:32] = hmask
    out[:, 32:96] = _pack_2bit(L & 3)
    out[:, 96:108] = sc
    out[:, 108:110] = d16.view(np.uint8).reshape(B, 2)


@quiet
def q3_k(xb: np.ndarray, out: np.ndarray) -> None:
    """``quantize_row_q3_K_ref``."""
    B = xb.shape[0]
    X = transposed(xb, _N)
    scale, L = _make_q3(X)
    scales = scale.reshape(B, 16)
    asc = np.abs(scales)
    asc[np.isnan(asc)] = 0  # C: `if (scale > amax)` never picks a NaN
    am = asc.argmax(axis=1)
    max_scale = scales[np.arange(B), am]
    some = asc[np.arange(B), am] > 0  # C: `if (max_scale)`; else scales 0 and d = 0
    iscale = np.divide(F32(-32.0), np.where(some, max_scale, F32(1.0)), dtype=F32)
    # int8_t l = nearest_int(...) (wrapping), then MAX(-32, MIN(31, l)) + 32
    l8 = nearest_int(iscale[:, None] * scales).astype(np.int8)
    ls = np.where(some[:, None], np.clip(l8, -32, 31) + 32, 0)
    d16 = np.where(some, fp16_bits(np.divide(F32(1.0), iscale, dtype=F32)), np.uint16(0))
    _q3_k_put(xb, out, ls, d16, np.ascontiguousarray(L.T).astype(np.uint8))


@quiet
def q3_k_w(xb: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms: np.ndarray | None = None) -> None:
    """``quantize_row_q3_K_impl`` (``sigma2 = 2*sumx2/QK_K``)."""
    B = xb.shape[0]
    X = transposed(xb, _N)
    sigma2 = np.divide(F32(2.0) * superblock_sum_sq(xb), F32(QK_K), dtype=F32)
    W, sw = _search_weights(xb, qw, X, sigma2)
    scale, l_iscale, zero = qx(X, 4, W)
    L_search = qx_L(xb.reshape(B * 16, _N), l_iscale, zero, 4)
    # make_qx_quants(16, 32, scales, Ls, 1, sw) over each super-block's 16 sub-block scales
    S = np.ascontiguousarray(scale.reshape(B, 16).T)
    d_block, s_iscale, s_zero = qx(S, 32, np.ascontiguousarray(sw.T))
    ls = qx_L(scale.reshape(B, 16), s_iscale, s_zero, 32)
    _q3_k_put(xb, out, ls, fp16_bits(d_block), L_search)


LOWK: dict[str, Kernel] = {
    "Q2_K": Kernel(q2_k, q2_k_w),
    "Q3_K": Kernel(q3_k, q3_k_w),
}
