"""The 256-element super-block ggml types Q4_K, Q5_K and Q6_K.

Reproduces ``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref`` and ``quantize_row_q6_K_ref`` of
llama.cpp's ``ggml/src/ggml-quants.c`` (the path ``ggml_quantize_chunk`` takes without an
importance matrix) bit for bit.

Layout trick: the sub-blocks of a chunk are transposed to ``[n, S]`` (element index first,
sub-block second), so every per-element step of the C loops becomes one numpy operation on a
contiguous row of ``S`` sub-blocks, and every C accumulation ``acc += term`` over the ``n``
elements becomes ``np.add.reduce(axis=0)``, which adds the rows one after another: the same
float32 operations in the same order as the C code, for thousands of sub-blocks at once.
"""

from __future__ import annotations

import numpy as np

from ._common import F32, fp16_bits, nearest_int, nearest_int_u8, quiet, scratch, seq_sum, signed_absmax

QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


# --------------------------------------------------------------------------------------------
# make_qkx2_quants (affine, weighted) for Q4_K / Q5_K
# --------------------------------------------------------------------------------------------

def _qkx2(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false)``
    for ``S`` sub-blocks at once.

    ``X``/``W``: ``[n, S]`` float32 C-contiguous (element-major). Returns ``(scale, the_min,
    l_iscale, l_min, flat)``: the returned scale and ``*the_min`` per sub-block, plus the iscale
    and min with which the kept ``L`` was computed (``L = clamp(nearest_int(l_iscale*(x -
    l_min)), 0, nmax)``), and a mask of the ``max == min`` sub-blocks (whose L is all 0).
    """
    n, S = X.shape
    fnmax = F32(nmax)
    xmin = X.min(axis=0)
    xmax = X.max(axis=0)
    sum_w = seq_sum(W)
    T = scratch("T", X.shape)
    np.multiply(W, X, out=T)
    sum_x = seq_sum(T)
    mn = np.minimum(xmin, F32(0.0))
    flat = xmax == mn

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.divide(fnmax, xmax - mn, dtype=F32)
        scale = np.divide(F32(1.0), iscale, dtype=F32)
        # initial L: x - min in [0, max - min] so no clamping is needed
        np.subtract(X, mn, out=T)
        T *= iscale
        np.rint(T, out=T)
        # best_error = sum w * (scale*L + min - x)^2
        T *= scale
        T += mn
        T -= X
        T *= T
        T *= W
        best_error = seq_sum(T)
    l_iscale = iscale
    l_min = mn.copy()

    # Every error is a sum of w * diff^2 >= 0, so `cur_error < best_error` never holds where the
    # first fit is already exact (best_error 0; weights stored on a 4-bit grid give many such
    # sub-blocks) or NaN (flat and non-finite sub-blocks): only the others are searched.
    act = np.flatnonzero(best_error > 0)
    if act.size == S:
        _qkx2_search(X, W, nmax, rmin, rdelta, nstep, xmin, xmax, sum_w, sum_x, mn, best_error,
                     scale, l_iscale, l_min)
    elif act.size:
        Xa = np.take(X, act, axis=1, out=scratch("Xa", (n, act.size)))
        Wa = np.take(W, act, axis=1, out=scratch("Wa", (n, act.size)))
        mn_a, scale_a, l_iscale_a, l_min_a = (v[act] for v in (mn, scale, l_iscale, l_min))
        _qkx2_search(Xa, Wa, nmax, rmin, rdelta, nstep, xmin[act], xmax[act], sum_w[act], sum_x[act],
                     mn_a, best_error[act], scale_a, l_iscale_a, l_min_a)
        mn[act], scale[act], l_iscale[act], l_min[act] = mn_a, scale_a, l_iscale_a, l_min_a
    scale[flat] = 0
    return scale, -mn, l_iscale, l_min, flat


def _qkx2_search(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                 xmin: np.ndarray, xmax: np.ndarray, sum_w: np.ndarray, sum_x: np.ndarray,
                 mn: np.ndarray, best_error: np.ndarray, scale: np.ndarray, l_iscale: np.ndarray,
                 l_min: np.ndarray) -> None:
    """The ``nstep + 1`` refinement steps of make_qkx2_quants on ``[n, S]`` sub-blocks; updates
    ``mn``, ``best_error``, ``scale``, ``l_iscale`` and ``l_min`` (all ``[S]``) in place."""
    fnmax = F32(nmax)
    T = scratch("T", X.shape)
    WL = scratch("WL", X.shape)
    tmp = scratch("tmp", X.shape)
    red = np.empty(X.shape[1], dtype=F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            c = F32(F32(F32(rmin) + F32(F32(rdelta) * F32(step))) + fnmax)
            iscale = np.divide(c, xmax - mn, dtype=F32)
            np.subtract(X, mn, out=T)
            T *= iscale
            np.rint(T, out=T)
            # clamp to [0, nmax]: x <= max always, so the upper clamp matters only when
            # iscale*(max-min) = c can round above nmax; the lower one only when min > x.
            # (numpy's minimum/maximum are much faster against a full array than a scalar)
            if c >= fnmax + F32(0.45):
                np.minimum(T, scratch("hi", X.shape, fill=nmax), out=T)
            if np.any(mn > xmin):
                np.maximum(T, scratch("zero", X.shape, fill=0.0), out=T)
            np.multiply(W, T, out=WL)                 # w*l
            sum_l = seq_sum(WL)
            np.multiply(WL, T, out=tmp)               # (w*l)*l
            sum_l2 = seq_sum(tmp)
            np.multiply(WL, X, out=tmp)               # (w*l)*x
            sum_xl = seq_sum(tmp)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                # (np.putmask is several times faster than np.where / np.copyto(where=))
                np.putmask(this_scale, pos, sum_xl / sum_l2)
                np.putmask(this_min, pos, F32(0.0))
            # cur_error = sum w * (this_scale*L + this_min - x)^2
            T *= this_scale
            T += this_min
            T -= X
            T *= T
            T *= W
            cur_error = seq_sum(T, out=red)
            upd = (D > 0) & (cur_error < best_error)
            if upd.any():
                np.putmask(best_error, upd, cur_error)
                np.putmask(scale, upd, this_scale)
                np.putmask(l_iscale, upd, iscale)
                np.putmask(l_min, upd, mn)
                np.putmask(mn, upd, this_min)


def _search_L_affine(Xs: np.ndarray, l_iscale, l_min, flat, nmax: int) -> np.ndarray:
    """Recompute the L kept by make_qkx2_quants for the given sub-blocks (``Xs``: ``[k, 32]``)."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.subtract(Xs, l_min[:, None], dtype=F32)
        t *= l_iscale[:, None]
        t[flat] = 0
        return nearest_int_u8(t, 0, nmax)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales + 8 six-bit mins -> the 12 ``scales`` bytes of Q4_K/Q5_K."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _k_affine(xb: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared body of Q4_K/Q5_K for super-blocks ``xb`` ``[B, 256]``.

    Returns (d fp16 bits [B], dmin fp16 bits [B], packed scales [B, 12], L [B, 256] uint8).
    """
    B = xb.shape[0]
    X = scratch("X", (32, B * 8))  # [32, S], S = 8B sub-blocks
    np.copyto(X, xb.reshape(B * 8, 32).T)
    # weights: av_x + |x| with av_x = sqrt(sum x^2 / 32)
    W = scratch("W", X.shape)
    np.multiply(X, X, out=W)
    sum_x2 = seq_sum(W)
    av_x = np.sqrt(sum_x2 / F32(32.0))
    np.abs(X, out=W)
    W += av_x
    scale, the_min, l_iscale, l_min, flat = _qkx2(X, W, nmax, rmin, rdelta, nstep)

    scales = scale.reshape(B, 8)
    mins = the_min.reshape(B, 8)
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
        L.reshape(B * 8, 32)[idx] = _search_L_affine(
            xb.reshape(B * 8, 32)[idx], l_iscale[idx], l_min[idx], flat[idx], nmax)
    return d16, dmin16, _pack_scales_k4(ls, lm), L.reshape(B, 256)


@quiet
def q4_k(xb: np.ndarray, out: np.ndarray) -> None:
    B = xb.shape[0]
    d16, dmin16, sc, L = _k_affine(xb, 15, -1.0, 0.1, 20)
    out[:, 0:2] = d16.view(np.uint8).reshape(B, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(B, 2)
    out[:, 4:16] = sc
    Lr = L.reshape(B, 4, 2, 32)
    out[:, 16:144] = (Lr[:, :, 0, :] | (Lr[:, :, 1, :] << 4)).reshape(B, 128)


@quiet
def q5_k(xb: np.ndarray, out: np.ndarray) -> None:
    B = xb.shape[0]
    d16, dmin16, sc, L = _k_affine(xb, 31, -0.5, 0.1, 15)
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


# --------------------------------------------------------------------------------------------
# make_qx_quants (symmetric, rmse_type 1, no quant weights) for Q6_K
# --------------------------------------------------------------------------------------------

def _qx(X: np.ndarray, nmax: int):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` for ``S`` sub-blocks at once.

    ``X``: ``[n, S]`` float32 C-contiguous. Returns ``(scale, l_iscale, zero)``: the returned
    scale, the iscale of the kept ``L`` (``L = nmax + clamp(nearest_int(l_iscale*x), -nmax,
    nmax-1)``) and a mask of the all-(near-)zero sub-blocks (whose L is all 0).
    """
    n, S = X.shape
    fnmax = F32(nmax)
    amax, mx = signed_absmax(X, axis=0)  # max = the signed x of the first largest |x|
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1.0), mx)  # keep the zero sub-blocks finite; masked at the end

    Wt = np.multiply(X, X, out=scratch("W", X.shape))      # w = x*x
    WX = np.multiply(Wt, X, out=scratch("WX", X.shape))    # w*x
    T = scratch("T", X.shape)
    tmp = scratch("tmp", X.shape)
    # (numpy's minimum/maximum are much faster against a full array than a scalar)
    lo, hi = scratch("lo", X.shape, fill=-nmax), scratch("hi", X.shape, fill=nmax - 1)

    def sums(iscale: np.ndarray, c: np.float32):
        np.multiply(X, iscale, out=T)
        np.rint(T, out=T)
        # |iscale*x| <= c: clamps are only needed when c can round beyond the range
        if c >= F32(nmax - 1) + F32(0.45):
            np.minimum(T, hi, out=T)
        if c >= fnmax + F32(0.45):
            np.maximum(T, lo, out=T)
        np.multiply(WX, T, out=tmp)   # (w*x)*l
        sumlx = seq_sum(tmp)
        np.multiply(Wt, T, out=tmp)   # (w*l)*l
        np.multiply(tmp, T, out=tmp)
        suml2 = seq_sum(tmp)
        return sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.divide(-fnmax, mx, dtype=F32)
        sumlx, suml2 = sums(iscale, fnmax)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0)).astype(F32)
        best = scale * sumlx
        l_iscale = iscale
        for step in range(-9, 10):
            if step == 0:
                continue
            c = F32(fnmax + F32(F32(0.1) * F32(step)))
            iscale = np.divide(-c, mx, dtype=F32)
            sumlx, suml2 = sums(iscale, c)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if upd.any():
                new_scale = sumlx / suml2
                np.putmask(scale, upd, new_scale)
                np.putmask(best, upd, new_scale * sumlx)
                np.putmask(l_iscale, upd, iscale)
    scale[zero] = 0
    return scale, l_iscale, zero


@quiet
def q6_k(xb: np.ndarray, out: np.ndarray) -> None:
    B = xb.shape[0]
    X = scratch("X", (16, B * 16))  # [16, S], S = 16B sub-blocks
    np.copyto(X, xb.reshape(B * 16, 16).T)
    scale, l_iscale, zero = _qx(X, 32)

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


KQUANTS = {
    "Q4_K": q4_k,
    "Q5_K": q5_k,
    "Q6_K": q6_k,
}
