"""Integer quantizers for KV caches: bit packing, asymmetric group quantization, int8 absmax.

These are the storage primitives of the quantized caches in :mod:`qconv.model.kv_caches`.
Codes are packed into ``uint8`` tensors (2-bit: 4 codes a byte, 4-bit: 2, 8-bit: 1) so a
cache's memory saving is real, not a simulation in float tensors. All arithmetic runs in
float32 whatever the input dtype, and every scale/zero is rounded to its storage dtype
*before* the codes are computed from it, so dequantization uses exactly the parameters the
codes were fitted to.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
    """How many ``bits``-bit codes one byte holds."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits} (valid: {SUPPORTED_BITS})")
    return 8 // bits


def storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype for scales, zeros and full-precision residual tokens.

    KIVI keeps these in fp16; a bf16 runner keeps bf16 so values that fit bf16's range are not
    overflowed by a narrower format. A float32 runner still stores 16-bit: that is the memory a
    deployed cache would hold, and the rounding it costs is part of what is measured.
    """
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along ``dim`` into uint8; code ``i`` of a byte sits at
    bit ``bits * i``. ``codes.shape[dim]`` must be a multiple of :func:`codes_per_byte`."""
    per_byte = codes_per_byte(bits)
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes
    dim = dim % codes.ndim
    if codes.shape[dim] % per_byte:
        raise ValueError(f"cannot pack {codes.shape[dim]} codes {per_byte} to a byte")
    grouped = codes.unflatten(dim, (codes.shape[dim] // per_byte, per_byte))
    packed = grouped.select(dim + 1, 0).clone()
    for i in range(1, per_byte):
        packed |= grouped.select(dim + 1, i) << (bits * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes, ``codes_per_byte(bits)`` times longer along ``dim``."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed
    dim = dim % packed.ndim
    shape = [1] * (packed.ndim + 1)
    shape[dim + 1] = per_byte
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).view(shape)
    return ((packed.unsqueeze(dim + 1) >> shifts) & ((1 << bits) - 1)).flatten(dim, dim + 1)


def quantize_asym(
    x: torch.Tensor, bits: int, group: int, dim: int, store: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization in groups of ``group`` consecutive elements along ``dim``.

    Returns ``(packed, scale, zero)``: codes packed along ``dim``; ``scale = (max - min) /
    (2^bits - 1)`` and ``zero = min`` per group, in ``store`` dtype, with ``dim`` shrunk to the
    number of groups. ``x ≈ code * scale + zero``. A constant group gets the smallest normal
    scale of ``store`` instead of 0 so no division by zero can happen; its codes are then 0
    (up to the rounding of ``zero``) and it dequantizes to its value.
    """
    dim = dim % x.ndim
    qmax = (1 << bits) - 1
    grouped = x.float().unflatten(dim, (x.shape[dim] // group, group))
    lo = grouped.amin(dim + 1, keepdim=True)
    hi = grouped.amax(dim + 1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(store).tiny).to(store)
    zero = lo.to(store)
    codes = ((grouped - zero.float()) / scale.float()).round_().clamp_(0, qmax)
    return pack_codes(codes.flatten(dim, dim + 1), bits, dim), scale.squeeze(dim + 1), zero.squeeze(dim + 1)


def dequantize_asym(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dim: int,
    dtype: torch.dtype, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``code * scale + zero`` in ``dtype`` for the output of :func:`quantize_asym`, written into
    ``out`` when given (a view into a larger buffer saves the caller a concatenation)."""
    dim = dim % packed.ndim
    shape = (scale.shape[dim], group)
    codes = unpack_codes(packed, bits, dim).to(dtype).unflatten(dim, shape)
    if out is None:
        out = torch.empty(codes.flatten(dim, dim + 1).shape, dtype=dtype, device=packed.device)
    zero, scale = zero.unsqueeze(dim + 1).to(dtype), scale.unsqueeze(dim + 1).to(dtype)
    torch.addcmul(zero, codes, scale, out=out.unflatten(dim, shape))  # writes through the view
    return out


def quantize_int8(x: torch.Tensor, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 over the last dim: ``(codes int8 in [-127, 127], scale [..., 1])``.

    The scale is ``absmax / 127`` (at least ``store``'s smallest normal, so zero vectors work).
    """
    absmax = x.float().abs().amax(-1, keepdim=True)
    scale = (absmax / 127).clamp_min(torch.finfo(store).tiny).to(store)
    codes = (x.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``code * scale`` in ``dtype``."""
    return codes.to(dtype) * scale.to(dtype)
