"""The ggml block kernels alone, against ggml's own ``ggml_quantize_chunk``, interleaved.

    python bench/kquant_speed.py [--rows 1024] [--cols 14336] [--types Q4_K Q6_K Q8_0] [--repeat 5]
                                 [--chunks 256 1024]

Whole-file comparisons (``bench/large_model.py``, ``bench/gguf_export.py``) time two processes
one after the other, so load from anything else on the machine lands on one side only; on this
2-core box their ratio has spread from 1.12x to 1.81x for unchanged code. Here both sides
quantize the same float32 matrix in one process, alternately, ``--repeat`` times, and the table
gives the median of each and the median of the per-round ratios: a figure that drifts far less.

Each type runs on 1 and on 2 threads; ggml's side splits the rows between Python threads that
call ``ggml_quantize_chunk`` through ctypes (which releases the GIL), as ``llama_model_quantize``
splits a tensor's rows between its workers. Every round checks that the bytes are identical.
``--chunks`` times qconv's side at each of these super-blocks per work chunk, in the same
rounds; ``auto`` (the default) is what ``ggml.quantize`` does by itself: on several threads, the
size it timed on this machine (``ChunkTuner``; its first call tunes, on a matrix of at least
``2 * trial_blocks`` blocks; the table names the size it chose).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from qconv.core import ggml


def ggml_library() -> ctypes.CDLL:
    """llama-cpp-python's ``libggml-base`` with ``ggml_quantize_chunk`` typed."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: GGMLQuantizationType, threads: int) -> np.ndarray:
    """ggml's reference quantizer over ``x`` ``[rows, cols]``, its rows split between ``threads``."""
    rows, cols = x.shape
    row_bytes = lib.ggml_row_size(int(qtype), cols)
    out = np.empty(rows * row_bytes, dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))

    def part(a: int, b: int) -> None:
        # start is an element index; dst is the start of the whole output
        lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, a * cols, b - a, cols, None)

    step = -(-rows // threads)
    spans = [(a, min(rows, a + step)) for a in range(0, rows, step)]
    if threads == 1:
        part(*spans[0])
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda s: part(*s), spans))
    return out


def timed(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q8_0"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunks", nargs="+", default=["auto"],
                        help="qconv's blocks per work chunk to compare, or 'auto' (ggml.quantize's own choice)")
    args = parser.parse_args()
    lib = ggml_library()
    # weights shaped like a trained model's: per-row spread and a few large outliers, on the
    # fp16 grid (the 8B export quantizes from an f16 GGUF)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
    x *= np.exp(rng.standard_normal((args.rows, 1), dtype=np.float32) * 0.3)
    x[rng.random(x.shape) < 1e-4] *= 20
    x = x.astype(np.float16).astype(np.float32)
    melem = x.size / 1e6
    print(f"{args.rows} x {args.cols} float32 ({melem:.1f} M elements), {args.repeat} interleaved rounds\n")
    print("| type | threads | qconv chunk | ggml s (median) | qconv s (median) | qconv Melem/s "
          "| qconv / ggml (median of rounds) | identical |")
    print("|---|---|---|---|---|---|---|---|")
    chunks: list[int | None] = [None if c == "auto" else int(c) for c in args.chunks]
    for name in args.types:
        qtype = GGMLQuantizationType[name]
        for threads in args.threads:
            theirs: list[float] = []
            ours: dict[int | None, list[float]] = {c: [] for c in chunks}
            ratios: dict[int | None, list[float]] = {c: [] for c in chunks}
            same = True
            for _ in range(args.repeat):
                t_ref, ref = timed(lambda: ggml_quantize(lib, x, qtype, threads))
                theirs.append(t_ref)
                for c in chunks:
                    t_ours, mine = timed(lambda: ggml.quantize(x, qtype, threads=threads, chunk_blocks=c))
                    ours[c].append(t_ours)
                    ratios[c].append(t_ours / t_ref)
                    same &= np.array_equal(ref, np.asarray(mine).view(np.uint8).ravel())
            for c in chunks:
                r = ratios[c]
                print(f"| {name} | {threads} | {c or auto_label(name, threads)} "
                      f"| {statistics.median(theirs):.3f} | {statistics.median(ours[c]):.3f} "
                      f"| {melem / statistics.median(ours[c]):.1f} | **{statistics.median(r):.2f}x** "
                      f"(min {min(r):.2f}, max {max(r):.2f}) | {'yes' if same else 'NO'} |", flush=True)


def auto_label(name: str, threads: int) -> str:
    """What ``chunk_blocks=None`` ran: the tuned size, or the default where there is none."""
    if threads > 1 and name in ggml._AUTO_THREADS:
        chosen = ggml._TUNER.chosen((name, threads))
        return f"auto: tuned {chosen}" if chosen else f"auto: untuned, {ggml._TUNER.fallback}"
    return f"auto: {ggml._CHUNK_BLOCKS[name]}"


if __name__ == "__main__":
    main()
