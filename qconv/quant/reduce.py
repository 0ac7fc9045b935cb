"""Sums over calibration samples that come out bit for bit the same however the samples are split.

Floating-point addition is not associative, so a Hessian summed batch after batch in one process
and the same Hessian summed per rank and then all-reduced differ in their last bits, and GPTQ's
output with them. To make a data-parallel run reproduce a single process byte for byte, the
calibration samples are cut into :data:`BUCKETS` contiguous buckets (:func:`bucket_sizes`), each
bucket's batches are folded in order into the bucket's own partial sum, and the partials are
combined in one fixed balanced binary tree over the buckets. A rank owns an aligned run of
buckets (a subtree: the rank count must divide :data:`BUCKETS`), reduces it to the subtree's root
exactly as a single process would, and the ranks' roots are combined by the top of the same tree
(:class:`TreeSum`). A single process holds at most ``log2(BUCKETS) + 1`` partials at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Buckets of calibration samples; data-parallel rank counts must divide it.
BUCKETS = 8


def bucket_sizes(samples: int, buckets: int = BUCKETS) -> list[int]:
    """Samples per bucket: contiguous, the first ``samples % buckets`` one larger."""
    return [samples // buckets + (b < samples % buckets) for b in range(buckets)]


def bucket_span(rank: int, world: int, buckets: int = BUCKETS) -> tuple[int, int]:
    """The buckets ``[lo, hi)`` rank ``rank`` of ``world`` owns: an aligned subtree of the tree."""
    if world < 1 or buckets % world or world & (world - 1):
        raise ValueError(f"data-parallel calibration needs a power-of-two rank count dividing {buckets}, got {world}")
    per = buckets // world
    return rank * per, (rank + 1) * per


#: ``gather(this rank's value or None, zeros factory)`` -> every rank's value, in rank order
Gather = Callable[[torch.Tensor | None, Callable[[], torch.Tensor]], list[torch.Tensor | None]]


@dataclass
class _Node:
    lo: int
    hi: int
    value: torch.Tensor | None  # None: every bucket under it was empty


def _combine(a: _Node, b: _Node) -> _Node:
    if a.value is None:
        return _Node(a.lo, b.hi, b.value)
    if b.value is not None:
        a.value += b.value
    return _Node(a.lo, b.hi, a.value)


def _push(stack: list[_Node], node: _Node) -> None:
    """Add a node and merge siblings (equal widths, adjacent, the left one aligned)."""
    stack.append(node)
    while len(stack) > 1:
        a, b = stack[-2], stack[-1]
        width = a.hi - a.lo
        if a.hi != b.lo or b.hi - b.lo != width or a.lo % (2 * width):
            break
        stack[-2:] = [_combine(a, b)]


class TreeSum:
    """A sum over buckets ``[lo, hi)`` (visited in increasing order), added up in the fixed tree.

    :meth:`partial` hands out the running accumulator of one bucket (a consumer folds its
    batches into it in place, e.g. with ``addmm_``); asking for a later bucket closes the earlier
    ones. :meth:`total` closes the rest and returns the root (None if nothing was added)."""

    def __init__(self, zeros: Callable[[], torch.Tensor], span: tuple[int, int] = (0, BUCKETS)) -> None:
        self._zeros = zeros
        self._lo, self._hi = span
        self._next = self._lo
        self._open: tuple[int, torch.Tensor] | None = None
        self._stack: list[_Node] = []

    def partial(self, bucket: int) -> torch.Tensor:
        """The accumulator of ``bucket`` (zeros when first asked for)."""
        if self._open is not None and self._open[0] == bucket:
            return self._open[1]
        if not self._next <= bucket < self._hi:
            raise ValueError(f"bucket {bucket} out of order (next {self._next}, span end {self._hi})")
        self._close_until(bucket)
        self._open = (bucket, self._zeros())
        return self._open[1]

    def _close_until(self, bucket: int) -> None:
        if self._open is not None:
            b, value = self._open
            self._open = None
            _push(self._stack, _Node(b, b + 1, value))
            self._next = b + 1
        while self._next < bucket:  # empty buckets
            _push(self._stack, _Node(self._next, self._next + 1, None))
            self._next += 1

    def total(self, gather: Gather | None = None) -> torch.Tensor | None:
        """The sum over the span; with ``gather`` (a data-parallel run: ``gather(root, zeros)``
        is every rank's root in rank order), the sum over every rank's span, combined by the top
        of the same tree."""
        self._close_until(self._hi)
        assert len(self._stack) == 1, "a span must be an aligned subtree of the bucket tree"
        root = self._stack.pop()
        if gather is None:
            return root.value
        roots = gather(root.value, self._zeros)
        width = root.hi - root.lo
        stack: list[_Node] = []
        for r, value in enumerate(roots):
            _push(stack, _Node(r * width, (r + 1) * width, value))
        assert len(stack) == 1
        return stack[0].value
