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

from qconv.checkpoint import is_gguf
from qconv.checkpoint.hf import INDEX_FILE, SINGLE_FILE, open_shard
from qconv.errors import CorruptFile, InputNotFound, InvalidOption

_ST_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
            "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
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
        return 8 * sum(t.nbytes for t in self.tensors) / max(self.parameters, 1)

    def dtype_counts(self) -> dict[str, int]:
        """Parameters per storage type: the one-line answer to "what is this quantized to"."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return counts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(parameters=self.parameters, bits_per_weight=round(self.bits_per_weight, 4),
                 dtype_counts=self.dtype_counts())
        return d


def _inspect_gguf(path: Path) -> Inspection:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    except Exception as e:
        raise CorruptFile(f"not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})", path) from None
    tensors = [TensorInfo(t.name, [int(d) for d in reversed(t.shape.tolist())], t.tensor_type.name, int(t.n_bytes))
               for t in reader.tensors]
    keep = {k: v for k, v in meta.items() if not isinstance(v, list) and not k.startswith("GGUF.")}
    return Inspection(str(path), "gguf", str(meta.get("general.architecture", "unknown")), path.stat().st_size, tensors, keep)


def _safetensors_infos(shard: Path) -> list[TensorInfo]:
    handle = open_shard(shard)
    infos = []
    for name in handle.keys():
        sl = handle.get_slice(name)
        shape, dtype = list(sl.get_shape()), sl.get_dtype()
        infos.append(TensorInfo(name, shape, dtype, math.prod(shape) * _ST_BITS.get(dtype, 8) // 8))
    return infos


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
    size = sum(s.stat().st_size for s in shards)
    return Inspection(str(path), "safetensors", arch, size, tensors, meta)


def inspect_model(path: Path | str) -> Inspection:
    """Describe an HF checkpoint directory, a single .safetensors file or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound("no such file or directory", path)
    if path.is_dir():
        return _inspect_hf(path)
    if path.stat().st_size == 0:
        raise InputNotFound("file is empty", path)
    if is_gguf(path):
        return _inspect_gguf(path)
    if path.suffix == ".safetensors":
        return Inspection(str(path), "safetensors", "unknown", path.stat().st_size, _safetensors_infos(path))
    raise InvalidOption("not a model: expected a checkpoint directory, .safetensors or .gguf file", path)
