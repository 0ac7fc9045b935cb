"""llama.cpp's row order for the Linears RoPE rotates (q, k) in its ``llama`` arch.

llama.cpp's llama arch rotates consecutive pairs (2i, 2i+1) in RoPE, HF rotates halves
(i, i + d/2); llama.cpp's converter therefore permutes the rows of q_proj/k_proj (weights and
biases) per head. Both directions live here so import and export cannot drift apart; which
tensors and how many heads come from the family's spec (:meth:`ArchSpec.rope_heads`).
"""

from __future__ import annotations

import numpy as np


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order for Q/K (halves -> interleaved pairs, per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> HF row order for Q/K (the inverse of :func:`permute_rows`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
