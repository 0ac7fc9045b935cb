"""The 32-element "legacy" ggml types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Reproduces ``quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref`` from llama.cpp's ggml-quants.c (the
path ``ggml_quantize_chunk`` takes without an importance matrix; ``quantize_q8_0`` always takes it)
and, with one, ``quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl``: the scale searches of
:mod:`._search` weighted by ``qw * sqrt(sigma2 + x^2)``, ``sigma2`` the mean square of the row.
Each function maps float32 blocks ``[nb, 32]`` to the packed block bytes ``[nb, block_bytes]``.

The per-block reductions (max, min) run on a transposed ``[32, nb]`` copy, where numpy reduces over
the outer axis much faster than over 32-element rows; the per-element arithmetic runs in the
original layout so the packed bytes need no transposition. None of these types needs an ordered
float sum, only exact per-element arithmetic.
"""

from __future__ import annotations

import numpy as np

from ._common import F32, fp16_bits, quiet, scratch, signed_absmax, transposed
from ._kernel import Kernel
from ._search import first_extreme, importance_weights, qkx, qx, qx_L, search_L_affine


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` in float32."""
    inv = np.divide(F32(1.0), d, dtype=F32)
    inv[d == 0] = 0
    return inv


def _signed_absmax0(XT: np.ndarray) -> np.ndarray:
    """Per block (column), the value with the largest magnitude, the first one on ties.

    Like the C loop (``if (amax < fabsf(v)) {amax = fabsf(v); max = v;}`` from ``max = 0.0f``),
    an all-zero block yields +0.0 whatever the signs of its zeros.
    """
    amax, mx = signed_absmax(XT, axis=0)
    mx[amax == 0] = 0
    return mx


def _cast_i8(v: np.ndarray) -> np.ndarray:
    """C float -> int8_t conversion: truncation toward zero; on x86 (cvttss2si) NaN/inf/huge
    values become INT_MIN, whose low byte is 0 -- reproduced by going through int32."""
    i32 = scratch("Li32", v.shape, dtype=np.int32)
    np.copyto(i32, v, casting="unsafe")
    q = scratch("Li8", v.shape, dtype=np.int8)
    np.copyto(q, i32, casting="unsafe")
    return q


def _min_i8(q: np.ndarray, hi: int) -> None:
    """In-place ``q = MIN(hi, q)`` (numpy is much faster against an array than a scalar)."""
    np.minimum(q, scratch("min_i8", q.shape, fill=hi, dtype=np.int8), out=q)


def _fields(out: np.ndarray, layout: dict[str, tuple[int, str]]) -> np.ndarray:
    """The blocks ``out`` ``[nb, block_bytes]`` as a 1-D structured array with the fields
    ``name: (byte offset, dtype)``. Storing a field is one strided 1-D copy, several times faster
    than a 2-D slice assignment such as ``out[:, 0:2] = ...``, which loops per block."""
    names = list(layout)
    dt = np.dtype({"names": names, "formats": [layout[k][1] for k in names],
                   "offsets": [layout[k][0] for k in names], "itemsize": out.shape[1]})
    return out.view(dt).reshape(-1)


def _qs_layout(col: int) -> dict[str, tuple[int, str]]:
    """The 16 nibble bytes at ``col``, as two 8-byte words."""
    return {"qs0": (col, "<u8"), "qs1": (col + 8, "<u8")}


_LO_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def _put_nibbles(fields: np.ndarray, q: np.ndarray) -> None:
    """``qs[j] = q[j] & 0xF | (q[j + 16] & 0xF) << 4`` into fields ``qs0``/``qs1`` of each block.

    Done on 8-byte words: word w of a block holds quants 8w..8w+7, so words 0-1 are the low
    halves and words 2-3 the high halves of the 16 output bytes.
    """
    w = q.view("<u8")  # [nb, 4]
    for k, name in enumerate(("qs0", "qs1")):
        nib = w[:, k + 2] << np.uint64(4)
        nib &= ~_LO_NIBBLES
        nib |= w[:, k] & _LO_NIBBLES
        fields[name] = nib


_BITGATHER = np.uint64(0x0102040810204080)


def _put_high_bits(fields: np.ndarray, q: np.ndarray) -> None:
    """Bit 4 of quant j in bit j of the little-endian uint32 field ``qh`` of each block."""
    h = scratch("Lh", q.shape, dtype=np.uint8)
    np.right_shift(q, 4, out=h)
    h &= 1
    h64 = h.view("<u8")  # [nb, 4]: 8 bytes of 0/1 each
    # multiplying gathers byte k's bit into bit 56+k; the top byte is the packed byte
    h64 *= _BITGATHER
    h64 >>= np.uint64(56)
    fields["qh"] = h64.astype(np.uint8).view("<u4").reshape(-1)


def _scaled(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``x * (d ? 1/d : 0)`` per block, in a scratch buffer."""
    return np.multiply(x, _inv(d)[:, None], out=scratch("Lv", x.shape))


_HALF_DOWN = np.nextafter(F32(0.5), F32(0.0))  # 0.49999997f


@quiet
def q8_0(x: np.ndarray, out: np.ndarray) -> None:
    XT = transposed(x, 32, "LX")
    amax = np.maximum(XT.max(axis=0), np.negative(XT.min(axis=0)))
    amax += F32(0.0)  # MAX(0.0f, fabsf(v)) is never -0.0
    d = np.divide(amax, F32(127.0), dtype=F32)
    v = _scaled(x, d)
    # C roundf (half away from zero): trunc(v + copysign(0.49999997f, v)) is exact for
    # |v| < 2**22, and here |v| <= 127 * (1 + 2**-23) (or inf/NaN when 1/d overflows, where the
    # casts give the same bytes as C's on x86).
    v += np.copysign(_HALF_DOWN, v, out=scratch("Lc", v.shape))
    out[:, 2:34] = _cast_i8(v).view(np.uint8)
    _fields(out, {"d": (0, "<u2")})["d"] = fp16_bits(d)


def _symmetric(x: np.ndarray, nmax: int, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: ``d = max / -nmax``; ``q = MIN(2*nmax-1, (int8_t)(x*id + bias))``."""
    mx = _signed_absmax0(transposed(x, 32, "LX"))
    d = np.divide(mx, F32(-nmax), dtype=F32)
    v = _scaled(x, d)
    v += F32(bias)
    q = _cast_i8(v)
    _min_i8(q, 2 * nmax - 1)  # MIN(15 or 31, (int8_t)(.)), then stored as uint8
    return d, q.view(np.uint8)


@quiet
def q4_0(x: np.ndarray, out: np.ndarray) -> None:
    d, q = _symmetric(x, 8, 8.5)
    f = _fields(out, {"d": (0, "<u2"), **_qs_layout(2)})
    f["d"] = fp16_bits(d)
    _put_nibbles(f, q)


@quiet
def q5_0(x: np.ndarray, out: np.ndarray) -> None:
    d, q = _symmetric(x, 16, 16.5)
    f = _fields(out, {"d": (0, "<u2"), "qh": (2, "<u4"), **_qs_layout(6)})
    f["d"] = fp16_bits(d)
    _put_high_bits(f, q)
    _put_nibbles(f, q)


def _affine(x: np.ndarray, nmax: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: ``d = (max - min) / nmax``; ``q = (uint8)((x - min)*id + 0.5f)``, and for
    Q4_1 ``MIN(15, (int8_t)(.))`` (kept for fidelity; it cannot bind for finite input)."""
    XT = transposed(x, 32, "LX")
    mn = first_extreme(XT, XT.min(axis=0))
    mx = first_extreme(XT, XT.max(axis=0))
    d = np.divide(mx - mn, F32(nmax), dtype=F32)
    v = np.subtract(x, mn[:, None], out=scratch("Lv", x.shape))
    v *= _inv(d)[:, None]
    v += F32(0.5)
    q = _cast_i8(v)
    if clamp:
        _min_i8(q, nmax)
    return d, mn, q.view(np.uint8)


@quiet
def q4_1(x: np.ndarray, out: np.ndarray) -> None:
    d, mn, q = _affine(x, 15, True)
    f = _fields(out, {"d": (0, "<u2"), "m": (2, "<u2"), **_qs_layout(4)})
    f["d"] = fp16_bits(d)
    f["m"] = fp16_bits(mn)
    _put_nibbles(f, q)


@quiet
def q5_1(x: np.ndarray, out: np.ndarray) -> None:
    d, mn, q = _affine(x, 31, False)
    f = _fields(out, {"d": (0, "<u2"), "m": (2, "<u2"), "qh": (4, "<u4"), **_qs_layout(8)})
    f["d"] = fp16_bits(d)
    f["m"] = fp16_bits(mn)
    _put_high_bits(f, q)
    _put_nibbles(f, q)


# ------------------------------------------------------------------ with an importance matrix

def _weighted_search_input(x: np.ndarray, qw: np.ndarray, row_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blocks transposed to ``[32, nb]`` and their search weights ``qw*sqrt(sigma2 + x^2)``,
    ``sigma2`` being the mean square of the block's whole row (``quantize_row_q*_impl``)."""
    X = transposed(x, 32, "LX")
    QW = scratch("LQW", X.shape)
    np.copyto(QW, qw.T)
    return X, importance_weights(X, QW, row_ms)


def _symmetric_weighted(x: np.ndarray, qw: np.ndarray, row_ms: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0 with an imatrix: ``make_qx_quants(32, nmax, x, L, 1, weights)``; the levels are
    the search's own (no re-rounding with the fp16 scale). Returns (d [nb], q [nb, 32] uint8)."""
    X, W = _weighted_search_input(x, qw, row_ms)
    d, l_iscale, zero = qx(X, nmax, W)
    return d, qx_L(x, l_iscale, zero, nmax)


def _affine_weighted(x: np.ndarray, qw: np.ndarray, row_ms: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1 with an imatrix: ``make_qkx3_quants(32, nmax, x, weights, L, &min, Laux, -0.9f,
    0.05f, 36, false)``. Returns (d [nb], m [nb] = the fitted offset, q [nb, 32] uint8)."""
    X, W = _weighted_search_input(x, qw, row_ms)
    d, the_min, l_iscale, l_min, flat = qkx(X, W, nmax, -0.9, 0.05, 36)
    return d, np.negative(the_min), search_L_affine(x, l_iscale, l_min, flat, nmax)


@quiet
def q4_0_w(x: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms: np.ndarray) -> None:
    d, q = _symmetric_weighted(x, qw, row_ms, 8)
    f = _fields(out, {"d": (0, "<u2"), **_qs_layout(2)})
    f["d"] = fp16_bits(d)
    _put_nibbles(f, q)


@quiet
def q5_0_w(x: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms: np.ndarray) -> None:
    d, q = _symmetric_weighted(x, qw, row_ms, 16)
    f = _fields(out, {"d": (0, "<u2"), "qh": (2, "<u4"), **_qs_layout(6)})
    f["d"] = fp16_bits(d)
    _put_high_bits(f, q)
    _put_nibbles(f, q)


@quiet
def q4_1_w(x: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms: np.ndarray) -> None:
    d, mn, q = _affine_weighted(x, qw, row_ms, 15)
    f = _fields(out, {"d": (0, "<u2"), "m": (2, "<u2"), **_qs_layout(4)})
    f["d"] = fp16_bits(d)
    f["m"] = fp16_bits(mn)
    _put_nibbles(f, q)


@quiet
def q5_1_w(x: np.ndarray, out: np.ndarray, qw: np.ndarray, row_ms: np.ndarray) -> None:
    d, mn, q = _affine_weighted(x, qw, row_ms, 31)
    f = _fields(out, {"d": (0, "<u2"), "m": (2, "<u2"), "qh": (4, "<u4"), **_qs_layout(8)})
    f["d"] = fp16_bits(d)
    f["m"] = fp16_bits(mn)
    _put_high_bits(f, q)
    _put_nibbles(f, q)


LEGACY = {
    "Q8_0": Kernel(q8_0),  # quantize_q8_0 ignores the imatrix
    "Q4_0": Kernel(q4_0, q4_0_w, row_ms=True),
    "Q4_1": Kernel(q4_1, q4_1_w, row_ms=True),
    "Q5_0": Kernel(q5_0, q5_0_w, row_ms=True),
    "Q5_1": Kernel(q5_1, q5_1_w, row_ms=True),
}
