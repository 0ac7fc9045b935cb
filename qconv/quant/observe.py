"""Ranges for the scales a checkpoint fixes at calibration time: each Linear's largest |input|
(static FP8 activation scales, NVFP4's activation global scales) and each layer's largest |key|
and |value| after RoPE (FP8 KV-cache scales), over every calibration token, all ranks.

They are taken in one extra forward pass of the layer after its transforms (SmoothQuant, AWQ)
and before its weights are quantized, with the calibration inputs the quantized earlier layers
produce (compressed-tensors' ``static_minmax`` observers see the same tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.model.kv_cache import PLAIN, AttentionOptions, KVCache, KVMemory, causal_attention
from qconv.quant.pipeline import LayerContext


class _RangeCache(KVCache):
    """Attends exactly as without a cache, recording the largest |key| and |value| it is given."""

    max_len = 1 << 62

    def __init__(self, device: torch.device) -> None:
        self.absmax = torch.zeros(2, device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               opts: AttentionOptions = PLAIN) -> torch.Tensor:
        seen = torch.stack((k.detach().abs().amax(), v.detach().abs().amax())).float()
        self.absmax = torch.maximum(self.absmax, seen)
        return causal_attention(q, k, v, opts)

    def memory(self) -> KVMemory:
        return KVMemory(0, 0, 0)


@dataclass
class StaticRanges:
    #: inner Linear name -> largest |input| (float32 scalar)
    inputs: dict[str, torch.Tensor]
    #: largest |key| and |value| ``[2]``, or None when not asked for
    kv: torch.Tensor | None


def static_ranges(ctx: LayerContext, inputs: bool, kv: bool) -> StaticRanges:
    """The layer's input and KV ranges asked for (one forward pass; nothing when neither is)."""
    if not (inputs or kv):
        return StaticRanges({}, None)
    device = ctx.pipeline.device
    seen = {name: torch.zeros((), device=device) for name in ctx.linears} if inputs else {}

    def hook(name: str, x: torch.Tensor) -> None:
        if name in seen and x.numel():
            seen[name] = torch.maximum(seen[name], x.detach().abs().amax().float())

    cache = _RangeCache(device) if kv else None
    ctx.forward(hook if inputs else None, cache=cache)
    names = list(seen)
    flat = torch.cat([torch.stack([seen[n] for n in names]) if names else torch.zeros(0, device=device),
                      cache.absmax if cache is not None else torch.zeros(0, device=device)])
    if ctx.pipeline.parallel is not None:
        flat = ctx.pipeline.parallel.maximum(flat)
    flat = flat.cpu()
    return StaticRanges({n: flat[i] for i, n in enumerate(names)}, flat[len(names):] if kv else None)
