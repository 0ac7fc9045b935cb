"""Perplexity with one decoder layer in memory at a time, for models larger than the machine.

The runner (:func:`qconv.model.decoder.load_model`) holds every weight; an 8B model in float32
is 32 GB. Here the evaluation windows travel through the model layer by layer instead, as the
quantization pipeline's calibration windows do: all windows' hidden states ``[W, ctx, h]`` are
kept (in ``store_dtype``: the checkpoint's 16-bit dtype halves them), one layer is read from the
checkpoint in float32, applied to every window, and dropped; the final norm and head then score
each window. Peak memory: one layer, the hidden states, and the head (vocab x hidden, float32).

Each window is computed on its own, with the same ops as the runner's forward, so with float32
storage the perplexity equals :func:`qconv.model.perplexity.perplexity`'s to float32 round-off
(tested); 16-bit storage rounds the residual stream between layers, as a 16-bit model does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qconv.arch.spec import EMBED, FINAL_NORM, LM_HEAD
from qconv.checkpoint.source import ModelSource
from qconv.model.decoder import embed, local_rope, make_block, norm, rope_tables
from qconv.model.perplexity import PerplexityResult, logits_nll_sum, windows


@torch.inference_mode()
def streamed_perplexity(
    source: ModelSource,
    ids: list[int],
    ctx: int = 2048,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    store_dtype: torch.dtype = torch.float32,
    on_layer: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """GPTQ-protocol perplexity of ``source`` on ``ids``, streaming its layers (module docstring).
    ``on_layer(done, total)`` reports progress after each layer and after the head."""
    config, device = source.config, torch.device(device)
    chunks = windows(ids, ctx, max_windows)
    table = source.get_tensor(f"{EMBED}.weight")
    hidden = torch.empty(*chunks.shape, config.hidden_size, dtype=store_dtype)
    for w, window in enumerate(chunks):
        hidden[w] = embed(config, table, window.to(table.device), torch.float32)
    del table
    tables = rope_tables(config, 0, ctx, device, torch.float32)
    steps = config.num_layers + 1
    for i in range(config.num_layers):
        with torch.device("meta"):
            layer = make_block(config, i)
        layer.load_state_dict({k: v.to(device, torch.float32) for k, v in source.layer(i).items()},
                              strict=True, assign=True)
        cos, sin = tables[local_rope(config, i)]
        for w in range(len(chunks)):
            hidden[w] = layer(hidden[w][None].to(device, torch.float32), cos, sin, None, 0)[0].to(store_dtype)
        del layer
        if on_layer:
            on_layer(i + 1, steps)
    with torch.device("meta"):
        final = norm(config)
    final.load_state_dict({"weight": source.get_tensor(f"{FINAL_NORM}.weight").to(device, torch.float32)},
                          strict=True, assign=True)
    head = source.get_tensor(f"{EMBED if config.tie_word_embeddings else LM_HEAD}.weight").to(device, torch.float32)
    total, cap = 0.0, config.final_logit_softcapping
    for w, window in enumerate(chunks):
        logits = F.linear(final(hidden[w].to(device, torch.float32)), head)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        total += logits_nll_sum(logits[:-1], window[1:].to(device))
    if on_layer:
        on_layer(steps, steps)
    n_tokens = len(chunks) * (ctx - 1)
    return PerplexityResult(math.exp(total / n_tokens), total, n_tokens, len(chunks))
