"""GPTQ (Frantar et al., 2022) for one Linear, as pure tensor functions.

Two pieces, kept free of modules and hooks so a pipeline can drive them however it batches:

* :class:`HessianAccumulator` turns a Linear's calibration inputs into ``H = (2/N) Σ x xᵀ``.
* :func:`gptq_quantize` quantizes ``W [out, in]`` column by column against ``H``, pushing each
  column's rounding error onto the columns not yet quantized (the reference algorithm of
  IST-DASLab/gptq, with llm-compressor's static-group activation ordering).

The codes, scales and zero points it returns live on :mod:`qconv.core.grid`'s one convention,
and ``grid.dequantize(q, scale, zero, scheme)`` is bit for bit the fake-quantized weight GPTQ
optimized: the column quantizer below performs exactly ``grid.quantize``'s float32 operations.
:func:`gptq_quantize_ggml` runs the same column loop on a llama.cpp block type's grid, whose
scales llama.cpp's own search fixes first; its decoded values are the dequantizer's, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from qconv.core import ggml
from qconv.core.ggml import levels
from qconv.core.ggml_target import GGMLScheme, GGMLWeight

from qconv.errors import InvalidOption
from qconv.quant.distributed import DataParallel
from qconv.quant.reduce import BUCKETS, TreeSum
from qconv.core.grid import (
    WeightScheme,
    dequantize,
    group_minmax,
    mse_clip_params,
    qparams,
    quantize,
    round_float,
    tensor_global_scale,
)

# Multipliers of ``damp`` tried in turn when the damped Hessian cannot be factored. With a
# positive semi-definite H, ``damp = 0.01`` already bounds the condition number by 100·in, so a
# failure means H is indefinite beyond round-off (a broken accumulation); a few larger steps,
# up to 10x as GPTQModel's auto-increment reaches, are worth a try before giving up on GPTQ.
DAMP_MULTIPLIERS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)


#: tokens per Hessian product: bounds the float32/bfloat16 copy of the rows being added
HESSIAN_CHUNK = 16384

# Column blocks of the Hessian's lower block triangle (see HessianAccumulator.add); blocks
# narrower than 128 columns lose more GEMM efficiency than the skipped upper triangle saves.
_SYMMETRY_BLOCKS = 4
_MIN_SYMMETRY_BLOCK = 128


class BucketedProducts:
    """Float32 sums of token products ``Σ x yᵀ`` of a Linear's inputs, kept per bucket of
    calibration samples and combined in :mod:`qconv.quant.reduce`'s fixed tree, so a
    data-parallel run (``parallel``: each rank adds its own buckets) gets the single-process sum
    bit for bit. :class:`HessianAccumulator` (``y = x``) and :class:`CrossAccumulator` read it."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", bf16_matmul: bool = False,
                 span: tuple[int, int] = (0, BUCKETS), parallel: DataParallel | None = None) -> None:
        self.in_features = in_features
        self.bf16_matmul = bf16_matmul
        self._tree = TreeSum(lambda: torch.zeros(in_features, in_features, dtype=torch.float32, device=device), span)
        self._parallel = parallel
        self._device = torch.device(device)
        self._first_bucket = span[0]
        self._tokens = 0
        width = max(_MIN_SYMMETRY_BLOCK, -(-in_features // _SYMMETRY_BLOCKS))
        self._blocks = [(j0, min(j0 + width, in_features)) for j0 in range(0, in_features, width)]

    @property
    def tokens(self) -> int:
        """Token rows accumulated so far (by this process)."""
        return self._tokens

    def _add(self, x: torch.Tensor, y: torch.Tensor | None, bucket: int | None) -> None:
        if x.shape[-1] != self.in_features or (y is not None and y.shape != x.shape):
            raise ValueError(f"inputs {tuple(x.shape)} / {None if y is None else tuple(y.shape)} do not match "
                             f"the width {self.in_features}")
        dtype = torch.bfloat16 if self.bf16_matmul else torch.float32
        flat = x.detach().reshape(-1, self.in_features)
        if flat.shape[0] == 0:
            return
        acc = self._tree.partial(self._first_bucket if bucket is None else bucket)
        ys = flat if y is None else y.detach().reshape(-1, self.in_features)
        for chunk, other in zip(flat.split(HESSIAN_CHUNK), ys.split(HESSIAN_CHUNK)):
            rows = chunk.to(device=acc.device, dtype=dtype)
            if y is None:
                self._add_symmetric(acc, rows)
            else:  # a cross product has no symmetry to exploit
                self._add_product(acc, rows.T, other.to(device=acc.device, dtype=dtype))
        self._tokens += flat.shape[0]

    def _add_product(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` into the float32 sum: in place in float32, or (``bf16_matmul``) a
        bfloat16 GEMM whose result is rounded to bf16 before it is added."""
        if self.bf16_matmul:
            acc += a @ b
        else:
            acc.addmm_(a, b)

    def _add_symmetric(self, acc: torch.Tensor, rows: torch.Tensor) -> None:
        """``acc += rowsᵀ rows`` on the lower block triangle only: Σ x xᵀ is symmetric, so 4 column
        blocks cost 5/8 of the full product (measured 1536 wide: 8.4 s instead of 13.8 s of CPU
        per 128×2048 tokens)."""
        for j0, j1 in self._blocks:
            self._add_product(acc[j0:j1, :j1], rows[:, j0:j1].T, rows[:, :j1])

    def _total(self) -> tuple[torch.Tensor, int]:
        """The raw sum over every rank's buckets and the token count."""
        total = self._tree.total(self._parallel.gather if self._parallel else None)
        tokens = self._parallel.total(self._tokens, self._device) if self._parallel else self._tokens
        if not tokens or total is None:
            # an all-zero H would mark every column dead and zero the whole weight
            raise ValueError("no calibration tokens were accumulated for this Hessian")
        return total, tokens


class HessianAccumulator(BucketedProducts):
    """Running ``H = (2/N) Σ_tokens x xᵀ`` of one Linear's inputs, ``N`` counted in tokens.

    The reference rescales ``H *= n/(n+b)`` and adds ``(2/(n+b)) x xᵀ`` on every batch; that is
    algebraically the raw sum ``S = Σ x xᵀ`` scaled by ``2/N`` at the end, which is what is kept
    here: in-place ``addmm_`` on the lower block triangle per call, no O(in²) rescale, and one
    rounding fewer per batch. Batches of any size therefore combine as one big batch would.

    ``N`` counts tokens, not sequences (the reference counts sequences). GPTQ's result does not
    depend on a constant factor on H (the damping is relative to its mean diagonal and the error
    feedback is scale free); only the reported ``loss`` scales with it, and a per-token loss
    stays comparable across calibration lengths.

    The sum is float32, like both references: it is half the cost of float64 on CPU, and its
    relative error (~1e-6 over 128×2048 tokens) is four orders of magnitude under the 1% damping
    GPTQ adds to H anyway.

    ``bf16_matmul=True`` trades that margin for speed: each batch's product runs on bfloat16
    inputs (AVX512-BF16 / AMX GEMMs) and is rounded to bfloat16 before joining the float32 sum.
    Measured at in=1536 over 8×8192 correlated tokens: 1.9x less CPU, H off by 6e-4 (relative
    Frobenius), GPTQ's output error moved by 0.05%; at in=256, ±1.5% either way over 8 seeds
    (+0.2% on average) on held-out tokens. Off by default here; the GPTQ method turns it on
    when the calibration pass itself runs in bfloat16 (its inputs are bf16 values then anyway).

    Summed per calibration bucket (:class:`BucketedProducts`).
    """

    def add(self, x: torch.Tensor, bucket: int | None = None) -> None:
        """Accumulate inputs ``x [..., in]`` (any float dtype; every leading index is a token)
        of calibration bucket ``bucket`` (default: the first; buckets come in order)."""
        self._add(x, None, bucket)

    @property
    def hessian(self) -> torch.Tensor:
        """``(2/N) Σ x xᵀ`` as a new float32 ``[in, in]`` tensor (over every rank's tokens)."""
        total, tokens = self._total()
        lower = total.tril()  # a new tensor: the sum may be an inference tensor (filled by a hook)
        del total
        return lower.add_(lower.tril(-1).T).mul_(2.0 / tokens)


class CrossAccumulator(BucketedProducts):
    """Running ``C = (2/N) Σ_tokens x yᵀ`` of aligned inputs ``x, y`` (GPTQ's fp-target cross
    term: ``x`` the quantized model's inputs, ``y`` the fp model's), float32, scaled like
    :attr:`HessianAccumulator.hessian` and summed per bucket in the same fixed tree."""

    def add(self, x: torch.Tensor, y: torch.Tensor, bucket: int | None = None) -> None:
        """Accumulate the products of one batch of aligned inputs ``x, y [..., in]``."""
        self._add(x, y, bucket)

    @property
    def cross(self) -> torch.Tensor:
        """``(2/N) Σ x yᵀ`` as a new float32 ``[in, in]`` tensor (over every rank's tokens)."""
        total, tokens = self._total()
        return total.clone().mul_(2.0 / tokens)


def cross_products(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(2/N) Σ_tokens x yᵀ`` ``[in, in]`` in float32 for aligned inputs ``x, y [..., in]``
    (:class:`CrossAccumulator` over one batch)."""
    if x.shape != y.shape or not x.numel():
        raise ValueError(f"cross products need aligned, non-empty inputs, got {tuple(x.shape)} and {tuple(y.shape)}")
    acc = CrossAccumulator(x.shape[-1], device=x.device)
    acc.add(x, y)
    return acc.cross


def retarget(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight ``V`` that GPTQ should approximate so that its quantized layer fits the
    full-precision model's outputs rather than reproduce ``w`` on already-drifted inputs.

    GPTAQ's asymmetric objective (Li et al., 2025) is ``|X_fp wᵀ - X̃ qᵀ|²``: quantized weights
    ``q`` on the quantized model's inputs ``X̃`` should give what ``w`` gives on the fp model's
    inputs ``X_fp``. With ``V`` its unconstrained least-squares solution, the residual
    ``X_fp wᵀ - X̃ Vᵀ`` is orthogonal to every ``X̃ u``, so the objective splits exactly into a
    constant plus ``(V - q) H̃ (V - q)ᵀ``: plain GPTQ of ``V`` against ``H̃``. Damped the way
    GPTQ damps (``λ = damp · mean diag H̃``, i.e. ``+ λ|w - q|²`` on the objective):
    ``Vᵀ = (H̃ + λI)⁻¹ (C + λI) wᵀ`` with ``H̃ = (2/N) X̃ᵀX̃`` and ``C = (2/N) X̃ᵀX_fp``. When the
    inputs agree (``C = H̃``), ``V = w``. Solved in float64; if ``H̃ + λI`` cannot be factored,
    ``w`` is returned unchanged (GPTQ then retries its own dampening).
    """
    A = H.to(torch.float64)
    lam = damp * A.diagonal().mean()
    A = A + lam * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    if info.item():
        return w.detach().float().clone()
    B = C.to(torch.float64) + lam * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    v = torch.cholesky_solve(B @ w.detach().to(torch.float64).T, L)
    return v.T.to(torch.float32).contiguous()


@dataclass(frozen=True)
class GPTQResult:
    """One Linear's GPTQ output, ready for a writer: ``dequantize(q, scale, zero)`` is Ŵ.

    ``loss`` is the reference's ``Σ (w - q)² / Hinv[i,i]² / 2`` for the H given (NaN after an
    RTN fallback, where no inverse exists); ``damp_used`` the relative dampening the inverse was
    computed with (NaN after a fallback).
    """

    q: torch.Tensor  # int8 [out, in] (float32 element values on a float grid)
    scale: torch.Tensor  # float32 [out, groups], values representable in scheme.scale_dtype
    zero: torch.Tensor  # int32 [out, groups]
    loss: float
    damp_used: float
    fell_back_to_rtn: bool
    global_scale: torch.Tensor | None = None  # NVFP4's per-tensor scale


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``) and the damp used.

    ``λ = damp · mean(diag H)``, retried with :data:`DAMP_MULTIPLIERS`; ``None`` if every try
    fails. Instead of the reference's ``cholesky → cholesky_inverse → cholesky(upper)`` this
    factors the index-reversed matrix once: if ``J H J = M Mᵀ`` (``J`` the reversal), then
    ``U = J M⁻¹ J`` — one factorization and one triangular inverse (2n³/3 flops instead of
    4n³/3), and no explicit inverse that would be factored again. It runs in float64: ~0.1 s
    more than float32 at in=1536, for a factor exact to ~1e-15 instead of float32's 1e-6
    (which grows with the condition number, bounded only by 100·in at damp 0.01 and not at all
    for smaller damps).
    """
    if not torch.isfinite(H).all():
        return None
    n = H.shape[0]
    mean_diag = H.diagonal().to(torch.float64).mean()
    # one thread: LAPACK's Cholesky gives different bits with different thread counts (measured),
    # and a data-parallel rank must factor exactly as a single process does. Copies are made one
    # at a time (peak: H, the float64 factor and its inverse), as this runs on 14336-wide
    # Hessians for 8B models.
    with _one_thread():
        for multiplier in DAMP_MULTIPLIERS:
            frac = damp * multiplier
            damped = torch.empty(n, n, dtype=torch.float64, device=H.device)
            damped.copy_(H.flip(0, 1))
            damped.diagonal().add_(frac * mean_diag)
            M, info = torch.linalg.cholesky_ex(damped)
            del damped
            if info.item():
                continue
            U = _lower_triangular_inverse(M)
            del M
            if torch.isfinite(U).all():
                return U.to(torch.float32).flip(0, 1), frac
    return None


def _lower_triangular_inverse(M: torch.Tensor) -> torch.Tensor:
    """``M⁻¹`` of a lower-triangular ``M`` by 2x2 block recursion, ``n³/3`` flops in GEMMs.

    ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]]``. torch has no ``trtri``; a triangular
    solve against the identity does ``n³`` flops, and measured 2x slower at n = 1536.
    """
    n = M.shape[0]
    if n <= 128:
        return torch.linalg.solve_triangular(M, torch.eye(n, dtype=M.dtype, device=M.device), upper=False)
    h = n // 2
    inv = torch.zeros_like(M)
    inv[:h, :h] = _lower_triangular_inverse(M[:h, :h])
    inv[h:, h:] = _lower_triangular_inverse(M[h:, h:])
    inv[h:, :h] = -(inv[h:, h:] @ (M[h:, :h] @ inv[:h, :h]))
    return inv


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    scheme: WeightScheme,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    mse: bool = False,
    refine: int = 0,
    global_scale: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``w [out, in]`` with GPTQ against the input Hessian ``H [in, in]``.

    * Dead inputs (``H[i,i] == 0``, never active in calibration) get ``H[i,i] = 1`` and a zero
      weight, as in the reference.
    * ``static_groups``: every group's (scale, zero) comes from the un-updated weight, in the
      original column order. With ``act_order`` columns are processed by descending ``H[i,i]``
      but each keeps its original group's parameters, so the checkpoint needs no ``g_idx``
      (llm-compressor's default ``actorder="static"``).
    * not ``static_groups`` (the reference's default, only without ``act_order``): a group's
      parameters are computed when quantization reaches its first column, from the weight with
      the lazy updates of all previous blocks but not those of the current block — the
      reference's exact behaviour, kept for parity.
    * ``group_size == -1``: one (scale, zero) per row, from the un-updated weight.
    * ``mse``: static parameters from :func:`mse_clip_params` (the reference's ``--mse`` grid)
      instead of the plain min/max; the error feedback then works against a tighter grid.
    * ``refine``: that many rounds of :func:`refit_scales` then :func:`descend_codes` on GPTQ's
      result, against the same damped ``H`` (GPTQ is one greedy pass; these only ever lower its
      objective). ``loss`` stays GPTQ's own.

    * float grids (FP8, NVFP4, MXFP4): each column rounds to the nearest element value of its
      group's scale; NVFP4's ``global_scale`` is :func:`tensor_global_scale` of ``w`` unless given.
      Static groups only, no ``refine`` (its scale refit and code descent are integer-grid steps).

    If ``H + λI`` cannot be factored for any retried damp, the module falls back to RTN on the
    same grid and ``fell_back_to_rtn`` says so.
    """
    out, n = w.shape
    if H.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match a weight with {n} input columns")
    if block_size < 1:
        raise InvalidOption(f"GPTQ block size must be positive, got {block_size}")
    if not damp >= 0:
        raise InvalidOption(f"GPTQ dampening must be a non-negative fraction, got {damp}")
    grouped = scheme.group_size != -1
    if act_order and grouped and not static_groups:
        raise InvalidOption("act_order needs static groups: dynamic groups in permuted order would need a g_idx")
    if mse and grouped and not static_groups:
        raise InvalidOption("GPTQ mse needs static groups (the clip search runs on the un-updated weight)")
    if scheme.is_float and (refine or not static_groups):
        raise InvalidOption("GPTQ on a float grid (FP8/FP4) needs static groups and no refine")
    width = scheme.group_width(n)
    groups = scheme.groups(n)
    gs = global_scale if global_scale is not None else tensor_global_scale(w, scheme)

    W = w.detach().to(torch.float32, copy=True)
    H = H.detach().to(torch.float32, copy=True)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    static = static_groups or not grouped
    if static:
        scale, zero = mse_clip_params(W, scheme, global_scale=gs) if mse else \
            qparams(*group_minmax(W, scheme), scheme, gs)

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    factor = inverse_hessian_factor(H, damp)
    if factor is None:
        if not static:
            scale, zero = qparams(*group_minmax(W, scheme), scheme)
        return GPTQResult(quantize(W, scale, zero, scheme), scale, zero, math.nan, math.nan, True, gs)
    Hinv, damp_used = factor

    # Work on Wᵀ in processing order: a column is then a contiguous row, and so is every
    # per-column parameter vector below.
    Wt = (W[:, perm] if perm is not None else W).T.contiguous()
    column_group = torch.arange(n, device=W.device) // width
    if perm is not None:
        column_group = column_group[perm]
    if static:
        col_scale = scale.T[column_group].contiguous()
        col_zero = zero.T.to(torch.float32)[column_group].contiguous()
    else:
        scale = torch.empty(out, groups, dtype=torch.float32, device=W.device)
        zero = torch.empty(out, groups, dtype=torch.int32, device=W.device)
        col_scale = torch.empty_like(Wt)
        col_zero = torch.empty_like(Wt)

    def rounder(i1: int, i2: int) -> ColumnRounder:
        if not static:
            # Wt[i1:] holds exactly the previous blocks' lazy updates until this block ends,
            # so the parameters of every group starting in the block can be taken now.
            for g0 in range(-(-i1 // width) * width, i2, width):
                g = g0 // width
                gs, gz = qparams(Wt[g0 : g0 + width].amin(0), Wt[g0 : g0 + width].amax(0), scheme)
                scale[:, g], zero[:, g] = gs, gz
                col_scale[g0 : g0 + width] = gs
                col_zero[g0 : g0 + width] = gz.to(torch.float32)
        return _grid_rounder(col_scale[i1:i2], col_zero[i1:i2], scheme)

    codes, loss = _gptq_columns(Wt, Hinv, block_size, rounder)

    q = codes.T
    unperm = torch.argsort(perm) if perm is not None else None
    if unperm is not None:
        q = q[:, unperm]
    q = q.contiguous() if scheme.is_float else q.to(torch.int8).contiguous()
    if refine:
        # the damped H GPTQ factored, back in the original column order (indexing copies it)
        Hd = H[unperm][:, unperm] if unperm is not None else H.clone()
        Hd.diagonal().add_(damp_used * Hd.diagonal().mean())
        for _ in range(refine):
            scale = refit_scales(W, Hd, q, scale, zero, scheme)
            q = descend_codes(W, Hd, q, scale, zero, scheme)
    return GPTQResult(q, scale, zero, loss.item() / 2, damp_used, False, gs)


def row_errors(target: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(w - ŵ) H (w - ŵ)ᵀ`` per output row: the layer-output error GPTQ minimizes."""
    e = (wq - target).float()
    return ((e @ H) * e).sum(1)


def refit_scales(target: torch.Tensor, H: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 scheme: WeightScheme) -> torch.Tensor:
    """Per-(row, group) scales that minimize :func:`row_errors` for fixed codes and zero points.

    GPTQ's static scales are chosen from the weight before any error feedback, and its feedback
    then moves the weights they quantize; with the codes fixed, ``ŵ = Σ_g s_g (q - z_g)·1_g`` is
    linear in a row's scales, so the best ones solve a ``groups x groups`` system
    ``(Aᵀ H A) s = Aᵀ H w`` per row (float64, batched). A row keeps its old scales unless the
    new ones (rounded to the storage dtype) are positive and lower its error; a group whose
    codes all sit on the zero point keeps its scale (it does not enter the error).
    """
    out, n = target.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    D = (q.double() - zero.double().repeat_interleave(width, 1)).reshape(out, groups, width)
    H64 = H.double()
    M = torch.empty(out, groups, groups, dtype=torch.float64, device=target.device)
    for g in range(groups):
        # row r: Σ_ij D[r,g,i] H[gi, hj] D[r,h,j], for every h at once
        T = D[:, g] @ H64[g * width:(g + 1) * width]
        M[:, g] = (T.reshape(out, groups, width) * D).sum(-1)
    b = ((target.double() @ H64).reshape(out, groups, width) * D).sum(-1)
    idle = D.abs().sum(-1) == 0
    M = M + torch.diag_embed(idle.double())  # an idle group's row/column is zero: pin its scale
    fit, info = torch.linalg.solve_ex(M, b.unsqueeze(-1))
    new = fit.squeeze(-1).to(scheme.scale_dtype).float()
    new = torch.where(idle | (info != 0)[:, None], scale, new)
    ok = (new > 0).all(1)
    new = torch.where(ok[:, None], new, scale)
    before = row_errors(target, dequantize(q, scale, zero, scheme), H)
    after = row_errors(target, dequantize(q, new, zero, scheme), H)
    return torch.where((after < before)[:, None], new, scale)


def descend_codes(target: torch.Tensor, H: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  scheme: WeightScheme, sweeps: int = 3, block_size: int = 128) -> torch.Tensor:
    """Cyclic coordinate descent over the codes on a fixed grid (CDQuant, Nair & Suggala 2024).

    With ``G = (Ŵ - W) H``, moving one weight ``ŵ_j`` by ``δ`` changes a row's error by
    ``2δ G_j + δ² H_jj``: the best code for column ``j`` with the others fixed is the grid point
    nearest ``ŵ_j - G_j / H_jj``, exactly (a 1-D quadratic), so no step raises the error. Each
    sweep visits every column once in order, for all rows at once, until a sweep changes nothing
    or ``sweeps`` are done. ``G`` is updated lazily by blocks of columns as GPTQ updates its
    weights: exact inside the block, the rest of the row in one GEMM per block.
    """
    out, n = target.shape
    width = scheme.group_width(n)
    S = scale.float().repeat_interleave(width, 1).T.contiguous()  # per column, rows contiguous
    Z = zero.float().repeat_interleave(width, 1).T.contiguous()
    Q = q.float().T.contiguous()
    Wq = (Q - Z) * S
    G = H.float() @ (Wq - target.float().T)  # [n, out]: row j is column j's gradient (H is symmetric)
    inv_diag = H.diagonal().reciprocal().tolist()
    qmin, qmax = float(scheme.qmin), float(scheme.qmax)
    t, c, delta = (torch.empty(out, device=target.device) for _ in range(3))
    with _one_thread():
        for _ in range(sweeps):
            changed = False
            for i1 in range(0, n, block_size):
                i2 = min(i1 + block_size, n)
                D = torch.zeros(i2 - i1, out, device=target.device)
                for j in range(i1, i2):
                    torch.mul(G[j], inv_diag[j], out=t)
                    torch.sub(Wq[j], t, out=t)
                    torch.div(t, S[j], out=c)
                    c.round_().add_(Z[j]).clamp_(qmin, qmax)
                    torch.sub(c, Z[j], out=t)
                    t.mul_(S[j])
                    torch.sub(t, Wq[j], out=delta)
                    if delta.any():
                        changed = True
                        G[i1:i2].addr_(H[i1:i2, j], delta)
                        D[j - i1] = delta
                        Wq[j] = t
                        Q[j] = c
                if i1:
                    G[:i1].addmm_(H[:i1, i1:i2], D)
                if i2 < n:
                    G[i2:].addmm_(H[i2:, i1:i2], D)
            if not changed:
                break
    return Q.T.to(torch.int8).contiguous()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the column loop on one intra-op thread, then restore the pool size.

    Its ops are a few microseconds each; splitting them over threads costs a fork/join per op,
    and when another process holds a core the join waits a scheduler slice: measured on the
    2-core box under load, 576 columns took 5.4 s with 2 threads and 75 ms with 1. The lazy
    block updates ride along (a few ms of GEMM per module): resizing the pool costs ~70 µs
    each way, so it is done once per module, not per block.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: ``round_column(i, w, q, e)``: column ``i`` of a block, ``w``, rounded: codes into ``q``, the
#: dequantized values into ``e`` (rows of preallocated tensors, written in place)
ColumnRounder = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _grid_rounder(S1: torch.Tensor, Z1: torch.Tensor, scheme: WeightScheme) -> ColumnRounder:
    """The columns of a block on a :mod:`qconv.core.grid` grid, ``grid.quantize``'s and
    ``grid.dequantize``'s float32 ops in their order: ``round(w / scale) + zero``, clamped (a
    float grid: the nearest element value, zero being 0), then ``(q - zero) * scale``."""
    qmin, qmax, bits = float(scheme.qmin), float(scheme.qmax), scheme.bits if scheme.is_float else 0

    def round_column(i: int, w: torch.Tensor, q: torch.Tensor, e: torch.Tensor) -> None:
        s, z = S1[i], Z1[i]
        torch.div(w, s, out=q)
        if bits:
            q.copy_(round_float(q, bits))
        else:
            q.round_().add_(z).clamp_(qmin, qmax)
        torch.sub(q, z, out=e)
        e.mul_(s)

    return round_column


def _levels_rounder(S1: torch.Tensor, D1: torch.Tensor, O1: torch.Tensor | None, values: torch.Tensor) -> ColumnRounder:
    """The columns of a block on a ggml type's fixed grid ``ŵ = scale * values[L] + offset``: the
    level nearest to ``(w - offset) / scale`` (``D1``: the scales with 0 replaced by 1, so a
    group whose scale is 0 rounds harmlessly: all its levels decode to ``offset``). ``q`` gets
    the level index, ``e`` the decoded value in the dequantizer's float32 order."""
    v0, k = float(values[0]), values.numel()
    uniform = bool(torch.equal(values, torch.arange(k, dtype=values.dtype, device=values.device) + v0))
    mids = (values[1:] + values[:-1]) / 2

    def round_column(i: int, w: torch.Tensor, q: torch.Tensor, e: torch.Tensor) -> None:
        if O1 is None:
            torch.div(w, D1[i], out=q)
        else:
            torch.sub(w, O1[i], out=q)
            q.div_(D1[i])
        if uniform:
            q.sub_(v0).round_().clamp_(0, k - 1)
            torch.add(q, v0, out=e)
        else:
            q.copy_(torch.bucketize(q, mids))
            torch.index_select(values, 0, q.long(), out=e)
        e.mul_(S1[i])
        if O1 is not None:
            e.add_(O1[i])

    return round_column


def _gptq_columns(Wt: torch.Tensor, Hinv: torch.Tensor, block_size: int,
                  rounder: Callable[[int, int], ColumnRounder]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's pass over ``Wt [in, out]`` (columns of W in processing order, updated in place):
    blocks of ``block_size`` columns, each quantized by :func:`_quantize_block` with the rounding
    ``rounder(i1, i2)`` gives when the block starts, then its error pushed onto the later
    columns. Returns the codes ``[in, out]`` and the float64 sum of squared scaled errors."""
    n, out = Wt.shape
    codes = torch.empty_like(Wt)
    err = torch.empty(min(block_size, n), out, dtype=torch.float32, device=Wt.device)
    loss = torch.zeros((), dtype=torch.float64, device=Wt.device)
    with _one_thread():
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            block_err = err[: i2 - i1]
            _quantize_block(Wt[i1:i2], codes[i1:i2], block_err, Hinv[i1:i2, i1:i2], rounder(i1, i2))
            loss += block_err.square().sum(dtype=torch.float64)
            if i2 < n:
                Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, block_err, alpha=-1.0)
    return codes, loss


def _quantize_block(
    W1: torch.Tensor,
    Q1: torch.Tensor,
    E1: torch.Tensor,
    Hinv1: torch.Tensor,
    round_column: ColumnRounder,
) -> None:
    """Quantize the rows of ``W1 [count, out]`` (columns of W) in place, one after another.

    Writes codes to ``Q1`` and scaled errors ``(w - ŵ) / Hinv1[i,i]`` to ``E1``, and feeds each
    error into the later rows of the block. Every op writes into a preallocated row (``out=``,
    in-place), since this loop runs once per input column of every Linear.
    """
    count = W1.shape[0]
    inv_diag = Hinv1.diagonal().reciprocal().tolist()
    for i, (w, q, e, h) in enumerate(zip(W1.unbind(0), Q1.unbind(0), E1.unbind(0), Hinv1.unbind(0))):
        round_column(i, w, q, e)
        torch.sub(w, e, out=e)
        e.mul_(inv_diag[i])
        if i + 1 < count:
            W1[i + 1 :].addr_(h[i + 1 :], e, alpha=-1.0)


@dataclass(frozen=True)
class GGMLGPTQResult:
    """One Linear's GPTQ output on a ggml type: its blocks, and as :class:`GPTQResult` says."""

    weight: GGMLWeight
    loss: float
    damp_used: float
    fell_back_to_rtn: bool


def gptq_quantize_ggml(w: torch.Tensor, H: torch.Tensor, scheme: GGMLScheme, block_size: int = 128,
                       damp: float = 0.1, act_order: bool = False) -> GGMLGPTQResult:
    """GPTQ of ``w [out, in]`` onto the ggml type of ``scheme``, against the Hessian ``H``.

    Every block's scales come first, fixed: llama.cpp's own quantizer searches them, weighted by
    ``diag(H)`` (each input's mean squared activation: an imatrix of the calibration inputs), on
    the un-updated weight — static groups, so activation order needs no reordering in the file.
    Then the columns are rounded in (activation) order onto those grids — each value to its
    group's nearest level, ``ŵ = scale * values[L] + offset`` (:mod:`qconv.core.ggml.levels`) —
    with GPTQ's error feedback, and the levels are written into the blocks. A Hessian that
    cannot be factored leaves llama.cpp's importance-weighted rounding (``fell_back_to_rtn``).
    """
    out, n = w.shape
    if H.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match a weight with {n} input columns")
    if block_size < 1:
        raise InvalidOption(f"GPTQ block size must be positive, got {block_size}")
    qtype = scheme.qtype
    W = w.detach().to(torch.float32, copy=True)
    H = H.detach().to(torch.float32, copy=True)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    importance = H.diagonal().clone()
    importance[dead] = 0.0
    data = ggml.quantize(W.cpu().numpy(), qtype, imatrix=importance.cpu().numpy())
    grid = levels.block_grid(data, qtype, n)

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    factor = inverse_hessian_factor(H, damp)
    if factor is None:
        return GGMLGPTQResult(GGMLWeight(data, scheme, (out, n)), math.nan, math.nan, True)
    Hinv, damp_used = factor

    column_group = torch.arange(n, device=W.device) // grid.group
    if perm is not None:
        column_group = column_group[perm]

    def per_column(a: np.ndarray) -> torch.Tensor:  # [out, groups] -> [n, out] in processing order
        return torch.from_numpy(a).to(W.device).T[column_group].contiguous()

    S = per_column(grid.scale)
    D = torch.where(S == 0, torch.ones_like(S), S)
    O = per_column(grid.offset) if grid.offset is not None else None
    values = torch.from_numpy(grid.values).to(W.device)

    Wt = (W[:, perm] if perm is not None else W).T.contiguous()
    codes, loss = _gptq_columns(Wt, Hinv, block_size, lambda i1, i2: _levels_rounder(
        S[i1:i2], D[i1:i2], None if O is None else O[i1:i2], values))
    L = codes.T
    if perm is not None:
        L = L[:, torch.argsort(perm)]
    data = levels.with_levels(data, qtype, n, L.to(torch.uint8).cpu().numpy())
    return GGMLGPTQResult(GGMLWeight(data, scheme, (out, n)), loss.item() / 2, damp_used, False)
