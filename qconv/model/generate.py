"""Text generation with the reference runner: one prefill, then one token per step through a KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from qconv.model.decoder import Transformer
from qconv.model.kv_cache import FpKVCache, KVCache


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """Pick the next token from ``logits`` ``[V]``: argmax when ``temperature == 0``, otherwise
    sample after temperature, top-k and top-p filtering (in that order, as transformers does)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth_best = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already cover top_p; the best token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
    cache: KVCache | None = None,
) -> list[int]:
    """Continue ``prompt_ids``; returns the new tokens only (including the EOS that stopped it).

    Sampling draws from a ``torch.Generator`` seeded with ``seed`` so a run is reproducible.
    ``on_token`` sees each token as it is produced (for streaming output). ``cache`` selects the
    KV cache implementation; by default a full-precision one sized for prompt + new tokens.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = model.device
    if cache is None:
        cache = FpKVCache(model.config, 1, len(prompt_ids) + max_new_tokens, device, model.dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = set(eos_ids)
    logits = model(torch.tensor([prompt_ids], device=device), cache, 0)[0, -1]
    pos = len(prompt_ids)
    new: list[int] = []
    while len(new) < max_new_tokens:
        token = sample_token(logits, temperature, top_k, top_p, generator)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or len(new) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), cache, pos)[0, -1]
        pos += 1
    return new
