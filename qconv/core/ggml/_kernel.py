"""What one ggml type's quantizer is made of: the plain path and the importance-weighted one.

``ggml_quantize_chunk(type, src, dst, 0, rows, n, imatrix)`` takes two different code paths in
llama.cpp: with ``imatrix == NULL`` most types run their ``quantize_row_<type>_ref`` function,
with an importance vector they run a separate weighted search (``quantize_row_<type>_impl``).
A :class:`Kernel` names both, with the same calling convention for every type, so that
:func:`qconv.core.ggml.quantize` schedules them all alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: ``fn(x_blocks [nb, qk] float32, out [nb, block_bytes] uint8)``: the path without an imatrix.
BlockFn = Callable[[np.ndarray, np.ndarray], None]
#: ``fn(x_blocks, out, qw, row_ms)``: ``qw`` the importance of each element ``[nb, qk]`` (the
#: imatrix entries of the block's columns; None on the imatrix-free path of types whose plain
#: path is also a weighted search), ``row_ms`` ``[nb]`` the mean square ``sum(x*x)/n`` of each
#: block's whole row, summed in element order (None unless the kernel asks for it).
WeightedFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"], None]


@dataclass(frozen=True)
class Kernel:
    """One ggml type: ``plain`` is what llama.cpp runs without an imatrix; ``weighted`` what it
    runs with one (None: the type ignores the imatrix, as Q8_0 does); ``row_ms``: ``weighted``
    needs each row's mean square (the 32-element types' ``sigma2``)."""

    plain: BlockFn
    weighted: WeightedFn | None = None
    row_ms: bool = False
