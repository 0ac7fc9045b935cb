"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

For each norm -> Linears pair (``input_layernorm -> q/k/v``, ``post_attention_layernorm ->
gate/up``; o_proj and down_proj have no preceding norm to absorb a scale), per input channel j:
``s_j = max|X_j|^α / max|W_j|^(1-α)`` (max over tokens, and over the rows of every balanced
Linear), clamped to >= 1e-5. ``norm.weight /= s`` and ``W *= s``: the fp model computes the
same function, but the activations the int8 quantizer sees are flatter.
"""

from __future__ import annotations

import torch

from qconv.quant.methods.base import Transform
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap

#: (norm, Linears it feeds) inside a Llama-family decoder layer.
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-channel scales from activation maxima and the balanced weights' column maxima."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().pow(alpha) / w_max.float().pow(1 - alpha)).clamp(min=1e-5)


class SmoothQuant(Transform):
    name = "smoothquant"
    options = {"alpha": 0.5}

    def apply(self, ctx: LayerContext, schemes: SchemeMap) -> None:
        act_max: dict[str, torch.Tensor] = {}
        firsts = {linears[0] for _, linears in SMOOTH_GROUPS}

        def record(inner: str, x: torch.Tensor) -> None:
            if inner in firsts:
                m = x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
                act_max[inner] = m if inner not in act_max else torch.maximum(act_max[inner], m)

        ctx.forward(record)
        alpha = float(self.config["alpha"])
        with torch.no_grad():
            for norm_name, linears in SMOOTH_GROUPS:
                if linears[0] not in act_max:  # no calibration tokens reached it
                    continue
                mods = [ctx.layer.get_submodule(n) for n in linears]
                s = smoothing_scales(act_max[linears[0]], [m.weight for m in mods], alpha)
                norm = ctx.layer.get_submodule(norm_name)
                norm.weight.div_(s.to(norm.weight))
                for m in mods:
                    m.weight.mul_(s.to(m.weight)[None, :])
