"""KV caches: where attention over past tokens happens during generation.

The decoder never reads cached keys/values itself; it hands each layer's new ``k``/``v`` and
its queries to :meth:`KVCache.attend`. That keeps the storage format private to the cache, so
a quantized cache (int8, KIVI's packed 2/4-bit keys per channel and values per token with a
full-precision residual window) can store however it likes and dequantize per block, or run a
fused kernel, without the decoder knowing. :func:`causal_attention` is the shared math every
cache ends in once it has full-precision keys and values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qconv.arch.config import ModelConfig


@dataclass(frozen=True)
class AttentionOptions:
    """What one layer's attention does beyond plain causal softmax(q·kᵀ/√d)·v."""

    #: score scale (None: ``head_dim ** -0.5``)
    scale: float | None = None
    #: each query sees only the last ``window`` positions, itself included (None: all)
    window: int | None = None
    #: scores become ``c * tanh(scores / c)`` before the softmax (Gemma 2)
    softcap: float | None = None


PLAIN = AttentionOptions()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions = PLAIN
                     ) -> torch.Tensor:
    """Causal GQA attention where the ``Tq`` queries are the last ``Tq`` of the ``Tk`` key positions.

    Shapes: q ``[B, H, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` -> ``[B, H, Tq, D]``. KV heads are
    repeated in HF's order (query head ``h`` uses kv head ``h // (H // Hkv)``).
    """
    tq, tk = q.shape[2], k.shape[2]
    if opts.softcap is not None or (opts.window is not None and opts.window < tk):
        return _explicit_attention(q, k, v, opts)
    mask = None
    if 1 < tq < tk:
        # A chunk appended after cached history: SDPA's is_causal aligns the triangle top-left,
        # which is wrong here, so each query sees all history plus the chunk up to itself.
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    # enable_gqa maps query head h to kv head h // groups without materializing repeated K/V;
    # the CPU kernel runs ~9% faster (bf16) on contiguous heads than on the [B, T, H, D]-strided
    # views the projections produce, and the copies are small
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask,
                                          is_causal=tq > 1 and tq == tk, enable_gqa=q.shape[1] != k.shape[1],
                                          scale=opts.scale)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions) -> torch.Tensor:
    """Scores, soft-cap, causal (and sliding-window) mask, float32 softmax, as transformers'
    eager path computes them (SDPA has no soft-cap)."""
    tq, tk, groups = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if opts.scale is None else opts.scale)
    if opts.softcap is not None:
        scores = torch.tanh(scores / opts.softcap) * opts.softcap
    i = torch.arange(tk - tq, tk, device=q.device)[:, None]  # query positions
    j = torch.arange(tk, device=q.device)[None, :]
    allowed = j <= i
    if opts.window is not None:
        allowed &= j > i - opts.window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


@dataclass(frozen=True)
class KVMemory:
    """What a cache holds for ``tokens`` positions, against an fp16 cache of the same length.

    ``bytes`` counts the storage of the positions held (packed codes, scales/zeros,
    full-precision residual), not spare preallocated capacity, so runs of different lengths
    compare fairly. ``fp16_bytes`` is ``2 (K and V) * layers * batch * kv_heads * tokens *
    head_dim * 2``.
    """

    tokens: int
    bytes: int
    fp16_bytes: int

    @property
    def ratio(self) -> float:
        return self.bytes / self.fp16_bytes if self.fp16_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "bytes": self.bytes, "fp16_bytes": self.fp16_bytes, "ratio": self.ratio}


def fp16_kv_bytes(config: ModelConfig, batch: int, tokens: int) -> int:
    """Bytes an fp16 K+V cache needs for ``tokens`` positions: the reference every cache is compared with."""
    return 2 * config.num_layers * batch * config.num_kv_heads * tokens * config.head_dim * 2


class KVCache(ABC):
    """Per-layer key/value memory for incremental decoding, holding up to ``max_len`` positions."""

    max_len: int

    @abstractmethod
    def memory(self) -> KVMemory:
        """Bytes held for the positions stored so far (see :class:`KVMemory`)."""

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
        opts: AttentionOptions = PLAIN,
    ) -> torch.Tensor:
        """Store ``k``/``v`` (``[B, Hkv, T, D]``, RoPE applied) at positions ``start_pos..start_pos+T``
        of ``layer`` and return the causal attention (with the layer's ``opts``) of ``q``
        (``[B, H, T, D]``) over positions ``0..start_pos+T``."""

    def _check_room(self, start_pos: int, length: int) -> int:
        """End position of a write, or a clear error instead of a silent out-of-bounds slice."""
        end = start_pos + length
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, write would end at {end}")
        return end


class FpKVCache(KVCache):
    """Preallocated full-precision cache: one ``[B, Hkv, max_len, D]`` buffer per layer for k and v."""

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len
        self.config, self.batch, self.length = config, batch, 0
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
        opts: AttentionOptions = PLAIN,
    ) -> torch.Tensor:
        end = self._check_room(start_pos, k.shape[2])
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        self.length = max(self.length, end)
        return causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], opts)

    def memory(self) -> KVMemory:
        per_token = 2 * self.k[:, :, :, 0].numel() * self.k.element_size()
        return KVMemory(self.length, per_token * self.length, fp16_kv_bytes(self.config, self.batch, self.length))
