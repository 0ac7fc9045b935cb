"""HF safetensors checkpoints: a lazy, memory-mapped :class:`ModelSource`.

Shards are opened with ``safetensors.safe_open`` (mmap), headers are validated up front
against the config's expected tensor shapes, and tensors are materialized one at a time,
so a pipeline can stream a model larger than memory layer by layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qconv.checkpoint.config import ModelConfig, load_config
from qconv.checkpoint.source import ModelSource
from qconv.checkpoint.tokenizer import read_tokenizer_files
from qconv.errors import CheckpointMismatch, CorruptFile, InputNotFound

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def open_shard(path: Path) -> Any:
    """safe_open with safetensors' parse errors turned into a one-line CorruptFile."""
    if path.stat().st_size < 8:
        raise CorruptFile("truncated safetensors file (no header)", path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptFile(f"corrupt or truncated safetensors file ({msg})", path) from None


def _shard_map(directory: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index or the single-file layout."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CorruptFile(f"invalid safetensors index ({e})", index) from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise InputNotFound(f"shard {missing[0]} named by the index is missing", directory)
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise InputNotFound(f"no {SINGLE_FILE} or {INDEX_FILE}", directory)
    return {}  # filled from the single file's header by the caller


class HFSource(ModelSource):
    """An HF checkpoint directory: config.json + (sharded) safetensors + tokenizer files."""

    format = "safetensors"

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory)
        self.config: ModelConfig = load_config(self.path)
        shard_of = _shard_map(self.path)
        shards = sorted(set(shard_of.values())) or [self.path / SINGLE_FILE]
        self._handles = {p: open_shard(p) for p in shards}
        if not shard_of:
            shard_of = {k: shards[0] for k in self._handles[shards[0]].keys()}
        self._shard_of = shard_of
        self._names = self._validate()

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors the files must hold, with shapes. A plain checkpoint stores exactly the model's
        tensors; subclasses storing another layout (packed quantized weights) override this."""
        return self.config.expected_shapes()

    def _validate(self) -> list[str]:
        """Check every stored tensor exists with the right shape; return the model's tensor
        names (what :meth:`get_tensor` serves) in order."""
        for name, shape in self._stored_shapes().items():
            shard = self._shard_of.get(name)
            if shard is None or name not in self._handles[shard].keys():
                raise CheckpointMismatch(f"tensor {name} is missing", self.path)
            actual = tuple(self._handles[shard].get_slice(name).get_shape())
            if actual != shape:
                raise CheckpointMismatch(
                    f"tensor {name} has shape {list(actual)}, config implies {list(shape)}", shard
                )
        return list(self.config.expected_shapes())

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def get_tensor(self, name: str) -> torch.Tensor:
        shard = self._shard_of[name]
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as e:
            raise CorruptFile(f"cannot read tensor {name} ({e})", shard) from None

    def dtype_of(self, name: str) -> str:
        """Stored dtype string (``F32``, ``BF16``, ...) without reading the data."""
        return self._handles[self._shard_of[name]].get_slice(name).get_dtype()

    def tokenizer_files(self) -> dict[str, bytes]:
        return read_tokenizer_files(self.path)

    def close(self) -> None:
        self._handles.clear()
