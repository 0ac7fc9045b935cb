"""RTN: round-to-nearest on the min/max grid, optionally with an MSE clip search.

No calibration. The clip search (``mse: true``) shrinks each group's range by factors
1 - i/100 and keeps the one with the least |w - ŵ|^2.4 error per (row, group), the grid GPTQ's
reference quantizer uses; it only ever narrows the range, so it never loses to plain RTN.
"""

from __future__ import annotations

import torch

from qconv.formats.compressed_tensors import QuantizedWeight
from qconv.quant.grid import WeightScheme, dequantize, group_minmax, qparams, quantize
from qconv.quant.methods.base import Quantizer, set_weight
from qconv.quant.pipeline import LINEARS, LayerContext
from qconv.quant.schemes import SchemeMap


def mse_clip_params(w: torch.Tensor, scheme: WeightScheme, grid: int = 100, max_shrink: float = 0.8,
                    norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per (row, group) after searching the shrink factor of the min/max range."""
    wmin, wmax = group_minmax(w, scheme)
    out, n = w.shape
    wg = w.float().reshape(out, scheme.groups(n), scheme.group_width(n))
    best_err = torch.full(wmin.shape, float("inf"))
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


def rtn_weight(w: torch.Tensor, scheme: WeightScheme, mse: bool = False) -> QuantizedWeight:
    """One weight matrix quantized round-to-nearest."""
    scale, zero = mse_clip_params(w, scheme) if mse else qparams(*group_minmax(w, scheme), scheme)
    return QuantizedWeight(quantize(w, scale, zero, scheme), scale, zero, scheme)


class RTN(Quantizer):
    name = "rtn"
    needs_calibration = False
    options = {"mse": False}

    def quantize(self, ctx: LayerContext, schemes: SchemeMap) -> dict[str, QuantizedWeight]:
        result: dict[str, QuantizedWeight] = {}
        for inner in LINEARS:
            scheme = schemes.scheme_for(ctx.module_name(inner))
            if scheme is None:
                continue
            qw = rtn_weight(ctx.layer.get_submodule(inner).weight, scheme, self.config["mse"])
            set_weight(ctx, inner, qw)
            result[inner] = qw
        return result
