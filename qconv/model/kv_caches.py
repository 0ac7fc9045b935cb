"""Quantized KV caches: per-token int8, FP8 E4M3 with a static scale per layer (vLLM's
``kv_cache_dtype=fp8``), and KIVI (2/4/8-bit keys per channel, values per token).

Both store integer codes in uint8/int8 tensors (see :mod:`qconv.model.kv_quant`) and attend by
dequantizing the stored blocks into the compute dtype for each call.

Exactness contract: ``attend`` for a chunk of ``T`` new tokens returns exactly what ``T``
single-token calls would (up to float summation order). Each query sees the past as the cache
holds it *at that query's decoding step*, so a perplexity computed with chunked prefill is the
perplexity token-by-token generation would see, never one that attends to unquantized history.

KIVI rules (residual ``R``, group ``G``, ``R % G == 0``), as KIVI's decode step implements them:

* A step appends the new token, attends, then compresses. So the query at position ``p`` sees
  keys ``0 .. R*floor(p/R) - 1`` dequantized and the rest (``1..R`` tokens, itself included)
  in 16-bit; values ``0 .. p-R-1`` dequantized and the last ``min(p, R) + 1`` in 16-bit.
* After storing ``n`` tokens: keys ``0 .. R*floor(n/R) - 1`` are quantized (the fp buffer is
  quantized all at once when it reaches ``R`` tokens, per channel over groups of ``G``
  consecutive tokens); values ``0 .. n-R-1`` are quantized (one token ages out per step,
  per token over groups of ``G`` channels); everything newer stays 16-bit.

Optional attention sinks (``sink`` = ``S < R``, default 0 = plain KIVI): the first ``S`` positions
are also held in 16-bit for good, and left out of their key groups' min/max. Small models put a
large share of every query's attention on the first token (whose keys are outliers), so its
quantization error reaches every later query; measured on SmolLM2-135M (ctx 2048) one 16-bit
token cut KIVI-2's perplexity cost roughly in half, for 2 x head_dim x 2 bytes per KV head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from qconv.arch.config import ModelConfig
from qconv.errors import InvalidOption
from qconv.model.kv_cache import PLAIN, AttentionOptions, KVCache, KVMemory, causal_attention, fp16_kv_bytes
from qconv.model.kv_quant import (
    codes_per_byte,
    dequantize_asym,
    dequantize_int8,
    quantize_asym,
    quantize_int8,
    storage_dtype,
)

#: Token axis of a ``[B, Hkv, T, D]`` key/value tensor.
TOKENS = -2
#: Where KIVI's quantization groups run in both storage layouts: keys are stored ``[.., T, D]``
#: (groups of tokens), values channel-major ``[.., D, T]`` (groups of channels). Either way the
#: long contiguous inner axis is the other one, which keeps unpacking and scaling fast.
GROUP_AXIS = -2


class Int8KVCache(KVCache):
    """Every key and value vector stored as int8 with one absmax scale per token per KV head.

    A token is quantized when it is stored, before its own query attends (as llama.cpp's q8_0
    cache does), so chunked and single-token calls see identical keys and values.
    """

    def __init__(
        self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len, self.config, self.batch, self.length = max_len, config, batch, 0
        shape = (config.num_layers, batch, config.num_kv_heads, max_len)
        store = storage_dtype(dtype)
        self.k = torch.zeros(*shape, config.head_dim, device=device, dtype=torch.int8)
        self.v = torch.zeros_like(self.k)
        self.k_scale = torch.zeros(*shape, 1, device=device, dtype=store)
        self.v_scale = torch.zeros_like(self.k_scale)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
        opts: AttentionOptions = PLAIN,
    ) -> torch.Tensor:
        end = self._check_room(start_pos, k.shape[2])
        store = self.k_scale.dtype
        self.k[layer, :, :, start_pos:end], self.k_scale[layer, :, :, start_pos:end] = quantize_int8(k, store)
        self.v[layer, :, :, start_pos:end], self.v_scale[layer, :, :, start_pos:end] = quantize_int8(v, store)
        self.length = max(self.length, end)
        keys = dequantize_int8(self.k[layer, :, :, :end], self.k_scale[layer, :, :, :end], q.dtype)
        values = dequantize_int8(self.v[layer, :, :, :end], self.v_scale[layer, :, :, :end], q.dtype)
        return causal_attention(q, keys, values, opts)

    def memory(self) -> KVMemory:
        per_token = 2 * (self.k[:, :, :, 0].nbytes + self.k_scale[:, :, :, 0].nbytes)
        return KVMemory(self.length, per_token * self.length, fp16_kv_bytes(self.config, self.batch, self.length))


class Fp8KVCache(KVCache):
    """Keys and values stored as FP8 E4M3 under one static scale per layer for keys and one for
    values, as vLLM's ``kv_cache_dtype="fp8"`` does: ``k_scale`` / ``v_scale`` from the checkpoint
    (calibrated ``max|k| / 448``; ``qconv quantize --kv-cache fp8``), 1.0 when it has none (vLLM's
    default). A token is quantized when stored, before its own query attends."""

    def __init__(
        self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32, scales: torch.Tensor | None = None,
    ) -> None:
        self.max_len, self.config, self.batch, self.length = max_len, config, batch, 0
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=torch.float8_e4m3fn)
        self.v = torch.zeros_like(self.k)
        if scales is None:
            scales = torch.ones(config.num_layers, 2)
        if tuple(scales.shape) != (config.num_layers, 2):
            raise InvalidOption(f"FP8 KV cache scales must be [layers, 2], got {list(scales.shape)}")
        self.scales = scales.float().to(device)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
        opts: AttentionOptions = PLAIN,
    ) -> torch.Tensor:
        end = self._check_room(start_pos, k.shape[2])
        ks, vs = self.scales[layer, 0], self.scales[layer, 1]
        self.k[layer, :, :, start_pos:end] = (k.float() / ks).clamp(-448, 448).to(torch.float8_e4m3fn)
        self.v[layer, :, :, start_pos:end] = (v.float() / vs).clamp(-448, 448).to(torch.float8_e4m3fn)
        self.length = max(self.length, end)
        keys = (self.k[layer, :, :, :end].float() * ks).to(q.dtype)
        values = (self.v[layer, :, :, :end].float() * vs).to(q.dtype)
        return causal_attention(q, keys, values, opts)

    def memory(self) -> KVMemory:
        per_token = 2 * self.k[:, :, :, 0].nbytes
        return KVMemory(self.length, per_token * self.length, fp16_kv_bytes(self.config, self.batch, self.length))


class KiviKVCache(KVCache):
    """KIVI: keys quantized per channel, values per token, a 16-bit residual of recent tokens.

    Storage per layer (``[B, Hkv, ...]`` each; ``P`` = codes per byte, ``S`` = 16-bit dtype):
    key codes ``uint8 [cap/P, D]`` packed along tokens with ``S`` scale/zero ``[cap/G, D]``;
    value codes stored channel-major, ``uint8 [D/P, cap]`` packed along channels, with scale/zero
    ``[D/G, cap]`` (each token's own groups of G channels; the transposed layout only makes
    dequantization a contiguous sweep over tokens);
    16-bit residual keys (< R tokens) and values (<= R tokens). Code buffers are preallocated
    for ``max_len`` like :class:`FpKVCache`; :meth:`memory` counts what is filled.
    """

    def __init__(
        self, config: ModelConfig, batch: int, max_len: int, bits: int, group: int, residual: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, sink: int = 0,
    ) -> None:
        if (residual < group or residual % group or config.head_dim % group or group % codes_per_byte(bits)
                or not 0 <= sink < residual):
            raise ValueError(f"invalid KIVI layout: bits {bits}, group {group}, residual {residual}, "
                             f"sink {sink}, head_dim {config.head_dim}")
        self.max_len, self.config, self.batch = max_len, config, batch
        self.bits, self.group, self.residual, self.sink = bits, group, residual, sink
        self.store = storage_dtype(dtype)
        per_byte, d = codes_per_byte(bits), config.head_dim
        lead = (config.num_layers, batch, config.num_kv_heads)
        k_cap = max_len // residual * residual  # keys are quantized R tokens at a time
        v_cap = max(0, max_len - residual)
        u8 = dict(device=device, dtype=torch.uint8)
        s16 = dict(device=device, dtype=self.store)
        self.k_codes = torch.zeros(*lead, k_cap // per_byte, d, **u8)
        self.k_scale = torch.zeros(*lead, k_cap // group, d, **s16)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_codes = torch.zeros(*lead, d // per_byte, v_cap, **u8)
        self.v_scale = torch.zeros(*lead, d // group, v_cap, **s16)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.k_sink = torch.zeros(*lead, sink, d, **s16)
        self.v_sink = torch.zeros_like(self.k_sink)
        empty = torch.zeros(batch, config.num_kv_heads, 0, d, **s16)
        self.k_fp = [empty] * config.num_layers
        self.v_fp = [empty] * config.num_layers
        self.lengths = [0] * config.num_layers

    def keys_quantized(self, n: int) -> int:
        """Keys held quantized once ``n`` tokens are stored (equivalently: dequantized keys the
        query at position ``n`` sees)."""
        return n // self.residual * self.residual

    def values_quantized(self, n: int) -> int:
        """Values held quantized once ``n`` tokens are stored (and seen dequantized by query ``n``)."""
        return max(0, n - self.residual)

    @property
    def length(self) -> int:
        return self.lengths[-1]

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
        opts: AttentionOptions = PLAIN,
    ) -> torch.Tensor:
        if opts.softcap is not None or opts.window is not None:
            # its step-wise attention mixes dequantized and 16-bit history per query; no window or cap there
            raise InvalidOption("the KIVI cache does not support sliding-window or soft-capped attention "
                                "(Gemma 2): use --kv-cache fp or int8")
        if start_pos != self.lengths[layer]:
            raise ValueError(f"KIVI cache is append-only: layer {layer} holds {self.lengths[layer]} "
                             f"positions, write starts at {start_pos}")
        end = self._check_room(start_pos, k.shape[2])
        if start_pos < self.sink:
            n = min(end, self.sink) - start_pos
            self.k_sink[layer, :, :, start_pos: start_pos + n] = k[:, :, :n]
            self.v_sink[layer, :, :, start_pos: start_pos + n] = v[:, :, :n]
        # 16-bit tokens not yet quantized before this call, then the new ones: keys from
        # position keys_quantized(start_pos), values from values_quantized(start_pos).
        k_fp = torch.cat((self.k_fp[layer], k.to(self.store)), dim=TOKENS)
        v_fp = torch.cat((self.v_fp[layer], v.to(self.store)), dim=TOKENS)
        k_lo, v_lo = self.keys_quantized(start_pos), self.values_quantized(start_pos)
        self._store_keys(layer, k_fp[:, :, : self.keys_quantized(end) - k_lo], k_lo)
        self._store_values(layer, v_fp[:, :, : self.values_quantized(end) - v_lo], v_lo)
        # Copies, so the residual does not keep the whole concatenation alive.
        self.k_fp[layer] = k_fp[:, :, self.keys_quantized(end) - k_lo:].clone()
        self.v_fp[layer] = v_fp[:, :, self.values_quantized(end) - v_lo:].clone()
        self.lengths[layer] = end

        # Query p sees keys < keys_quantized(p) and values < values_quantized(p) dequantized and
        # the rest in 16-bit; over the chunk those counts grow from (k_lo, v_lo) to (k_hi, v_hi).
        k_hi, v_hi = self.keys_quantized(end - 1), self.values_quantized(end - 1)
        pos = torch.arange(start_pos, end, device=q.device)
        keys = _History(_late_view(k_fp, k_hi, end, q.dtype, lambda out: self._keys(layer, out), False),
                        k_fp.to(q.dtype), pos // self.residual * self.residual, k_hi)
        values = _History(_late_view(v_fp, v_hi, end, q.dtype, lambda out: self._values(layer, out), True),
                          v_fp.to(q.dtype), (pos - self.residual).clamp_min(0), v_hi)
        return _stepwise_attention(q, keys, values)

    def _store_keys(self, layer: int, keys: torch.Tensor, start: int) -> None:
        """Quantize ``keys`` (a whole number of R-token blocks from position ``start``) per channel."""
        if keys.shape[2] == 0:
            return
        if start < self.sink:  # sinks stay 16-bit: let the next token stand in for them in the ranges
            keys = keys.clone()
            keys[:, :, : self.sink] = keys[:, :, self.sink: self.sink + 1]
        codes, scale, zero = quantize_asym(keys, self.bits, self.group, GROUP_AXIS, self.store)
        per_byte = codes_per_byte(self.bits)
        self.k_codes[layer, :, :, start // per_byte: start // per_byte + codes.shape[2]] = codes
        self.k_scale[layer, :, :, start // self.group: start // self.group + scale.shape[2]] = scale
        self.k_zero[layer, :, :, start // self.group: start // self.group + zero.shape[2]] = zero

    def _store_values(self, layer: int, values: torch.Tensor, start: int) -> None:
        """Quantize ``values`` (tokens from position ``start``) per token in groups of G channels."""
        if values.shape[2] == 0:
            return
        end = start + values.shape[2]
        codes, scale, zero = quantize_asym(values.transpose(-1, -2), self.bits, self.group, GROUP_AXIS, self.store)
        self.v_codes[layer, :, :, :, start:end] = codes
        self.v_scale[layer, :, :, :, start:end] = scale
        self.v_zero[layer, :, :, :, start:end] = zero

    def _keys(self, layer: int, out: torch.Tensor) -> None:
        """Dequantize the first ``out.shape[2]`` (a multiple of R) stored keys into ``out``."""
        n, per_byte = out.shape[2], codes_per_byte(self.bits)
        dequantize_asym(
            self.k_codes[layer, :, :, : n // per_byte], self.k_scale[layer, :, :, : n // self.group],
            self.k_zero[layer, :, :, : n // self.group], self.bits, self.group, GROUP_AXIS, out.dtype, out,
        )
        s = min(n, self.sink)
        out[:, :, :s] = self.k_sink[layer, :, :, :s]

    def _values(self, layer: int, out: torch.Tensor) -> None:
        """Dequantize the first ``out.shape[3]`` stored values into channel-major ``out`` ``[B, Hkv, D, n]``."""
        n = out.shape[3]
        dequantize_asym(
            self.v_codes[layer, ..., :n], self.v_scale[layer, ..., :n], self.v_zero[layer, ..., :n],
            self.bits, self.group, GROUP_AXIS, out.dtype, out,
        )
        s = min(n, self.sink)
        out[..., :s] = self.v_sink[layer, :, :, :s].transpose(-1, -2)

    def memory(self) -> KVMemory:
        n = self.length
        nk, nv = self.keys_quantized(n), self.values_quantized(n)
        per_byte = codes_per_byte(self.bits)
        held = (
            self.k_codes[:, :, :, : nk // per_byte].nbytes
            + self.k_scale[:, :, :, : nk // self.group].nbytes
            + self.k_zero[:, :, :, : nk // self.group].nbytes
            + self.v_codes[..., :nv].nbytes
            + self.v_scale[..., :nv].nbytes
            + self.v_zero[..., :nv].nbytes
            + sum(t.nbytes for t in self.k_fp + self.v_fp)
            # sinks already quantized keep a 16-bit copy (the ones still in the residual do not)
            + self.k_sink[:, :, :, : min(nk, self.sink)].nbytes
            + self.v_sink[:, :, :, : min(nv, self.sink)].nbytes
        )
        return KVMemory(n, held, fp16_kv_bytes(self.config, self.batch, n))


def _late_view(
    fp: torch.Tensor, hi: int, end: int, dtype: torch.dtype, dequantize: Callable[[torch.Tensor], None],
    channel_major: bool,
) -> torch.Tensor:
    """Positions ``0..end`` ``[B, Hkv, end, D]`` as a chunk's last query sees them: the first
    ``hi`` dequantized (by ``dequantize`` straight into its slice of the buffer, no
    concatenation), the rest from ``fp``, the 16-bit tokens that end at ``end``. With
    ``channel_major`` the buffer is ``[B, Hkv, D, end]`` (what ``dequantize`` fills) and a
    transposed view of it is returned; matmuls read either without copying."""
    b, h, _, d = fp.shape
    tail = fp[:, :, fp.shape[2] - (end - hi):]
    if channel_major:
        out = torch.empty(b, h, d, end, dtype=dtype, device=fp.device)
        dequantize(out[..., :hi])
        out[..., hi:] = tail.transpose(-1, -2)
        return out.transpose(-1, -2)
    out = torch.empty(b, h, end, d, dtype=dtype, device=fp.device)
    dequantize(out[:, :, :hi])
    out[:, :, hi:] = tail
    return out


class _History(NamedTuple):
    """Keys or values of positions ``0..n`` as a chunk of ``T`` queries sees them.

    ``late`` ``[B, Hkv, n, D]``: positions below ``hi`` dequantized, the rest full precision (the
    view of the chunk's last query); ``fp`` ``[B, Hkv, n-lo, D]``: full-precision positions
    ``lo..n``; query ``t`` sees positions below ``split[t]`` dequantized (``lo <= split[t] <= hi``).
    Only the band ``lo..hi`` differs between queries.
    """

    late: torch.Tensor
    fp: torch.Tensor
    split: torch.Tensor
    hi: int

    def band(self) -> tuple[int, int, torch.Tensor | None]:
        """``(lo, hi, mask)``; mask ``[T, hi-lo]`` is True where a query sees the dequantized version."""
        lo = self.late.shape[2] - self.fp.shape[2]
        if self.hi == lo:
            return lo, lo, None
        return lo, self.hi, torch.arange(lo, self.hi, device=self.split.device) < self.split[:, None]


def _stepwise_attention(q: torch.Tensor, keys: _History, values: _History) -> torch.Tensor:
    """Causal GQA attention of ``T`` queries (the last ``T`` of ``n`` positions) where each query
    sees keys and values as the cache held them at its own decoding step.

    Scores and outputs come from the ``late`` views in one product each; the band where earlier
    queries saw full precision instead is patched with a product over the band only. q is
    ``[B, H, T, D]``; query head ``h`` uses kv head ``h // (H // Hkv)``.
    """
    b, h, t, d = q.shape
    hkv, n = keys.late.shape[1], keys.late.shape[2]
    rows = h // hkv * t
    qg = (q * d**-0.5).reshape(b, hkv, rows, d)
    s = (qg @ keys.late.transpose(-1, -2)).view(b, hkv, h // hkv, t, n)
    lo, hi, late = keys.band()
    if late is not None:
        early = (qg @ keys.fp[:, :, : hi - lo].transpose(-1, -2)).view(b, hkv, h // hkv, t, hi - lo)
        s[..., lo:hi] = torch.where(late, s[..., lo:hi], early)
    if t > 1:
        s[..., -t:].masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = s.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)  # >= fp32 softmax
    out = p.view(b, hkv, rows, n) @ values.late
    lo, hi, late = values.band()
    if late is not None:
        p_early = (p[..., lo:hi] * ~late).reshape(b, hkv, rows, hi - lo)
        out += p_early @ (values.fp[:, :, : hi - lo] - values.late[:, :, lo:hi])
    return out.reshape(b, h, t, d)
