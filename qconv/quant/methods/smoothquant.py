"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

For each source -> Linears pair (the family spec's Linear groups fed by a norm or a Linear), per
input channel j of the Linears:
``s_j = max|X_j|^α / max|W_j|^(1-α)`` (max over tokens, and over the rows of every balanced
Linear), clamped to >= 1e-5. The Linears' columns are multiplied by ``s`` and the source's output
channels divided by it, so the fp model computes the same function while the activations the
int8 quantizer sees are flatter. Sources:

* ``input_layernorm -> q/k/v`` and ``post_attention_layernorm -> gate/up`` (the norm's weight
  absorbs ``1/s``), as in the paper and llm-compressor's Llama mappings;
  (option ``norms``, default on; off leaves only the pair below, for a rotated model whose
  norm outputs are already flat);
* ``up_proj -> down_proj`` (option ``down_proj``, default off): down_proj's input is
  ``silu(gate) * up``, so dividing up_proj's output row j by ``s_j`` divides that input's channel
  j exactly. It flattens the input with the largest per-channel outliers in Llama-family MLPs,
  but measured on SmolLM2-135M (α 0.8, GPTQ W8A8) it did not help: 21.27 vs 21.25 PPL without.
  At α 0.8 it pushes the outliers into down_proj's weights, which per-channel int8 then rounds
  badly; ``down_proj_alpha`` gives the pair its own, lower α (docs/methods.md has the scan).

With ``search: true`` each pair of each layer gets its own α instead: a grid over α = 0, 0.05,
..., 1 (the configured α included) picks the one whose smoothed, quantized Linears
(inputs on the scheme's activation grid, per-token int8 or FP8; the quantizer's weight grid by
RTN) best reproduce the fp Linears'
outputs on ``search_tokens`` calibration tokens (least squared error), the scale search AWQ
does for weight-only grids, here with the activation grid in the loss.

o_proj has no exact source on GQA models (its input channels are the attention's value heads,
shared between query heads), so it is left alone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from qconv.errors import InvalidOption
from qconv.model.act_quant import fake_quant_input, fake_quant_per_token
from qconv.core.grid import WeightScheme, fake_quantize
from qconv.quant.methods.base import Transform
from qconv.quant.methods.scaling import fold_scales
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap

log = logging.getLogger(__name__)
WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]



def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-channel scales from activation maxima and the balanced weights' column maxima."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.to(w_max.device, torch.float32).pow(alpha) / w_max.float().pow(1 - alpha)).clamp(min=1e-5)


def smoothed_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor,
                   quantize_weight: list[WeightQuantizer], refs: list[torch.Tensor] | None = None,
                   quantize_input: WeightQuantizer = fake_quant_per_token) -> float:
    """Squared error of the smoothed quantized Linears' outputs against the fp outputs (``refs``,
    computed when not given) on tokens ``x`` ``[N, in]``: inputs ``x / s`` through
    ``quantize_input`` (default: per-token int8), weights ``W·s`` through ``quantize_weight[i]``
    (their fake-quantizer, or identity for Linears kept in fp)."""
    xq = quantize_input(x / s[None, :])
    refs = refs or [x @ w.T for w in weights]
    return sum(((xq @ q(w * s[None, :]).T) - r).pow(2).sum().item()
               for w, q, r in zip(weights, quantize_weight, refs))


def search_alpha(act_max: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                 quantize_weight: list[WeightQuantizer], alphas: list[float],
                 quantize_input: WeightQuantizer = fake_quant_per_token) -> float:
    """The α of ``alphas`` with the least :func:`smoothed_error` (ties: the first)."""
    w = [t.float() for t in weights]
    refs = [x @ t.T for t in w]
    errors = [smoothed_error(x, w, smoothing_scales(act_max, w, a), quantize_weight, refs, quantize_input)
              for a in alphas]
    return alphas[min(range(len(alphas)), key=errors.__getitem__)]


class SmoothQuant(Transform):
    name = "smoothquant"
    supports_experts = True
    supports_parallel = True  # maxima reduce exactly; the alpha search is refused data-parallel
    options = {"alpha": 0.5, "norms": True, "down_proj": False, "down_proj_alpha": None,
               "search": False, "search_tokens": 4096}

    def apply(self, ctx: LayerContext, schemes: SchemeMap) -> None:
        # a value Linear feeds its group through attention's head mixing, a fused one among other
        # outputs: no exact source there
        groups = [(g.source, g.linears, g.source_kind == "linear") for g in ctx.spec.groups
                  if g.source_kind in ("norm", "linear")
                  and self.config["down_proj" if g.source_kind == "linear" else "norms"]]
        search, budget = bool(self.config["search"]), int(self.config["search_tokens"])
        groups += _expert_groups(ctx, bool(self.config["norms"]), bool(self.config["down_proj"]))
        act_max: dict[str, torch.Tensor] = {}
        members = {n for _, linears, _ in groups for n in linears}
        kept: dict[str, list[torch.Tensor]] = {}
        stride = max(1, ctx.inputs.shape[0] * ctx.inputs.shape[1] // max(budget, 1))

        def record(inner: str, x: torch.Tensor) -> None:
            if inner in members:
                rows = x.reshape(-1, x.shape[-1])
                m = rows.abs().amax(0).float().cpu()
                act_max[inner] = m if inner not in act_max else torch.maximum(act_max[inner], m)
                if search:  # an even subsample of the calibration tokens
                    kept.setdefault(inner, []).append(rows[::stride].float().cpu())

        ctx.forward(record)
        parallel = ctx.pipeline.parallel
        if parallel is not None:
            if search:
                raise InvalidOption("smoothquant: the alpha search is not implemented data-parallel yet")
            for name in sorted(act_max):
                parallel.maximum(act_max[name])
        alpha = float(self.config["alpha"])
        down_alpha = self.config["down_proj_alpha"]
        for name, a in (("alpha", alpha), ("down_proj_alpha", down_alpha)):
            if a is not None and not 0 <= float(a) <= 1:
                raise InvalidOption(f"smoothquant: {name} must be between 0 and 1, got {a}")
        with torch.no_grad():
            # all maxima come from one pass over the unsmoothed layer: each group's scale only
            # rescales its own input channels, which no other group's input depends on
            for source, linears, from_linear in groups:
                # the group's input channels' maxima: of its Linears' inputs (in a mixture of
                # experts the union of every expert's routed tokens is every token)
                seen = [act_max[n] for n in linears if n in act_max]
                if not seen:  # no calibration tokens reached it
                    continue
                group_max = functools.reduce(torch.maximum, seen)
                mods = [ctx.layer.get_submodule(n) for n in linears]
                a = float(down_alpha) if from_linear and down_alpha is not None else alpha
                if search:
                    grid = sorted({a, *(i / 20 for i in range(21))})
                    quantizers = [_weight_quantizer(None if n == ctx.router else schemes.scheme_for(ctx.module_name(n)))
                                  for n in linears]
                    a = search_alpha(group_max, torch.cat(kept[linears[0]])[:budget],
                                     [m.weight for m in mods], quantizers, grid, _input_quantizer(schemes))
                    log.debug("layer %d, %s -> %s: alpha %.2f", ctx.index, source, linears[0], a)
                s = smoothing_scales(group_max, [m.weight for m in mods], a)
                fold_scales(ctx.layer.get_submodule(source), mods, s)


def _expert_groups(ctx: LayerContext, norms: bool, down_proj: bool) -> list[tuple[str, tuple[str, ...], bool]]:
    """A mixture of experts' pairs: its norm -> the router and every expert's gate/up (one scale:
    one norm feeds them all; the router stays in full precision, scaled to match; ``search``
    measures this pair's error on every token for every expert, the router's choice aside), and
    each expert's up -> down (on its routed tokens)."""
    x = ctx.spec.experts
    if x is None:
        return []
    experts = [x.groups(e) for e in range(ctx.pipeline.config.num_experts)]
    out: list[tuple[str, tuple[str, ...], bool]] = []
    if norms:
        out.append((x.input_norm, (f"{x.module}.{x.router}", *(n for g, _ in experts for n in g.linears)), False))
    if down_proj:
        out += [(down.source, down.linears, True) for _, down in experts]
    return out


def _input_quantizer(schemes: SchemeMap) -> WeightQuantizer:
    """The activation grid the search measures with: the scheme's (FP8 per token, per tensor
    with the scale these tokens would calibrate, ...), per-token int8 by default."""
    act = schemes.activations
    if act is None or act.type == "int":
        return fake_quant_per_token
    return lambda x: fake_quant_input(x, act, act.static_scale(x.abs().amax()) if act.needs_scale else None)


def _weight_quantizer(scheme: WeightScheme | None) -> WeightQuantizer:
    """The fake-quantizer of a Linear's weight grid (identity for a Linear kept in fp)."""
    return (lambda w: w) if scheme is None else (lambda w: fake_quantize(w, scheme))
