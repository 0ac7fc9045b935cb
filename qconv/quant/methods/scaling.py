"""Moving a per-channel scale between an op and the Linears it feeds (AWQ, SmoothQuant).

If a group of Linears reads channel j of its input only through its weight column j, scaling
that column by ``s_j`` and dividing channel j of the input by ``s_j`` computes the same outputs.
The division is folded into the op that produces the input (its spec ``source``): a norm's
weight, or the output rows (and bias) of a Linear. The model's full-precision function is
unchanged; what changes is where the range lives, which is what the methods optimize.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_scales(source: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """In place: ``source``'s output channel j divided by ``s_j``, every Linear's column j
    multiplied by it."""
    if isinstance(source, nn.Linear):
        source.weight.div_(s.to(source.weight)[:, None])
        if source.bias is not None:
            source.bias.div_(s.to(source.bias))
    else:  # a norm (qconv.model.decoder.RMSNorm): it knows how its weight scales each channel
        source.divide_(s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])
