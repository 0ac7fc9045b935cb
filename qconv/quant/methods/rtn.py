"""RTN: round-to-nearest on the min/max grid, optionally with an MSE clip search.

No calibration. The clip search (``mse: true``) shrinks each group's range by factors
1 - i/100 and keeps the one with the least |w - ŵ|^2.4 error per (row, group), the grid GPTQ's
reference quantizer uses; it only ever narrows the range, so it never loses to plain RTN.
"""

from __future__ import annotations

import torch

from qconv.core.quantized import QuantizedWeight
from qconv.core.grid import WeightScheme, group_minmax, mse_clip_params, qparams, quantize
from qconv.quant.methods.base import Quantizer, set_weight
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap


def rtn_weight(w: torch.Tensor, scheme: WeightScheme, mse: bool = False) -> QuantizedWeight:
    """One weight matrix quantized round-to-nearest."""
    scale, zero = mse_clip_params(w, scheme) if mse else qparams(*group_minmax(w, scheme), scheme)
    return QuantizedWeight(quantize(w, scale, zero, scheme), scale, zero, scheme)


class RTN(Quantizer):
    name = "rtn"
    supports_experts = True
    supports_parallel = True  # nothing to reduce
    needs_calibration = False
    options = {"mse": False}

    def quantize(self, ctx: LayerContext, schemes: SchemeMap) -> dict[str, QuantizedWeight]:
        result: dict[str, QuantizedWeight] = {}
        for inner in ctx.linears:
            scheme = schemes.scheme_for(ctx.module_name(inner))
            if scheme is None:
                continue
            qw = rtn_weight(ctx.layer.get_submodule(inner).weight, scheme, self.config["mse"])
            set_weight(ctx, inner, qw)
            result[inner] = qw
        return result
