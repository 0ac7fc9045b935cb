"""RTN: round-to-nearest on the min/max grid, optionally with an MSE clip search.

No calibration. The clip search (``mse: true``) shrinks each group's range by factors
1 - i/100 and keeps the one with the least |w - ŵ|^2.4 error per (row, group), the grid GPTQ's
reference quantizer uses; it only ever narrows the range, so it never loses to plain RTN.
"""

from __future__ import annotations

import torch

from qconv.core.ggml_target import GGMLScheme, GGMLWeight, ggml_weight
from qconv.core.quantized import QuantizedWeight
from qconv.core.target import Scheme
from qconv.errors import InvalidOption
from qconv.core.grid import group_minmax, mse_clip_params, qparams, quantize, tensor_global_scale
from qconv.quant.methods.base import Quantizer, set_weight, shared_global_scales
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap


def rtn_weight(w: torch.Tensor, scheme: Scheme, mse: bool = False,
               global_scale: torch.Tensor | None = None) -> QuantizedWeight | GGMLWeight:
    """One weight matrix quantized round-to-nearest (NVFP4: under ``global_scale``, by default
    the weight's own; a ggml type: llama.cpp's quantizer without an imatrix)."""
    if isinstance(scheme, GGMLScheme):
        return ggml_weight(w, scheme)
    gs = global_scale if global_scale is not None else tensor_global_scale(w, scheme)
    scale, zero = mse_clip_params(w, scheme, global_scale=gs) if mse else \
        qparams(*group_minmax(w, scheme), scheme, gs)
    return QuantizedWeight(quantize(w, scale, zero, scheme), scale, zero, scheme, gs)


class RTN(Quantizer):
    name = "rtn"
    supports_experts = True
    supports_parallel = True  # nothing to reduce
    needs_calibration = False
    options = {"mse": False}

    def check_scheme(self, scheme: Scheme) -> None:
        if self.config["mse"] and scheme.block_rows != 1:
            raise InvalidOption("rtn mse chooses a range per row: not for block or per-tensor scales")
        if self.config["mse"] and isinstance(scheme, GGMLScheme):
            raise InvalidOption("rtn mse: a ggml type's quantizer searches its own scales")

    def quantize(self, ctx: LayerContext, schemes: SchemeMap) -> dict[str, QuantizedWeight | GGMLWeight]:
        result: dict[str, QuantizedWeight] = {}
        shared = shared_global_scales(ctx, schemes)
        for inner in ctx.linears:
            scheme = schemes.scheme_for(ctx.module_name(inner))
            if scheme is None:
                continue
            qw = rtn_weight(ctx.layer.get_submodule(inner).weight, scheme, self.config["mse"], shared.get(inner))
            set_weight(ctx, inner, qw)
            result[inner] = qw
        return result
