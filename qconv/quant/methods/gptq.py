"""GPTQ as a pipeline quantizer: Hessians from the layer's calibration inputs, then
:func:`qconv.quant.gptq.gptq_quantize` per Linear.

``true_sequential`` (default on, as the GPTQ reference): inside a layer the Linears are done in
four groups in execution order (q/k/v, o, gate/up, down); each group's Hessian is collected from
inputs computed with the already-quantized groups before it, running the layer only as far as
that group. Off: all four Hessians come from one fp pass (llm-compressor's per-layer order).
Between layers the pipeline always feeds quantized outputs forward.
"""

from __future__ import annotations

import logging

from qconv.formats.compressed_tensors import QuantizedWeight
from qconv.quant.gptq import HessianAccumulator, gptq_quantize
from qconv.quant.methods.base import Quantizer, set_weight
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap

log = logging.getLogger(__name__)

#: Linears sharing one input, in execution order.
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class GPTQ(Quantizer):
    name = "gptq"
    options = {"damp": 0.01, "act_order": True, "block_size": 128, "static_groups": True, "true_sequential": True}

    def quantize(self, ctx: LayerContext, schemes: SchemeMap) -> dict[str, QuantizedWeight]:
        todo = [[m for m in g if schemes.scheme_for(ctx.module_name(m)) is not None] for g in GROUPS]
        todo = [g for g in todo if g]
        result: dict[str, QuantizedWeight] = {}
        if self.config["true_sequential"]:
            for group in todo:
                result.update(self._quantize_group(ctx, schemes, group, self._hessian(ctx, group[0])))
        else:
            hessians = {g[0]: HessianAccumulator(ctx.layer.get_submodule(g[0]).in_features) for g in todo}
            ctx.forward(lambda inner, x: hessians[inner].add(x) if inner in hessians else None)
            for group in todo:
                result.update(self._quantize_group(ctx, schemes, group, hessians[group[0]].hessian))
        return result

    @staticmethod
    def _hessian(ctx: LayerContext, inner: str):
        acc = HessianAccumulator(ctx.layer.get_submodule(inner).in_features)
        ctx.collect(inner, acc.add)
        return acc.hessian

    def _quantize_group(self, ctx: LayerContext, schemes: SchemeMap, group: list[str], H) -> dict[str, QuantizedWeight]:
        out: dict[str, QuantizedWeight] = {}
        for inner in group:
            scheme = schemes.scheme_for(ctx.module_name(inner))
            assert scheme is not None
            r = gptq_quantize(ctx.layer.get_submodule(inner).weight.data, H, scheme,
                              block_size=int(self.config["block_size"]), damp=float(self.config["damp"]),
                              act_order=bool(self.config["act_order"]), static_groups=bool(self.config["static_groups"]))
            if r.fell_back_to_rtn:
                log.warning("%s: Hessian not positive definite even with extra damping; used RTN",
                            ctx.module_name(inner))
            qw = QuantizedWeight(r.q, r.scale, r.zero, scheme)
            set_weight(ctx, inner, qw)
            out[inner] = qw
        return out
