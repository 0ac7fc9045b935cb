"""Writing one safetensors file with bounded memory and reproducible bytes.

``safetensors.save_file`` needs every tensor of the file in memory at once (a 5 GB shard of a
large model is 5 GB of RSS) and stores ``__metadata__`` from a Rust HashMap whose key order
changes between processes. :class:`SafetensorsFileWriter` instead appends each tensor's bytes to
a scratch file as it arrives, one scratch file per element size, and at :meth:`close` writes the
header and concatenates the scratch files, larger elements first (every tensor stays aligned to
its element size, as safetensors lays files out), through the kernel's file copy. Peak memory is
one tensor; the header lists ``__metadata__`` first (keys sorted), then the tensors in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

#: torch dtype -> safetensors dtype name
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsFileWriter:
    """One safetensors file written tensor by tensor (see the module docstring)."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.metadata = dict(sorted((metadata or {}).items()))
        #: element size -> (scratch file, [(name, dtype, shape, nbytes)])
        self._parts: dict[int, tuple[BinaryIO, list[tuple[str, str, list[int], int]]]] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        size = t.element_size()
        if size not in self._parts:
            self._parts[size] = (open(self._scratch(size), "w+b"), [])
        f, entries = self._parts[size]
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        f.write(memoryview(data))
        entries.append((name, ST_DTYPES[t.dtype], list(t.shape), t.numel() * size))
        self.nbytes += t.numel() * size

    def close(self) -> None:
        """Write the file (header, then the scratch files, larger elements first) and remove the
        scratch files."""
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        sizes = sorted(self._parts, reverse=True)
        for size in sizes:
            for name, dtype, shape, n in self._parts[size][1]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
                offset += n
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in sizes:
                f = self._parts[size][0]
                f.flush()
                f.seek(0)
                out.flush()
                shutil.copyfileobj(f, out, 1 << 24)
        self.discard()

    def discard(self) -> None:
        """Remove the scratch files (after :meth:`close`, or when the write is abandoned)."""
        for size, (f, _) in self._parts.items():
            f.close()
            os.unlink(self._scratch(size))
        self._parts.clear()

    def _scratch(self, size: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part{size}")
