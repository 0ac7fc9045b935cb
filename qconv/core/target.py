"""The quantizer a method rounds onto, whatever the output: an integer or float grid
(compressed-tensors) or a llama.cpp block type (GGUF). Methods that only need to measure a
rounding (AWQ's scale and clip searches) call :func:`fake_quantize` and stay format-blind."""

from __future__ import annotations

import torch

from qconv.core.ggml_target import GGMLScheme, ggml_fake_quantize
from qconv.core.grid import WeightScheme, fake_quantize as grid_fake_quantize

#: a Linear's target: a grid of :mod:`qconv.core.grid` or a ggml block type
Scheme = WeightScheme | GGMLScheme


def fake_quantize(w: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` rounded onto ``scheme`` and back. ``importance`` (per input column, mean squared
    activation) weights the rounding where the target's quantizer uses one (the ggml types'
    imatrix search); the grids of :mod:`qconv.core.grid` round every weight alike and ignore it."""
    if isinstance(scheme, GGMLScheme):
        return ggml_fake_quantize(w, scheme, importance)
    return grid_fake_quantize(w, scheme)
