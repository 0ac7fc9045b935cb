"""The compressed-tensors layout (the format vLLM and transformers load): how one quantized
Linear is stored, read by the compressed-tensors reader and written by the writer.

A compressed-tensors checkpoint is an HF safetensors checkpoint whose quantized Linear weights
are replaced by their integer codes plus per-(row, group) parameters, described by
``config.json["quantization_config"]``. qconv writes two formats:

* ``pack-quantized`` (weight-only, W2..W8 A16): ``X.weight_packed`` int32 ``[out, ceil(in*b/32)]``
  (codes offset to unsigned and packed densely along the input dim, see :func:`pack_int32`),
  ``X.weight_scale`` ``[out, groups]`` in ``scheme.scale_dtype``, ``X.weight_shape`` int32
  ``[out, in]`` and, for asymmetric grids only, ``X.weight_zero_point`` int32 packed along the
  *output* dim ``[ceil(out*b/32), groups]``.
* ``int-quantized`` (W8A8: int8 per-channel symmetric weights, int8 dynamic per-token
  activations): ``X.weight`` int8 ``[out, in]`` and ``X.weight_scale`` ``[out, 1]``; nothing is
  stored for the activations (their scales are computed per token at run time).

and the float formats (codes stored as their 8- or 4-bit patterns):

* ``float-quantized`` (FP8 W8A8) and ``naive-quantized`` (FP8 weight-only): ``X.weight``
  float8_e4m3fn ``[out, in]``, ``X.weight_scale`` ``[out, 1]`` per channel, ``[1]`` per tensor or
  ``[ceil(out/128), in/128]`` per 128x128 block, in ``scheme.scale_dtype``; a static FP8 input
  scale is ``X.input_scale`` ``[1]``.
* ``nvfp4-pack-quantized``: ``X.weight_packed`` uint8 ``[out, in/2]`` (two E2M1 codes per byte,
  the even column in the low nibble, sign in each nibble's bit 3), ``X.weight_scale``
  float8_e4m3fn ``[out, in/16]``, ``X.weight_global_scale`` float32 ``[1]`` (effective scale
  ``weight_scale / weight_global_scale``); W4A4 adds ``X.input_global_scale`` float32 ``[1]``.
* ``mxfp4-pack-quantized``: ``X.weight_packed`` as NVFP4's, ``X.weight_scale`` uint8
  ``[out, in/32]`` (E8M0: the scale is ``2^(byte - 127)``).

Codes and parameters follow :mod:`qconv.core.grid`, which uses compressed-tensors' own
convention (``x = (q - zero) * scale``, signed codes), so writing is pure re-layout: the
stored codes dequantize to exactly what the quantizer produced.

Layout facts were checked against compressed-tensors 0.20.0 (``PackedQuantizationCompressor``,
``pack_to_int32``, ``QuantizationArgs``) and are tested against it. 2/4/8-bit packing is the same
in every compressed-tensors release; 3/5/6/7-bit packing became *dense* (codes straddle int32
words) in 0.20, so those widths need compressed-tensors >= 0.20 to load (older releases refuse
them or expect a padded layout, and vLLM's WNA16 kernels take only 4 and 8 bits).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from qconv.core.grid import E8M0, FP8, WeightScheme, e2m1_codes, e2m1_values, load_scale, store_scale
from qconv.core.quantized import ActivationScheme, QuantizedWeight

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
NAIVE_QUANTIZED = "naive-quantized"
MIXED = "mixed-precision"
FLOAT_QUANTIZED = "float-quantized"
NVFP4_PACKED = "nvfp4-pack-quantized"
MXFP4_PACKED = "mxfp4-pack-quantized"
#: formats whose weight is stored unpacked as ``X.weight``
UNPACKED = (INT_QUANTIZED, NAIVE_QUANTIZED, FLOAT_QUANTIZED)
#: formats whose weight is E2M1 codes packed two per byte
FP4_PACKED = (NVFP4_PACKED, MXFP4_PACKED)
#: The compressed-tensors release whose layout qconv writes (recorded as ``version``).
CT_VERSION = "0.20.0"


#: ``kv_cache_scheme`` of an FP8 KV cache with one static scale per layer for keys and one for
#: values (``X.self_attn.k_scale`` / ``v_scale``, ``[1]``, calibrated ``max|k| / 448``): what
#: llm-compressor writes for ``kv_cache_scheme: {num_bits: 8, type: float}`` and vLLM reads with
#: ``kv_cache_dtype="fp8"``
FP8_KV_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                 "group_size": None, "actorder": None, "block_structure": None, "observer": "minmax",
                 "observer_kwargs": {}}


#: the FP8 KV cache's keys and values as an activation grid: one static E4M3 scale per tensor,
#: whose :meth:`~ActivationScheme.static_scale` gives the stored ``k_scale`` / ``v_scale``
FP8_KV = ActivationScheme(8, strategy="tensor", dynamic=False, type="float")


def is_fp8_kv_scheme(scheme: Any) -> bool:
    """Whether a ``kv_cache_scheme`` is :data:`FP8_KV_SCHEME` (the one qconv reads)."""
    if not isinstance(scheme, dict):
        return False
    keys = ("num_bits", "type", "symmetric", "strategy", "dynamic")
    return tuple(scheme.get(k, d) for k, d in zip(keys, (8, "int", True, None, False))) == \
        tuple(FP8_KV_SCHEME[k] for k in keys)


# --------------------------------------------------------------------------- packing


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit codes (int8, 2-D) into int32 words along ``dim``.

    Codes are offset to unsigned (``q + 2^(b-1)``) and laid out as one little-endian bit stream
    per row: code ``i`` occupies bits ``i*b .. i*b+b-1``, so a row of ``n`` codes takes
    ``ceil(n*b/32)`` words and, for widths that do not divide 32, a code may straddle two words.
    This is compressed-tensors' ``pack_to_int32`` layout (identical to the classic
    "``32/b`` codes per word, first code in the low bits" layout for b = 1, 2, 4, 8).

    Works on bytes (uint8) rather than int32 words so no step can overflow and every step is a
    cheap byte op: the bit stream is built a byte at a time, then reinterpreted as int32.
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int32 needs a 2-D int8 tensor, got {q.dtype} {list(q.shape)}")
    _check_bits(bits)
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    rows, n = q.shape
    # q + 2^(b-1) in uint8 arithmetic: wraps modulo 256 to the right value in [0, 2^b)
    u = q.contiguous().view(torch.uint8) + (1 << (bits - 1))
    u = torch.nn.functional.pad(u, (0, _padded(n) - n))  # whole 32-code blocks = whole words
    if 8 % bits == 0:  # whole codes per byte: OR them in directly
        per = u.view(rows, -1, 8 // bits)
        stream = per[..., 0].clone()
        for k in range(1, 8 // bits):
            stream |= per[..., k] << (bits * k)
    else:  # codes straddle bytes: expand to single bits, regroup by 8
        bit_stream = (u.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1
        stream = (bit_stream.view(rows, -1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return _bytes_to_words(stream)[:, : packed_width(n, bits)].contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``size`` signed codes (int8) along ``dim``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_int32 needs a 2-D int32 tensor, got {packed.dtype} {list(packed.shape)}")
    _check_bits(bits)
    if dim == 0:
        return unpack_int32(packed.t(), bits, size, 1).t().contiguous()
    rows, nwords = packed.shape
    if nwords != packed_width(size, bits):
        raise ValueError(f"{nwords} int32 words do not hold {size} densely packed {bits}-bit codes")
    words = torch.nn.functional.pad(packed, (0, _padded(size) * bits // 32 - nwords))
    stream = _words_to_bytes(words)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        u = ((stream.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(rows, -1)
    else:
        bit_stream = ((stream.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(rows, -1, bits)
        u = (bit_stream << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return (u[:, :size] - (1 << (bits - 1))).view(torch.int8).contiguous()


def _padded(n: int) -> int:
    return -(-n // 32) * 32


def _bytes_to_words(stream: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, 4k]`` little-endian byte stream -> int32 ``[rows, k]``, on any host."""
    stream = stream.contiguous()
    if sys.byteorder == "big":
        stream = stream.view(stream.shape[0], -1, 4).flip(-1).reshape(stream.shape[0], -1)
    return stream.view(torch.int32)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    stream = words.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        stream = stream.view(words.shape[0], -1, 4).flip(-1).reshape(words.shape[0], -1)
    return stream


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def packed_width(n: int, bits: int) -> int:
    """int32 words holding ``n`` densely packed ``bits``-bit codes."""
    return math.ceil(n * bits / 32)


# --------------------------------------------------------------------------- schemes


def weight_args(scheme: WeightScheme) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` (as JSON) for a weight scheme."""
    channel = scheme.group_size == -1
    strategy = ("tensor" if scheme.block_rows == 0 else "block" if scheme.block_rows > 1 else
                "tensor_group" if scheme.global_scale else "channel" if channel else "group")
    args: dict[str, Any] = {
        "num_bits": scheme.bits, "type": scheme.type, "symmetric": scheme.symmetric, "strategy": strategy,
        "group_size": None if channel or strategy == "block" else scheme.group_size,
        "dynamic": False, "actorder": None,
        "block_structure": [scheme.block_rows, scheme.group_size] if strategy == "block" else None,
        "observer": "minmax", "observer_kwargs": {},
    }
    if scheme.scale_dtype in (FP8, E8M0):
        args["scale_dtype"] = "torch.float8_e4m3fn" if scheme.scale_dtype == FP8 else "torch.uint8"
    return args


def module_format(scheme: WeightScheme, act: ActivationScheme | None) -> str:
    """The compressed-tensors format a module is stored in (what ``infer_module_format`` picks)."""
    if not scheme.is_float:
        return PACKED if act is None else INT_QUANTIZED
    if scheme.bits == 4:
        return NVFP4_PACKED if scheme.global_scale else MXFP4_PACKED
    return NAIVE_QUANTIZED if act is None else FLOAT_QUANTIZED


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``[rows, n]`` (float32, n even) -> uint8 ``[rows, n/2]``, column 2k in the low
    nibble of byte k (compressed-tensors' ``pack_fp4_to_uint8``)."""
    codes = e2m1_codes(values)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: float32 E2M1 values ``[rows, 2 * width]``."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return e2m1_values(codes)


def _stored_scale(w: QuantizedWeight) -> torch.Tensor:
    """The scale tensor as stored: one row per block of rows (or one for the tensor), in its
    storage dtype (E8M0 as its exponent byte, which is what compressed-tensors stores)."""
    s = w.scheme
    scale = w.scale.cpu()
    if s.block_rows != 1:
        scale = scale[:: s.rows_per_scale(w.shape[0])]
        if s.block_rows == 0:
            scale = scale.reshape(1)
    gs = None if w.global_scale is None else w.global_scale.cpu()
    stored = store_scale(scale, s, gs).contiguous()
    return stored.view(torch.uint8) if s.scale_dtype == E8M0 else stored


def compress(w: QuantizedWeight, act: ActivationScheme | None,
             input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized Linear, keyed by local name (``weight_packed``, ...).
    Packed on the CPU whatever device quantized them: the bytes must not depend on it.
    ``input_scale``: the calibrated static input scale an ``act`` that needs one stores."""
    s = w.scheme
    q = w.q.cpu()
    out: dict[str, torch.Tensor]
    if s.is_float:
        out = {"weight_packed": pack_fp4(q)} if s.bits == 4 else {"weight": q.to(FP8).contiguous()}
        out["weight_scale"] = _stored_scale(w)
        if w.global_scale is not None:
            out["weight_global_scale"] = w.global_scale.to("cpu", torch.float32).reshape(1).contiguous()
    elif act is not None:
        out = {"weight": q.contiguous(), "weight_scale": _stored_scale(w)}
    else:
        out = {
            "weight_packed": pack_int32(q, s.bits, dim=1),
            "weight_scale": _stored_scale(w),
            "weight_shape": torch.tensor(w.shape, dtype=torch.int32),
        }
        if not s.symmetric:
            out["weight_zero_point"] = pack_int32(w.zero.to("cpu", torch.int8), s.bits, dim=0)
    if act is not None and act.needs_scale:
        if input_scale is None:
            raise ValueError(f"{act.scale_name} missing for a static activation scheme")
        dtype = torch.float32 if act.strategy == "tensor_group" else s.scale_dtype
        out[act.scale_name] = input_scale.to("cpu", dtype).reshape(1).contiguous()
    return out


def stored_shapes(fmt: str, scheme: WeightScheme, shape: tuple[int, int],
                  tensor_strategy: bool = False) -> dict[str, tuple[int, ...]]:
    """Local names and shapes a module of format ``fmt`` must store (for header validation).

    ``tensor_strategy``: one scale for the whole integer matrix (``strategy: tensor``, read
    only). A zero point is required for asymmetric grids only (some writers also store zeros for
    symmetric ones; those are ignored).
    """
    out, n = shape
    groups = scheme.groups(n)
    rows = scheme.stored_rows(out)
    scale_shape: tuple[int, ...] = (1,) if tensor_strategy or scheme.block_rows == 0 else (rows, groups)
    shapes: dict[str, tuple[int, ...]]
    if fmt in FP4_PACKED:
        shapes = {"weight_packed": (out, n // 2), "weight_scale": scale_shape}
        if scheme.global_scale:
            shapes["weight_global_scale"] = (1,)
        return shapes
    if fmt == PACKED:
        shapes = {"weight_packed": (out, packed_width(n, scheme.bits)), "weight_scale": scale_shape,
                  "weight_shape": (2,)}
        zero_shape = scale_shape if tensor_strategy else (packed_width(out, scheme.bits), groups)
    else:
        shapes = {"weight": (out, n), "weight_scale": scale_shape}
        zero_shape = scale_shape
    if not scheme.symmetric:
        shapes["weight_zero_point"] = zero_shape
    return shapes


def decompress(fmt: str, scheme: WeightScheme, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
               tensor_strategy: bool = False) -> QuantizedWeight:
    """Codes and grid parameters back from one module's stored tensors (local names, shapes
    already validated against :func:`stored_shapes`)."""
    out, n = shape
    groups = scheme.groups(n)
    if scheme.is_float:
        q = unpack_fp4(tensors["weight_packed"]) if fmt in FP4_PACKED else tensors["weight"].float()
        stored = tensors["weight_scale"]
        if scheme.scale_dtype == E8M0:
            stored = stored.view(E8M0)
        gs = tensors.get("weight_global_scale")
        gs = None if gs is None else gs.float().reshape(1)
        scale = load_scale(stored.reshape(-1, groups), scheme, gs)
        scale = scale.repeat_interleave(scheme.rows_per_scale(out), 0)[:out]
        return QuantizedWeight(q.contiguous(), scale.contiguous(), torch.zeros(out, groups, dtype=torch.int32),
                               scheme, gs)
    if fmt == PACKED:
        q = unpack_int32(tensors["weight_packed"], scheme.bits, n, dim=1)
    else:
        q = tensors["weight"].to(torch.int8)
    zp = tensors.get("weight_zero_point")
    if tensor_strategy:
        scale = tensors["weight_scale"].reshape(1, 1).expand(out, 1)
        zero = (torch.zeros(1, 1) if scheme.symmetric or zp is None else zp.reshape(1, 1)).expand(out, 1)
    else:
        scale = tensors["weight_scale"].reshape(out, groups)
        if scheme.symmetric or zp is None:
            zero = torch.zeros(out, groups)
        elif fmt == PACKED:
            zero = unpack_int32(zp, scheme.bits, out, dim=0)
        else:
            zero = zp.reshape(out, groups)
    return QuantizedWeight(q, scale.float().contiguous(), zero.to(torch.int32).contiguous(), scheme)
