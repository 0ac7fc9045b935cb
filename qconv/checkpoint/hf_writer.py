"""Write HF checkpoints: sharded safetensors + index + config + tokenizer files, atomically.

Tensors are pulled from a :class:`ModelSource` one at a time and each is written out as it
arrives (:class:`~qconv.checkpoint.safetensors_file.SafetensorsFileWriter`), so peak memory is one
tensor rather than a shard or the model. :class:`ShardWriter` and
:func:`write_config_and_tokenizer` are the reusable halves (the compressed-tensors writer uses
them too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qconv.atomic import atomic_output
from qconv.checkpoint.hf import INDEX_FILE, SINGLE_FILE
from qconv.checkpoint.safetensors_file import SafetensorsFileWriter
from qconv.checkpoint.source import ModelSource
from qconv.errors import InvalidOption

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "float32": torch.float32,
    "f16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def parse_dtype(name: str) -> torch.dtype:
    """``f32|f16|bf16`` (or the long names) -> torch dtype."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidOption(f"unknown dtype {name!r} (valid: f32, f16, bf16)") from None


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"`` -> bytes (decimal units, as HF uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise InvalidOption(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Streams named tensors into safetensors shards inside a directory being written.

    Each tensor goes to disk as it arrives; a new shard starts when the next tensor would push
    the current one past ``max_shard_size``, so peak memory is one tensor whatever the shard or
    model size. :meth:`finish` gives the shards their final HF names and writes the index. Used
    by every safetensors writer (plain HF, compressed-tensors) so sharding and naming behave
    identically everywhere.
    """

    def __init__(self, directory: Path, max_shard_size: int) -> None:
        self.directory = directory
        self.max_shard_size = max_shard_size
        self.total_size = 0
        self._shards: list[list[str]] = []
        self._current: SafetensorsFileWriter | None = None
        self._current_names: list[str] = []
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor; starts a new shard first if the current one is full."""
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        if self._current is not None and self._current.nbytes and \
                self._current.nbytes + _nbytes(tensor) > self.max_shard_size:
            self._flush()
        if self._current is None:
            self._current = SafetensorsFileWriter(self.directory / f"shard-{len(self._shards):05d}", {"format": "pt"})
        self._current.add(name, tensor)
        self._current_names.append(name)
        self.total_size += _nbytes(tensor)

    def _flush(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current.path.chmod(_FILE_MODE)
            self._shards.append(self._current_names)
            self._current, self._current_names = None, []

    def finish(self) -> dict[str, str]:
        """Flush, rename shards to ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``,
        write the index when sharded; return the weight map (tensor name -> file name)."""
        self._flush()
        weight_map: dict[str, str] = {}
        n = len(self._shards)
        for i, shard_names in enumerate(self._shards):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"shard-{i:05d}").rename(self.directory / final)
            weight_map.update(dict.fromkeys(shard_names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map


def write_config_and_tokenizer(
    directory: Path, config: dict[str, Any], dtype: torch.dtype | None, tokenizer_files: dict[str, bytes]
) -> None:
    """Write ``config.json`` (``torch_dtype`` set to ``dtype``, the floating dtype of the stored
    weights, when known) and the tokenizer side files: the non-tensor half of an HF checkpoint."""
    config = dict(config)
    config["torch_dtype"] = _DTYPE_NAMES.get(dtype, config.get("torch_dtype"))  # type: ignore[arg-type]
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname, data in sorted(tokenizer_files.items()):
        (directory / fname).write_bytes(data)


def write_hf_checkpoint(
    source: ModelSource,
    out: Path | str,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write ``source`` as an HF checkpoint directory at ``out``; return ``out``.

    ``dtype`` re-types floating tensors (None keeps each tensor's dtype).
    """
    out = Path(out)
    with atomic_output(out, force=force, directory=True) as tmp:
        shards = ShardWriter(tmp, max_shard_size)
        out_dtype: torch.dtype | None = dtype
        for name in source.tensor_names():
            t = source.get_tensor(name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if out_dtype is None and t.is_floating_point():
                out_dtype = t.dtype
            shards.add(name, t)
            if on_tensor:
                on_tensor(name)
        shards.finish()
        write_config_and_tokenizer(tmp, source.config.to_hf_dict(), out_dtype, source.tokenizer_files())
    return out
