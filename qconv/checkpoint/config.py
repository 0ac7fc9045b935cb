"""Reading ``config.json`` from disk: the model's :class:`~qconv.arch.config.ModelConfig`, and
whether (and how) the checkpoint is already quantized."""

from __future__ import annotations

import json
from pathlib import Path

from qconv.arch.config import ModelConfig, config_from_dict
from qconv.errors import CorruptFile, InputNotFound


def quantization_method(directory: Path) -> str | None:
    """``quant_method`` of ``config.json["quantization_config"]``, or None when the directory has
    no readable config or the model is not quantized (the HF reader then reports any problem)."""
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not qc:
        return None
    return str(qc.get("quant_method", "unknown")) if isinstance(qc, dict) else "unknown"


def load_config(path: Path | str) -> ModelConfig:
    """Read and validate ``config.json`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputNotFound("config.json not found", path.parent)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"not valid JSON: {e}", path) from None
    if not isinstance(raw, dict):
        raise CorruptFile("not a JSON object", path)
    return config_from_dict(raw, path)
