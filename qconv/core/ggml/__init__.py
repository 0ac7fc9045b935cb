"""llama.cpp (ggml) block quantizers, byte-identical to llama.cpp's reference quantization.

Pure functions, no I/O::

    from qconv.core import ggml
    data = ggml.quantize(w, "Q4_K")          # float32 [rows, n] -> uint8 [rows, n/256*144]
    w2 = ggml.dequantize(data, "Q4_K", n)    # -> float32 [rows, n]
    ggml.block_size("Q4_K")                  # (256, 144)

``quantize`` reproduces what ``ggml_quantize_chunk(type, src, dst, 0, rows, n, imatrix=NULL)``
writes, i.e. llama.cpp's ``quantize_row_<type>_ref`` functions (the path ``llama-quantize`` takes
without ``--imatrix``): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32-element blocks) and Q4_K, Q5_K, Q6_K
(256-element super-blocks). The work is vectorised across blocks with numpy float32, keeping the
C code's operation order so results match bit for bit, and split into chunks that run on
several threads (``threads``; by default the K-quants of tensors with at least 2**22 elements use
the CPUs available, or ``$QCONV_GGML_THREADS``; everything else runs on the calling thread).
On several threads the chunk size is timed on the machine (:mod:`._schedule`); no byte depends
on threads or chunks.
"""

from __future__ import annotations

import numpy as np

from ._schedule import ChunkTuner, default_threads, run_chunked
from ._kquants import KQUANTS
from ._legacy import LEGACY

__all__ = ["QTYPES", "block_size", "quantize", "dequantize"]

#: Supported GGML type names (as in ``gguf.GGMLQuantizationType``).
QTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_FUNCS = {**LEGACY, **KQUANTS}

# blocks per work chunk on one thread (and on several before a tuned size exists): large enough
# to amortise numpy's per-call overhead, small enough to keep a chunk's work arrays in cache.
_CHUNK_BLOCKS = {
    "Q8_0": 4096, "Q4_0": 4096, "Q4_1": 4096, "Q5_0": 4096, "Q5_1": 4096,
    "Q4_K": 512, "Q5_K": 512, "Q6_K": 384,
}
# Automatic threading: only the compute-bound K-quants on large tensors gain from extra threads
# (the 32-element types are memory-bound, and small tensors only pay for the GIL hand-overs).
# Their chunk size on several threads is timed on the machine (see ._schedule): the best one
# measured 384-512 super-blocks on an AMX Xeon and 1024-1536 on an AVX2 EPYC.
_AUTO_THREADS = {"Q4_K", "Q5_K", "Q6_K"}
_AUTO_THREADS_MIN_ELEMENTS = 1 << 22
_TUNER = ChunkTuner(candidates=(384, 768, 1536), fallback=768)


def _name(qtype) -> str:
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str):
        raise TypeError(f"qtype must be a GGML type name such as 'Q4_K', got {qtype!r}")
    key = name.upper()
    if key not in _FUNCS:
        raise ValueError(f"unsupported GGML quantization type {name!r}; supported: {', '.join(QTYPES)}")
    return key


def block_size(qtype) -> tuple[int, int]:
    """``(elements per block, bytes per block)`` of a GGML type (``gguf.constants.GGML_QUANT_SIZES``)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return tuple(GGML_QUANT_SIZES[GGMLQuantizationType[_name(qtype)]])


def quantize(x: np.ndarray, qtype, *, threads: int | None = None, chunk_blocks: int | None = None) -> np.ndarray:
    """Quantize float32 ``x`` of shape ``[rows, n]`` (``n`` a multiple of the block size) to the
    bytes llama.cpp writes for GGML type ``qtype``: uint8 ``[rows, n // block * block_bytes]``.

    A 1-D ``x`` is treated as one row. Non-float32 input is converted to float32 first.
    ``threads``: worker threads (None: automatic, see the module docstring); ``chunk_blocks``:
    blocks per work chunk (None: the type's default on one thread, the size timed on this
    machine for K-quants on several). The bytes depend on neither.
    """
    name = _name(qtype)
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
    if threads is None:
        big = name in _AUTO_THREADS and x.size >= _AUTO_THREADS_MIN_ELEMENTS
        threads = default_threads() if big else 1
    if nblocks:
        blocks = x.reshape(nblocks, qk)
        if chunk_blocks is None and threads > 1 and name in _AUTO_THREADS:
            _TUNER.run((name, threads), blocks, out, _FUNCS[name], threads)
        else:
            run_chunked(blocks, out, _FUNCS[name], chunk_blocks or _CHUNK_BLOCKS[name], threads)
    return out.reshape(rows, (n // qk) * nbytes)


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
