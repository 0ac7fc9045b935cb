"""AWQ: activation-aware scaling and clipping of weights before low-bit quantization.

Per decoder layer, for each Linear group of the family's spec and the op that feeds it (for the
Llama family ``input_layernorm -> q/k/v``, ``v_proj -> o_proj`` when their shapes allow it (never
under GQA), ``post_attention_layernorm -> gate/up``, ``up_proj -> down_proj``):

1. ``x_mean`` = mean |x| per input channel over the search tokens; ``w_mean`` = mean over rows
   of |W| normalized by its quantization group's max (AutoAWQ's "duo scaling").
2. Grid over ratio r = i/grid: ``s = clamp(x_mean^r / (w_mean^(1-r) + 1e-4), 1e-4)``,
   ``s /= sqrt(max s * min s)``; loss = squared error between the group's branch output (what
   it adds to the residual stream: the whole attention for q/k/v, the whole MLP for gate/up)
   with ``Q(W·s)/s`` and with the fp weights; keep the best s (r = 0, no scaling, is in the grid).
   Where the branch is the group's single Linear (o_proj, down_proj: AutoAWQ inspects the
   Linear itself there) the loss is ``Σ_rows d H dᵀ`` with ``d = Q(W·s)/s - W`` and
   ``H = Σ_tokens x xᵀ``: the same number without re-running the Linear over every token per
   grid point (one GEMM of ``in²`` per token once, then ``out·in²`` per point).
3. Fold (:func:`qconv.quant.methods.scaling.fold_scales`): ``prev /= s`` (norm weight, or the
   rows of the previous Linear), ``W *= s``; the search inputs are divided by s so later steps
   see what the scaled model computes.
4. Clip search for every Linear except those whose outputs RoPE rotates (q/k: their error is
   amplified by the q·k product): per (row, group), shrink the |w| range by 1 - i/20 (i < 10)
   and keep the least output error ``d_g H_g d_gᵀ`` (``H_g``: the group's diagonal block of
   ``H``, over all search tokens).

Search tokens: ``search_samples`` windows, taken as the first samples of each calibration
bucket (:mod:`qconv.quant.reduce`), so a data-parallel rank holds its share of them. Every
sum over tokens (``x_mean``, ``H``, the branch losses) is taken per bucket and the buckets'
sums are combined in the fixed tree, losses as correctly rounded sums (``math.fsum``) of
per-token errors: a data-parallel run chooses the single process's scales bit for bit.

The branch outputs are computed in ``search_dtype`` (``auto``: bfloat16 where the device has
native bf16 GEMMs, float32 elsewhere); scales, H and losses are float32/float64 sums. The
quantizer stage after this transform (RTN or GPTQ) produces the codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qconv.arch.config import ModelConfig
from qconv.core.ggml_target import GGMLScheme
from qconv.core.target import Scheme, fake_quantize
from qconv.errors import InvalidOption
from qconv.quant.gptq import HessianAccumulator
from qconv.arch.spec import LAYER_PREFIX
from qconv.quant.memory import Workload, batch_bytes
from qconv.quant.methods.base import Transform
from qconv.quant.methods.scaling import fold_scales
from qconv.core.device import native_bf16
from qconv.quant.pipeline import LayerContext, LayerPipeline
from qconv.quant.schemes import SchemeMap

#: search-input features per bucket: bucket -> feature name -> ``[samples, T, in]`` (an
#: expert's routed tokens: ``[1, tokens, in]``)
Features = dict[int, dict[str, torch.Tensor]]


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of a 2-D tensor, as a GEMM: under ``MKL_CBWR`` its bits do not depend
    on the thread count (a reduction kernel's split does), which data-parallel ranks need."""
    return (torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device) @ x)[0]


def w_mean(weights: list[torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """Mean over rows of |W| / (group max of |W|): how large each input column is relative to
    the quantization range it shares."""
    w = torch.cat([x.float() for x in weights])
    out, n = w.shape
    g = w.abs().reshape(out, scheme.groups(n), scheme.group_width(n))
    g = g / (g.amax(-1, keepdim=True) + 1e-6)
    return column_sum(g.reshape(out, n)) / out


def candidate_scales(x_mean: torch.Tensor, wm: torch.Tensor, ratio: float) -> torch.Tensor:
    s = (x_mean.pow(ratio) / (wm.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def quadratic_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``Σ_rows d H dᵀ`` (= Σ over the tokens behind ``H`` of ``|x dᵀ|²``), correctly rounded."""
    return math.fsum(((d @ h) * d).sum(-1).double().tolist())


def clip_search(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, steps: int = 10, grid: int = 20) -> torch.Tensor:
    """Per (row, group) max |w| that minimizes the group's output error ``d H_g dᵀ`` (``H_g`` =
    the group's diagonal block of the input second moments ``h [in, in]``); returns the clipped
    weight. The rounding is weighted by ``diag(h)`` where the target uses importances."""
    out, n = w.shape
    ng, gw = scheme.groups(n), scheme.group_width(n)
    blocks = torch.stack([h[i * gw:(i + 1) * gw, i * gw:(i + 1) * gw] for i in range(ng)])  # [ng, gw, gw]
    wg = w.float().reshape(out, ng, gw)
    org_max = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
    best_max = org_max.clone()
    for i in range(steps):
        m = org_max * (1 - i / grid)
        d = fake_quantize(torch.clamp(wg, -m, m).reshape(out, n), scheme, h.diagonal()).reshape(out, ng, gw) - wg
        err = (torch.bmm(d.transpose(0, 1), blocks).transpose(0, 1) * d).sum(-1)  # [out, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], m, best_max)
    return torch.clamp(wg, -best_max, best_max).reshape(out, n).to(w.dtype)


@dataclass
class _Pair:
    """One scale to search: the op it folds into, the Linears it balances, fp Linears scaled
    with them (a MoE router), the feature they read, and how the error is measured: through
    ``branch`` (run per grid point) or, when None, at the single Linear's output via H."""

    source: str
    balance: tuple[str, ...]
    also: tuple[str, ...]
    feature: str
    branch: Callable[[torch.Tensor], torch.Tensor] | None


class AWQ(Transform):
    name = "awq"
    supports_experts = True
    supports_parallel = True
    #: ``search_samples`` 32 x 2048 tokens = the 64k tokens AutoAWQ searches with (128 x 512)
    options = {"grid": 20, "clip": True, "search_samples": 32, "search_tokens": 16384, "search_dtype": "auto"}

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.config["search_dtype"] not in ("auto", "float32", "bfloat16"):
            raise InvalidOption(f"awq: search_dtype must be auto, float32 or bfloat16, got {self.config['search_dtype']!r}")
        if min(int(self.config[k]) for k in ("search_samples", "search_tokens", "grid")) < 1:
            raise InvalidOption("awq: search_samples, search_tokens and grid must be >= 1")

    def calibration_samples(self, samples: int) -> int:
        """Only the search samples: after AWQ and RTN no pass reads more."""
        return min(int(self.config["search_samples"]), samples)

    def memory_bytes(self, config: ModelConfig, work: Workload) -> dict[str, int]:
        """The search features, one per Linear group in the group dtype (a mixture of experts:
        the router's input, and each token's routed copies for its experts), with the float32
        reference outputs of the branch losses; they are held while the layer's forward
        computes the next group's input, so its batch work counts beside them. The features
        count twice: each bucket's captured pieces live beside their concatenation, each scale
        fold writes rescaled copies beside them, and the heap keeps what they free (SmolLM2,
        16 and 32 search windows: once, the estimate was 14% and 18% under the measured peak)."""
        tokens = min(int(self.config["search_samples"]), work.samples) * work.seqlen
        widths = sum(config.expected_shapes()[f"{LAYER_PREFIX.format(0)}{g.linears[0]}.weight"][1]
                     for g in config.spec.groups)
        if config.spec.experts is not None:
            widths += config.hidden_size + config.num_experts_per_tok * (config.hidden_size + config.moe_intermediate_size)
        refs = min(tokens, int(self.config["search_tokens"])) * config.hidden_size * 4
        return {"awq_features": 2 * tokens * widths * work.group_dtype.itemsize + refs,
                "batch_work": batch_bytes(config, work, "keep")}

    def _dtype(self, device: torch.device) -> torch.dtype:
        name = self.config["search_dtype"]
        if name == "auto":
            return torch.bfloat16 if native_bf16(device) else torch.float32
        return getattr(torch, name)

    @property
    def changes_outputs(self) -> bool:
        """The clip (not the scales) changes the fp layer's outputs."""
        return bool(self.config["clip"])

    def apply(self, ctx: LayerContext, schemes: SchemeMap) -> None:
        feats, feature_of = self._features(ctx)
        layer = ctx.layer
        hessians: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for pair in self._pairs(ctx):
                member_schemes = [schemes.scheme_for(ctx.module_name(b)) for b in pair.balance]
                source = layer.get_submodule(pair.source)
                if None in member_schemes or not self._reached(feats, pair.feature) \
                        or source.weight.shape[0] != self._width(feats, pair.feature):
                    continue  # not quantized, not reached, or no exact source (a value Linear under GQA)
                s = self._search(ctx, pair, feats, hessians, member_schemes)
                fold_scales(source, [layer.get_submodule(b) for b in (*pair.also, *pair.balance)], s)
                for name in {feature_of[n] for n in (*pair.also, *pair.balance)}:  # their inputs are now x / s
                    for per in feats.values():
                        if name in per:
                            per[name] = (per[name].float() / s.to(per[name].device)).to(per[name].dtype)
                    if name in hessians:
                        hessians[name] = hessians[name] / (s[:, None] * s[None, :]).to(hessians[name].device)
            if self.config["clip"]:
                ctx.hold_reference()
                self._clip(ctx, schemes, feats, feature_of, hessians)

    def _features(self, ctx: LayerContext) -> tuple[Features, dict[str, str]]:
        """The search samples' inputs of every Linear group (one tensor per group: its Linears
        read the same input), per bucket, and the map Linear -> its group's feature name."""
        p = ctx.pipeline
        feature_of = {lin: g.linears[0] for g in ctx.spec.groups for lin in g.linears}
        if ctx.spec.experts is not None:
            assert ctx.router is not None
            feature_of[ctx.router] = ctx.router
            for e in range(p.config.num_experts):
                for g in ctx.spec.experts.groups(e):
                    feature_of.update({lin: g.linears[0] for lin in g.linears})
        wanted = set(feature_of.values())
        feats: Features = {}
        for bucket, part in p.subset(int(self.config["search_samples"])):
            got: dict[str, list[torch.Tensor]] = {}
            ctx.forward(lambda inner, x: got.setdefault(inner, []).append(x.to(p.group_dtype, copy=True).cpu())
                        if inner in wanted else None, inputs=ctx.inputs[part])
            # an expert's inputs are its routed tokens, one sequence of them
            feats[bucket] = {k: torch.cat(v).reshape(1, -1, v[0].shape[-1]) if v[0].dim() == 2 else torch.cat(v)
                             for k, v in got.items()}
        return feats, feature_of

    @staticmethod
    def _reached(feats: Features, name: str) -> bool:
        """Whether any search token reached the feature (an expert may get none)."""
        return any(name in per for per in feats.values())

    @staticmethod
    def _width(feats: Features, name: str) -> int:
        return next(per[name].shape[-1] for per in feats.values() if name in per)

    def _loss_length(self, p: LayerPipeline) -> int:
        """Positions of each search sample the branch losses run over: the first ones, about
        ``search_tokens`` in all. A causal block computes them exactly as in the full windows,
        and the attention over them costs quadratically less."""
        samples = min(int(self.config["search_samples"]), p.samples)
        return max(1, -(-int(self.config["search_tokens"]) // samples))

    def _pairs(self, ctx: LayerContext) -> list[_Pair]:
        """Every scale pair of the layer: the spec's groups (none through a fused source), then
        in a mixture of experts its norm -> the router and every expert's gate/up (one scale:
        one norm feeds them; on all tokens, measured at the whole MoE's output) and each
        expert's up -> down (its routed tokens)."""
        length = self._loss_length(ctx.pipeline)

        def branch(k: int, linears: tuple[str, ...], residual: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
            return None if len(linears) == 1 and residual == "writes" else ctx.branch_at(k, length)

        pairs = [_Pair(g.source, g.linears, (), g.linears[0], branch(k, g.linears, g.residual))
                 for k, g in enumerate(ctx.spec.groups) if g.source_kind != "fused"]
        x = ctx.spec.experts
        if x is not None:
            experts = [x.groups(e) for e in range(ctx.pipeline.config.num_experts)]
            assert ctx.router is not None
            gate_up = tuple(n for g, _ in experts for n in g.linears)
            pairs.append(_Pair(x.input_norm, gate_up, (ctx.router,), ctx.router,
                               ctx.branch_at(len(ctx.spec.groups), length)))
            pairs += [_Pair(down.source, down.linears, (), down.linears[0], None) for _, down in experts]
        return pairs

    def _hessian(self, ctx: LayerContext, feats: Features, name: str, width: int) -> torch.Tensor:
        """``Σ x xᵀ`` of a feature over every rank's search tokens (float32, bucket tree)."""
        p = ctx.pipeline
        acc = HessianAccumulator(width, p.device, span=p.span, parallel=p.parallel)
        for bucket in sorted(feats):
            if name in feats[bucket]:
                acc.add(feats[bucket][name], bucket)
        return acc.hessian

    def _search(self, ctx: LayerContext, pair: _Pair, feats: Features, hessians: dict[str, torch.Tensor],
                schemes: list[Scheme]) -> torch.Tensor:
        """The best scale for the pair, each of its Linears rounded onto its own scheme (the
        first one's groups normalize ``w_mean``). A target that weights its rounding by the
        inputs' mean squares (a ggml type's imatrix search) gets those of the scaled inputs,
        ``x / s``, at every grid point."""
        p = ctx.pipeline
        mods = [ctx.layer.get_submodule(b) for b in pair.balance]
        originals = [m.weight.data.clone() for m in mods]
        width = originals[0].shape[1]
        rows = {b: per[pair.feature].reshape(-1, width) for b, per in sorted(feats.items()) if pair.feature in per}
        x_sum = p.reduce(((b, column_sum(x.float().abs())) for b, x in rows.items()), width)
        tokens = p.count(sum(x.shape[0] for x in rows.values()))
        x_mean = (x_sum / max(tokens, 1)).to(originals[0].device)
        x_sq = None
        if any(isinstance(s, GGMLScheme) for s in schemes):
            x_sq = p.reduce(((b, column_sum(x.float().square())) for b, x in rows.items()), width)
            x_sq = (x_sq / max(tokens, 1)).to(originals[0].device)
        wm = w_mean(originals, schemes[0])
        grid = int(self.config["grid"])
        scales = [candidate_scales(x_mean, wm, i / grid) for i in range(grid)]

        def trial(i: int) -> None:
            s = scales[i]
            importance = None if x_sq is None else x_sq / s.square()
            for m, w, scheme in zip(mods, originals, schemes):
                m.weight.data = fake_quantize(w * s[None, :], scheme, importance) / s[None, :]

        if pair.branch is None:  # a single Linear: its error through H, no pass over the tokens
            if pair.feature not in hessians:
                hessians[pair.feature] = self._hessian(ctx, feats, pair.feature, width)
            h = hessians[pair.feature].to(originals[0].device)
            losses = []
            for i in range(grid):
                trial(i)
                losses.append(quadratic_error(mods[0].weight.data - originals[0], h))
        else:
            losses = self._branch_losses(ctx, pair, feats, trial, grid)
        for m, w in zip(mods, originals):
            m.weight.data = w
        best = min(range(grid), key=lambda i: (losses[i], i))
        return scales[best]

    def _branch_losses(self, ctx: LayerContext, pair: _Pair, feats: Features, trial: Callable[[int], None],
                       grid: int) -> list[float]:
        """Squared error of the branch output per grid point, summed over every rank's search
        tokens: per bucket a correctly rounded sum of per-token errors, buckets by the tree."""
        p, dtype, branch = ctx.pipeline, self._dtype(ctx.pipeline.device), pair.branch
        assert branch is not None
        buckets = [b for b in sorted(feats) if pair.feature in feats[b]]
        length = self._loss_length(p)
        inputs = {b: feats[b][pair.feature][:, :length] for b in buckets}
        refs = {b: p.map(branch, inputs[b], compute=dtype) for b in buckets}
        table = torch.zeros(len(buckets), grid, dtype=torch.float64)
        for i in range(grid):
            trial(i)
            for j, b in enumerate(buckets):
                rows = p.map(lambda x, r: (branch(x).float() - r).pow(2).sum(-1), inputs[b], refs[b],
                             compute=dtype)
                table[j, i] = math.fsum(rows.double().flatten().tolist())
        return p.reduce(zip(buckets, table), grid, torch.float64).tolist()

    def _clip(self, ctx: LayerContext, schemes: SchemeMap, feats: Features, feature_of: dict[str, str],
              hessians: dict[str, torch.Tensor]) -> None:
        for inner in ctx.linears:
            scheme = schemes.scheme_for(ctx.module_name(inner))
            name = feature_of.get(inner)
            if scheme is None or name is None or not self._reached(feats, name) or \
                    (inner in ctx.spec.linear_names and ctx.spec.linear(inner).rope_heads):
                continue
            linear = ctx.layer.get_submodule(inner)
            if name not in hessians:
                hessians[name] = self._hessian(ctx, feats, name, linear.weight.shape[1])
            linear.weight.data = clip_search(linear.weight.data, hessians[name].to(linear.weight.device), scheme)
