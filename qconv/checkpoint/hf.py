"""HF safetensors checkpoints: a lazy :class:`ModelSource` that reads one tensor at a time.

Shard headers are parsed and validated up front by ``safetensors.safe_open`` (against the
config's expected tensor shapes). Tensor data is then read with plain file reads into a fresh
buffer, not through safetensors' memory map: the pages of a mapping that have been touched
count in the process's RSS until it is unmapped, so streaming a model through the map would
grow memory to the size of the input. Read this way, a consumer holding one tensor at a time
(the GGUF writer, the layer pipeline) holds only that tensor. The handles are opened with
``framework="numpy"`` and :meth:`HFSource.get_array` decodes to numpy, so exporting to GGUF
never imports torch (:meth:`HFSource.get_tensor` imports it on first use).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from safetensors import safe_open

from qconv.arch.config import ModelConfig
from qconv.checkpoint.config import load_config
from qconv.checkpoint.source import ModelSource
from qconv.checkpoint.tokenizer import read_tokenizer_files
from qconv.errors import CheckpointMismatch, CorruptFile, InputNotFound, UnsupportedModel

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: safetensors dtype -> numpy dtype holding the stored bytes. Types numpy lacks are read as raw
#: unsigned integers of the same width and reinterpreted by torch (:data:`_TORCH_VIEWS`).
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
#: safetensors dtype -> torch dtype name the raw integers are viewed as.
_TORCH_VIEWS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def open_shard(path: Path) -> Any:
    """safe_open with safetensors' parse errors turned into a one-line CorruptFile.

    The handle serves the header (names, shapes, dtypes); it is opened for numpy so that
    nothing here imports torch."""
    if path.stat().st_size < 8:
        raise CorruptFile("truncated safetensors file (no header)", path)
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptFile(f"corrupt or truncated safetensors file ({msg})", path) from None


def data_starts(path: Path) -> dict[str, int]:
    """tensor name -> absolute file offset of its data in a shard.

    safetensors validates the header (:func:`open_shard`: offsets, sizes) but does not expose
    where the bytes are; the format fixes it: an 8-byte little-endian header length, the JSON
    header, then the data, which each entry's ``data_offsets`` index."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {name: 8 + n + int(e["data_offsets"][0]) for name, e in header.items() if name != "__metadata__"}


def _fill(f: BinaryIO, out: np.ndarray) -> None:
    """Read exactly ``out.nbytes`` bytes from ``f`` into the contiguous array ``out``."""
    if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
        raise EOFError("file is truncated")


#: F16/BF16 values widened per read in :func:`_widen` (8 MiB of input).
_WIDEN_ELEMENTS = 1 << 22


def _widen(f: BinaryIO, out: np.ndarray, dtype: str) -> None:
    """Read ``out.size`` F16 or BF16 values from ``f`` into the 1-D float32 ``out``, a slice at a
    time (no full-size copy of the 16-bit data). Both widenings are exact, as torch's
    ``.float()``: BF16 is the top half of a float32."""
    raw = np.empty(min(out.size, _WIDEN_ELEMENTS), dtype=np.uint16)
    for i in range(0, out.size, _WIDEN_ELEMENTS):
        part = raw[: min(_WIDEN_ELEMENTS, out.size - i)]
        _fill(f, part)
        dst = out[i:i + part.size]
        if dtype == "F16":
            dst[...] = part.view(np.float16)
        else:
            bits = dst.view(np.uint32)
            bits[...] = part
            bits <<= 16


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
        self._data_start = {p: data_starts(p) for p in shards}

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

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._shard_of[name]].get_slice(name).get_shape())

    @contextmanager
    def _data(self, name: str) -> Iterator[BinaryIO]:
        """The shard holding ``name``, opened and positioned at its data; read errors inside the
        block become CorruptFile."""
        shard = self._shard_of[name]
        try:
            with shard.open("rb") as f:
                f.seek(self._data_start[shard][name])
                yield f
        except (OSError, EOFError) as e:
            raise CorruptFile(f"cannot read tensor {name} ({e})", shard) from None

    def _read(self, name: str) -> tuple[np.ndarray, str]:
        """Stored tensor ``name`` in a new numpy array of its stored dtype (BF16 and FP8 as raw
        unsigned integers), and that dtype."""
        dtype = self.dtype_of(name)
        if dtype not in _NUMPY_DTYPES:
            raise UnsupportedModel(f"tensor {name} has dtype {dtype}, which qconv cannot read", self._shard_of[name])
        out = np.empty(self._stored_shape(name), dtype=_NUMPY_DTYPES[dtype])
        with self._data(name) as f:
            _fill(f, out)
        return out, dtype

    def get_tensor(self, name: str) -> torch.Tensor:
        import torch

        raw, dtype = self._read(name)
        t = torch.from_numpy(raw)
        return t.view(getattr(torch, _TORCH_VIEWS[dtype])) if dtype in _TORCH_VIEWS else t

    def get_array(self, name: str) -> np.ndarray:
        """float32 numpy without torch for F32/F16/BF16 tensors, decoded straight into the result
        (16-bit data a slice at a time), so the result is the only full-size buffer."""
        dtype = self.dtype_of(name)
        if dtype not in ("F32", "F16", "BF16"):
            return super().get_array(name)
        out = np.empty(self._stored_shape(name), dtype=np.float32)
        with self._data(name) as f:
            if dtype == "F32":
                _fill(f, out)
            else:
                _widen(f, out.reshape(-1), dtype)
        return out

    def dtype_of(self, name: str) -> str:
        """Stored dtype string (``F32``, ``BF16``, ...) without reading the data."""
        return self._handles[self._shard_of[name]].get_slice(name).get_dtype()

    def tokenizer_files(self) -> dict[str, bytes]:
        return read_tokenizer_files(self.path)

    def close(self) -> None:
        self._handles.clear()
        self._data_start.clear()
