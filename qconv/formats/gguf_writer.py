"""GGUF export: any :class:`ModelSource` -> a GGUF file llama.cpp loads.

Streaming: the tensor table is planned from the config alone (names, shapes, per-tensor types,
byte sizes), the header is written, then tensors are read, converted/quantized and appended one
at a time, so peak memory is one tensor plus its encoded bytes. The file is written to a temp
path and renamed. Tensor order and per-tensor types follow llama-quantize, and the block
quantizers reproduce its bytes, so a qconv Q4_K_M file equals llama.cpp's own.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from qconv.atomic import atomic_output
from qconv.arch.config import ModelConfig
from qconv.arch.rope_layout import permute_rows
from qconv.checkpoint.source import ModelSource
from qconv.errors import UnsupportedModel
from qconv.formats.gguf_tokenizer import gguf_tokenizer_metadata
from qconv.formats.gguf_types import FileType, llama_cpp_order, tensor_types
from qconv.core import ggml

log = logging.getLogger(__name__)


@dataclass
class PlannedTensor:
    """One tensor of the output file: where it comes from and how it is stored."""

    name: str
    #: the HF tensors it holds: one, every expert's (stacked), or none (computed from the config)
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    type: T

    @property
    def nbytes(self) -> int:
        elems, size = gguf.GGML_QUANT_SIZES[self.type]
        return int(np.prod(self.shape)) // elems * size


@dataclass
class GGUFExportResult:
    input: str
    output: str
    file_type: str
    tensors: int
    bytes: int
    seconds: float
    type_counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_tensors(config: ModelConfig, ft: FileType) -> list[PlannedTensor]:
    """Every output tensor in llama.cpp's order, with its GGML type."""
    hf_shapes = config.expected_shapes()
    shapes: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    for name, hfs in config.spec.gguf_tensors(config).items():
        one = hf_shapes[hfs[0]]
        shapes[name] = ((len(hfs), *one) if len(hfs) > 1 else one, hfs)
    for name, values in computed_tensors(config).items():
        shapes[name] = (values.shape, ())
    order = llama_cpp_order(list(shapes))
    types = tensor_types([(n, shapes[n][0]) for n in order], ft, config.num_layers,
                         is_70b=config.spec.gguf_arch == "llama" and config.num_layers == 80
                         and config.num_heads != config.num_kv_heads, n_expert=config.num_experts)
    return [PlannedTensor(n, shapes[n][1], shapes[n][0], types[n]) for n in order]


def computed_tensors(config: ModelConfig) -> dict[str, np.ndarray]:
    """Tensors llama.cpp reads that HF checkpoints keep in config.json instead: Llama 3's
    ``rope_freqs`` divisors, longrope's ``rope_factors_long`` / ``rope_factors_short``."""
    s = config.rope_scaling
    if s is None:
        return {}
    if s.rope_type == "llama3":
        return {"rope_freqs.weight": s.llama3_factors(config.rope_theta, config.head_dim).astype(np.float32)}
    if s.rope_type == "longrope":
        return {"rope_factors_long.weight": np.array(s.long_factor, dtype=np.float32),
                "rope_factors_short.weight": np.array(s.short_factor, dtype=np.float32)}
    return {}


def _add_model_metadata(w: gguf.GGUFWriter, config: ModelConfig, ft: FileType, name: str) -> None:
    """Architecture keys llama.cpp reads (see llama-model.cpp) plus ``general.*``."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ft.ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.rotary_dim)
    if config.head_dim != config.hidden_size // config.num_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling.factor)
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "longrope":
        w.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(config.rope_scaling.cos_sin_scale)
    if config.attn_logit_softcapping is not None:
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    if config.sliding_window is not None:
        if config.spec.gguf_arch not in _LLAMA_CPP_WINDOWED:
            log.warning("llama.cpp's %s attends to the whole context: this model's sliding window of %d "
                        "positions is not applied there (outputs past the window differ)",
                        config.spec.gguf_arch, config.sliding_window)
        w.add_sliding_window(config.sliding_window)
        if config.layer_types != config.spec.default_layer_types(config.num_layers):  # else llama.cpp's default
            w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    if config.rope_local_theta is not None:
        w.add_rope_freq_base_swa(config.rope_local_theta)
    if config.num_experts:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if config.spec.experts.ffn_key != "intermediate_size":  # experts narrower than a dense MLP (qwen3moe)
            w.add_expert_feed_forward_length(config.moe_intermediate_size)


#: llama.cpp archs that apply a sliding window (its phi3 reads the key and disables it)
_LLAMA_CPP_WINDOWED = ("gemma2", "gemma3")
#: llama.cpp's Gemma graphs scale scores by head_dim^-0.5, except for the 27B (recognized by its
#: layer count), which uses (n_embd / n_head)^-0.5; they never read query_pre_attn_scalar
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def check_llama_cpp_runs(config: ModelConfig) -> None:
    """Refuse what llama.cpp's graph for the arch would compute differently from the model:
    a file it loads but runs wrong is worse than no file."""
    arch = config.spec.gguf_arch
    if config.num_experts and not config.norm_topk_prob:
        raise UnsupportedModel(f"llama.cpp's {arch} renormalizes the chosen experts' weights; this model "
                               "does not (norm_topk_prob false)")
    if arch not in _GEMMA_27B_LAYERS:
        return
    if not config.tie_word_embeddings:
        raise UnsupportedModel(f"llama.cpp's {arch} always uses the embeddings as the output matrix; "
                               "this model has its own lm_head")
    expected = config.hidden_size / config.num_heads if config.num_layers == _GEMMA_27B_LAYERS[arch] \
        else config.head_dim
    if config.query_pre_attn_scalar not in (None, expected):
        raise UnsupportedModel(f"query_pre_attn_scalar {config.query_pre_attn_scalar:g} differs from the "
                               f"{expected:g} llama.cpp's {arch} scales attention by")


_V = gguf.GGUFValueType


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer with list metadata (vocabulary tokens, token types, merges, scores)
    packed in bulk. gguf-py packs every list item through ``_pack_val`` in Python, a quarter of
    a second for a 49k-token vocabulary; the bytes written are the same."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        items = None
        if vtype == _V.ARRAY and sub_type is None and self.endianess == gguf.GGUFEndian.LITTLE:
            items = _pack_list(val)
        if items is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + items


def _pack_list(val: Any) -> bytes | None:
    """A GGUF array (item type, count, items) of a non-empty list of all str, all int (INT32) or
    all float (FLOAT32), as gguf-py would write it; None for anything else, including values
    gguf-py refuses (out of range), which are left to it."""
    if not isinstance(val, list) or not val:
        return None
    if all(isinstance(v, str) for v in val):
        data = b"".join(len(e).to_bytes(8, "little") + e for e in (v.encode("utf-8") for v in val))
        ltype = _V.STRING
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in val):
        if not (-(1 << 31) <= min(val) and max(val) < (1 << 31)):
            return None
        ltype, data = _V.INT32, np.array(val, dtype="<i4").tobytes()
    elif all(type(v) is float for v in val):
        wide = np.array(val, dtype=np.float64)
        with np.errstate(over="ignore"):
            narrow = wide.astype("<f4")
        if (np.isinf(narrow) & ~np.isinf(wide)).any():  # struct.pack("f") raises on overflow
            return None
        ltype, data = _V.FLOAT32, narrow.tobytes()
    else:
        return None
    return struct.pack("<IQ", ltype, len(val)) + data


def _encode(x: np.ndarray, t: T) -> np.ndarray:
    """float32 array (HF layout) -> the bytes (or float array) stored for type ``t``."""
    if t == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if t == T.F16:
        return x.astype(np.float16)
    if t == T.BF16:
        return gguf.quants.quantize(x, T.BF16)
    return ggml.quantize(x.reshape(-1, x.shape[-1]), t)


def _tensor_data(source: ModelSource, p: PlannedTensor) -> np.ndarray:
    config = source.config
    if not p.sources:  # computed from the config, never stored in HF checkpoints
        return computed_tensors(config)[p.name]
    if len(p.sources) > 1:  # llama.cpp's merged experts: [experts, out, in]
        return np.stack([source.get_array(hf) for hf in p.sources])
    hf = p.sources[0]
    x = source.get_array(hf)
    if config.spec.norm_offset and config.spec.is_norm(hf):  # llama.cpp stores offset + weight
        x = x + np.float32(config.spec.norm_offset)
    heads = config.spec.rope_heads(hf, config)
    if heads:
        x = permute_rows(x, heads)
    return x


def write_gguf(
    source: ModelSource,
    out: Path | str,
    ft: FileType,
    force: bool = False,
    tokenizer_pre: str | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> GGUFExportResult:
    """Write ``source`` as a GGUF file of file type ``ft``."""
    t0 = time.perf_counter()
    out = Path(out)
    config = source.config
    check_llama_cpp_runs(config)
    arch = config.spec.gguf_arch
    plan = plan_tensors(config, ft)
    tok_meta = gguf_tokenizer_metadata(source.tokenizer_files(), config.vocab_size, tokenizer_pre)
    with atomic_output(out, force=force) as tmp:
        w = _Writer(str(tmp), arch)
        _add_model_metadata(w, config, ft, out.stem)
        for key, (value, vtype) in tok_meta.items():
            w.add_key_value(key, value, vtype)
        for p in plan:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:  # one expression, so no tensor outlives its write
            w.write_tensor_data(_encode(_tensor_data(source, p), p.type))
            if on_tensor:
                on_tensor(p.name)
        w.close()
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.type.name] = counts.get(p.type.name, 0) + 1
    return GGUFExportResult(str(source.path), str(out), ft.name, len(plan), out.stat().st_size,
                            time.perf_counter() - t0, counts)
