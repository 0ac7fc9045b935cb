"""A GGUF file's metadata and tensor table, parsed in one pass over a read-only memory map.

Why not gguf-py's ``GGUFReader``: it builds a numpy memmap view per value and per string, which
for a Llama-3 vocabulary (128k tokens, 280k merges) took 7-14 s per open, every time a 15 GB GGUF
was converted or inspected. Here strings are decoded with ``struct`` straight from the mapping and
numeric arrays become one ``numpy.frombuffer`` each, so the same file opens in well under a second.

The values are the Python values gguf-py's ``ReaderField.contents()`` gives (``str``, ``int``,
``float``, ``bool``, lists of those); tensor data are numpy views of the mapping in gguf-py's
layout (float arrays in numpy axis order, quantized types as ``uint8 [..., row_bytes]``), so
``gguf.quants.dequantize`` reads them unchanged. Format facts (GGUF v2/v3): little-endian header
``GGUF``, version, tensor count and metadata count (u64), then typed key/value pairs, then per
tensor its name, dims (ggml order: innermost first), type and offset relative to the data section,
which starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qconv.errors import CorruptFile

_MAGIC = b"GGUF"
#: GGUF value type id -> (struct format, numpy dtype) for the fixed-size scalars
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9
#: tensor types stored as plain numpy arrays (the rest are byte rows of ggml blocks)
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (the message says where it broke); raised inside
    the parser, reported as :class:`CorruptFile`."""


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table; ``shape`` in ggml order (innermost dimension first)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The shape in numpy (HF) axis order."""
        return tuple(reversed(self.shape))


class GGUFFile:
    """Read-only view of a GGUF file: ``meta`` (key -> value) and ``tensors`` (file order)."""

    def __init__(self, path: Path | str) -> None:
        """Map and parse ``path``; a malformed file raises :class:`CorruptFile` (one line saying
        where it broke), the error every reader of a GGUF reports."""
        self.path = Path(path)
        try:
            self._open()
        except GGUFFormatError as e:
            raise CorruptFile(f"not a readable GGUF file ({e})", self.path) from None

    def _open(self) -> None:
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFFormatError("empty file") from None
        self._pos = 0
        try:
            self.meta, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
            self.close()
            raise GGUFFormatError(f"truncated or corrupt metadata at byte {self._pos} ({type(e).__name__})") from None
        except GGUFFormatError:
            self.close()
            raise

    def _take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        end = self._pos + n
        if end > len(self._map):
            raise GGUFFormatError(f"a string at byte {self._pos} runs past the end of the file")
        s = self._map[self._pos:end].decode("utf-8")
        self._pos = end
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {vtype} at byte {self._pos - 4}")
        sub, n = self._take("<I"), self._take("<Q")
        if sub in _SCALARS:
            dtype = np.dtype(_SCALARS[sub][1]).newbyteorder("<")
            if self._pos + n * dtype.itemsize > len(self._map):
                raise GGUFFormatError(f"an array at byte {self._pos} runs past the end of the file")
            values = np.frombuffer(self._map, dtype=dtype, count=n, offset=self._pos)
            self._pos += n * dtype.itemsize
            return values.tolist()
        return [self._value(sub) for _ in range(n)]

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if self._map[:4] != _MAGIC:
            raise GGUFFormatError("no GGUF magic at the start")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            meta[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._take("<Q") for _ in range(self._take("<I")))
            infos.append((name, dims, self._take("<I"), self._take("<Q")))
        align = int(meta.get("general.alignment", 32))
        if align <= 0:
            raise GGUFFormatError(f"general.alignment is {align}")
        start = -(-self._pos // align) * align
        tensors, seen = [], set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise GGUFFormatError(f"tensor {name} appears twice")
            seen.add(name)
            try:
                ttype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFFormatError(f"tensor {name} has unknown type {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[ttype]
            n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
            n_bytes = n_elements * type_size // block
            at = start + offset
            if at + n_bytes > len(self._map):
                raise GGUFFormatError(f"tensor {name} runs past the end of the file (truncated)")
            shape = tuple(reversed(dims))
            plain = _PLAIN.get(ttype.name)
            if plain is not None:
                data = np.frombuffer(self._map, dtype=plain, count=n_elements, offset=at).reshape(shape)
            else:  # ggml blocks: rows of bytes, as gguf.quants.dequantize expects
                data = np.frombuffer(self._map, dtype=np.uint8, count=n_bytes, offset=at)
                data = data.reshape(*shape[:-1], shape[-1] // block * type_size)
            tensors.append(GGUFTensor(name, ttype, dims, n_bytes, at, data))
        return meta, tensors

    def release(self, offset: int, nbytes: int) -> None:
        """Drop a range's pages from this process's mapping (touched pages of a mapping count in
        the RSS until unmapped; the page cache keeps them for the next reader)."""
        if hasattr(self._map, "madvise"):
            start = offset - offset % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)

    def close(self) -> None:
        """Unmap the file (numpy views of it must be gone; otherwise the OS unmaps at exit)."""
        self.tensors = []
        try:
            self._map.close()
        except BufferError:  # arrays still reference the mapping
            pass
