"""The scale searches of llama.cpp's quantizers, vectorised over thousands of (sub-)blocks.

``make_qkx2_quants`` / ``make_qkx3_quants`` (affine: ``x ~ scale*L + min``), ``make_qx_quants``
(symmetric) and ``make_qp_quants`` (non-negative scales of scales) from ``ggml-quants.c``, bit for
bit. Layout: a group's elements run down axis 0 of an ``[n, S]`` array (``S`` groups side by
side), so each per-element step of the C loops is one numpy operation over a contiguous row and
each C accumulation ``acc += term`` is :func:`seq_sum`, the same float32 additions in the same
order.
"""

from __future__ import annotations

import numpy as np

from ._common import F32, nearest_int, nearest_int_u8, scratch, seq_sum, signed_absmax

GROUP_MAX_EPS = F32(1e-15)


def importance_weights(X: np.ndarray, QW: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` for sub-blocks ``X``/``QW`` ``[n, S]`` with each
    sub-block's ``sigma2`` ``[S]``: the weights llama.cpp searches with when given an imatrix."""
    W = np.multiply(X, X, out=scratch("W", X.shape))
    W += sigma2
    np.sqrt(W, out=W)
    np.multiply(QW, W, out=W)
    return W


def first_extreme(X: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """The C running ``if (x[i] < min) min = x[i]`` loop (from ``min = x[0]``) keeps the *first*
    element equal to the extreme; that differs from numpy's min/max only in the sign of a zero,
    so fix up the groups (columns of ``X`` ``[n, S]``) whose extreme is 0."""
    z = np.flatnonzero(ext == 0)
    if z.size:
        sub = X[:, z]
        ext[z] = sub[(sub == 0).argmax(axis=0), np.arange(z.size)]
    return ext


# --------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants (affine, weighted)
# --------------------------------------------------------------------------------------------

def qkx(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
        use_mad: bool = False):
    """``make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)``
    for ``S`` sub-blocks at once; also ``make_qkx3_quants`` with weights, which is the same
    algorithm (its early exit ``max <= min`` and qkx2's ``max == min`` agree, as min <= max).

    ``X``/``W``: ``[n, S]`` float32 C-contiguous (element-major). Returns ``(scale, the_min,
    l_iscale, l_min, flat)``: the returned scale and ``*the_min`` per sub-block, plus the iscale
    and min with which the kept ``L`` was computed (``L = clamp(nearest_int(l_iscale*(x -
    l_min)), 0, nmax)``), and a mask of the ``max == min`` sub-blocks (whose L is all 0).
    """
    n, S = X.shape
    fnmax = F32(nmax)
    xmin = first_extreme(X, X.min(axis=0))
    xmax = X.max(axis=0)
    sum_w = seq_sum(W)
    T = scratch("T", X.shape)
    np.multiply(W, X, out=T)
    sum_x = seq_sum(T)
    mn = np.where(xmin > 0, F32(0.0), xmin)  # C: `if (min > 0) min = 0` (a -0 min stays -0)
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
        _error_term(T, use_mad)
        T *= W
        best_error = seq_sum(T)
    l_iscale = iscale
    l_min = mn.copy()

    # Every error is a sum of w * diff^2 >= 0, so `cur_error < best_error` never holds where the
    # first fit is already exact (best_error 0; weights stored on a 4-bit grid give many such
    # sub-blocks) or NaN (flat and non-finite sub-blocks): only the others are searched.
    act = np.flatnonzero(best_error > 0)
    if act.size == S:
        _qkx_search(X, W, nmax, rmin, rdelta, nstep, xmin, xmax, sum_w, sum_x, mn, best_error,
                     scale, l_iscale, l_min, use_mad)
    elif act.size:
        Xa = np.take(X, act, axis=1, out=scratch("Xa", (n, act.size)))
        Wa = np.take(W, act, axis=1, out=scratch("Wa", (n, act.size)))
        mn_a, scale_a, l_iscale_a, l_min_a = (v[act] for v in (mn, scale, l_iscale, l_min))
        _qkx_search(Xa, Wa, nmax, rmin, rdelta, nstep, xmin[act], xmax[act], sum_w[act], sum_x[act],
                     mn_a, best_error[act], scale_a, l_iscale_a, l_min_a, use_mad)
        mn[act], scale[act], l_iscale[act], l_min[act] = mn_a, scale_a, l_iscale_a, l_min_a
    scale[flat] = 0
    return scale, -mn, l_iscale, l_min, flat


def _error_term(diff: np.ndarray, use_mad: bool) -> None:
    """make_qkx2_quants' ``diff = use_mad ? fabsf(diff) : diff*diff``, in place (Q2_K's plain
    path measures the absolute error)."""
    if use_mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff


def _qkx_search(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                 xmin: np.ndarray, xmax: np.ndarray, sum_w: np.ndarray, sum_x: np.ndarray,
                 mn: np.ndarray, best_error: np.ndarray, scale: np.ndarray, l_iscale: np.ndarray,
                 l_min: np.ndarray, use_mad: bool = False) -> None:
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
            # iscale*(max-min) = c can round above nmax, or when an updated min lies above max
            # (iscale < 0, and x far below max lands far above nmax); the lower one only when
            # min > x. (numpy's minimum/maximum are much faster against a full array than a scalar)
            if c >= fnmax + F32(0.45) or np.any(mn > xmax):
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
            _error_term(T, use_mad)
            T *= W
            cur_error = seq_sum(T, out=red)
            upd = (D > 0) & (cur_error < best_error)
            if upd.any():
                np.putmask(best_error, upd, cur_error)
                np.putmask(scale, upd, this_scale)
                np.putmask(l_iscale, upd, iscale)
                np.putmask(l_min, upd, mn)
                np.putmask(mn, upd, this_min)


def search_L_affine(Xs: np.ndarray, l_iscale, l_min, flat, nmax: int) -> np.ndarray:
    """Recompute the L kept by make_qkx2_quants for the given sub-blocks (``Xs``: ``[k, 32]``)."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.subtract(Xs, l_min[:, None], dtype=F32)
        t *= l_iscale[:, None]
        t[flat] = 0
        return nearest_int_u8(t, 0, nmax)


# --------------------------------------------------------------------------------------------
# make_qx_quants (symmetric, rmse_type 1)
# --------------------------------------------------------------------------------------------

def qx(X: np.ndarray, nmax: int, W: np.ndarray | None = None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for ``S`` sub-blocks at once.

    ``X``: ``[n, S]`` float32 C-contiguous; ``W``: the weights ``qw`` in the same layout (None:
    ``x*x``, the C default for rmse_type 1). Returns ``(scale, l_iscale, zero)``: the returned
    scale, the iscale of the kept ``L`` (``L = nmax + clamp(nearest_int(l_iscale*x), -nmax,
    nmax-1)``) and a mask of the all-(near-)zero sub-blocks (whose L is all 0).
    """
    n, S = X.shape
    fnmax = F32(nmax)
    amax, mx = signed_absmax(X, axis=0)  # max = the signed x of the first largest |x|
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1.0), mx)  # keep the zero sub-blocks finite; masked at the end

    Wt = np.multiply(X, X, out=scratch("W", X.shape)) if W is None else W   # w = x*x or qw
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


def qx_L(X: np.ndarray, l_iscale: np.ndarray, zero: np.ndarray, nmax: int) -> np.ndarray:
    """The ``L`` (``0 .. 2*nmax-1``, uint8) that :func:`qx` kept, for groups ``X`` ``[S, n]``
    (group-major) with its ``l_iscale`` and ``zero`` mask."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.multiply(X, l_iscale[:, None], dtype=F32)
        L = nearest_int_u8(t, -nmax, nmax - 1, nmax)
    L[zero] = 0
    return L


# --------------------------------------------------------------------------------------------
# make_qp_quants (non-negative values on 0..nmax, weighted) for the K-quants' scales of scales
# --------------------------------------------------------------------------------------------

def _cmax(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C's ``MAX(a, b)`` = ``a > b ? a : b`` (a NaN ``b`` wins, a NaN ``a`` loses)."""
    return np.where(a > b, a, b)


def qp(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights=w)`` for ``B`` groups: ``x``, ``w``
    ``[B, n]`` float32 (group-major; ``n`` is 8 or 16 here, so the loops over it stay in Python
    and each step works on ``[B]`` vectors). Returns ``(scale [B], L [B, n] uint8)``.

    ``L`` is a ``uint8_t`` array in C: a negative level wraps (only reachable with negative or
    NaN inputs) and is read back wrapped in the refinement rounds, as here.
    """
    B, n = x.shape
    fnmax = F32(nmax)
    cols = [np.ascontiguousarray(x[:, i]) for i in range(n)]
    ws = [np.ascontiguousarray(w[:, i]) for i in range(n)]
    mx = np.zeros(B, dtype=F32)
    for c in cols:
        mx = _cmax(mx, c)
    blank = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.divide(fnmax, mx, dtype=F32)
        scale = np.divide(F32(1.0), iscale, dtype=F32)
        best = np.zeros(B, dtype=F32)
        for c, wi in zip(cols, ws):
            l0 = (nearest_int(iscale * c) & 0xFF).astype(F32)
            diff = c - scale * l0
            best += wi * diff * diff
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = np.divide(F32(F32(F32(0.1) * F32(step)) + fnmax), mx, dtype=F32)
            scale_is = np.divide(F32(1.0), iscale_is, dtype=F32)
            mse = np.zeros(B, dtype=F32)
            for c, wi in zip(cols, ws):
                li = np.minimum(nearest_int(iscale_is * c), nmax).astype(F32)
                diff = c - scale_is * li
                mse += wi * diff * diff
            upd = mse < best
            np.putmask(best, upd, mse)
            np.putmask(iscale, upd, iscale_is)
        L = np.empty((B, n), dtype=np.int32)
        sumlx = np.zeros(B, dtype=F32)
        suml2 = np.zeros(B, dtype=F32)
        for i, (c, wi) in enumerate(zip(cols, ws)):
            li = np.minimum(nearest_int(iscale * c), nmax)
            L[:, i] = li & 0xFF
            lf = li.astype(F32)
            sumlx += wi * c * lf
            suml2 += wi * lf * lf
        for _ in range(5):
            changed = False
            for i, (c, wi) in enumerate(zip(cols, ws)):
                Li = L[:, i].astype(F32)
                slx = sumlx - wi * c * Li
                sl2 = suml2 - wi * Li * Li
                ok = (slx > 0) & (sl2 > 0)
                if not ok.any():
                    continue
                new_l = np.minimum(nearest_int(c * sl2 / slx), nmax)
                ok &= new_l != L[:, i]
                nf = new_l.astype(F32)
                slx = slx + wi * c * nf
                sl2 = sl2 + wi * nf * nf
                ok &= slx * slx * suml2 > sumlx * sumlx * sl2
                if ok.any():
                    changed = True
                    L[ok, i] = new_l[ok] & 0xFF
                    np.putmask(sumlx, ok, slx)
                    np.putmask(suml2, ok, sl2)
            if not changed:  # no group changed: later rounds cannot change one either
                break
        out = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(F32)
    out[blank] = 0
    L[blank] = 0
    return out, L.astype(np.uint8)
