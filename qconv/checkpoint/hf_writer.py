"""Write HF checkpoints: sharded safetensors + index + config + tokenizer files, atomically.

Tensors are pulled from a :class:`ModelSource` one at a time and flushed shard by shard, so
peak memory is one shard (``max_shard_size``) rather than the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from qconv.atomic import atomic_output
from qconv.checkpoint.hf import INDEX_FILE, SINGLE_FILE
from qconv.checkpoint.source import ModelSource
from qconv.errors import InvalidOption

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "float32": torch.float32,
    "f16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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
    names = source.tensor_names()
    with atomic_output(out, force=force, directory=True) as tmp:
        shards: list[list[str]] = []
        current: dict[str, torch.Tensor] = {}
        size = total = 0
        out_dtype: torch.dtype | None = dtype

        def flush() -> None:
            nonlocal current, size
            if current:
                save_file(current, str(tmp / f"shard-{len(shards):05d}"), metadata={"format": "pt"})
                shards.append(list(current))
                current, size = {}, 0

        for name in names:
            t = source.get_tensor(name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.contiguous()
            if out_dtype is None and t.is_floating_point():
                out_dtype = t.dtype
            if current and size + _nbytes(t) > max_shard_size:
                flush()
            current[name] = t
            size += _nbytes(t)
            total += _nbytes(t)
            if on_tensor:
                on_tensor(name)
        flush()

        weight_map: dict[str, str] = {}
        for i, shard_names in enumerate(shards):
            final = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (tmp / f"shard-{i:05d}").rename(tmp / final)
            weight_map.update(dict.fromkeys(shard_names, final))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        config = source.config.to_hf_dict()
        config["torch_dtype"] = _DTYPE_NAMES.get(out_dtype, config.get("torch_dtype"))
        if "dtype" in config:
            config["dtype"] = config["torch_dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, data in source.tokenizer_files().items():
            (tmp / fname).write_bytes(data)
    return out
