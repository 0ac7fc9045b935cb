"""Perplexity under the GPTQ evaluation protocol, so numbers are comparable with published tables.

The protocol: tokenize the whole text once, cut it into ``len // ctx`` non-overlapping windows
of ``ctx`` tokens (the last partial window is dropped), run each window from an empty context,
and score every token after the first of each window. :func:`windows` and
:func:`score_window` are shared with :mod:`qconv.model.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qconv.errors import InvalidOption
from qconv.model.decoder import Transformer

#: ``on_window(done, total)``: progress after each evaluated window.
WindowCallback = Callable[[int, int], None]


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int

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


def score_window(model: Transformer, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[ctx-1, V]`` (float32) for every scored position of one window, and the targets
    ``[ctx-1]`` they predict (the window shifted by one)."""
    window = window.to(model.device)
    logits = model(window[None])[0, :-1]  # the last position predicts past the window
    return logits, window[1:]


def nll_sum(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logprobs`` ``[N, V]``, accumulated in float64."""
    return -logprobs.gather(-1, targets[:, None]).double().sum().item()


@torch.inference_mode()
def perplexity(
    model: Transformer,
    ids: list[int],
    ctx: int = 2048,
    max_windows: int | None = None,
    on_window: WindowCallback | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``ids`` (GPTQ protocol, see module docstring)."""
    chunks = windows(ids, ctx, max_windows)
    total = 0.0
    for i, window in enumerate(chunks):
        logits, targets = score_window(model, window)
        total += nll_sum(logits.log_softmax(-1), targets)
        if on_window is not None:
            on_window(i + 1, len(chunks))
    n_tokens = len(chunks) * (ctx - 1)
    return PerplexityResult(math.exp(total / n_tokens), total, n_tokens, len(chunks))
