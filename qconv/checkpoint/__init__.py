"""Checkpoint I/O: read any supported model file as a :class:`ModelSource`, write HF checkpoints."""

from __future__ import annotations

from pathlib import Path

from qconv.arch.config import ModelConfig
from qconv.checkpoint.config import load_config, quantization_method
from qconv.checkpoint.source import ModelSource
from qconv.errors import InputNotFound, InvalidOption, UnsupportedModel

GGUF_MAGIC = b"GGUF"

__all__ = ["ModelConfig", "ModelSource", "load_config", "model_path", "open_model", "is_gguf"]


def is_gguf(path: Path) -> bool:
    """True for a file that is (or claims to be, by suffix) GGUF."""
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def model_path(path: Path | str) -> Path:
    """A model argument as a local path: itself when it exists, else the snapshot of the Hub
    model it names (:mod:`qconv.checkpoint.hub`); a one-line InputNotFound otherwise."""
    text, path = str(path), Path(path)
    if path.exists():
        return path
    from qconv.checkpoint import hub

    if not hub.looks_like_repo_id(text):
        raise InputNotFound("no such file or directory", path)
    return hub.resolve(text)


def open_model(path: Path | str) -> ModelSource:
    """Open an HF checkpoint directory (plain or compressed-tensors) or a GGUF file, validating it
    against its config; a Hugging Face Hub model id (``owner/name[@revision]``) that is not a
    local path is resolved to its snapshot first (:mod:`qconv.checkpoint.hub`). Other quantized
    HF checkpoints (GPTQ, AWQ, ...) are refused; FP8 ones in the published block layout
    (``quant_method: fp8``) are read."""
    path = model_path(path)
    if path.is_dir():
        if not any(path.iterdir()):
            raise InputNotFound("directory is empty", path)
        method = quantization_method(path)
        if method == "compressed-tensors":
            from qconv.checkpoint.compressed_source import CompressedTensorsSource  # imports torch

            return CompressedTensorsSource(path)
        if method == "fp8":
            from qconv.checkpoint.compressed_source import Fp8BlockSource

            return Fp8BlockSource(path)
        if method is not None:
            raise UnsupportedModel(
                f"quantized checkpoint with quant_method {method!r} is not supported (qconv reads compressed-tensors and fp8)",
                path,
            )
        from qconv.checkpoint.hf import HFSource

        return HFSource(path)
    if path.stat().st_size == 0:
        raise InputNotFound("file is empty", path)
    if is_gguf(path):
        from qconv.checkpoint.gguf_source import GGUFSource

        return GGUFSource(path)
    if path.suffix == ".safetensors":
        raise InvalidOption("pass the checkpoint directory (with config.json), not a .safetensors file", path)
    raise InvalidOption("not a model: expected an HF checkpoint directory or a .gguf file", path)
