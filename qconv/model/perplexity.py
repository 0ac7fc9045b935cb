"""Perplexity under the GPTQ evaluation protocol, so numbers are comparable with published tables.

The protocol: tokenize the whole text once, cut it into ``len // ctx`` non-overlapping windows
of ``ctx`` tokens (the last partial window is dropped), run each window from an empty context,
and score every token after the first of each window. :func:`windows` and
:func:`score_window` are shared with :mod:`qconv.model.compare`.

With a KV cache spec, each window runs through a fresh cache of that kind in chunks of
:data:`PREFILL_CHUNK` tokens. Every cache's ``attend`` treats a chunk exactly as that many
single-token decoding steps, so the perplexity is the one token-by-token generation with that
cache would produce, not an optimistic one where the window attends to unquantized keys/values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qconv.errors import InvalidOption
from qconv.model.decoder import Transformer
from qconv.model.kv_cache import KVCache
from qconv.model.kv_spec import KVCacheSpec

#: ``on_window(done, total)``: progress after each evaluated window.
WindowCallback = Callable[[int, int], None]
#: Tokens per forward pass when a window runs through a KV cache; only bounds the memory of
#: the attention scores (chunk x ctx), the result does not depend on it.
PREFILL_CHUNK = 512


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    kv_cache: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(ids: list[int], ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """The evaluation windows as a ``[n_windows, ctx]`` LongTensor (at most ``max_windows`` rows)."""
    if ctx < 2:
        raise InvalidOption(f"context length must be at least 2, got {ctx}")
    n = len(ids) // ctx
    if max_windows is not None:
        if max_windows < 1:
            raise InvalidOption(f"max windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise InvalidOption(f"text has {len(ids)} tokens, fewer than one window of {ctx}")
    return torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)


def score_window(
    model: Transformer, window: torch.Tensor, cache: KVCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[ctx-1, V]`` (float32) for every scored position of one window, and the targets
    ``[ctx-1]`` they predict (the window shifted by one). With ``cache`` (empty, room for the
    window) the window is fed through it in chunks of :data:`PREFILL_CHUNK` tokens."""
    window = window.to(model.device)[None]
    if cache is None:
        logits = model(window)
    else:
        starts = range(0, window.shape[1], PREFILL_CHUNK)
        logits = torch.cat([model(window[:, a: a + PREFILL_CHUNK], cache, a) for a in starts], dim=1)
    return logits[0, :-1], window[0, 1:]  # the last position predicts past the window


def logits_nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logits`` ``[N, V]`` (float64 sum):
    ``logsumexp - logit[target]`` in float32 per chunk of rows, so no ``[N, V]`` log-probability tensor is written (at a 49k vocabulary
    and 2048 positions that is 400 MB of memory traffic per window, measured ~0.2 s)."""
    total = 0.0
    for rows, tgt in zip(logits.split(chunk), targets.split(chunk)):
        rows = rows.float()
        total += (torch.logsumexp(rows, -1) - rows.gather(-1, tgt[:, None])[:, 0]).double().sum().item()
    return total


@torch.inference_mode()
def perplexity(
    model: Transformer,
    ids: list[int],
    ctx: int = 2048,
    max_windows: int | None = None,
    on_window: WindowCallback | None = None,
    kv_cache: KVCacheSpec | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``ids`` (GPTQ protocol, see module docstring).

    ``kv_cache`` runs every window through a fresh cache of that kind; the result then reports
    the bytes that cache held at the end of a window.
    """
    chunks = windows(ids, ctx, max_windows)
    total = 0.0
    report = None
    for i, window in enumerate(chunks):
        cache = None if kv_cache is None else kv_cache.make(model.config, 1, ctx, model.device, model.dtype,
                                                             getattr(model, "kv_scales", None))
        logits, targets = score_window(model, window, cache)
        total += logits_nll_sum(logits, targets)
        if cache is not None:
            report = kv_cache.report(cache)
        if on_window is not None:
            on_window(i + 1, len(chunks))
    n_tokens = len(chunks) * (ctx - 1)
    return PerplexityResult(math.exp(total / n_tokens), total, n_tokens, len(chunks), report)
