"""What a quantizer produces and what a W8A8 Linear computes with: the records every stage
passes along (methods make them, the runner and readers dequantize them, writers store them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qconv.core.grid import WeightScheme, dequantize
from qconv.errors import InvalidOption


@dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's *inputs* are quantized at run time (W8A8): dynamic, symmetric, per token.

    Only this variant is supported: it is what vLLM runs with its int8 ``scaled_mm`` kernels
    and what needs no calibration data (no stored activation scales).
    """

    bits: int = 8
    symmetric: bool = True
    strategy: str = "token"
    dynamic: bool = True

    def __post_init__(self) -> None:
        if (self.bits, self.symmetric, self.strategy, self.dynamic) != (8, True, "token", True):
            raise InvalidOption(
                "only dynamic symmetric per-token int8 activation quantization is supported, got "
                f"bits={self.bits} symmetric={self.symmetric} strategy={self.strategy} dynamic={self.dynamic}"
            )

    def to_args(self) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` for ``input_activations``."""
        return {
            "num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": self.strategy,
            "group_size": None, "dynamic": self.dynamic, "actorder": None, "block_structure": None,
            "observer": None, "observer_kwargs": {},
        }


@dataclass
class QuantizedWeight:
    """One Linear weight on an integer grid: codes ``q`` int8 ``[out, in]``, ``scale`` ``[out, groups]``
    and ``zero`` int32 ``[out, groups]`` per :mod:`qconv.core.grid` (``x = (q - zero) * scale``)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: WeightScheme

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """float32 weights; exact (an integer times a float16/bfloat16/float32 scale fits float32)."""
        return dequantize(self.q, self.scale, self.zero, self.scheme)

    def check(self, name: str) -> None:
        """Raise ValueError if the parts disagree with each other or the scheme: a writer would
        otherwise store codes that silently dequantize to something else."""
        s = self.scheme
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"{name}: codes must be a 2-D int8 tensor, got {self.q.dtype} {list(self.q.shape)}")
        out, n = self.shape
        groups = s.groups(n)
        for part, t in (("scale", self.scale), ("zero", self.zero)):
            if tuple(t.shape) != (out, groups):
                raise ValueError(f"{name}: {part} has shape {list(t.shape)}, expected {[out, groups]}")
        if self.q.numel() and (int(self.q.min()) < s.qmin or int(self.q.max()) > s.qmax):
            raise ValueError(f"{name}: codes outside the {s.bits}-bit range [{s.qmin}, {s.qmax}]")
        if s.symmetric and bool(self.zero.any()):
            raise ValueError(f"{name}: symmetric scheme with non-zero zero points")
        if not s.symmetric and (int(self.zero.min()) < s.qmin or int(self.zero.max()) > s.qmax):
            raise ValueError(f"{name}: zero points outside [{s.qmin}, {s.qmax}]")
        if not torch.equal(self.scale.to(s.scale_dtype).float(), self.scale.float()):
            raise ValueError(f"{name}: scales are not representable in {s.scale_dtype}")
