"""The grid of a quantized ggml tensor, apart from its levels: for rounding onto fixed scales.

GPTQ and AWQ choose each weight's quantized value themselves (GPTQ one column at a time, feeding
the rounding error of each column into the ones not yet rounded), but the result has to be a
valid llama.cpp block format. They do it in three steps: quantize the weights once with
:func:`qconv.core.ggml.quantize` to fix every group's scale and offset (the fp16 super-scales and
the packed 4/6/8-bit sub-block scales of the K-quants), read that grid with :func:`block_grid`,
round onto it with their own error feedback, and write the chosen levels into the same bytes with
:func:`with_levels`, which leaves every scale byte alone. :func:`levels` reads the levels back.

Every type is split as::

    w_hat[r, j] = scale[r, j // group] * values[L[r, j]] + offset[r, j // group]   (float32)

(``offset`` None: the symmetric types, no term). ``values`` is ascending, so a level index ``L``
orders the values of the grid; ``scale`` is the float32 step of each group exactly as llama.cpp's
``dequantize_row_<type>`` computes it (e.g. Q4_K's ``d * sc``), and ``offset`` the negated min
(Q4_K's ``-(dmin * m)``; ``s*v + (-m)`` is ``s*v - m`` exactly in IEEE arithmetic). With these
operations in this order, :meth:`BlockGrid.dequantize` reproduces that C dequantizer, and
gguf-py's, bit for bit. ``scale`` may be negative or zero (Q4_0's ``d = max / -8``, Q3_K's and
IQ4_XS's signed 6-bit sub-scales, an all-zero group), and is whatever fp16 holds, inf or NaN
included: a caller rounding ``w / scale`` must expect both signs.

The level bits of every type fill whole bytes (``qs``, ``qh``, ``ql``, ``hmask``) that hold
nothing else, so each type is described by where each element's bit fields lie in those bytes
(:class:`_Field`, taken from the index arithmetic of the dequantizers) and reading or writing
levels is a gather or a scatter of bit fields, vectorised over all blocks at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import _name, block_size
from ._iq4 import KVALUES
from ._kquants import _unpack_scales_k4

__all__ = ["BlockGrid", "block_grid", "levels", "with_levels"]

F32 = np.float32
QK_K = 256


@dataclass(frozen=True, eq=False)
class BlockGrid:
    """What the non-level bytes of a tensor mean: ``w_hat = scale[r, g] * values[L] + offset[r, g]``.

    ``scale``: float32 ``[rows, n // group]``, the effective step of each group (sub-block);
    ``offset``: float32 ``[rows, n // group]``, or None for the symmetric types; ``values``:
    float32 ``[n_levels]``, strictly ascending, level index -> value in units of ``scale``;
    ``group``: elements per group.
    """

    scale: np.ndarray
    offset: np.ndarray | None
    values: np.ndarray
    group: int

    def dequantize(self, L: np.ndarray) -> np.ndarray:
        """float32 ``w_hat`` ``[rows, n]`` of level indices ``L`` ``[rows, n]`` on this grid, with
        the dequantizer's operations (a product, then the offset added)."""
        rows, groups = self.scale.shape
        w = self.values[L].reshape(rows, groups, self.group) * self.scale[:, :, None]
        if self.offset is not None:
            w += self.offset[:, :, None]
        return w.reshape(rows, groups * self.group)


@dataclass(frozen=True, eq=False)
class _Field:
    """``width``-bit pieces of the level indices packed into bytes ``start .. start + nbytes`` of
    every block: slot ``s`` of byte ``b`` (bits ``s*width ..``) holds bits ``shift ..
    shift + width`` of the index of element ``elems[b * 8 // width + s]``."""

    start: int
    width: int
    shift: int
    elems: np.ndarray  # [block elements], a permutation: the element of each (byte, slot)
    order: np.ndarray  # its inverse: the (byte, slot) of each element

    @property
    def nbytes(self) -> int:
        return self.elems.size * self.width // 8

    @property
    def slots(self) -> np.ndarray:
        """Bit position of each slot within its byte."""
        return np.arange(0, 8, self.width, dtype=np.uint8)


def _field(start: int, width: int, byte: np.ndarray, slot: np.ndarray, shift: int = 0) -> _Field:
    """A field from where each element ``e`` lies: byte ``byte[e]`` (from ``start``), slot
    ``slot[e]``."""
    order = byte * (8 // width) + slot
    elems = np.empty_like(order)
    elems[order] = np.arange(order.size)
    return _Field(start, width, shift, elems, order)


@dataclass(frozen=True, eq=False)
class _Codec:
    """One type: its level fields, its level values, its group size, how to read its grid from
    blocks ``[B, block_bytes]`` (-> scale, offset ``[B, groups per block]``), and ``flip``, XORed
    onto the raw bits to give the level index (Q8_0: its int8 two's complement -> ``q + 128``)."""

    fields: tuple[_Field, ...]
    values: np.ndarray
    group: int
    grid: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    flip: int = 0


# --- reading the headers -----------------------------------------------------------------------

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of each block, as float32 ``[B, 1]`` (GGML_FP16_TO_FP32: exact)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<f2").astype(F32)


def _u16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<u2").astype(np.int32)


def _grid_d(blocks: np.ndarray) -> tuple[np.ndarray, None]:
    """Symmetric 32-element types: ``y = q * d`` (``x0*d`` in C: the int converts to float)."""
    return _f16(blocks, 0), None


def _grid_dm(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: ``y = q*d + m``."""
    return _f16(blocks, 0), _f16(blocks, 2)


def _grid_k4(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: ``d1 = d * sc; m1 = dmin * m; y = d1*q - m1``."""
    ls, lm = _unpack_scales_k4(blocks[:, 4:16])  # get_scale_min_k4 of the 8 sub-blocks
    return _f16(blocks, 0) * ls.astype(F32), -(_f16(blocks, 2) * lm.astype(F32))


def _grid_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, None]:
    """Q6_K: ``y = d * sc[is] * q`` with int8 ``sc``, evaluated left to right: ``(d*sc) * q``."""
    return _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(F32), None


def _grid_q2_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q2_K: ``dl = d * (sc & 0xF); ml = dmin * (sc >> 4); y = dl*q - ml``."""
    sc = blocks[:, 0:16]
    return _f16(blocks, 80) * (sc & 0xF).astype(F32), -(_f16(blocks, 82) * (sc >> 4).astype(F32))


def _grid_q3_k(blocks: np.ndarray) -> tuple[np.ndarray, None]:
    """Q3_K: ``dl = d * (sc6 - 32)``; the 6-bit ``sc6[i]`` has its low nibble in nibble ``i // 8``
    of byte ``i % 8`` and its top 2 bits in bits ``2*(i // 4)`` of byte ``8 + i % 4``."""
    sc = blocks[:, 96:108]
    i = np.arange(16)
    low = (sc[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0x0F
    high = (sc[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    sc6 = (low | (high << 4)).astype(np.int32) - 32
    return _f16(blocks, 108) * sc6.astype(F32), None


def _grid_iq4_xs(blocks: np.ndarray) -> tuple[np.ndarray, None]:
    """IQ4_XS: ``dl = d * (ls - 32)`` per 32-sub-block ``ib``, the 6-bit ``ls`` = nibble ``ib % 2``
    of ``scales_l[ib / 2]`` | bits ``2*ib ..`` of the uint16 ``scales_h``, shifted up by 4."""
    ib = np.arange(8)
    low = (blocks[:, 4 + ib // 2] >> (4 * (ib % 2)).astype(np.uint8)) & 0x0F
    high = (_u16(blocks, 2) >> (2 * ib)) & 3
    ls = (low.astype(np.int32) | (high << 4)) - 32
    return _f16(blocks, 0) * ls.astype(F32), None


# --- where the level bits lie ------------------------------------------------------------------

_E32 = np.arange(32)
_E256 = np.arange(QK_K)


def _nibbles32(start: int) -> _Field:
    """32-element blocks: ``qs[j]`` holds element ``j`` (low nibble) and ``j + 16`` (high)."""
    return _field(start, 4, _E32 % 16, _E32 // 16)


def _qh32(start: int) -> _Field:
    """Q5_0/Q5_1: bit ``j`` of the little-endian uint32 ``qh`` is bit 4 of element ``j``."""
    return _field(start, 1, _E32 // 8, _E32 % 8, shift=4)


def _nibbles_k(start: int) -> _Field:
    """Q4_K/Q5_K: each 64 elements, ``qs[l]`` holds element ``l`` (low nibble) and ``l + 32``."""
    return _field(start, 4, 32 * (_E256 // 64) + _E256 % 32, (_E256 % 64) // 32)


def _bit_planes(start: int, shift: int) -> _Field:
    """Q5_K's ``qh`` and Q3_K's ``hmask``: bit ``k`` of byte ``l`` belongs to element ``32k + l``."""
    return _field(start, 1, _E256 % 32, _E256 // 32, shift)


def _crumbs_k(start: int, shift: int = 0) -> _Field:
    """2-bit fields of Q2_K/Q3_K ``qs`` and Q6_K ``qh``: each 128 elements, bits ``2k`` of byte
    ``l`` belong to element ``32k + l``."""
    return _field(start, 2, 32 * (_E256 // 128) + _E256 % 32, (_E256 % 128) // 32, shift)


def _ql_q6_k() -> _Field:
    """Q6_K ``ql``: each 128 elements (64 bytes), byte ``l`` holds ``l`` and ``l + 64``, byte
    ``32 + l`` holds ``l + 32`` and ``l + 96`` (``l < 32``; low nibble first)."""
    k = (_E256 % 128) // 32
    return _field(0, 4, 64 * (_E256 // 128) + 32 * (k % 2) + _E256 % 32, k // 2)


def _nibbles_xs() -> _Field:
    """IQ4_XS: each 32-sub-block as an IQ4_NL block, 16 bytes from byte 8."""
    return _field(8, 4, 16 * (_E256 // 32) + _E256 % 16, (_E256 % 32) // 16)


def _ints(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=F32)


_IQ4 = KVALUES.astype(F32)

_CODECS: dict[str, _Codec] = {
    "Q8_0": _Codec((_field(2, 8, _E32, np.zeros(32, dtype=int)),), _ints(-128, 127), 32, _grid_d, flip=0x80),
    "Q4_0": _Codec((_nibbles32(2),), _ints(-8, 7), 32, _grid_d),
    "Q4_1": _Codec((_nibbles32(4),), _ints(0, 15), 32, _grid_dm),
    "Q5_0": _Codec((_nibbles32(6), _qh32(2)), _ints(-16, 15), 32, _grid_d),
    "Q5_1": _Codec((_nibbles32(8), _qh32(4)), _ints(0, 31), 32, _grid_dm),
    "Q4_K": _Codec((_nibbles_k(16),), _ints(0, 15), 32, _grid_k4),
    "Q5_K": _Codec((_nibbles_k(48), _bit_planes(16, 4)), _ints(0, 31), 32, _grid_k4),
    "Q6_K": _Codec((_ql_q6_k(), _crumbs_k(128, 4)), _ints(-32, 31), 16, _grid_q6_k),
    "Q2_K": _Codec((_crumbs_k(16),), _ints(0, 3), 16, _grid_q2_k),
    # index = low2 | hbit << 2: a set hmask bit means v = low2, a clear one v = low2 - 4
    "Q3_K": _Codec((_crumbs_k(32), _bit_planes(0, 2)), _ints(-4, 3), 16, _grid_q3_k),
    "IQ4_NL": _Codec((_nibbles32(2),), _IQ4, 32, _grid_d),
    "IQ4_XS": _Codec((_nibbles_xs(),), _IQ4, 32, _grid_iq4_xs),
}


# --- the API -------------------------------------------------------------------------------------

def _blocks(data: np.ndarray, qtype, n: int) -> tuple[str, np.ndarray, int, tuple[int, ...]]:
    """``(type name, blocks [rows * n/qk, block_bytes], rows, shape of data as bytes)`` of
    ``data`` ``[rows, row bytes]`` (1-D: one row; any dtype is read as its bytes)."""
    name = _name(qtype)
    qk, nbytes = block_size(name)
    if n <= 0 or n % qk:
        raise ValueError(f"row length {n} is not a positive multiple of the {name} block size {qk}")
    data = np.asarray(data)
    if data.dtype != np.uint8:
        data = np.ascontiguousarray(data).view(np.uint8)
    shape = data.shape
    if data.ndim == 1:
        data = data[None, :]
    row_bytes = n // qk * nbytes
    if data.ndim != 2 or data.shape[1] != row_bytes:
        raise ValueError(f"expected {name} data of shape [rows, {row_bytes}] for rows of {n}, got {shape}")
    return name, np.ascontiguousarray(data).reshape(-1, nbytes), data.shape[0], shape


def block_grid(data: np.ndarray, qtype, n: int) -> BlockGrid:
    """The scales and offsets of ggml ``qtype`` data ``[rows, n // block * block_bytes]`` (as
    :func:`qconv.core.ggml.quantize` returns) whose rows hold ``n`` elements."""
    name, blocks, rows, _ = _blocks(data, qtype, n)
    codec = _CODECS[name]
    with np.errstate(invalid="ignore", over="ignore"):  # fp16 inf/NaN scales stay what they are
        scale, offset = codec.grid(blocks)
    groups = n // codec.group
    return BlockGrid(scale=scale.reshape(rows, groups),
                     offset=None if offset is None else offset.reshape(rows, groups),
                     values=codec.values, group=codec.group)


def levels(data: np.ndarray, qtype, n: int) -> np.ndarray:
    """The level index of every element, uint8 ``[rows, n]``: ``BlockGrid.values[L]`` is its value
    in units of its group's scale."""
    name, blocks, rows, _ = _blocks(data, qtype, n)
    codec = _CODECS[name]
    L = np.zeros((blocks.shape[0], codec.fields[0].elems.size), dtype=np.uint8)
    for f in codec.fields:
        raw = blocks[:, f.start:f.start + f.nbytes]
        bits = (raw[:, :, None] >> f.slots) & np.uint8((1 << f.width) - 1)   # [B, bytes, slots]
        L |= bits.reshape(blocks.shape[0], -1)[:, f.order] << np.uint8(f.shift)
    if codec.flip:
        L ^= np.uint8(codec.flip)
    return L.reshape(rows, n)


def with_levels(data: np.ndarray, qtype, n: int, L: np.ndarray) -> np.ndarray:
    """A copy of the bytes of ``data`` (uint8, the shape of ``data`` as bytes) whose level bits hold
    ``L`` (integers in ``[0, n_levels)``, shape ``[rows, n]``, or ``[n]`` for 1-D data); every scale
    and header byte is kept."""
    name, blocks, rows, shape = _blocks(data, qtype, n)
    codec = _CODECS[name]
    L = np.asarray(L)
    if L.shape != (rows, n) and not (len(shape) == 1 and L.shape == (n,)):
        raise ValueError(f"levels of shape {L.shape} for data of {rows} rows of {n} elements")
    if L.dtype.kind not in "iu":
        raise ValueError(f"levels must be integers, got dtype {L.dtype}")
    if L.size and (L.min() < 0 or L.max() >= codec.values.size):
        raise ValueError(f"{name} levels must lie in [0, {codec.values.size}), got [{L.min()}, {L.max()}]")
    Lb = L.astype(np.uint8).reshape(blocks.shape[0], -1)
    if codec.flip:
        Lb ^= np.uint8(codec.flip)
    out = blocks.copy()
    for f in codec.fields:
        bits = (Lb[:, f.elems] >> np.uint8(f.shift)) & np.uint8((1 << f.width) - 1)
        packed = bits.reshape(blocks.shape[0], f.nbytes, -1) << f.slots
        out[:, f.start:f.start + f.nbytes] = np.bitwise_or.reduce(packed, axis=2)
    return out.reshape(shape)
