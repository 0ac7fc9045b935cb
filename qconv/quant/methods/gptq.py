"""GPTQ as a pipeline quantizer: Hessians from the layer's calibration inputs, then
:func:`qconv.quant.gptq.gptq_quantize` per Linear.

``true_sequential`` (default on, as the GPTQ reference): inside a layer the Linears are done in
four groups in execution order (q/k/v, o, gate/up, down); each group's Hessian comes from
inputs computed with the already-quantized groups before it. This costs one forward pass per
layer (:meth:`LayerContext.sequential` stops at each group boundary for all samples), and
that same pass produces the next layer's inputs. Off: all four Hessians come from one fp pass
(llm-compressor's per-layer order) and a second pass computes the quantized layer's outputs.
Between layers the pipeline always feeds quantized outputs forward.
"""

from __future__ import annotations

import logging

import torch

from qconv.formats.compressed_tensors import QuantizedWeight
from qconv.quant.gptq import HessianAccumulator, gptq_quantize
from qconv.quant.methods.base import Quantizer, set_weight
from qconv.quant.pipeline import GROUPS, LayerContext
from qconv.quant.schemes import SchemeMap

log = logging.getLogger(__name__)

#: tokens per Hessian update: bounds the temporary copy ``bf16_hessian`` makes
HESSIAN_CHUNK = 16384


class GPTQ(Quantizer):
    name = "gptq"
    options = {"damp": 0.01, "act_order": True, "block_size": 128, "static_groups": True, "true_sequential": True,
               "bf16_hessian": None, "mse": False}

    def quantize(self, ctx: LayerContext, schemes: SchemeMap) -> dict[str, QuantizedWeight]:
        todo = {g: [m for m in g if schemes.scheme_for(ctx.module_name(m)) is not None] for g in GROUPS}
        result: dict[str, QuantizedWeight] = {}
        if self.config["true_sequential"]:
            def visit(group: tuple[str, ...], inputs: torch.Tensor) -> None:
                if todo[group]:
                    result.update(self._quantize_group(ctx, schemes, todo[group], self._hessian(ctx, group, inputs)))
            ctx.sequential(visit)
        else:
            firsts = {g[0]: g for g in GROUPS if todo[g]}
            acc = {g: self._accumulator(ctx, g) for g in firsts.values()}
            ctx.forward(lambda inner, x: acc[firsts[inner]].add(x) if inner in firsts else None)
            for g, a in acc.items():
                result.update(self._quantize_group(ctx, schemes, todo[g], a.hessian))
        return result

    def _accumulator(self, ctx: LayerContext, group: tuple[str, ...]) -> HessianAccumulator:
        # default (None): Hessian products in bfloat16 exactly when the calibration pass runs in
        # it — its inputs are then bf16 values already, and the products are ~2x cheaper
        bf16 = self.config["bf16_hessian"]
        if bf16 is None:
            bf16 = ctx.pipeline.compute_dtype == torch.bfloat16
        return HessianAccumulator(ctx.layer.get_submodule(group[0]).in_features, device=ctx.pipeline.device,
                                  bf16_matmul=bool(bf16))

    def _hessian(self, ctx: LayerContext, group: tuple[str, ...], inputs: torch.Tensor) -> torch.Tensor:
        acc = self._accumulator(ctx, group)
        for part in inputs.reshape(-1, inputs.shape[-1]).split(HESSIAN_CHUNK):
            acc.add(part)
        return acc.hessian

    def _quantize_group(self, ctx: LayerContext, schemes: SchemeMap, group: list[str], H) -> dict[str, QuantizedWeight]:
        out: dict[str, QuantizedWeight] = {}
        for inner in group:
            scheme = schemes.scheme_for(ctx.module_name(inner))
            assert scheme is not None
            r = gptq_quantize(ctx.layer.get_submodule(inner).weight.data, H, scheme,
                              block_size=int(self.config["block_size"]), damp=float(self.config["damp"]),
                              act_order=bool(self.config["act_order"]), static_groups=bool(self.config["static_groups"]),
                              mse=bool(self.config["mse"]))
            if r.fell_back_to_rtn:
                log.warning("%s: Hessian not positive definite even with extra damping; used RTN",
                            ctx.module_name(inner))
            qw = QuantizedWeight(r.q, r.scale, r.zero, scheme)
            set_weight(ctx, inner, qw)
            out[inner] = qw
        return out
