"""The 256-element super-block ggml types Q4_K, Q5_K and Q6_K.

Reproduces ``quantize_row_q{4,5,6}_K_ref`` of llama.cpp's ``ggml/src/ggml-quants.c`` (the path
``ggml_quantize_chunk`` takes without an importance matrix) and ``quantize_row_q{4,5,6}_K_impl``
(its path with one) bit for bit; the scale searches they share are in :mod:`._search`.

Layout trick: the sub-blocks of a chunk are transposed to ``[n, S]`` (element index first,
sub-block second), so every per-element step of the C loops becomes one numpy operation on a
contiguous row of ``S`` sub-blocks, and every C accumulation ``acc += term`` over the ``n``
elements becomes ``np.add.reduce(axis=0)``, which adds the rows one after another: the same
float32 operations in the same order as the C code, for thousands of sub-blocks at once.
"""

from __future__ import annotations

import numpy as np

from ._kernel import Kernel
from ._common import F32, fp16_bits, nearest_int, nearest_int_u8, quiet, scratch, seq_sum, superblock_sum_sq, transposed
from ._search import GROUP_MAX_EPS, importance_weights, qkx, qp, qx, search_L_affine

QK_K = 256


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales + 8 six-bit mins -> the 12 ``scales`` bytes of Q4_K/Q5_K."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _unpack_scales_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for all 8 sub-blocks: the 12 packed bytes -> (scales, mins) ``[B, 8]``."""
    ls = np.empty((sc.shape[0], 8), dtype=np.uint8)
    lm = np.empty_like(ls)
    ls[:, 0:4] = sc[:, 0:4] & 63
    lm[:, 0:4] = sc[:, 4:8] & 63
    ls[:, 4:8] = (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)
    lm[:, 4:8] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return ls, lm


def _k_affine(xb: np.ndarray, nmax: int, qw: np.ndarray | None, clamp_qp: bool = False):
    """Shared body of Q4_K/Q5_K for super-blocks ``xb`` ``[B, 256]``.

    Without ``qw``: ``quantize_row_q{4,5}_K_ref`` (weights ``av_x + |x|``, make_qkx2_quants, 6-bit
    scales relative to the largest). With ``qw`` (``[B, 256]`` importances):
    ``quantize_row_q{4,5}_K_impl`` (weights ``qw*sqrt(sigma2 + x^2)``, make_qkx3_quants, 6-bit
    scales by make_qp_quants weighted by each sub-block's total weight; ``clamp_qp``: Q5_K's
    ``MIN(63, .)`` on them). Returns (d fp16 bits [B], dmin fp16 bits [B], packed scales
    [B, 12], L [B, 256] uint8).
    """
    B = xb.shape[0]
    X = transposed(xb, 32)  # [32, S], S = 8B sub-blocks
    if qw is None:
        # weights: av_x + |x| with av_x = sqrt(sum x^2 / 32)
        W = scratch("W", X.shape)
        np.multiply(X, X, out=W)
        av_x = np.sqrt(seq_sum(W) / F32(32.0))
        np.abs(X, out=W)
        W += av_x
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
    else:
        W = importance_weights(X, transposed(qw, 32, "QW"), np.repeat(np.divide(F32(2.0) * superblock_sum_sq(xb), F32(QK_K), dtype=F32), 8))
        sw = seq_sum(W).reshape(B, 8)
        rmin, rdelta, nstep = -0.9, 0.05, 36
    scale, the_min, l_iscale, l_min, flat = qkx(X, W, nmax, rmin, rdelta, nstep)

    scales = scale.reshape(B, 8)
    mins = the_min.reshape(B, 8)
    if qw is None:
        # C: `if (scale > max_scale) max_scale = scale` from 0, so NaNs (from overflowing sums on
        # absurdly large inputs) are skipped: fmax ignores NaN
        max_scale = np.fmax(np.fmax.reduce(scales, axis=1), F32(0.0))
        max_min = np.fmax(np.fmax.reduce(mins, axis=1), F32(0.0))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0)).astype(F32)
            # uint8_t ls = nearest_int(...) (wraps mod 256), then MIN(63, ls)
            ls = np.minimum(nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
            lm = np.minimum(nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
        d16 = fp16_bits(max_scale / F32(63.0))
        dmin16 = fp16_bits(max_min / F32(63.0))
        packed = _pack_scales_k4(ls, lm)
    else:
        d_block, ls = qp(scales, sw, 63)
        m_block, lm = qp(mins, sw, 63)
        if clamp_qp:
            np.minimum(ls, 63, out=ls)
            np.minimum(lm, 63, out=lm)
        d16 = fp16_bits(d_block)
        dmin16 = fp16_bits(m_block)
        packed = _pack_scales_k4(ls, lm)
        ls, lm = _unpack_scales_k4(packed)  # the C re-reads the packed 6-bit values

    # re-quantize with the fp16-rounded super-scales and the 6-bit sub-scales
    d = d16.view(np.float16).astype(F32)[:, None] * ls.astype(F32)    # [B, 8]
    dm = dmin16.view(np.float16).astype(F32)[:, None] * lm.astype(F32)
    x3 = xb.reshape(B, 8, 32)
    zero = d == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = np.add(x3, dm[:, :, None], dtype=F32)
        v /= np.where(zero, F32(1.0), d)[:, :, None]  # d == 0 sub-blocks are replaced below
        L = nearest_int_u8(v, 0, nmax)
    if zero.any():
        # sub-blocks with d == 0 keep the L from the search
        idx = np.flatnonzero(zero.ravel())
        L.reshape(B * 8, 32)[idx] = search_L_affine(
            xb.reshape(B * 8, 32)[idx], l_iscale[idx], l_min[idx], flat[idx], nmax)
    return d16, dmin16, packed, L.reshape(B, 256)


def _put_q4_k(out: np.ndarray, d16, dmin16, sc, L) -> None:
    B = out.shape[0]
    out[:, 0:2] = d16.view(np.uint8).reshape(B, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(B, 2)
    out[:, 4:16] = sc
    Lr = L.reshape(B, 4, 2, 32)
    out[:, 16:144] = (Lr[:, :, 0, :] | (Lr[:, :, 1, :] << 4)).reshape(B, 128)


def _put_q5_k(out: np.ndarray, d16, dmin16, sc, L) -> None:
    B = out.shape[0]
    out[:, 0:2] = d16.view(np.uint8).reshape(B, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(B, 2)
    out[:, 4:16] = sc
    L8 = L.reshape(B, 8, 32)
    qh = np.zeros((B, 32), dtype=np.uint8)
    for k in range(8):
        qh |= ((L8[:, k, :] >> 4) & 1) << k
    out[:, 16:48] = qh
    Lr = (L & 0x0F).reshape(B, 4, 2, 32)
    out[:, 48:176] = (Lr[:, :, 0, :] | (Lr[:, :, 1, :] << 4)).reshape(B, 128)


@quiet
def q4_k(xb: np.ndarray, out: np.ndarray) -> None:
    _put_q4_k(out, *_k_affine(xb, 15, None))


@quiet
def q4_k_w(xb: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms=None) -> None:
    _put_q4_k(out, *_k_affine(xb, 15, qw))


@quiet
def q5_k(xb: np.ndarray, out: np.ndarray) -> None:
    _put_q5_k(out, *_k_affine(xb, 31, None))


@quiet
def q5_k_w(xb: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms=None) -> None:
    _put_q5_k(out, *_k_affine(xb, 31, qw, clamp_qp=True))


def _q6_k(xb: np.ndarray, out: np.ndarray, qw: np.ndarray | None) -> None:
    """``quantize_row_q6_K_ref`` (``qw`` None: make_qx_quants weighted by x*x) or
    ``quantize_row_q6_K_impl`` (weighted by the raw importances ``qw``: llama.cpp's
    ``sqrt(sigma2 + x^2)`` factor is commented out for Q6_K)."""
    B = xb.shape[0]
    X = transposed(xb, 16)  # [16, S], S = 16B sub-blocks
    scale, l_iscale, zero = qx(X, 32, None if qw is None else transposed(qw, 16, "QW"))

    scales = scale.reshape(B, 16)
    asc = np.abs(scales)
    asc[np.isnan(asc)] = 0  # C: `if (abs_scale > max_abs_scale)` never picks a NaN
    am = asc.argmax(axis=1)
    rows = np.arange(B)
    max_abs = asc[rows, am]
    max_scale = scales[rows, am]
    blank = max_abs < GROUP_MAX_EPS
    max_scale = np.where(blank, F32(1.0), max_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.divide(F32(-128.0), max_scale, dtype=F32)
        d16 = fp16_bits(np.divide(F32(1.0), iscale, dtype=F32))
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
        d = d16.view(np.float16).astype(F32)[:, None] * sc.astype(F32)   # [B, 16]
        dz = d == 0
        # d == 0 sub-blocks are replaced below
        v = np.divide(xb.reshape(B, 16, 16), np.where(dz, F32(1.0), d)[:, :, None], dtype=F32)
        L = nearest_int_u8(v, -32, 31, 32)
    if dz.any():
        # sub-blocks with d == 0 keep the L of make_qx_quants (0 for all-zero sub-blocks)
        idx = np.flatnonzero(dz.ravel())
        xs = xb.reshape(B * 16, 16)[idx]
        with np.errstate(invalid="ignore", over="ignore"):
            t = np.multiply(xs, l_iscale[idx][:, None], dtype=F32)
            Ls = nearest_int_u8(t, -32, 31, 32)
        Ls[zero[idx]] = 0
        L.reshape(B * 16, 16)[idx] = Ls

    Lr = L.reshape(B, 2, 4, 32)
    ql = out[:, 0:128].reshape(B, 2, 2, 32)
    ql[:, :, 0, :] = (Lr[:, :, 0, :] & 0x0F) | ((Lr[:, :, 2, :] & 0x0F) << 4)
    ql[:, :, 1, :] = (Lr[:, :, 1, :] & 0x0F) | ((Lr[:, :, 3, :] & 0x0F) << 4)
    qh = out[:, 128:192].reshape(B, 2, 32)
    qh[...] = (Lr[:, :, 0, :] >> 4) | ((Lr[:, :, 1, :] >> 4) << 2) | \
        ((Lr[:, :, 2, :] >> 4) << 4) | ((Lr[:, :, 3, :] >> 4) << 6)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(B, 2)
    if blank.any():
        out[blank] = 0


@quiet
def q6_k(xb: np.ndarray, out: np.ndarray) -> None:
    _q6_k(xb, out, None)


@quiet
def q6_k_w(xb: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms=None) -> None:
    _q6_k(xb, out, qw)


KQUANTS = {
    "Q4_K": Kernel(q4_k, q4_k_w),
    "Q5_K": Kernel(q5_k, q5_k_w),
    "Q6_K": Kernel(q6_k, q6_k_w),
}
