"""The HF <-> GGUF correspondence for llama-family models: tensor names and the Q/K row order.

llama.cpp's llama arch rotates consecutive pairs (2i, 2i+1) in RoPE, HF rotates halves
(i, i + d/2); llama.cpp's converter therefore permutes the rows of q_proj/k_proj (weights and
biases) per head. Both directions live here so import and export cannot drift apart.
"""

from __future__ import annotations

import re

import numpy as np

#: GGUF per-layer stem -> HF per-layer stem.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_HF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_HF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_BLK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF tensor name; None for tensors HF has no slot for
    (``rope_freqs.weight`` is folded into the config instead)."""
    m = _BLK.match(gguf_name)
    if m:
        stem = LAYER_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{stem}.{m.group(3)}" if stem else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{GLOBAL_NAMES[stem]}.{kind}" if stem in GLOBAL_NAMES else None


def gguf_name(hf: str) -> str:
    """GGUF tensor name for an HF tensor name (KeyError for names llama.cpp has no slot for)."""
    m = _HF_BLK.match(hf)
    if m:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"
    stem, _, kind = hf.rpartition(".")
    return f"{_HF_GLOBAL[stem]}.{kind}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order for Q/K (halves -> interleaved pairs, per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> HF row order for Q/K (the inverse of :func:`permute_rows`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf: str, num_heads: int, num_kv_heads: int) -> int | None:
    """Heads to (un)permute by for an HF q/k tensor name; None for every other tensor."""
    if ".self_attn.q_proj." in hf:
        return num_heads
    if ".self_attn.k_proj." in hf:
        return num_kv_heads
    return None
