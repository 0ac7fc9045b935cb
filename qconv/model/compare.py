"""How far a converted/quantized model drifts from its base, token by token.

Perplexity alone hides drift that happens to cancel out; KL(base‖other) over the full
next-token distribution and top-1 agreement show it. Both models see the same GPTQ-protocol
windows as :func:`qconv.model.perplexity.perplexity`, so the two perplexities reported here
equal what that function gives for each model. A KV cache spec applies to ``other`` only, so
comparing a model with itself under ``--kv-cache`` measures what the cache alone costs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qconv.model.decoder import Transformer
from qconv.model.kv_spec import KVCacheSpec
from qconv.model.perplexity import WindowCallback, logits_nll_sum, score_window, windows


@dataclass
class CompareResult:
    ppl_base: float
    ppl_other: float
    kl_mean: float
    top1_agreement: float
    max_abs_dlogit: float
    n_tokens: int
    n_windows: int
    kv_cache: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def compare(
    base: Transformer,
    other: Transformer,
    ids: list[int],
    ctx: int = 2048,
    max_windows: int | None = None,
    on_window: WindowCallback | None = None,
    kv_cache: KVCacheSpec | None = None,
) -> CompareResult:
    """Score ``other`` against ``base`` on the token stream ``ids``.

    The models may sit on different devices; ``other``'s logits are moved to ``base``'s.
    ``kv_cache`` runs ``other`` through a fresh cache of that kind per window (``base`` never).
    """
    chunks = windows(ids, ctx, max_windows)
    nll_base = nll_other = kl_sum = 0.0
    agree = 0
    max_dlogit = 0.0
    report = None
    for i, window in enumerate(chunks):
        logits_base, targets = score_window(base, window)
        cache = None if kv_cache is None else kv_cache.make(other.config, 1, ctx, other.device, other.dtype,
                                                             getattr(other, "kv_scales", None))
        logits_other = score_window(other, window, cache)[0].to(logits_base.device)
        if cache is not None:
            report = kv_cache.report(cache)
        lp_base, lp_other = logits_base.log_softmax(-1), logits_other.log_softmax(-1)
        nll_base += logits_nll_sum(logits_base, targets)  # as qconv run --ppl computes it
        nll_other += logits_nll_sum(logits_other, targets)
        kl_per_token = (lp_base.exp() * (lp_base - lp_other)).sum(-1)
        kl_sum += kl_per_token.double().sum().item()
        agree += int((logits_base.argmax(-1) == logits_other.argmax(-1)).sum())
        max_dlogit = max(max_dlogit, (logits_base - logits_other).abs().max().item())
        if on_window is not None:
            on_window(i + 1, len(chunks))
    n = len(chunks) * (ctx - 1)
    return CompareResult(
        ppl_base=math.exp(nll_base / n),
        ppl_other=math.exp(nll_other / n),
        kl_mean=kl_sum / n,
        top1_agreement=agree / n,
        max_abs_dlogit=max_dlogit,
        n_tokens=n,
        n_windows=len(chunks),
        kv_cache=report,
    )
