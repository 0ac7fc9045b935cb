"""A llama.cpp (ggml) block type as the grid a quantization method rounds onto.

The methods (RTN, AWQ's search and clip, GPTQ) see a :class:`GGMLScheme` where a compressed-
tensors run gives them a :class:`~qconv.core.grid.WeightScheme`: the GGUF file's type for that
Linear (Q4_K, Q6_K, Q5_0, IQ4_XS, ...). Rounding onto it is llama.cpp's own quantizer
(:func:`qconv.core.ggml.quantize`, importance-weighted when the method has activation statistics),
so every trial a search makes measures the error of the bytes the file will hold; the result is
a :class:`GGMLWeight`, those bytes, which the GGUF writer stores as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from qconv.core import ggml

#: elements sharing one scale (a K-quant's sub-block, a 32-block type's block)
_GROUP = {"Q4_K": 32, "Q5_K": 32, "IQ4_XS": 32, "Q6_K": 16, "Q3_K": 16, "Q2_K": 16}


@dataclass(frozen=True)
class GGMLScheme:
    """One Linear's GGUF tensor type (a ggml type name, e.g. ``"Q4_K"``)."""

    qtype: str
    # what the methods ask of a grid: one scale per row and group, no global or block scales
    is_float: ClassVar[bool] = False
    global_scale: ClassVar[bool] = False
    block_rows: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.qtype not in ggml.QTYPES:
            raise ValueError(f"{self.qtype} is not a ggml type qconv quantizes to (valid: {', '.join(ggml.QTYPES)})")

    @property
    def group_size(self) -> int:
        return _GROUP.get(self.qtype, 32)

    @property
    def block(self) -> int:
        """Elements per block: a row's length must be a multiple of it."""
        return ggml.block_size(self.qtype)[0]

    def groups(self, in_features: int) -> int:
        return in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return self.group_size


@dataclass
class GGMLWeight:
    """A Linear's weight as the GGUF file stores it: ggml blocks, one row per output channel."""

    data: np.ndarray  # uint8 [out, row_bytes]
    scheme: GGMLScheme
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """What llama.cpp computes with (float32 ``[out, in]``)."""
        return torch.from_numpy(ggml.dequantize(self.data, self.scheme.qtype, self.shape[1]))


def _importance(importance: torch.Tensor | None) -> np.ndarray | None:
    return None if importance is None else importance.detach().float().cpu().numpy()


def ggml_weight(w: torch.Tensor, scheme: GGMLScheme, importance: torch.Tensor | None = None) -> GGMLWeight:
    """``w`` ``[out, in]`` quantized by llama.cpp's quantizer for the scheme's type; with
    ``importance`` (per input column, e.g. the mean squared activation) its weighted search, as
    ``llama-quantize --imatrix``."""
    x = w.detach().float().cpu().numpy()
    return GGMLWeight(ggml.quantize(x, scheme.qtype, imatrix=_importance(importance)), scheme, tuple(x.shape))


def ggml_fake_quantize(w: torch.Tensor, scheme: GGMLScheme, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize ``w`` on the scheme's ggml type (same dtype and device as ``w``)."""
    return ggml_weight(w, scheme, importance).dequantize().to(w.device, w.dtype)
