"""AWQ: activation-aware scaling and clipping of weights before low-bit quantization.

Per decoder layer, for each Linear group of the family's spec and the op that feeds it (for the
Llama family ``input_layernorm -> q/k/v``, ``v_proj -> o_proj`` when their shapes allow it (never
under GQA), ``post_attention_layernorm -> gate/up``, ``up_proj -> down_proj``):

1. ``x_mean`` = mean |x| per input channel over calibration tokens; ``w_mean`` = mean over rows
   of |W| normalized by its quantization group's max (AutoAWQ's "duo scaling").
2. Grid over ratio r = i/grid: ``s = clamp(x_mean^r / (w_mean^(1-r) + 1e-4), 1e-4)``,
   ``s /= sqrt(max s * min s)``; loss = MSE between the group's branch output (what it adds to
   the residual stream: the whole attention for q/k/v, the whole MLP for gate/up) with
   ``Q(W·s)/s`` and with the fp weights; keep the best s (r = 0, no scaling, is in the grid).
3. Fold (:func:`qconv.quant.methods.scaling.fold_scales`): ``prev /= s`` (norm weight, or the
   rows of the previous Linear), ``W *= s``; the cached inputs are divided by s so later steps
   see what the scaled model computes.
4. Clip search for every Linear except those whose outputs RoPE rotates (q/k: their error is
   amplified by the q·k product):
   per (row, group), shrink the |w| range by 1 - i/20 (i < 10) and keep the least output MSE.

All search math is float32 (AWQ's fp16 overflow issues do not arise). The quantizer stage after
this transform (RTN or GPTQ) produces the codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qconv.core.grid import WeightScheme, fake_quantize
from qconv.quant.methods.base import Transform
from qconv.quant.methods.scaling import fold_scales
from qconv.arch.config import ModelConfig
from qconv.quant.memory import linear_shapes
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap


def w_mean(weights: list[torch.Tensor], scheme: WeightScheme) -> torch.Tensor:
    """Mean over rows of |W| / (group max of |W|): how large each input column is relative to
    the quantization range it shares."""
    w = torch.cat([x.float() for x in weights])
    out, n = w.shape
    g = w.abs().reshape(out, scheme.groups(n), scheme.group_width(n))
    g = g / (g.amax(-1, keepdim=True) + 1e-6)
    return g.reshape(out, n).mean(0)


def candidate_scales(x_mean: torch.Tensor, wm: torch.Tensor, ratio: float) -> torch.Tensor:
    s = (x_mean.pow(ratio) / (wm.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def clip_search(w: torch.Tensor, x: torch.Tensor, scheme: WeightScheme, steps: int = 10, grid: int = 20,
                chunk: int = 64) -> torch.Tensor:
    """Per (row, group) max |w| that minimizes the group-wise output error on tokens ``x`` [N, in];
    returns the clipped weight."""
    out, n = w.shape
    ng, gw = scheme.groups(n), scheme.group_width(n)
    xg = x.float().reshape(-1, ng, gw)
    clipped = torch.empty_like(w, dtype=torch.float32)
    for r0 in range(0, out, chunk):
        wc = w[r0:r0 + chunk].float()
        wg = wc.reshape(-1, ng, gw)
        ref = torch.einsum("tng,cng->ctn", xg, wg)
        org_max = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
        best_max = org_max.clone()
        for i in range(steps):
            m = org_max * (1 - i / grid)
            q = fake_quantize(torch.clamp(wg, -m, m).reshape(wc.shape), scheme).reshape(wg.shape)
            err = (torch.einsum("tng,cng->ctn", xg, q) - ref).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], m, best_max)
        clipped[r0:r0 + chunk] = torch.clamp(wg, -best_max, best_max).reshape(wc.shape)
    return clipped.to(w.dtype)


class AWQ(Transform):
    name = "awq"
    supports_experts = True
    #: ``search_samples`` 32 x 2048 tokens = the 64k tokens AutoAWQ searches with (128 x 512)
    options = {"grid": 20, "clip": True, "clip_tokens": 512, "search_samples": 32}

    def memory_bytes(self, config: ModelConfig, samples: int, seqlen: int) -> dict[str, int]:
        """Every Linear's inputs over the search samples in float32, and the two branch outputs
        the loss compares."""
        tokens = min(int(self.config["search_samples"]), samples) * seqlen
        return {"awq_features": tokens * (sum(i for _, i in linear_shapes(config)) + 2 * config.hidden_size) * 4}

    def apply(self, ctx: LayerContext, schemes: SchemeMap) -> None:
        layer = ctx.layer
        n = min(int(self.config["search_samples"]), ctx.inputs.shape[0])
        inputs = ctx.inputs[:n]
        feats: dict[str, list[torch.Tensor]] = {}
        ctx.forward(lambda inner, x: feats.setdefault(inner, []).append(x.float().cpu()), inputs=inputs)
        # an expert's inputs are its routed tokens, one sequence of them
        x = {k: torch.cat(v).reshape(1, -1, v[0].shape[-1]) if v[0].dim() == 2 else torch.cat(v)
             for k, v in feats.items()}
        p = ctx.pipeline
        with torch.inference_mode():
            for source_name, balance, also, feat, branch in self._pairs(ctx):
                scheme = schemes.scheme_for(ctx.module_name(balance[0]))
                source = layer.get_submodule(source_name)
                if scheme is None or feat not in x or source.weight.shape[0] != x[feat].shape[-1]:
                    continue  # not quantized, not reached, or no exact source (a value Linear under GQA)
                s = self._search(layer, balance, lambda t: p.map(branch, t), x[feat], scheme)
                fold_scales(source, [layer.get_submodule(b) for b in (*also, *balance)], s)
                for name in (*also, *balance):  # their inputs are now x / s
                    if name in x:
                        x[name] = x[name] / s.to(x[name].device)
            if self.config["clip"]:
                self._clip(ctx, schemes, {k: v for k, v in x.items() if k != ctx.router})

    @staticmethod
    def _pairs(ctx: LayerContext) -> list[tuple[str, tuple[str, ...], tuple[str, ...], str,
                                                Callable[[torch.Tensor], torch.Tensor]]]:
        """(source, balanced Linears, fp Linears scaled with them, the input feature to search
        on, the branch the error is measured at) for every scale pair of the layer: the spec's
        groups (none through a fused source), then in a mixture of experts its norm -> the
        router and every expert's gate/up (one scale: one norm feeds them; on all tokens,
        measured at the whole MoE's output) and each expert's up -> down (its routed tokens)."""
        pairs = [(g.source, g.linears, (), g.linears[0], ctx.branch(g)) for g in ctx.spec.groups
                 if g.source_kind != "fused"]
        x = ctx.spec.experts
        if x is not None:
            experts = [x.groups(e) for e in range(ctx.pipeline.config.num_experts)]
            assert ctx.router is not None
            gate_up = tuple(n for g, _ in experts for n in g.linears)
            pairs.append((x.input_norm, gate_up, (ctx.router,), ctx.router, ctx.branch_at(len(ctx.spec.groups))))
            pairs += [(down.source, down.linears, (), down.linears[0], ctx.layer.get_submodule(down.linears[0]))
                      for _, down in experts]
        return pairs

    def _search(self, layer: torch.nn.Module, balance: tuple[str, ...], inspect: Callable[[torch.Tensor], torch.Tensor],
                x: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
        mods = [layer.get_submodule(b) for b in balance]
        originals = [m.weight.data.clone() for m in mods]
        x_mean = x.abs().reshape(-1, x.shape[-1]).mean(0).to(originals[0].device)
        wm = w_mean(originals, scheme)
        ref = inspect(x)
        best, best_s = float("inf"), torch.ones_like(x_mean)
        grid = int(self.config["grid"])
        for i in range(grid):
            s = candidate_scales(x_mean, wm, i / grid)
            for m, w in zip(mods, originals):
                m.weight.data = fake_quantize(w * s[None, :], scheme) / s[None, :]
            loss = (inspect(x) - ref).float().pow(2).mean().item()
            if loss < best:
                best, best_s = loss, s
        for m, w in zip(mods, originals):
            m.weight.data = w
        return best_s

    def _clip(self, ctx: LayerContext, schemes: SchemeMap, x: dict[str, torch.Tensor]) -> None:
        for inner, feats in x.items():
            scheme = schemes.scheme_for(ctx.module_name(inner))
            if scheme is None or (inner in ctx.spec.linear_names and ctx.spec.linear(inner).rope_heads):
                continue
            flat = feats.reshape(-1, feats.shape[-1])
            step = max(1, flat.shape[0] // int(self.config["clip_tokens"]))
            linear = ctx.layer.get_submodule(inner)
            linear.weight.data = clip_search(linear.weight.data, flat[::step].to(linear.weight.device), scheme)
