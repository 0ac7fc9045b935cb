"""The non-linear 4-bit types IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks).

Reproduces, bit for bit, what ``ggml_quantize_chunk`` writes for them in llama.cpp's
``ggml/src/ggml-quants.c``: ``quantize_iq4_nl`` / ``quantize_iq4_xs``, i.e.
``quantize_row_iq4_nl_impl(super_block_size, 32, ..., kvalues_iq4nl, qw, ntry=7)`` per block,
with and without an imatrix. (Without one, ``ggml_quantize_chunk`` does not run
``quantize_row_iq4_nl_ref``, whose ``ntry = -1`` skips the search: it runs the same search
weighted by ``x*x``.)

Each 32-element sub-block's elements are mapped to the 16 signed levels ``kvalues_iq4nl`` by
``best_index_int8``; the scale search tries 16 candidate scales and keeps the least-squares one
that fits best. IQ4_NL stores that scale as fp16; IQ4_XS stores each sub-block's scale as a
6-bit multiple of ``-max_scale/32``. Either way the levels are finally re-chosen from the stored
scale (the search's levels are never kept).

Layout (as in :mod:`._kquants`): the sub-blocks of a chunk are transposed to ``[32, S]``, so each
per-element C step is one numpy operation over ``S`` sub-blocks and each C accumulation is
:func:`seq_sum` (rows added in element order, the same float32 additions as C).

``best_index_int8`` is a table lookup: every threshold between two adjacent levels falls on a
multiple of 1/2 (checked when the table is built), so the level index of ``al`` depends only on
``floor(2*al)``. That is a float multiply, a floor and one gather per element instead of a
binary search.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._common import F32, fp16_bits, nearest_int, quiet, scratch, seq_sum, signed_absmax, superblock_sum_sq, transposed
from ._kernel import Kernel
from ._search import GROUP_MAX_EPS, importance_weights

QK_K = 256
_N = 32      # elements per (sub-)block
NTRY = 7     # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7

#: ``kvalues_iq4nl`` (ggml-common.h): the 16 levels, sorted.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                   dtype=np.int8)
_V = KVALUES.astype(F32)
_V0 = int(KVALUES[0])


def best_index_int8(x: float) -> int:
    """llama.cpp ``best_index_int8(16, kvalues_iq4nl, x)`` for one float32 ``x``: the nearest
    level by bisection, a tie (in float32 differences) going to the upper level; ``x <= -127``
    gives 0, ``x >= 113`` and NaN give 15."""
    x = F32(x)
    if x <= _V[0]:
        return 0
    if x >= _V[-1]:
        return len(_V) - 1
    ml, mu = 0, len(_V) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < _V[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if F32(x - _V[mu - 1]) < F32(_V[mu] - x) else mu


# Half-unit bins b = floor(2*al). In the search every |al| <= 134*(1+2**-24)**2 when the sub-block's
# amax is finite (|id| <= 134/amax up to rounding and |x| <= amax; the skipped sub-blocks search
# with max = 1 and |x| < GROUP_MAX_EPS), so b lies in [-269, 268]; negative b index the table from
# its end.
_HALF = 272
_LO_BIN, _HI_BIN = 2 * _V0, 2 * int(KVALUES[-1])  # al <= -127 -> index 0, al >= 113 -> 15


def _lut() -> np.ndarray:
    """``best_index_int8`` of each half-unit bin ``[b/2, (b+1)/2)``, as uint8 ``[2*_HALF]``.

    The function is monotone in ``x``, so a bin whose first and last float32 give the same index
    maps entirely to it; the build fails if some bin straddles a threshold."""
    lut = np.empty(2 * _HALF, dtype=np.uint8)
    for b in range(-_HALF, _HALF):
        i = best_index_int8(F32(b / 2))
        if best_index_int8(np.nextafter(F32((b + 1) / 2), F32(-np.inf))) != i:
            raise AssertionError(f"a best_index_int8 threshold falls inside [{b / 2}, {(b + 1) / 2})")
        lut[b] = i
    return lut


_LUT_I = _lut()
_LUT_Q = _V[_LUT_I]


def _bins(al: np.ndarray, bounded: bool) -> np.ndarray:
    """``floor(2*al)`` as table indices (intp, same shape). ``bounded``: every ``al`` is finite and
    within the table; otherwise ``al`` is first clamped to [-127, 113] (NaN to 113, as
    best_index_int8 sends it to the top level)."""
    a2 = np.multiply(al, F32(2.0), out=scratch("a2", al.shape))
    if not bounded:
        np.fmin(a2, F32(_HI_BIN), out=a2)
        np.fmax(a2, F32(_LO_BIN), out=a2)
    np.floor(a2, out=a2)
    idx = scratch("bins", al.shape, dtype=np.intp)
    idx[...] = a2
    return idx


def best_index(al: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues_iq4nl, al)`` elementwise, for any float32 ``al`` (uint8)."""
    return _LUT_I[_bins(al, False)]


def _scales(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The scale ``d`` that ``quantize_row_iq4_nl_impl``'s search (``ntry > 0``) picks for each
    sub-block of ``X`` ``[32, S]`` with weights ``W`` ``[32, S]`` (``scales[ib]``; 0 for a
    sub-block whose ``amax < GROUP_MAX_EPS``)."""
    amax, mx = signed_absmax(X, axis=0)  # max = the signed x of the first largest |x|
    skip = amax < GROUP_MAX_EPS
    mx[skip] = 1  # keep the skipped sub-blocks finite; their scale is set to 0 at the end
    # with every amax finite (and >= GROUP_MAX_EPS), id*x stays within the bin table
    bounded = bool(np.isfinite(amax).all())
    WQ = scratch("WQ", X.shape)
    T = scratch("T", X.shape)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(X, iscale, out=T)             # al = id*x
        q = _LUT_Q[_bins(T, bounded)]             # values[best_index_int8(al)]
        np.multiply(W, q, out=WQ)                 # w*q
        np.multiply(WQ, X, out=T)
        sumqx = seq_sum(T)                        # sum (w*q)*x
        np.multiply(WQ, q, out=T)
        return sumqx, seq_sum(T)                  # sum (w*q)*q

    d = np.divide(np.negative(mx), F32(_V0), dtype=F32)  # d = -max/values[0]
    sumqx, sumq2 = sums(np.divide(F32(1.0), d, dtype=F32))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0.0)).astype(F32)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(np.divide(F32(itry + _V0), mx, dtype=F32))
        upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if upd.any():
            new_d = sumqx / sumq2
            np.putmask(d, upd, new_d)
            np.putmask(best, upd, new_d * sumqx)
    d[skip] = 0
    return d


def _weights(X: np.ndarray, qw: np.ndarray | None, sigma2: Callable[[], np.ndarray]) -> np.ndarray:
    """The search weights ``[32, S]``: ``x*x`` without an imatrix, else ``qw*sqrtf(sigma2 + x*x)``
    (``qw`` ``[S, 32]``; ``sigma2()`` gives each sub-block's super-block ``sigma2`` ``[S]``)."""
    if qw is None:
        return np.multiply(X, X, out=scratch("W", X.shape))
    QW = scratch("QW", X.shape)
    np.copyto(QW, qw.T)
    return importance_weights(X, QW, sigma2())


def _inverse(d: np.ndarray) -> np.ndarray:
    """C ``d ? 1/d : 0`` (NaN is true)."""
    return np.where(d != 0, np.divide(F32(1.0), d, dtype=F32), F32(0.0)).astype(F32)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """``q4[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4``: ``L`` ``[B, k*32]`` -> ``[B, k*16]``."""
    Lr = L.reshape(L.shape[0], -1, 2, 16)
    return (Lr[:, :, 0] | (Lr[:, :, 1] << 4)).reshape(L.shape[0], -1)


@quiet
def iq4_nl(xb: np.ndarray, out: np.ndarray, qw: np.ndarray | None) -> None:
    """``quantize_iq4_nl`` for blocks ``xb`` ``[B, 32]`` (``qw`` ``[B, 32]`` or None) into ``out``
    ``[B, 18]``: ``d`` fp16, then 16 nibble bytes."""
    B = xb.shape[0]
    X = transposed(xb, _N)
    W = _weights(X, qw, lambda: seq_sum(np.square(X, out=scratch("X2", X.shape))) * F32(2.0 / _N))
    d = _scales(X, W)
    L = best_index(xb * _inverse(d)[:, None])
    out[:, 0:2] = fp16_bits(d).view(np.uint8).reshape(B, 2)
    out[:, 2:18] = _pack_nibbles(L)


def _sigma2_xs(xb: np.ndarray) -> np.ndarray:
    """``sigma2 = (sum x*x over the super-block, in element order) * 2/256`` for each sub-block."""
    return np.repeat(superblock_sum_sq(xb) * F32(2.0 / QK_K), QK_K // _N)


@quiet
def iq4_xs(xb: np.ndarray, out: np.ndarray, qw: np.ndarray | None) -> None:
    """``quantize_iq4_xs`` for super-blocks ``xb`` ``[B, 256]`` (``qw`` ``[B, 256]`` or None) into
    ``out`` ``[B, 136]``: ``d`` fp16, ``scales_h`` uint16, ``scales_l`` [4], ``qs`` [128]."""
    B = xb.shape[0]
    nsub = QK_K // _N
    X = transposed(xb, _N)
    W = _weights(X, None if qw is None else qw.reshape(-1, _N), lambda: _sigma2_xs(xb))
    scales = _scales(X, W).reshape(B, nsub)
    # `if (fabsf(d) > amax_scale) {amax_scale = fabsf(d); max_scale = d;}` from 0: the first
    # largest |d| wins, NaN never does (fmax drops it)
    ad = np.fmax(np.abs(scales), F32(0.0))
    first = ad.argmax(axis=1)
    rows = np.arange(B)
    max_scale = np.where(ad[rows, first] > 0, scales[rows, first], F32(0.0)).astype(F32)
    d = np.divide(np.negative(max_scale), F32(32.0), dtype=F32)
    l = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.astype(F32)
    L = best_index(xb.reshape(B, nsub, _N) * _inverse(dl)[:, :, None]).reshape(B, QK_K)
    ls = (l + 32).astype(np.uint8)
    h = np.bitwise_or.reduce((ls >> 4).astype(np.uint16) << (2 * np.arange(nsub, dtype=np.uint16)), axis=1)
    out[:, 0:2] = fp16_bits(d).view(np.uint8).reshape(B, 2)
    out[:, 2:4] = h.astype("<u2").view(np.uint8).reshape(B, 2)
    out[:, 4:8] = (ls[:, 0::2] & 0x0F) | ((ls[:, 1::2] & 0x0F) << 4)
    out[:, 8:136] = _pack_nibbles(L)


def _kernel(fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None]) -> Kernel:
    """Both paths are the same search; without an imatrix it weighs by ``x*x``."""
    return Kernel(plain=lambda xb, out: fn(xb, out, None),
                  weighted=lambda xb, out, qw, row_ms: fn(xb, out, qw))


IQ4: dict[str, Kernel] = {"IQ4_NL": _kernel(iq4_nl), "IQ4_XS": _kernel(iq4_xs)}
