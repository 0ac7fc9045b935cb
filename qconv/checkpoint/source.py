"""ModelSource: the one interface every reader (HF safetensors, GGUF) offers.

Consumers (runner, writers, the quantization pipeline) see HF tensor names and torch tensors,
whatever the file format. Access is lazy and per tensor, so a pipeline can hold one decoder
layer at a time; :meth:`ModelSource.layer` is the unit that pipeline streams. The GGUF writer
takes float32 numpy arrays instead (:meth:`ModelSource.get_array`), so the readers that can
decode without torch keep GGUF export free of torch's import time and memory.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qconv.arch.config import ModelConfig
from qconv.arch.spec import LAYER_PREFIX
from qconv.checkpoint.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


class ModelSource(ABC):
    """A readable model checkpoint. Subclasses: :class:`~qconv.checkpoint.hf.HFSource`,
    :class:`~qconv.checkpoint.gguf_source.GGUFSource`."""

    path: Path
    config: ModelConfig
    #: Format tag for messages and ``inspect``: "safetensors" or "gguf".
    format: str

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """HF names of every tensor, in checkpoint order."""

    @abstractmethod
    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor by HF name, materialized (dequantized for GGUF) in its natural dtype."""

    def get_array(self, name: str) -> np.ndarray:
        """One tensor by HF name as a new float32 numpy array (what the GGUF writer consumes).

        This default goes through :meth:`get_tensor`, i.e. torch; readers that can decode
        without torch override it."""
        return self.get_tensor(name).float().numpy()

    @abstractmethod
    def tokenizer_files(self) -> dict[str, bytes]:
        """HF tokenizer side files (``tokenizer.json``, ``tokenizer_config.json``, ...)."""

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer; raises MissingTokenizer if it has none."""
        return Tokenizer.from_files(self.tokenizer_files(), self.path)

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of decoder layer ``index``, keyed by the name inside the layer
        (``self_attn.q_proj.weight``)."""
        prefix = LAYER_PREFIX.format(index)
        return {n[len(prefix):]: self.get_tensor(n) for n in self.tensor_names() if n.startswith(prefix)}

    def close(self) -> None:
        """Release file handles/maps. Safe to call twice."""

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _input_files(source: ModelSource) -> list[Path]:
    """The files a checkpoint is read from (config and weights)."""
    return [source.path] if source.path.is_file() else sorted(
        p for p in source.path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())


def file_identity(source: ModelSource) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of the input's files: which checkpoint this is, without
    reading it (what a resumed run checks, where hashing 16 GB would cost a minute)."""
    return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in _input_files(source)]


def fingerprint(source: ModelSource) -> str:
    """sha256 of the input's files (config and weights): which checkpoint an output came from."""
    h = hashlib.sha256()
    for p in _input_files(source):
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
