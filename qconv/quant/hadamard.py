"""Orthogonal matrices for rotating a model's residual stream (QuaRot / SpinQuant style).

A rotation ``Q`` spreads each activation and weight outlier over all channels: ``x Q`` has the
same norm as ``x`` but, for a Hadamard ``Q``, every coordinate is a ±1/√n mix of all of ``x``'s,
so low-bit grids no longer spend their range on a few large channels ("incoherence processing").

Hadamard matrices are built, not stored: Sylvester's ``H_2 ⊗ … ⊗ H_2`` for powers of two, times
one Paley (type I) factor of order ``p + 1`` for a prime ``p ≡ 3 (mod 4)``. That covers the
hidden sizes of common small models (576 = 72·8, 960 = 60·16, 896 = 224·4, 1536 = 12·128, and all
powers of two). Other sizes fall back to a random orthogonal matrix (QR of a Gaussian), which
also rotates exactly but spreads outliers less evenly. Both are randomized from a seed (random
column signs for Hadamard), so the same seed gives the same bytes.
"""

from __future__ import annotations

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def paley(order: int) -> torch.Tensor:
    """Hadamard matrix of ``order = p + 1`` (``p`` prime, ``p ≡ 3 mod 4``), Paley's construction I.

    With χ the quadratic character mod p and the Jacobsthal matrix ``J[i, j] = χ(j - i)``, the
    bordered matrix ``S = [[0, 1ᵀ], [-1, J]]`` is skew-symmetric with ``S Sᵀ = p I``, so
    ``H = I + S`` satisfies ``H Hᵀ = I - S² = (p + 1) I``.
    """
    p = order - 1
    if not (_is_prime(p) and p % 4 == 3):
        raise ValueError(f"no Paley I Hadamard matrix of order {order}")
    residues = torch.zeros(p, dtype=torch.float64)
    residues[[(k * k) % p for k in range(1, p)]] = 1.0
    chi = 2 * residues - 1
    chi[0] = 0
    idx = torch.arange(p)
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % p]
    return torch.eye(order, dtype=torch.float64) + s


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (entries ±1, ``H Hᵀ = n I``) in float64, or None when
    ``n`` is not ``2^k`` times a Paley order."""
    m = n // (n & -n)  # the odd part of n; candidates are m, 2m, 4m, ... (all divide n)
    while m <= n:
        if m == 1 or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            h = paley(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
            h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            for _ in range((n // m).bit_length() - 1):
                h = torch.kron(h, h2)
            return h
        m *= 2
    return None


def random_rotation(n: int, seed: int, kind: str = "hadamard") -> torch.Tensor:
    """An ``n × n`` orthogonal matrix in float64: a Hadamard matrix with random column signs,
    scaled by 1/√n (``kind="hadamard"``, falling back to ``"random"`` where no Hadamard matrix is
    constructed), or the Q factor of a seeded Gaussian matrix (``kind="random"``)."""
    if kind not in ("hadamard", "random"):
        raise ValueError(f"unknown rotation kind {kind!r} (valid: hadamard, random)")
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        return h * signs[None, :] / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # unique Q: a positive diagonal of R
