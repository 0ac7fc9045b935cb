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
import math
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
#: ``(x, max |x| over all calibration tokens) -> x`` on the activation grid
InputQuantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]



def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-channel scales from activation maxima and the balanced weights' column maxima."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.to(w_max.device, torch.float32).pow(alpha) / w_max.float().pow(1 - alpha)).clamp(min=1e-5)


def token_errors(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor,
                 quantize_weight: list[WeightQuantizer], quantize_input: InputQuantizer,
                 x_max: torch.Tensor, refs: list[torch.Tensor]) -> torch.Tensor:
    """Per token of ``x`` ``[N, in]``, the squared error of the smoothed quantized Linears'
    outputs against the fp outputs ``refs``, summed over the Linears: inputs ``x / s`` through
    ``quantize_input`` (given ``x_max``, the largest |x / s| over all calibration tokens, which a
    static scale is calibrated from), weights ``W·s`` through ``quantize_weight[i]`` (their
    fake-quantizer, or identity for Linears kept in fp)."""
    xq = quantize_input(x / s[None, :], x_max)
    return sum(((xq @ q(w * s[None, :]).T) - r).pow(2).sum(-1)
               for w, q, r in zip(weights, quantize_weight, refs))


def alpha_errors(act_max: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                 quantize_weight: list[WeightQuantizer], alphas: list[float],
                 quantize_input: InputQuantizer = lambda x, _: fake_quant_per_token(x)) -> torch.Tensor:
    """float64 ``[len(alphas)]``: per α, the correctly rounded sum (``math.fsum``) of
    :func:`token_errors` over the tokens ``x``, so that sums over disjoint token sets (a
    data-parallel rank's buckets) combine to the same bits however they were split.
    ``act_max``: every calibration token's per-channel max |x| (it sets the scales)."""
    w = [t.float() for t in weights]
    refs = [x @ t.T for t in w]
    out = []
    for a in alphas:
        s = smoothing_scales(act_max, w, a)
        errors = token_errors(x, w, s, quantize_weight, quantize_input, (act_max.float() / s).amax(), refs)
        out.append(math.fsum(errors.double().tolist()))
    return torch.tensor(out, dtype=torch.float64)


class SmoothQuant(Transform):
    name = "smoothquant"
    supports_experts = True
    #: maxima reduce exactly; the α search sums its errors per bucket in the fixed tree
    supports_parallel = True
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
        p = ctx.pipeline
        #: search tokens per bucket: an even subsample (every ``stride``-th token of every rank's
        #: samples), kept per bucket so that a data-parallel run sums the same errors
        kept: dict[int, dict[str, list[torch.Tensor]]] = {}
        stride = max(1, p.samples * ctx.inputs.shape[1] // max(budget, 1))

        def record(bucket: int, inner: str, x: torch.Tensor) -> None:
            if inner in members:
                rows = x.reshape(-1, x.shape[-1])
                m = rows.abs().amax(0).float().cpu()
                act_max[inner] = m if inner not in act_max else torch.maximum(act_max[inner], m)
                if search:
                    kept.setdefault(bucket, {}).setdefault(inner, []).append(rows[::stride].float().cpu())

        if search:
            for bucket, part in p.subset(p.samples):
                ctx.forward(functools.partial(record, bucket), inputs=ctx.inputs[part])
        else:
            ctx.forward(functools.partial(record, 0))
        if p.parallel is not None:
            for name in sorted(act_max):
                p.parallel.maximum(act_max[name])
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
                    weights = [m.weight for m in mods]
                    table = [(b, alpha_errors(group_max, torch.cat(kept[b][linears[0]]), weights, quantizers, grid,
                                              _input_quantizer(schemes)))
                             for b in sorted(kept) if linears[0] in kept[b]]
                    errors = p.reduce(table, len(grid), torch.float64).tolist()
                    a = grid[min(range(len(grid)), key=lambda i: (errors[i], i))]
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


def _input_quantizer(schemes: SchemeMap) -> InputQuantizer:
    """The activation grid the search measures with: the scheme's (FP8 per token, per tensor
    with the scale all calibration tokens give, ...), per-token int8 by default."""
    act = schemes.activations
    if act is None or act.type == "int":
        return lambda x, _: fake_quant_per_token(x)
    return lambda x, x_max: fake_quant_input(x, act, act.static_scale(x_max) if act.needs_scale else None)


def _weight_quantizer(scheme: WeightScheme | None) -> WeightQuantizer:
    """The fake-quantizer of a Linear's weight grid (identity for a Linear kept in fp)."""
    return (lambda w: w) if scheme is None else (lambda w: fake_quantize(w, scheme))
