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
from collections.abc import Callable, Sequence
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
from qconv.errors import CorruptFile, InvalidOption, UnsupportedModel
from qconv.checkpoint.imatrix_file import Imatrix, read_imatrix
from qconv.formats.gguf_tokenizer import gguf_tokenizer_metadata
from qconv.formats.gguf_types import FileType, MixModel, file_type, TypeOverride, llama_cpp_order, tensor_types
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


def gguf_options(type_name: str, tensor_types: Sequence[str] = (), imatrix: Path | str | None = None,
                 ) -> tuple[FileType, tuple[TypeOverride, ...], Imatrix | None]:
    """Parse the GGUF export options of the CLI and API: ``--type``, ``--tensor-type`` (repeated)
    and ``--imatrix`` (read here, so a bad file fails before any output exists)."""
    ft = file_type(type_name)
    allowed = [*ggml.QTYPES, "F16", "F32", "BF16"]
    overrides = tuple(TypeOverride.parse(spec, allowed) for spec in tensor_types)
    imx = None
    if imatrix is not None:
        imx = read_imatrix(imatrix)
        if not ft.quantized:
            raise InvalidOption(f"--imatrix: a {ft.name} file is not quantized, there is nothing to weight")
    return ft, overrides, imx


def plan_tensors(config: ModelConfig, ft: FileType, has_imatrix: bool = False,
                 overrides: tuple[TypeOverride, ...] = ()) -> list[PlannedTensor]:
    """Every output tensor in llama.cpp's order, with its GGML type (``has_imatrix``,
    ``overrides``: see :func:`tensor_types`)."""
    hf_shapes = config.expected_shapes()
    shapes: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    for name, hfs in config.spec.gguf_tensors(config).items():
        one = hf_shapes[hfs[0]]
        shapes[name] = ((len(hfs), *one) if len(hfs) > 1 else one, hfs)
    for name, values in computed_tensors(config).items():
        shapes[name] = (values.shape, ())
    order = llama_cpp_order(list(shapes))
    model = MixModel(config.num_layers, n_gqa=config.num_heads // config.num_kv_heads,
                     n_expert=config.num_experts,
                     is_70b=config.spec.gguf_arch == "llama" and config.num_layers == 80
                     and config.num_heads != config.num_kv_heads)
    types = tensor_types([(n, shapes[n][0]) for n in order], ft, model, has_imatrix, overrides)
    for o in overrides:
        if not any(o.matches(n) for n in order):
            raise InvalidOption(f"--tensor-type {o.pattern}={o.type.name.lower()}: the pattern matches no tensor "
                                f"of this model (names look like {order[-1]})")
    return [PlannedTensor(n, shapes[n][1], shapes[n][0], types[n]) for n in order]


def check_imatrix(plan: list[PlannedTensor], imatrix: Imatrix) -> None:
    """Refuse an importance matrix that was made for another model: an entry naming no tensor of
    this one, a width that differs, or a layer weight the mix quantizes with it that it lacks
    (llama.cpp would quietly quantize that one without)."""
    names = {p.name for p in plan}
    stray = sorted(set(imatrix.entries) - names)
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise CorruptFile(f"imatrix entry {stray[0]}{more} names no tensor of this model: an imatrix of "
                          "another model?", imatrix.path)
    for p in plan:
        if p.type.name in ggml.QTYPES and ggml.uses_imatrix(p.type):
            if imatrix.for_tensor(p.name, p.shape) is None and p.name.startswith("blk."):
                raise CorruptFile(f"imatrix has no entry for {p.name}: an imatrix of another model?", imatrix.path)


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


def _importance(imatrix: Imatrix | None, p: PlannedTensor) -> np.ndarray | None:
    if imatrix is None or p.type.name not in ggml.QTYPES or not ggml.uses_imatrix(p.type):
        return None
    return imatrix.for_tensor(p.name, p.shape)


def _add_imatrix_metadata(w: gguf.GGUFWriter, imatrix: Imatrix) -> None:
    """The keys llama-quantize adds when given ``--imatrix`` (its integers are written as u32)."""
    w.add_string("quantize.imatrix.file", str(imatrix.path))
    if imatrix.datasets:
        w.add_string("quantize.imatrix.dataset", imatrix.datasets[0])
    w.add_uint32("quantize.imatrix.entries_count", len(imatrix.entries))
    if imatrix.chunk_count > 0:
        w.add_uint32("quantize.imatrix.chunks_count", imatrix.chunk_count)


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


def _encode(x: np.ndarray, t: T, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 array (HF layout) -> the bytes (or float array) stored for type ``t``;
    ``importance``: the tensor's imatrix rows ``[n_mat, in]`` (one per expert of a merged
    ``[experts, out, in]`` tensor), used by the types whose quantizer reads one."""
    if t == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if t == T.F16:
        return x.astype(np.float16)
    if t == T.BF16:
        return gguf.quants.quantize(x, T.BF16)
    if importance is None:
        return ggml.quantize(x.reshape(-1, x.shape[-1]), t)
    mats = x.reshape(importance.shape[0], -1, x.shape[-1])
    out = [ggml.quantize(m, t, imatrix=v) for m, v in zip(mats, importance)]
    return out[0] if len(out) == 1 else np.concatenate(out)


def tensor_data(get_array: Callable[[str], np.ndarray], config: ModelConfig, p: PlannedTensor) -> np.ndarray:
    """A planned tensor's data in llama.cpp's layout, from its HF tensors (``get_array``: HF name ->
    float array, or a quantized Linear's ggml bytes ``uint8 [out, row_bytes]``): experts stacked,
    norm offsets added, Q/K rows permuted (bytes too: a ggml row is one output channel)."""
    if not p.sources:  # computed from the config, never stored in HF checkpoints
        return computed_tensors(config)[p.name]
    if len(p.sources) > 1:  # llama.cpp's merged experts: [experts, out, in]
        return np.stack([get_array(hf) for hf in p.sources])
    hf = p.sources[0]
    x = get_array(hf)
    if config.spec.norm_offset and config.spec.is_norm(hf):  # llama.cpp stores offset + weight
        x = x + np.float32(config.spec.norm_offset)
    heads = config.spec.rope_heads(hf, config)
    if heads:
        x = permute_rows(x, heads)
    return x


def encode(x: np.ndarray, t: T, importance: np.ndarray | None = None) -> np.ndarray:
    """A planned tensor's data (float, or already ggml bytes) -> what the file stores for type ``t``."""
    if x.dtype == np.uint8 and t not in (T.F32, T.F16, T.BF16):
        return x  # quantized by a method, in the layer pipeline
    return _encode(x, t, importance)


class GGUFStream:
    """A GGUF file written in one pass: header, metadata and tensor table first (the plan gives
    every tensor's type and byte size), then each tensor's data in plan order, so peak memory is
    one tensor. A context manager: the file appears (renamed from a temp path) only when every
    planned tensor was written; a failure leaves nothing."""

    def __init__(self, out: Path | str, config: ModelConfig, tokenizer_files: Any, ft: FileType,
                 plan: list[PlannedTensor], force: bool = False, tokenizer_pre: str | None = None,
                 imatrix: Imatrix | None = None, extra: dict[str, str] | None = None) -> None:
        self.out, self.config, self.ft, self.plan, self.force = Path(out), config, ft, plan, force
        self._meta = gguf_tokenizer_metadata(tokenizer_files, config.vocab_size, tokenizer_pre)
        self._imatrix, self._extra = imatrix, extra or {}
        self._next = 0

    def __enter__(self) -> "GGUFStream":
        self._atomic = atomic_output(self.out, force=self.force, needed=sum(p.nbytes for p in self.plan))
        tmp = self._atomic.__enter__()
        try:
            w = self._w = _Writer(str(tmp), self.config.spec.gguf_arch)
            _add_model_metadata(w, self.config, self.ft, self.out.stem)
            if self._imatrix is not None:
                _add_imatrix_metadata(w, self._imatrix)
            for key, value in self._extra.items():
                w.add_string(key, value)
            for key, (value, vtype) in self._meta.items():
                w.add_key_value(key, value, vtype)
            for p in self.plan:
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    @property
    def pending(self) -> PlannedTensor | None:
        """The tensor the file expects next (None: all written)."""
        return self.plan[self._next] if self._next < len(self.plan) else None

    def write(self, name: str, data: np.ndarray) -> None:
        """Append tensor ``name``'s stored form (``encode``'s output); names must come in plan order."""
        p = self.pending
        if p is None or p.name != name:
            raise RuntimeError(f"GGUF tensors out of order: got {name}, expected {p.name if p else 'none'}")
        if data.nbytes != p.nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes for a planned {p.nbytes}")
        self._w.write_tensor_data(data)
        self._next += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        closing = None
        try:
            self._w.close()
        except BaseException as e:  # flushing the last bytes (a full disk): the temp file goes too
            closing = e
            if exc is None:
                exc_type, exc, tb = type(e), e, e.__traceback__
        if exc_type is None and self.pending is not None:
            exc = RuntimeError(f"GGUF file incomplete: {self.pending.name} and later tensors were never written")
            self._atomic.__exit__(RuntimeError, exc, None)
            raise exc
        self._atomic.__exit__(exc_type, exc, tb)  # renames the file, or removes it and lets exc go on
        if closing is not None and exc is closing:
            raise closing


def write_gguf(
    source: ModelSource,
    out: Path | str,
    ft: FileType,
    force: bool = False,
    tokenizer_pre: str | None = None,
    on_tensor: Callable[[str], None] | None = None,
    imatrix: Imatrix | None = None,
    overrides: tuple[TypeOverride, ...] = (),
) -> GGUFExportResult:
    """Write ``source`` as a GGUF file of file type ``ft``; with ``imatrix``, the types that
    read one use llama.cpp's importance-weighted searches (as ``llama-quantize --imatrix``);
    ``overrides``: ``--tensor-type`` choices."""
    t0 = time.perf_counter()
    out = Path(out)
    config = source.config
    check_llama_cpp_runs(config)
    plan = plan_tensors(config, ft, imatrix is not None, overrides)
    if imatrix is not None:
        check_imatrix(plan, imatrix)
    with GGUFStream(out, config, source.tokenizer_files(), ft, plan, force, tokenizer_pre, imatrix) as stream:
        for p in plan:  # one expression, so no tensor outlives its write
            stream.write(p.name, _encode(tensor_data(source.get_array, config, p), p.type, _importance(imatrix, p)))
            if on_tensor:
                on_tensor(p.name)
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.type.name] = counts.get(p.type.name, 0) + 1
    return GGUFExportResult(str(source.path), str(out), ft.name, len(plan), out.stat().st_size,
                            time.perf_counter() - t0, counts)
