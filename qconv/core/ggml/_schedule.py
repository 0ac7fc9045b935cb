"""How a tensor's blocks are split into work chunks and spread over threads.

Every block is quantized independently, so none of this changes a byte of the result (tested);
it only decides how fast the numpy kernels run. A chunk's size trades numpy's per-call cost (and,
on several threads, the GIL hand-over at every call) against its work arrays spilling out of the
core's caches, and the balance differs between CPUs: with 2 threads on 512 x 14336 matrices,
``bench/kquant_speed.py`` measured the fastest Q6_K chunk at 384 super-blocks on an AMX Xeon
(1.29x ggml's time, 1.67x at 1024) but at 1536 on an AVX2 EPYC (1.24x, 2.53x at 384). So on
large tensors the size is chosen on the machine itself, by timing the first blocks of the first
such tensor of each type (:class:`ChunkTuner`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

#: ``work(a, b)``: quantize blocks ``a`` to ``b`` of a tensor into its output
SpanFn = Callable[[int, int], None]


def default_threads() -> int:
    """Worker threads for large tensors: ``$QCONV_GGML_THREADS``, else the CPUs this process may use."""
    env = os.environ.get("QCONV_GGML_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def run_chunked(nb: int, work: SpanFn, chunk_blocks: int, threads: int) -> None:
    """Run ``work(a, b)`` over spans that cover blocks ``0 .. nb``, optionally in threads.

    numpy releases the GIL inside its loops, so chunks overlap on several cores; the chunks are
    made as large as ``chunk_blocks`` allows and balanced across the threads.
    """
    if nb <= 0:
        return
    nthreads = max(1, int(threads))
    nchunks = -(-nb // max(1, chunk_blocks))
    if nthreads > 1:
        nchunks = -(-nchunks // nthreads) * nthreads
    size = -(-nb // nchunks)
    spans = [(a, min(nb, a + size)) for a in range(0, nb, size)]
    nthreads = min(nthreads, len(spans))
    if nthreads <= 1:
        for a, b in spans:
            work(a, b)
        return
    with ThreadPoolExecutor(max_workers=nthreads) as ex:
        for f in [ex.submit(work, a, b) for a, b in spans]:
            f.result()


class ChunkTuner:
    """Blocks per work chunk, chosen per (type, threads) by timing real work on this machine.

    The first tensor of a key with at least twice :meth:`trial_blocks` blocks has its leading
    blocks quantized in trials: every candidate size in turn, in two rounds (ascending, then
    descending, so that a drift in the machine's load does not favour one end), each trial
    ``threads * max(candidates)`` blocks, so that every candidate does the same work. The size
    with the least time per block (best of its two trials) is kept for the rest of the process.
    The trials' output is the tensor's own, so nothing is done twice. Smaller tensors, before
    a choice exists, use ``fallback``.
    """

    ROUNDS = 2

    def __init__(self, candidates: Sequence[int], fallback: int) -> None:
        self.candidates = tuple(sorted(candidates))
        self.fallback = fallback
        self._chosen: dict[Hashable, int] = {}

    def trial_blocks(self, threads: int) -> int:
        """Blocks the trials consume from the first large tensor."""
        return self.ROUNDS * len(self.candidates) * threads * max(self.candidates)

    def chosen(self, key: Hashable) -> int | None:
        """The size chosen for ``key`` so far (None: not tuned yet)."""
        return self._chosen.get(key)

    def run(self, key: Hashable, nb: int, work: SpanFn, threads: int) -> None:
        """:func:`run_chunked` with the size chosen for ``key``, tuning on these blocks if none is yet."""
        size = self._chosen.get(key)
        done = 0
        if size is None and nb >= 2 * self.trial_blocks(threads):
            done, size = self._tune(work, threads)
            self._chosen.setdefault(key, size)  # a concurrent tuning of the same key may have won
        run_chunked(nb - done, lambda a, b: work(done + a, done + b), size or self.fallback, threads)

    def _tune(self, work: SpanFn, threads: int) -> tuple[int, int]:
        """Quantize the leading blocks in timed trials; returns (blocks done, fastest size)."""
        per_trial = threads * max(self.candidates)
        best = {c: math.inf for c in self.candidates}
        done = 0
        for r in range(self.ROUNDS):
            for c in (self.candidates if r % 2 == 0 else self.candidates[::-1]):
                t0 = time.perf_counter()
                start = done
                run_chunked(per_trial, lambda a, b: work(start + a, start + b), c, threads)
                best[c] = min(best[c], time.perf_counter() - t0)
                done += per_trial
        return done, min(self.candidates, key=best.__getitem__)
