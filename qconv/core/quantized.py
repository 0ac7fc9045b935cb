"""What a quantizer produces and what a W8A8 Linear computes with: the records every stage
passes along (methods make them, the runner and readers dequantize them, writers store them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qconv.core.grid import (
    E8M0,
    FP8,
    WeightScheme,
    dequantize,
    load_scale,
    round_float,
    store_scale,
    tensor_global_scale,
)
from qconv.errors import InvalidOption


#: the activation quantizations qconv writes and emulates: (type, bits, strategy, dynamic, group size)
_ACTIVATION_KINDS = {
    ("int", 8, "token", True, None): "dynamic per-token int8 (W8A8)",
    ("float", 8, "token", True, None): "dynamic per-token FP8 (FP8_DYNAMIC)",
    ("float", 8, "tensor", False, None): "static per-tensor FP8 (FP8)",
    ("float", 8, "group", True, 128): "dynamic per-group FP8, 1x128 (FP8_BLOCK)",
    ("float", 4, "tensor_group", "local", 16): "NVFP4: dynamic FP8 scales per 16 under a static global scale",
    ("float", 4, "group", True, 32): "MXFP4: dynamic E8M0 scales per 32",
}


@dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's *inputs* are quantized at run time (compressed-tensors' ``input_activations``).

    Only the kinds vLLM serves are accepted (:data:`_ACTIVATION_KINDS`): dynamic per-token int8
    (W8A8, no stored scales); FP8 per token, per tensor with a calibrated static scale, or per
    1x128 group; NVFP4 (FP8 scales per 16 values, computed at run time, under a calibrated
    static global scale) and MXFP4 (E8M0 scales per 32). ``needs_scale``: the checkpoint stores a
    calibrated ``input_scale`` (static FP8) or ``input_global_scale`` (NVFP4) per Linear.
    """

    bits: int = 8
    symmetric: bool = True
    strategy: str = "token"
    dynamic: bool | str = True
    type: str = "int"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not self.symmetric or self._kind not in _ACTIVATION_KINDS:
            raise InvalidOption(
                "unsupported activation quantization: type={} bits={} strategy={} dynamic={} group_size={} "
                "symmetric={} (supported: {})".format(*self._kind, self.symmetric,
                                                        "; ".join(_ACTIVATION_KINDS.values())))

    @property
    def _kind(self) -> tuple[str, int, str, bool | str, int | None]:
        return (self.type, self.bits, self.strategy, self.dynamic, self.group_size)

    @property
    def needs_scale(self) -> bool:
        """Whether a calibrated per-Linear scale is stored (and calibration data needed)."""
        return self.dynamic is not True

    @property
    def scale_name(self) -> str:
        """The stored calibrated scale's local name."""
        return "input_global_scale" if self.strategy == "tensor_group" else "input_scale"

    def grid(self) -> WeightScheme:
        """The grid each token's features are rounded to, as a weight row would be (tokens are
        rows): per token one scale; per group a scale per ``group_size`` features; per tensor one
        scale for all (given); NVFP4/MXFP4 as their weights."""
        if self.type == "int":
            return WeightScheme(self.bits, -1, True)
        if self.strategy == "tensor_group":
            return WeightScheme(4, 16, True, FP8, "float", global_scale=True)
        if self.bits == 4:
            return WeightScheme(4, 32, True, E8M0, "float")
        return WeightScheme(8, self.group_size or -1, True, torch.float32, "float",
                            block_rows=0 if self.strategy == "tensor" else 1)

    def fits(self, weights: WeightScheme) -> bool:
        """Whether these activations go with ``weights`` in one compressed-tensors format (int8
        with int8 per-channel weights, FP8 with FP8, NVFP4 with NVFP4, MXFP4 with MXFP4)."""
        if self.type == "int":
            return (weights.type, weights.bits, weights.group_size, weights.symmetric) == ("int", 8, -1, True)
        g = self.grid()
        if self.bits == 4:
            return (weights.type, weights.bits, weights.scale_dtype) == ("float", 4, g.scale_dtype)
        return (weights.type, weights.bits) == ("float", 8)

    def static_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The stored calibrated scale (float32 ``[1]``) from the largest |input| seen: FP8's
        ``absmax / 448``, NVFP4's global ``448 * 6 / absmax``."""
        g = self.grid()
        if g.global_scale:
            return tensor_global_scale(absmax.reshape(1), g)  # type: ignore[return-value]
        return (absmax.float().clamp(min=torch.finfo(torch.float32).tiny) / g.elem_max).reshape(1)

    def to_args(self) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` for ``input_activations``."""
        args: dict[str, Any] = {
            "num_bits": self.bits, "type": self.type, "symmetric": self.symmetric, "strategy": self.strategy,
            "group_size": self.group_size, "dynamic": self.dynamic, "actorder": None, "block_structure": None,
            "observer": None if self.dynamic is True else "static_minmax", "observer_kwargs": {},
        }
        if self.bits == 4:
            dtype = "float8_e4m3fn" if self.strategy == "tensor_group" else "uint8"
            args["scale_dtype"] = f"torch.{dtype}"
        return args


@dataclass
class QuantizedWeight:
    """One Linear weight on a grid: codes ``q`` ``[out, in]`` (int8, or float32 element values of
    a float grid), float32 effective ``scale`` ``[out, groups]`` and ``zero`` int32 ``[out, groups]``
    per :mod:`qconv.core.grid` (``x = (q - zero) * scale``), and NVFP4's per-tensor
    ``global_scale`` (float32 ``[1]``) under which the scales are stored."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: WeightScheme
    global_scale: torch.Tensor | None = None

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
        if self.q.dim() != 2 or self.q.dtype != (torch.float32 if s.is_float else torch.int8):
            raise ValueError(f"{name}: codes must be a 2-D {'float32' if s.is_float else 'int8'} tensor, "
                             f"got {self.q.dtype} {list(self.q.shape)}")
        out, n = self.shape
        groups = s.groups(n)
        for part, t in (("scale", self.scale), ("zero", self.zero)):
            if tuple(t.shape) != (out, groups):
                raise ValueError(f"{name}: {part} has shape {list(t.shape)}, expected {[out, groups]}")
        if (self.global_scale is not None) != s.global_scale:
            raise ValueError(f"{name}: a global scale {'is missing' if s.global_scale else 'without NVFP4'}")
        if s.is_float:
            if bool(self.zero.any()):
                raise ValueError(f"{name}: float grids have no zero points")
            if s.bits == 4 and self.q.numel() and not torch.equal(round_float(self.q, 4), self.q):
                raise ValueError(f"{name}: codes are not FP4 E2M1 values")
            if s.bits == 8 and not torch.equal(self.q.to(FP8).float(), self.q):
                raise ValueError(f"{name}: codes are not FP8 E4M3 values")
        else:
            if self.q.numel() and (int(self.q.min()) < s.qmin or int(self.q.max()) > s.qmax):
                raise ValueError(f"{name}: codes outside the {s.bits}-bit range [{s.qmin}, {s.qmax}]")
            if s.symmetric and bool(self.zero.any()):
                raise ValueError(f"{name}: symmetric scheme with non-zero zero points")
            if not s.symmetric and (int(self.zero.min()) < s.qmin or int(self.zero.max()) > s.qmax):
                raise ValueError(f"{name}: zero points outside [{s.qmin}, {s.qmax}]")
        back = load_scale(store_scale(self.scale, s, self.global_scale), s, self.global_scale)
        if not torch.equal(back, self.scale.float()):
            raise ValueError(f"{name}: scales are not representable in {s.scale_dtype}")
        if s.block_rows != 1:
            rows = s.rows_per_scale(out)
            if not torch.equal(self.scale, self.scale[::rows].repeat_interleave(rows, 0)[:out]):
                raise ValueError(f"{name}: scales differ inside a block of {rows} rows")

