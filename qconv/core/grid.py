"""Integer weight grids: scales, zero points, quantize, dequantize (pure tensor functions).

One convention everywhere, compressed-tensors' (what vLLM and transformers load): signed codes
``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, ``x = (q - zero) * scale``, one (scale, zero) per row and
group of ``group_size`` input columns (``group_size = -1``: one per row). Symmetric grids have
``zero = 0``. Ranges always include 0 (``min <= 0 <= max``), as GPTQ and compressed-tensors do,
so zero weights stay exact. Scales are rounded to their storage dtype *before* codes are
computed, so the codes a writer stores dequantize exactly to what the methods optimized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.errors import InvalidOption


@dataclass(frozen=True)
class WeightScheme:
    """How one Linear's weight is quantized."""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise InvalidOption(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise InvalidOption(f"group size must be -1 (per channel) or positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        """Number of column groups for a row of ``in_features``; checks divisibility."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise InvalidOption(f"group size {self.group_size} does not divide the input width {in_features}")
        return in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def qparams(wmin: torch.Tensor, wmax: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from per-group minima and maxima (any shape; zero is int32)."""
    wmin = torch.clamp(wmin.float(), max=0.0)
    wmax = torch.clamp(wmax.float(), min=0.0)
    if scheme.symmetric:
        absmax = torch.maximum(-wmin, wmax)
        scale = absmax / ((scheme.qmax - scheme.qmin) / 2)
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
    """Per (row, group) min and max of a ``[out, in]`` weight: ``[out, groups]`` each."""
    out, n = w.shape
    g = w.float().reshape(out, scheme.groups(n), scheme.group_width(n))
    return g.amin(-1), g.amax(-1)


def mse_clip_params(w: torch.Tensor, scheme: WeightScheme, grid: int = 100, max_shrink: float = 0.8,
                    norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per (row, group) after searching the shrink factor of the min/max range:
    factors 1 - i/grid down to 1 - max_shrink, keeping the least sum |w - ŵ|^norm per
    (row, group) (GPTQ's reference grid). It only narrows the range, so it never loses to min/max."""
    wmin, wmax = group_minmax(w, scheme)
    out, n = w.shape
    wg = w.float().reshape(out, scheme.groups(n), scheme.group_width(n))
    best_err = torch.full(wmin.shape, float("inf"), device=w.device)
    best_scale, best_zero = qparams(wmin, wmax, scheme)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = qparams(wmin * p, wmax * p, scheme)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], scheme.qmin, scheme.qmax)
        err = ((q - zero[..., None]) * scale[..., None] - wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _expand(p: torch.Tensor, n: int, scheme: WeightScheme) -> torch.Tensor:
    """``[out, groups]`` parameters broadcast to ``[out, in]`` columns."""
    return p.repeat_interleave(scheme.group_width(n), dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Integer codes (int8) of ``w`` ``[out, in]`` on the grid given per (row, group)."""
    n = w.shape[1]
    q = torch.round(w.float() / _expand(scale, n, scheme)) + _expand(zero, n, scheme)
    return torch.clamp(q, scheme.qmin, scheme.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """float32 weights ``(q - zero) * scale`` from codes ``[out, in]``."""
    n = q.shape[1]
    return (q.float() - _expand(zero, n, scheme)) * _expand(scale.float(), n, scheme)


def rtn(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the min/max grid: (codes, scale, zero)."""
    scale, zero = qparams(*group_minmax(w, scheme), scheme)
    return quantize(w, scale, zero, scheme), scale, zero


def fake_quantize(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """``dequantize(rtn(w))``: the float weights a quantized checkpoint would hold."""
    q, scale, zero = rtn(w, scheme)
    return dequantize(q, scale, zero, scheme)
