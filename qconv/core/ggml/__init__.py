"""llama.cpp (ggml) block quantizers, byte-identical to llama.cpp's reference quantization.

Pure functions, no I/O::

    from qconv.core import ggml
    data = ggml.quantize(w, "Q4_K")          # float32 [rows, n] -> uint8 [rows, n/256*144]
    data = ggml.quantize(w, "Q4_K", imatrix=v)   # v: float32 [n], llama-quantize --imatrix
    w2 = ggml.dequantize(data, "Q4_K", n)    # -> float32 [rows, n]
    ggml.block_size("Q4_K")                  # (256, 144)

``quantize`` reproduces what ``ggml_quantize_chunk(type, src, dst, 0, rows, n, imatrix)`` writes,
the call ``llama-quantize`` makes for each tensor: without an importance matrix
(``imatrix=None``, llama.cpp's ``quantize_row_<type>_ref`` functions for most types) and with one
(``imatrix=``, the per-column importance of ``--imatrix``: its weighted searches
``quantize_row_<type>_impl``). Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32-element blocks), Q4_K,
Q5_K, Q6_K (256-element super-blocks) and whatever :mod:`._lowk` and :mod:`._iq4` register
(:data:`QTYPES`). The work is vectorised across blocks with numpy float32, keeping the C code's
operation order so results match bit for bit, and split into chunks that run on several threads
(``threads``; by default the 256-element types, and every type with an imatrix, of tensors with
at least 2**22 elements use the CPUs available, or ``$QCONV_GGML_THREADS``; everything else runs
on the calling thread). On several threads the chunk size of the plain K-quants is timed on the
machine (:mod:`._schedule`); no byte depends on threads or chunks.
"""

from __future__ import annotations

import numpy as np

from ._common import F32, seq_sum
from ._kernel import Kernel
from ._schedule import ChunkTuner, default_threads, run_chunked
from ._iq4 import IQ4
from ._kquants import KQUANTS
from ._legacy import LEGACY
from ._lowk import LOWK

__all__ = ["QTYPES", "block_size", "quantize", "dequantize", "uses_imatrix"]

_KERNELS: dict[str, Kernel] = {**LEGACY, **KQUANTS, **LOWK, **IQ4}

#: Supported GGML type names (as in ``gguf.GGMLQuantizationType``).
QTYPES = tuple(_KERNELS)

# blocks per work chunk on one thread (and on several before a tuned size exists): large enough
# to amortise numpy's per-call overhead, small enough to keep a chunk's work arrays in cache.
_CHUNK_BLOCKS_SMALL = 4096   # 32-element blocks
_CHUNK_BLOCKS = {"Q4_K": 512, "Q5_K": 512, "Q6_K": 384}
# Automatic threading: only the compute-bound K-quants on large tensors gain from extra threads
# (the 32-element types are memory-bound, and small tensors only pay for the GIL hand-overs).
# Their chunk size on several threads is timed on the machine (see ._schedule): the best one
# measured 384-512 super-blocks on an AMX Xeon and 1024-1536 on an AVX2 EPYC.
_AUTO_THREADS_MIN_ELEMENTS = 1 << 22
_TUNER = ChunkTuner(candidates=(384, 768, 1536), fallback=768)


def _chunk_blocks(name: str) -> int:
    return _CHUNK_BLOCKS.get(name, 512 if name.endswith("_K") or name == "IQ4_XS" else _CHUNK_BLOCKS_SMALL)


def _auto_threads(name: str) -> bool:
    """The 256-element types are compute-bound; so is every type's importance-weighted search."""
    return block_size(name)[0] == 256


def _name(qtype) -> str:
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str):
        raise TypeError(f"qtype must be a GGML type name such as 'Q4_K', got {qtype!r}")
    key = name.upper()
    if key not in _KERNELS:
        raise ValueError(f"unsupported GGML quantization type {name!r}; supported: {', '.join(QTYPES)}")
    return key


def block_size(qtype) -> tuple[int, int]:
    """``(elements per block, bytes per block)`` of a GGML type (``gguf.constants.GGML_QUANT_SIZES``)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return tuple(GGML_QUANT_SIZES[GGMLQuantizationType[_name(qtype)]])


def uses_imatrix(qtype) -> bool:
    """Whether llama.cpp's quantizer for ``qtype`` reads an importance matrix (Q8_0 ignores it)."""
    return _KERNELS[_name(qtype)].weighted is not None


def quantize(x: np.ndarray, qtype, *, imatrix: np.ndarray | None = None, threads: int | None = None,
             chunk_blocks: int | None = None) -> np.ndarray:
    """Quantize float32 ``x`` of shape ``[rows, n]`` (``n`` a multiple of the block size) to the
    bytes llama.cpp writes for GGML type ``qtype``: uint8 ``[rows, n // block * block_bytes]``.

    ``imatrix``: the importance of each of the ``n`` input columns (llama-quantize's
    ``--imatrix`` entry for the tensor: mean squared activation), or None; with it the bytes are
    those of ``ggml_quantize_chunk(type, x, ..., imatrix)``, llama.cpp's weighted search.
    A 1-D ``x`` is treated as one row. Non-float32 input is converted to float32 first.
    ``threads``: worker threads (None: automatic, see the module docstring); ``chunk_blocks``:
    blocks per work chunk (None: the type's default on one thread, the size timed on this
    machine for K-quants on several). The bytes depend on neither.
    """
    name = _name(qtype)
    kernel = _KERNELS[name]
    qk, nbytes = block_size(name)
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array [rows, n], got shape {x.shape}")
    rows, n = x.shape
    if n % qk != 0:
        raise ValueError(f"row length {n} is not a multiple of the {name} block size {qk}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    nblocks = rows * (n // qk)
    out = np.empty((nblocks, nbytes), dtype=np.uint8)
    blocks = x.reshape(nblocks, qk)
    work = _span_work(kernel, blocks, out, x, imatrix)
    if threads is None:
        big = (_auto_threads(name) or imatrix is not None) and x.size >= _AUTO_THREADS_MIN_ELEMENTS
        threads = default_threads() if big else 1
    if chunk_blocks is None and threads > 1 and name in _CHUNK_BLOCKS and work.plain:
        _TUNER.run((name, threads), nblocks, work, threads)
    else:
        run_chunked(nblocks, work, chunk_blocks or _chunk_blocks(name), threads)
    return out.reshape(rows, (n // qk) * nbytes)


class _span_work:
    """``work(a, b)`` for the scheduler: blocks ``a .. b`` of ``blocks`` into ``out``, through the
    kernel's plain path or, with an imatrix, its weighted one (given each block's slice of the
    importance vector, gathered per span so no full-size copy of it is made)."""

    def __init__(self, kernel: Kernel, blocks: np.ndarray, out: np.ndarray, x: np.ndarray,
                 imatrix: np.ndarray | None) -> None:
        self.kernel, self.blocks, self.out = kernel, blocks, out
        self.plain = imatrix is None or kernel.weighted is None
        if self.plain:
            return
        rows, n = x.shape
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.size != n:
            raise ValueError(f"imatrix has {qw.size} values for rows of {n} elements")
        self.per_row = n // blocks.shape[1]
        self.qw = qw.reshape(self.per_row, blocks.shape[1])
        self.row_ms = np.repeat(row_mean_square(x), self.per_row) if kernel.row_ms else None

    def __call__(self, a: int, b: int) -> None:
        if self.plain:
            self.kernel.plain(self.blocks[a:b], self.out[a:b])
            return
        qw = self.qw[np.arange(a, b) % self.per_row]
        ms = None if self.row_ms is None else self.row_ms[a:b]
        self.kernel.weighted(self.blocks[a:b], self.out[a:b], qw, ms)


def row_mean_square(x: np.ndarray, rows_per_chunk: int = 256) -> np.ndarray:
    """``sum(x[r]*x[r]) / n`` per row of float32 ``[rows, n]``, summed in element order as the C
    loop ``for (j...) sum_x2 += x[j]*x[j]`` does (llama.cpp's ``sigma2`` of the 32-element types)."""
    rows, n = x.shape
    out = np.empty(rows, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(0, rows, rows_per_chunk):
            sq = np.ascontiguousarray(np.square(x[r:r + rows_per_chunk].T, dtype=F32))  # [n, R]
            out[r:r + rows_per_chunk] = seq_sum(sq)
        return np.divide(out, F32(n), dtype=F32)


def dequantize(data: np.ndarray, qtype, n: int) -> np.ndarray:
    """Decode ``quantize`` output (uint8 ``[rows, n // block * block_bytes]``) back to float32
    ``[rows, n]`` with gguf-py's reference dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as _gguf_dequantize

    name = _name(qtype)
    qk, nbytes = block_size(name)
    if n % qk != 0:
        raise ValueError(f"row length {n} is not a multiple of the {name} block size {qk}")
    data = np.ascontiguousarray(np.asarray(data).view(np.uint8))
    row_bytes = n // qk * nbytes
    if data.size % row_bytes if row_bytes else data.size:
        raise ValueError(f"{data.size} bytes is not a whole number of {name} rows of {n} elements")
    rows = data.size // row_bytes if row_bytes else 0
    data = data.reshape(rows, row_bytes)
    out = _gguf_dequantize(data, GGMLQuantizationType[name])
    return np.asarray(out, dtype=np.float32).reshape(rows, n)
