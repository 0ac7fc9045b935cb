"""``qconv inspect``: what a model file holds, read from headers only (no tensor data).

Works on files qconv cannot otherwise use (unsupported architectures, odd quant types), so a
user can see *why* another command refused a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qconv.checkpoint import is_gguf, model_path
from qconv.checkpoint.gguf_file import GGUFFile
from qconv.checkpoint.hf import INDEX_FILE, SINGLE_FILE, open_shard
from qconv.errors import CorruptFile, InputNotFound, InvalidOption

_ST_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
            "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}

#: Quantization parameters stored beside a quantized weight (compressed-tensors, FP8 checkpoints):
#: their bytes count toward bits/weight, but they are not model parameters.
_QUANT_PARAM_SUFFIXES = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx",
                         ".weight_global_scale", ".weight_scale_inv", ".input_scale", ".input_zero_point",
                         ".input_global_scale", ".output_scale", ".output_zero_point", ".k_scale", ".v_scale")
_PACKED = ".weight_packed"


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    nbytes: int
    #: the weight a packed tensor stands for (compressed-tensors ``weight_packed``: int32 words
    #: holding several codes each); None when the stored shape is the logical one
    logical_shape: list[int] | None = None
    #: storage label for packed codes, e.g. ``int4 (packed I32)``
    packed_as: str | None = None

    @property
    def numel(self) -> int:
        """Model parameters this tensor holds: the logical weight's size for packed codes, 0 for
        quantization parameters (scales, zero points, shapes), else the stored element count."""
        if self.logical_shape is not None:
            return math.prod(self.logical_shape)
        if self.name.endswith(_QUANT_PARAM_SUFFIXES):
            return 0
        return math.prod(self.shape)


@dataclass
class Inspection:
    path: str
    format: str
    architecture: str
    file_size: int
    tensors: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """All tensor bytes (codes, scales, zero points, unquantized tensors) per parameter."""
        return 8 * sum(t.nbytes for t in self.tensors) / max(self.parameters, 1)

    def dtype_counts(self) -> dict[str, int]:
        """Parameters per storage type: the one-line answer to "what is this quantized to"."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            if t.numel:
                key = t.packed_as or t.dtype
                counts[key] = counts.get(key, 0) + t.numel
        return counts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(parameters=self.parameters, bits_per_weight=round(self.bits_per_weight, 4),
                 dtype_counts=self.dtype_counts())
        return d


def _inspect_gguf(path: Path) -> Inspection:
    f = GGUFFile(path)
    tensors = [TensorInfo(t.name, list(t.numpy_shape), t.tensor_type.name, t.n_bytes) for t in f.tensors]
    meta = f.meta
    f.close()
    keep = {k: v for k, v in meta.items() if not isinstance(v, list) and not k.startswith("tokenizer.ggml.")}
    return Inspection(str(path), "gguf", str(meta.get("general.architecture", "unknown")), path.stat().st_size, tensors, keep)


def _safetensors_infos(shard: Path) -> list[TensorInfo]:
    handle = open_shard(shard)
    infos = []
    for name in handle.keys():
        sl = handle.get_slice(name)
        shape, dtype = list(sl.get_shape()), sl.get_dtype()
        infos.append(TensorInfo(name, shape, dtype, math.prod(shape) * _ST_BITS.get(dtype, 8) // 8))
    return infos


def _quant_bits(quantization_config: dict[str, Any]) -> int | None:
    """The weights' bit width when every config group agrees on one."""
    bits = {g.get("weights", {}).get("num_bits") for g in (quantization_config.get("config_groups") or {}).values()
            if isinstance(g, dict) and isinstance(g.get("weights"), dict)}
    bits.discard(None)
    return int(bits.pop()) if len(bits) == 1 else None


def _unpack_shapes(tensors: list[TensorInfo], shards: list[Path], quantization_config: dict[str, Any] | None) -> None:
    """Give every ``X.weight_packed`` its logical ``[out, in]``: from ``X.weight_shape`` (a 2-element
    tensor, the only data read), else from the packed width and the config's bit width."""
    packed = {t.name[:-len(_PACKED)]: t for t in tensors if t.name.endswith(_PACKED)}
    if not packed:
        return
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        handle = open_shard(shard)
        for name in handle.keys():
            if name.endswith(".weight_shape") and name[:-len(".weight_shape")] in packed:
                shapes[name[:-len(".weight_shape")]] = [int(x) for x in handle.get_tensor(name).reshape(-1)]
    config_bits = _quant_bits(quantization_config or {})
    for stem, t in packed.items():
        shape = shapes.get(stem)
        word = _ST_BITS.get(t.dtype, 32)  # int32 words (int codes), bytes (FP4 codes)
        if shape is None and config_bits and len(t.shape) == 2:  # codes packed along the input dim
            shape = [t.shape[0], t.shape[1] * word // config_bits]
        if shape is None or len(t.shape) != 2:
            continue
        t.logical_shape = shape
        # dense packing: ceil(in * bits / 32) words per row, so the width gives the bits back
        bits = t.shape[1] * 32 // max(shape[1], 1) if stem in shapes else config_bits
        kind = "fp" if t.dtype == "U8" else "int"  # compressed-tensors packs E2M1 codes two per byte
        t.packed_as = f"{kind}{bits} (packed {t.dtype})"


def _inspect_hf(path: Path) -> Inspection:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise InputNotFound(f"no {SINGLE_FILE} or {INDEX_FILE}", path)
    arch = "unknown"
    config_path = path / "config.json"
    meta: dict[str, Any] = {}
    if config_path.is_file():
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFile(f"not valid JSON: {e}", config_path) from None
        arch = (raw.get("architectures") or [raw.get("model_type", "unknown")])[0]
        if "quantization_config" in raw:
            meta["quantization_config"] = raw["quantization_config"]
    tensors = [t for s in shards for t in _safetensors_infos(s)]
    _unpack_shapes(tensors, shards, meta.get("quantization_config"))
    size = sum(s.stat().st_size for s in shards)
    return Inspection(str(path), "safetensors", arch, size, tensors, meta)


def inspect_model(path: Path | str) -> Inspection:
    """Describe an HF checkpoint directory, a single .safetensors file or a GGUF file."""
    path = model_path(path)
    if path.is_dir():
        return _inspect_hf(path)
    if path.stat().st_size == 0:
        raise InputNotFound("file is empty", path)
    if is_gguf(path):
        return _inspect_gguf(path)
    if path.suffix == ".safetensors":
        tensors = _safetensors_infos(path)
        _unpack_shapes(tensors, [path], None)
        return Inspection(str(path), "safetensors", "unknown", path.stat().st_size, tensors)
    raise InvalidOption("not a model: expected a checkpoint directory, .safetensors or .gguf file", path)
