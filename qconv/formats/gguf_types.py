"""GGUF file types (``--type``) and the per-tensor type each one gives, as llama-quantize does.

A file type such as ``q4_k_m`` is a *mix*: a default tensor type plus rules that spend more bits
where quantization hurts most (attn_v and ffn_down in a subset of layers, the output matrix),
and fallbacks for rows whose length is not a multiple of the block size. The rules follow
llama.cpp's ``src/llama-quant.cpp`` (``llama_tensor_get_type``: non-Falcon models; for mixtures
of experts its 8-expert rules; the rules that depend on whether an imatrix is given), including
its ``--tensor-type PATTERN=TYPE`` overrides, so that qconv's files are byte-identical to
``llama_model_quantize``'s.
"""

from __future__ import annotations

import re
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
        FileType("q2_k", F.MOSTLY_Q2_K, T.Q2_K),
        FileType("q3_k_s", F.MOSTLY_Q3_K_S, T.Q3_K),
        FileType("q3_k_m", F.MOSTLY_Q3_K_M, T.Q3_K),
        FileType("q3_k_l", F.MOSTLY_Q3_K_L, T.Q3_K),
        FileType("iq4_nl", F.MOSTLY_IQ4_NL, T.IQ4_NL),
        FileType("iq4_xs", F.MOSTLY_IQ4_XS, T.IQ4_XS),
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
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
             T.IQ4_XS: T.IQ4_NL}


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


@dataclass(frozen=True)
class TypeOverride:
    """``--tensor-type PATTERN=TYPE``: tensors whose GGUF name the regex matches (``re.search``,
    lower-cased pattern, as llama-quantize lower-cases it) get ``type``; the first match wins."""

    pattern: str
    type: T

    @classmethod
    def parse(cls, spec: str, allowed: Sequence[str]) -> "TypeOverride":
        name, sep, tname = spec.partition("=")
        if not sep or not name or not tname:
            raise InvalidOption(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
        try:
            t = T[tname.upper()]
        except KeyError:
            t = None
        if t is None or t.name not in allowed:
            raise InvalidOption(f"--tensor-type {spec!r}: unknown or unsupported tensor type {tname!r} "
                                f"(valid: {', '.join(a.lower() for a in allowed)})")
        try:
            re.compile(name.lower())
        except re.error as e:
            raise InvalidOption(f"--tensor-type {spec!r}: bad pattern ({e})") from None
        return cls(name.lower(), t)

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class MixModel:
    """What llama.cpp's type rules read of the model besides tensor names and shapes."""

    n_layer: int
    n_gqa: int = 1
    n_expert: int = 0
    is_70b: bool = False


def _category(name: str, tied: bool) -> str:
    """llama.cpp's ``tensor_get_category`` (tied models quantize token_embd as the output)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                     ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


#: file types whose attn_output in 8-expert models gets Q5_K
_MOE8_ATTN_OUTPUT_Q5K = ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs")


class _Mixer:
    """``llama_tensor_get_type_impl``: the mix's type for one tensor, in processing order (the
    attn_v and ffn_down rules count the tensors seen so far)."""

    def __init__(self, ft: FileType, model: MixModel, n_attn_v: int, has_imatrix: bool) -> None:
        self.ft, self.m, self.n_attn_v, self.has_imatrix = ft, model, n_attn_v, has_imatrix
        self.i_attn_v = self.i_ffn_down = 0

    def __call__(self, name: str, category: str, row: int) -> T:
        ft, m, new = self.ft.name, self.m, self.ft.default
        if category == "output":
            if row % block_elems(new) != 0:
                return T.Q8_0
            return new if new == T.Q8_0 else T.Q6_K
        if category == "attn_v":
            i = self.i_attn_v
            self.i_attn_v += 1
            if ft == "q2_k":
                new = T.Q4_K if m.n_gqa >= 4 else T.Q3_K
            elif ft == "q3_k_m":
                new = T.Q5_K if i < 2 else T.Q4_K
            elif ft == "q3_k_l":
                new = T.Q5_K
            elif ft in ("iq4_nl", "iq4_xs") and m.n_gqa >= 4:
                new = T.Q5_K
            elif ft in ("q4_k_m", "q5_k_m") and use_more_bits(i, self.n_attn_v):
                new = T.Q6_K
            elif ft == "q4_k_s" and i < 4:
                new = T.Q5_K
            if m.is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K
            if m.n_expert == 8:  # 8-expert models (Mixtral): attention is a small share of the bytes
                new = T.Q8_0
            return new
        if category == "attn_k":
            return T.Q8_0 if m.n_expert == 8 else new
        if category == "ffn_down":
            i, n = self.i_ffn_down, m.n_layer
            self.i_ffn_down += 1
            if m.n_expert > 1:  # expert tensors are not in layer order: llama.cpp reads the layer
                i = int(name.split(".")[1])
            if ft == "q2_k":
                new = T.Q3_K
            elif ft == "q3_k_m":
                new = T.Q5_K if i < n // 16 else T.Q4_K
            elif ft == "q3_k_l":
                new = T.Q5_K
            elif ft == "q4_k_m":
                if use_more_bits(i, n):
                    new = T.Q6_K
            elif i < n // 8 and ft in ("iq4_nl", "iq4_xs") and not self.has_imatrix:
                new = T.Q5_K
            elif ft == "q5_k_m" and use_more_bits(i, n):
                new = T.Q6_K
            elif ft == "q4_k_s" and i < n // 8:
                new = T.Q5_K
            elif ft in ("q4_0", "q5_0") and self.has_imatrix and i < n // 8:
                new = T.Q4_1 if ft == "q4_0" else T.Q5_1
            return new
        if category == "attn_output":
            if m.n_expert == 8:
                return T.Q5_K if ft in _MOE8_ATTN_OUTPUT_Q5K else new
            return {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(ft, new)
        return new


def tensor_types(tensors: Sequence[tuple[str, tuple[int, ...]]], ft: FileType, model: MixModel,
                 has_imatrix: bool = False, overrides: Sequence[TypeOverride] = ()) -> dict[str, T]:
    """GGML type of every tensor (GGUF name, numpy shape), in llama.cpp's processing order.

    ``tensors`` must be in the order llama-quantize visits them (globals, then layer by layer):
    the attn_v(-like) / ffn_down rules count occurrences. Non-quantizable tensors are F32.
    ``has_imatrix``: a few rules differ when an importance matrix is given. ``overrides``
    replace the mix's choice for the tensors they match (the fallback for the row length still
    applies), as llama-quantize's ``--tensor-type``; a tensor they take is not counted by the
    mix's layer rules, as in llama.cpp.
    """
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_attn_v = sum(_category(name, tied) == "attn_v" for name, _ in tensors)
    mixer = _Mixer(ft, model, n_attn_v, has_imatrix)
    types: dict[str, T] = {}
    for name, shape in tensors:
        if not quantizable(name, len(shape)):
            types[name] = T.F32
            continue
        if not ft.quantized:
            types[name] = ft.default
            continue
        manual = next((o.type for o in overrides if o.matches(name)), None)
        new = manual if manual is not None else mixer(name, _category(name, tied), shape[-1])
        types[name] = fallback(new, shape[-1])
    return types


def llama_cpp_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's tensor order: non-layer tensors by name, then by layer number, then by name."""

    def key(name: str) -> tuple[int, str]:
        if name.startswith("blk."):
            return int(name.split(".")[1]), name
        return -1, name

    return sorted(names, key=key)
