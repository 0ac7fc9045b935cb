"""GGUF file types (``--type``) and the per-tensor type each one gives, as llama-quantize does.

A file type such as ``q4_k_m`` is a *mix*: a default tensor type plus rules that spend more bits
where quantization hurts most (attn_v and ffn_down in a subset of layers, the output matrix),
and fallbacks for rows whose length is not a multiple of the block size. The rules follow
llama.cpp's ``src/llama-quant.cpp`` (non-Falcon models, no imatrix; for mixtures of experts
its 8-expert rules) so that qconv's files are byte-identical to ``llama_model_quantize``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from qconv.errors import InvalidOption


@dataclass(frozen=True)
class FileType:
    """One ``--type`` choice: the GGUF ``general.file_type`` and the mix's default tensor type."""

    name: str
    ftype: F
    default: T

    @property
    def quantized(self) -> bool:
        return self.default not in (T.F32, T.F16, T.BF16)


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("f32", F.ALL_F32, T.F32),
        FileType("f16", F.MOSTLY_F16, T.F16),
        FileType("bf16", F.MOSTLY_BF16, T.BF16),
        FileType("q8_0", F.MOSTLY_Q8_0, T.Q8_0),
        FileType("q4_0", F.MOSTLY_Q4_0, T.Q4_0),
        FileType("q4_1", F.MOSTLY_Q4_1, T.Q4_1),
        FileType("q5_0", F.MOSTLY_Q5_0, T.Q5_0),
        FileType("q5_1", F.MOSTLY_Q5_1, T.Q5_1),
        FileType("q4_k_s", F.MOSTLY_Q4_K_S, T.Q4_K),
        FileType("q4_k_m", F.MOSTLY_Q4_K_M, T.Q4_K),
        FileType("q5_k_s", F.MOSTLY_Q5_K_S, T.Q5_K),
        FileType("q5_k_m", F.MOSTLY_Q5_K_M, T.Q5_K),
        FileType("q6_k", F.MOSTLY_Q6_K, T.Q6_K),
    )
}

#: Where a row length is not a multiple of the block, llama.cpp demotes to a 32-block type.
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def file_type(name: str) -> FileType:
    """Look up ``--type``; the error lists the valid names."""
    try:
        return FILE_TYPES[name.lower()]
    except KeyError:
        raise InvalidOption(f"unknown GGUF type {name!r} (valid: {', '.join(FILE_TYPES)})") from None


def block_elems(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of "important" layers: first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name: str, ndim: int) -> bool:
    """Tensors llama-quantize may change: 2-D (and merged-expert 3-D) ``*weight`` matrices except
    norms and MoE routers (``ffn_gate_inp``)."""
    return ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def fallback(t: T, row: int) -> T:
    """The type actually used for rows of length ``row`` (F16 if nothing fits)."""
    if row % block_elems(t) == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if row % block_elems(t) == 0 else T.F16


def _attn_v_like(name: str) -> bool:
    """llama.cpp treats a fused q/k/v matrix (``attn_qkv``, Phi-3) by the rules of ``attn_v``."""
    return "attn_v.weight" in name or "attn_qkv.weight" in name


def tensor_types(tensors: Sequence[tuple[str, tuple[int, ...]]], ft: FileType, n_layer: int,
                 is_70b: bool = False, n_expert: int = 0) -> dict[str, T]:
    """GGML type of every tensor (GGUF name, numpy shape), in llama.cpp's processing order;
    ``n_expert``: experts per MoE layer (llama.cpp spends more bits on attention at exactly 8).

    ``tensors`` must be in the order llama-quantize visits them (globals, then layer by layer):
    the attn_v(-like) / ffn_down rules count occurrences. Non-quantizable tensors are F32.
    """
    has_output = any(name == "output.weight" for name, _ in tensors)
    n_attn_v = sum(_attn_v_like(name) for name, _ in tensors)
    i_attn_v = i_ffn_down = 0
    types: dict[str, T] = {}
    for name, shape in tensors:
        if not quantizable(name, len(shape)):
            types[name] = T.F32
            continue
        new = ft.default
        if not ft.quantized:
            types[name] = new
            continue
        row = shape[-1]
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            if row % block_elems(new) != 0:
                new = T.Q8_0
            elif new != T.Q8_0:
                new = T.Q6_K
        elif _attn_v_like(name):
            if ft.name in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
                new = T.Q6_K
            elif ft.name == "q4_k_s" and i_attn_v < 4:
                new = T.Q5_K
            if is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K
            if n_expert == 8:  # 8-expert models (Mixtral): attention is a small share of the bytes
                new = T.Q8_0
            i_attn_v += 1
        elif "attn_k.weight" in name:
            if n_expert == 8:
                new = T.Q8_0
        elif "attn_output.weight" in name:
            if n_expert == 8 and ft.name in ("q4_k_s", "q4_k_m"):
                new = T.Q5_K
        elif "ffn_down" in name:
            if ft.name in ("q4_k_m", "q5_k_m") and use_more_bits(i_ffn_down, n_layer):
                new = T.Q6_K
            elif ft.name == "q4_k_s" and i_ffn_down < n_layer // 8:
                new = T.Q5_K
            i_ffn_down += 1
        types[name] = fallback(new, row)
    return types


def llama_cpp_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's tensor order: non-layer tensors by name, then by layer number, then by name."""

    def key(name: str) -> tuple[int, str]:
        if name.startswith("blk."):
            return int(name.split(".")[1]), name
        return -1, name

    return sorted(names, key=key)
