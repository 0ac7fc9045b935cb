"""Reading llama.cpp importance matrices: the GGUF format ``llama-imatrix`` writes by default (and
``qconv calibrate --format imatrix`` writes), and the legacy ``.dat`` format.

What ``llama-quantize --imatrix`` does with the file, reproduced so the importances are the same
float32 values (and the quantized bytes the same):

- GGUF (``general.type = imatrix``, keys ``imatrix.datasets``, ``imatrix.chunk_count``,
  ``imatrix.chunk_size`` all required): per weight ``<name>.in_sum2`` (Σx², ``[n_mat, ne0]``) and
  ``<name>.counts`` (tokens, ``[n_mat, 1]``, rounded to integers); the importance of matrix ``j``
  is ``in_sum2 / (float)count``, or 1 everywhere where no token reached it (an expert never
  routed to).
- legacy (``int32 n_entries``; per entry ``int32 len, name, int32 ncall, int32 nval, float
  values[nval]``; optional trailer ``int32 chunks, int32 len, dataset``): ``values / ncall``
  (values as stored where ``ncall`` is 0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qconv.checkpoint.gguf_file import GGUFFile
from qconv.errors import CorruptFile, InputNotFound

_GGUF_MAGIC = b"GGUF"
_SUM2, _COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """Importances per GGUF weight name: float32 ``[n_mat * ne0]`` (``n_mat`` experts, else 1)."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The importance rows for tensor ``name`` of numpy shape ``shape`` (``[out, in]`` or
        ``[experts, out, in]``): float32 ``[n_mat, in]``, None when the file has no entry (llama.cpp
        then quantizes that tensor without one). A width that does not match the tensor means the
        file was made for another model: :class:`CorruptFile`."""
        v = self.entries.get(name)
        if v is None:
            return None
        n_mat = shape[0] if len(shape) == 3 else 1
        if v.size != n_mat * shape[-1]:
            raise CorruptFile(f"imatrix entry {name} has {v.size} values, the model's tensor needs "
                              f"{n_mat * shape[-1]} ({n_mat} x {shape[-1]}): an imatrix of another model?", self.path)
        return v.reshape(n_mat, shape[-1])


def read_imatrix(path: Path | str) -> Imatrix:
    """Read an importance matrix file (GGUF or legacy ``.dat``, told apart by the GGUF magic)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound("imatrix file not found", path)
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == _GGUF_MAGIC else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    g = GGUFFile(path)
    try:
        missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in g.meta]
        if missing:
            raise CorruptFile(f"not an imatrix GGUF (no {', '.join(missing)}; llama-quantize refuses it too)", path)
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for t in g.tensors:
            for suffix in (_SUM2, _COUNTS):
                if t.name.endswith(suffix) and t.name != suffix:
                    if t.tensor_type.name != "F32":
                        raise CorruptFile(f"imatrix tensor {t.name} is {t.tensor_type.name}, not F32", path)
                    pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float32).reshape(-1)
        if not pairs:
            raise CorruptFile("imatrix GGUF holds no <name>.in_sum2 / <name>.counts tensors", path)
        entries: dict[str, np.ndarray] = {}
        for name, pair in pairs.items():
            if len(pair) != 2:
                raise CorruptFile(f"imatrix entry {name} lacks its {_COUNTS if _SUM2 in pair else _SUM2} tensor", path)
            sums, counts = pair[_SUM2], np.rint(pair[_COUNTS]).astype(np.float32)  # C: lround, then (float)
            if counts.size == 0 or sums.size % counts.size:
                raise CorruptFile(f"imatrix entry {name}: {sums.size} sums for {counts.size} counts", path)
            rows = sums.reshape(counts.size, -1)
            with np.errstate(divide="ignore", invalid="ignore"):
                e = np.where(counts[:, None] > 0, rows / counts[:, None], np.float32(1.0)).astype(np.float32)
            entries[name] = _finite(e.reshape(-1), name, path)
        datasets = g.meta["imatrix.datasets"]
        return Imatrix(path, entries, [str(d) for d in datasets] if isinstance(datasets, list) else [],
                       int(g.meta["imatrix.chunk_count"]))
    finally:
        g.close()


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptFile(f"truncated legacy imatrix at byte {pos}", path)
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise CorruptFile("not an imatrix file (neither GGUF nor a legacy .dat with entries)", path)
    entries: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0:
            raise CorruptFile(f"corrupt legacy imatrix at byte {pos}", path)
        try:
            name = take(f"<{length}s")[0].decode()
        except UnicodeDecodeError:
            raise CorruptFile(f"corrupt legacy imatrix (entry name at byte {pos})", path) from None
        ncall, nval = take("<ii")
        if nval < 1:
            raise CorruptFile(f"legacy imatrix entry {name} has {nval} values", path)
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        if ncall > 0:
            values = np.divide(values, np.float32(ncall), dtype=np.float32)
        entries[name] = _finite(values, name, path)
    chunks, datasets = 0, []
    if pos < len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(data):
                datasets = [data[pos:pos + length].decode(errors="replace")]
    return Imatrix(path, entries, datasets, chunks)


def _finite(v: np.ndarray, name: str, path: Path) -> np.ndarray:
    """llama-quantize refuses an imatrix with NaN or inf values ("imatrix contains non-finite value")."""
    if not np.isfinite(v).all():
        raise CorruptFile(f"imatrix entry {name} contains non-finite values", path)
    return v
