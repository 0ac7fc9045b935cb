"""Float32 helpers shared by the ggml block quantizers.

Everything here reproduces the exact float32 semantics of llama.cpp's C reference code
(``ggml/src/ggml-quants.c``): IEEE single-precision arithmetic, round-half-to-even fp16
conversion, the ``nearest_int`` bit trick, and C ``roundf``.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

F32 = np.float32

#: 1.5 * 2**23: adding it to a float32 of magnitude < 2**22 leaves round-half-even(x) in the mantissa.
_MAGIC = F32(12582912.0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp ``nearest_int`` bit for bit (int32), including its behaviour outside +-2**22.

    ``val = fval + 12582912.f`` in float32, then ``(bits(val) & 0x7fffff) - 0x400000``.
    Inside the documented range this is float32 round-half-to-even.
    """
    t = np.add(v, _MAGIC, dtype=F32)
    i = t.view(np.int32)
    np.bitwise_and(i, 0x007FFFFF, out=i)
    np.subtract(i, 0x00400000, out=i)
    return i


_NI_LIMIT = F32(4194303.0)


def nearest_int_u8(v: np.ndarray, lo: int, hi: int, offset: int = 0) -> np.ndarray:
    """``(uint8)(MAX(lo, MIN(hi, nearest_int(v))) + offset)`` exactly as the C code computes it.

    Fast path (every ``|v| <= 4194303``, where ``nearest_int`` is round-half-even): clamp in
    float (exact, since rounding is monotonic and the bounds are integers), then add
    ``12582912 + offset``: in [2**23, 2**24) the float32 sum rounds to an integer half-to-even
    (``offset`` is even, so ties resolve as for ``v`` alone), and its low mantissa byte is the
    result. Otherwise (or with NaN/inf around) emulate the bit trick exactly in int32.
    """
    assert offset % 2 == 0 and 0 <= lo + offset and hi + offset <= 255
    if v.size and v.min() >= -_NI_LIMIT and v.max() <= _NI_LIMIT:
        t = np.clip(v, F32(lo), F32(hi))
        t += F32(12582912 + offset)
        return t.view(np.uint32).astype(np.uint8)
    return (np.clip(nearest_int(v), lo, hi) + offset).astype(np.uint8)


def signed_absmax(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(amax, max)`` along ``axis`` of a 2-D ``x``: the largest ``|x|`` and the signed ``x`` that first
    reaches it (C: ``if (fabsf(x[i]) > amax) {amax = fabsf(x[i]); max = x[i];}``).

    Where every element is 0, ``max`` is the maximum (a zero of either sign; callers that care
    about the C initial value +0.0 must fix it up)."""
    pmax = x.max(axis=axis)
    nmin = x.min(axis=axis)
    neg = np.negative(nmin)
    amax = np.maximum(pmax, neg)
    mx = np.where(neg > pmax, nmin, pmax)
    tie = (neg == pmax) & (pmax != 0)
    if tie.any():  # both +a and -a present: the one that comes first wins
        idx = np.flatnonzero(tie)
        sub = np.take(x, idx, axis=1 - axis)  # x is 2-D
        first = np.abs(sub).argmax(axis=axis)
        mx[idx] = np.take_along_axis(sub, np.expand_dims(first, axis), axis=axis).squeeze(axis)
    nan = np.isnan(amax)
    if nan.any():  # `fabsf(NaN) > amax` is false: C never picks a NaN (Q3_K's scales of scales)
        idx = np.flatnonzero(nan)
        sub = np.take(x, idx, axis=1 - axis)
        amax[idx], mx[idx] = signed_absmax(np.where(np.isnan(sub), F32(0.0), sub), axis)
    return amax, mx


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` (round half away from zero), exact for float32 input; returns float32."""
    t = np.trunc(v)
    frac = np.subtract(v, t)  # exact
    up = np.abs(frac) >= F32(0.5)
    return np.where(up, t + np.copysign(F32(1.0), v), t).astype(F32, copy=False)


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> IEEE fp16 (round-half-even, like ``GGML_FP32_TO_FP16``) as a uint16 view."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def seq_sum(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Sum a C-contiguous ``[k, S]`` float32 array over axis 0 in strict element order.

    ``np.add.reduce`` over the outer (non-contiguous) axis adds whole rows one after another,
    which is exactly C's ``acc += term`` loop for every column; numpy's pairwise summation is only
    used along a contiguous reduction axis, which we avoid by requiring ``S >= 2``.
    """
    if a.shape[1] < 2 or not a.flags.c_contiguous:
        acc = np.array(a[0], dtype=F32, copy=True)
        for i in range(1, a.shape[0]):
            np.add(acc, a[i], out=acc)
        if out is not None:
            out[...] = acc
            return out
        return acc
    return np.add.reduce(a, axis=0, out=out)


def transposed(a: np.ndarray, n: int, name: str = "X") -> np.ndarray:
    """The ``n``-element groups (blocks, sub-blocks) of ``a`` as a C-contiguous ``[n, groups]``
    scratch array: the layout in which every per-element step of the C loops is one numpy
    operation over all groups and every C accumulation is :func:`seq_sum`."""
    T = scratch(name, (n, a.size // n))
    np.copyto(T, a.reshape(-1, n).T)
    return T


def superblock_sum_sq(xb: np.ndarray) -> np.ndarray:
    """``sum x[j]*x[j]`` over each 256-element super-block (row) of ``xb`` ``[B, 256]``, in element
    order: the start of every importance-weighted K-quant and IQ4 search's ``sigma2``."""
    return seq_sum(transposed(np.square(xb, dtype=F32), xb.shape[1], "XT256"))


def quiet(fn):
    """Run a block function with float warnings off: zero, subnormal or huge blocks divide by
    zero or overflow exactly like the C code does. (``np.errstate`` is per thread, so it has to
    be set inside the worker.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapper


_tls = threading.local()


def scratch(name: str, shape: tuple[int, ...], fill: float | None = None, dtype=F32) -> np.ndarray:
    """A per-thread work buffer (float32 unless ``dtype``), reused from chunk to chunk.

    Fresh large allocations are mmapped and page-faulted on first touch, which costs as much as
    several arithmetic passes; reusing buffers keeps them hot in cache. The memory is kept per
    name (so a name serves one array at a time) and handed out as a C-contiguous view of the
    requested shape, so chunks of other sizes (a tensor's last chunk, the next tensor, a
    compacted subset) reuse it too. With ``fill`` the buffer is a constant array (filled once,
    must not be written to by the caller).
    """
    cache = getattr(_tls, "bufs", None)
    if cache is None:
        cache = _tls.bufs = {}
    key = (name, fill, np.dtype(dtype).char)
    size = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=dtype)
        if fill is not None:
            buf.fill(fill)
        cache[key] = buf
    return buf[:size].reshape(shape)
