"""Weight grids, integer and floating point: scales, quantize, dequantize (pure tensor functions).

One convention everywhere, compressed-tensors' (what vLLM and transformers load): codes ``q``,
``x = (q - zero) * scale``, one (scale, zero) per row and group of ``group_size`` input columns
(``group_size = -1``: one per row).

* ``type: int``: signed codes in ``[-2^(b-1), 2^(b-1) - 1]`` (int8 tensors). Symmetric grids
  have ``zero = 0``. Ranges always include 0 (``min <= 0 <= max``), as GPTQ and
  compressed-tensors do, so zero weights stay exact.
* ``type: float``: codes are the element values of FP8 E4M3 (8 bits, |x| <= 448) or FP4 E2M1
  (4 bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6), held as float32; always symmetric (``zero = 0``),
  ``scale = absmax / element max``. Two FP4 flavours differ only in their scales: NVFP4 stores
  an FP8 E4M3 scale per 16 values under a float32 scale per tensor (``global_scale``; the
  effective scale is ``fp8_scale / global_scale``), MXFP4 a power of two per 32 values
  (``scale_dtype`` ``float8_e8m0fnu``, stored as its biased exponent byte).

Scales are rounded to their storage form *before* codes are computed, so the codes a writer
stores dequantize exactly to what the methods optimized; everything downstream (GPTQ, AWQ, the
writer's checks) sees only float32 effective scales of shape ``[out, groups]``. Scales shared by
several rows (``block_rows``: FP8's 128x128 blocks, or the whole tensor) are expanded to every
row they cover, so per-(row, group) code serves them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.errors import InvalidOption

#: largest magnitude of each float element type, by bits (E4M3, E2M1)
FLOAT_MAX = {8: 448.0, 4: 6.0}
#: E2M1's non-negative values, by code (the sign is bit 3)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: scale dtypes of the float formats
FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
_FLOAT_SCALES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class WeightScheme:
    """How one Linear's weight is quantized."""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float32
    #: "int" or "float" (E4M3 at 8 bits, E2M1 at 4)
    type: str = "int"
    #: rows sharing one scale: 1 (per row), N (blocks of N rows: FP8's 128x128 blocks with
    #: group_size 128), 0 (every row: one scale per tensor, group_size -1)
    block_rows: int = 1
    #: NVFP4: FP8 group scales under one float32 scale per tensor
    global_scale: bool = False

    def __post_init__(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise InvalidOption(f"group size must be -1 (per channel) or positive, got {self.group_size}")
        if self.block_rows < 0:
            raise InvalidOption(f"block rows must be 0 (per tensor) or positive, got {self.block_rows}")
        if self.type == "int":
            if not 2 <= self.bits <= 8:
                raise InvalidOption(f"bits must be between 2 and 8, got {self.bits}")
            if self.block_rows != 1 or self.global_scale:
                raise InvalidOption("integer grids have one scale per row and group (no blocks, no global scale)")
            if self.scale_dtype not in _FLOAT_SCALES:
                raise InvalidOption(f"integer grids need float32/float16/bfloat16 scales, got {self.scale_dtype}")
            return
        if self.type != "float":
            raise InvalidOption(f"weight type must be int or float, got {self.type!r}")
        if self.bits not in FLOAT_MAX:
            raise InvalidOption(f"float weights are FP8 (8 bits) or FP4 (4 bits), got {self.bits} bits")
        if not self.symmetric:
            raise InvalidOption("float weight grids are symmetric")
        if self.global_scale and self.scale_dtype != FP8:
            raise InvalidOption("a per-tensor global scale goes with FP8 group scales (NVFP4)")
        if self.bits == 4:
            if self.group_size < 1 or self.block_rows != 1:
                raise InvalidOption("FP4 weights need groups (NVFP4: 16, MXFP4: 32)")
            if self.scale_dtype not in (FP8, E8M0) or (self.scale_dtype == FP8) != self.global_scale:
                raise InvalidOption("FP4 weights need FP8 scales with a global scale (NVFP4) or E8M0 scales (MXFP4)")
        elif self.scale_dtype not in (*_FLOAT_SCALES, E8M0):
            raise InvalidOption(f"FP8 weights need float or E8M0 scales, got {self.scale_dtype}")
        if self.block_rows == 0 and self.group_size != -1:
            raise InvalidOption("a per-tensor scale has no column groups (group_size -1)")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def elem_max(self) -> float:
        """The largest code magnitude: what an absmax maps to."""
        return FLOAT_MAX[self.bits] if self.is_float else (self.qmax - self.qmin) / 2

    def groups(self, in_features: int) -> int:
        """Number of column groups for a row of ``in_features``; checks divisibility."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise InvalidOption(f"group size {self.group_size} does not divide the input width {in_features}")
        return in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def rows_per_scale(self, out_features: int) -> int:
        """How many consecutive rows share one scale (all of them for a per-tensor scale)."""
        return out_features if self.block_rows == 0 else self.block_rows

    def stored_rows(self, out_features: int) -> int:
        """Rows of the stored scale tensor: one per row, per block of rows, or one."""
        return -(-out_features // self.rows_per_scale(out_features))


def round_float(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest FP8 E4M3 (bits 8) or FP4 E2M1 (bits 4) value of float32 ``x``, saturating at the
    largest finite value; ties to even, as the hardware and compressed-tensors round (a negative
    value that rounds to zero gives -0, as both do)."""
    m = FLOAT_MAX[bits]
    if bits == 8:
        return x.clamp(-m, m).to(FP8).float()
    # E2M1 is uniform with step 0.5 below 2, 1 below 4 and 2 up to 6, and on each stretch the even
    # multiples of the step are the even codes, so round-half-even of |x| / step is the format's
    # rounding (0.25 -> 0, 0.75 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). Elementwise passes
    # instead of a table search: 4x faster on large inputs (W4A4 activations, GPTQ's grids).
    a = x.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    r = a.div_(step).round_().mul_(step).clamp_(max=m)
    # times sign(x), as compressed-tensors' cast: a negative value that rounds to zero gives -0
    # (code 8 in its packer), a zero gives +0, so the stored bytes equal llm-compressor's
    return r.mul_(torch.sign(x))


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign in bit 3) of exact E2M1 values (float32)."""
    table = torch.tensor(E2M1_VALUES, device=values.device)
    index = torch.searchsorted(table, values.abs().contiguous())
    return (index | (torch.signbit(values).to(torch.int64) << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit E2M1 codes (uint8, sign in bit 3)."""
    v = torch.tensor(E2M1_VALUES, device=codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -v, v)


def round_codes(x: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Codes of already scaled values ``x`` (``w / scale + zero``): nearest grid point, clamped
    (float32; int8 after :func:`quantize`)."""
    if scheme.is_float:
        return round_float(x, scheme.bits)
    return torch.clamp(torch.round(x), scheme.qmin, scheme.qmax)


def round_codes_(x: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """:func:`round_codes` in place (GPTQ's column loop writes into preallocated rows)."""
    if scheme.is_float:
        return x.copy_(round_float(x, scheme.bits))
    return x.round_().clamp_(scheme.qmin, scheme.qmax)


def tensor_global_scale(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor | None:
    """NVFP4's float32 per-tensor scale ``448 * 6 / max|w|`` (so the largest group scale is FP8's
    largest value); None for schemes without one. A zero tensor gets 1."""
    if not scheme.global_scale:
        return None
    amax = w.detach().abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
    gs = torch.nan_to_num(FLOAT_MAX[8] * FLOAT_MAX[scheme.bits] / amax, nan=1.0, posinf=1.0, neginf=1.0)
    return gs.reshape(1)


def store_scale(scale: torch.Tensor, scheme: WeightScheme, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Effective float32 scales -> the stored tensor (``scheme.scale_dtype``; NVFP4: times the
    global scale, in FP8; MXFP4: a power of two in E8M0)."""
    if scheme.global_scale:
        assert global_scale is not None, "an NVFP4 scale needs its global scale"
        scale = scale.float() * global_scale.to(scale.device)
    if scheme.scale_dtype == FP8:
        scale = scale.clamp(max=FLOAT_MAX[8])
    return scale.to(scheme.scale_dtype)


def load_scale(stored: torch.Tensor, scheme: WeightScheme, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 effective scales a stored scale tensor stands for (inverse of :func:`store_scale`,
    computed as compressed-tensors and the runner dequantize: ``fp8_scale / global_scale``)."""
    scale = stored.float()
    if scheme.global_scale:
        assert global_scale is not None, "an NVFP4 scale needs its global scale"
        scale = scale / global_scale.float().to(scale.device)
    return scale


def _mx_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """An MX block's power-of-two scale (compressed-tensors' rule): ``absmax`` rounded to a power
    of two, upwards from 1.25 x a power of two (E2M1's mantissa width), divided by the element
    type's largest power of two (4 for E2M1, 256 for E4M3); E8M0's range bounds the exponent."""
    bump = 1 << (23 - 1 - 1)  # float32 mantissa bits - E2M1 mantissa bits - 1
    p2 = ((absmax.float().view(torch.int32) + bump) & 0x7F800000).view(torch.float32)
    offset = {4: 2, 8: 8}[bits]
    exponent = torch.floor(torch.log2(p2)) - offset
    return torch.exp2(exponent.clamp(-127, 127))


def qparams(wmin: torch.Tensor, wmax: torch.Tensor, scheme: WeightScheme,
            global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from per-group minima and maxima (any shape; zero is int32); the scale is
    the float32 effective scale, already rounded to its storage form (NVFP4: under
    ``global_scale``, see :func:`tensor_global_scale`)."""
    wmin = torch.clamp(wmin.float(), max=0.0)
    wmax = torch.clamp(wmax.float(), min=0.0)
    if scheme.is_float:
        absmax = torch.maximum(-wmin, wmax)
        if scheme.scale_dtype == E8M0:
            scale = _mx_scale(absmax, scheme.bits)
        else:
            stored = store_scale(absmax / scheme.elem_max, scheme, global_scale).float()
            # an all-zero group: compressed-tensors' smallest stored scale (any positive one is exact)
            tiny = 0.125 if scheme.scale_dtype == FP8 else torch.finfo(scheme.scale_dtype).eps
            stored = torch.where(stored > 0, stored, torch.full_like(stored, tiny)).to(scheme.scale_dtype)
            scale = load_scale(stored, scheme, global_scale)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    if scheme.symmetric:
        absmax = torch.maximum(-wmin, wmax)
        scale = absmax / scheme.elem_max
    else:
        scale = (wmax - wmin) / (scheme.qmax - scheme.qmin)
    # an all-zero group: any positive scale represents it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scheme.scale_dtype).float()
    if scheme.symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero = torch.clamp(torch.round(scheme.qmin - wmin / scale), scheme.qmin, scheme.qmax).to(torch.int32)
    return scale, zero


def group_minmax(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of a ``[out, in]`` weight: ``[out, groups]`` each. Rows that
    share a scale (``block_rows``) get their block's extremes."""
    lo, hi = torch.aminmax(_grouped(w.float(), scheme), dim=-1)
    out = w.shape[0]
    if scheme.block_rows == 1:
        return lo, hi
    rows = scheme.rows_per_scale(out)
    pad = -out % rows  # zero rows: qparams puts 0 inside every range anyway
    lo = torch.nn.functional.pad(lo, (0, 0, 0, pad)).reshape(-1, rows, lo.shape[1]).amin(1)
    hi = torch.nn.functional.pad(hi, (0, 0, 0, pad)).reshape(-1, rows, hi.shape[1]).amax(1)
    return lo.repeat_interleave(rows, 0)[:out], hi.repeat_interleave(rows, 0)[:out]


def mse_clip_params(w: torch.Tensor, scheme: WeightScheme, grid: int = 100, max_shrink: float = 0.8,
                    norm: float = 2.4, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per (row, group) after searching the shrink factor of the min/max range:
    factors 1 - i/grid down to 1 - max_shrink, keeping the least sum |w - ŵ|^norm per
    (row, group) (GPTQ's reference grid). It only narrows the range, so it never loses to min/max.
    Scales shared by several rows are searched per row, which would split them: refused."""
    if scheme.block_rows != 1:
        raise InvalidOption("the MSE grid search chooses a range per row: not for block or per-tensor scales")
    wmin, wmax = group_minmax(w, scheme)
    out, n = w.shape
    wg = _grouped(w.float(), scheme)
    best_err = torch.full(wmin.shape, float("inf"), device=w.device)
    best_scale, best_zero = qparams(wmin, wmax, scheme, global_scale)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = qparams(wmin * p, wmax * p, scheme, global_scale)
        q = round_codes(wg / scale[..., None] + zero[..., None], scheme)
        err = ((q - zero[..., None]) * scale[..., None] - wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _grouped(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """A ``[out, in]`` view as ``[out, groups, group_width]``: per-(row, group) parameters then
    broadcast over the last dim (no ``[out, in]`` copy of them)."""
    out, n = w.shape
    return w.reshape(out, scheme.groups(n), scheme.group_width(n))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Codes of ``w`` ``[out, in]`` on the grid given per (row, group): int8 for integer grids,
    float32 element values for float ones."""
    x = _grouped(w.float(), scheme) / scale[..., None]
    if scheme.is_float:
        return round_float(x, scheme.bits).reshape(w.shape)
    q = torch.round(x) + zero[..., None]
    return torch.clamp(q, scheme.qmin, scheme.qmax).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """float32 weights ``(q - zero) * scale`` from codes ``[out, in]`` (a float grid's zero is 0)."""
    g = _grouped(q.float(), scheme)
    if not scheme.is_float:
        g = g - zero[..., None]
    return (g * scale.float()[..., None]).reshape(q.shape)


def rtn(w: torch.Tensor, scheme: WeightScheme,
        global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the min/max grid: (codes, scale, zero). NVFP4's global scale is
    :func:`tensor_global_scale` of ``w`` unless given."""
    if global_scale is None:
        global_scale = tensor_global_scale(w, scheme)
    scale, zero = qparams(*group_minmax(w, scheme), scheme, global_scale)
    return quantize(w, scale, zero, scheme), scale, zero


def fake_quantize(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """``dequantize(rtn(w))``: the float weights a quantized checkpoint would hold."""
    q, scale, zero = rtn(w, scheme)
    return dequantize(q, scale, zero, scheme)
