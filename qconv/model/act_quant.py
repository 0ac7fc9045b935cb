"""Activation fake-quantization for the runner: what W8A8 checkpoints do to Linear inputs.

A W8A8 (``int-quantized``) checkpoint stores only weights; at inference vLLM quantizes every
input row (token) of those Linears to int8 on the fly with its own absmax scale. Measuring
such a checkpoint with float activations would overstate its quality, so the runner installs
forward pre-hooks that round each token's inputs to the same int8 grid before the matmul.
The result equals an int8 x int8 matmul rescaled by ``s_x * s_w`` up to float accumulation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qconv.errors import InvalidOption
from qconv.core.quantized import ActivationScheme


def fake_quant_per_token(x: torch.Tensor, bits: int = 8, range_divisor: float | None = None) -> torch.Tensor:
    """Round each row (last dim = one token's features) of ``x`` to a symmetric ``bits``-bit grid.

    ``scale = max|x_row| / range_divisor``, ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1)-1)``,
    result ``q * scale`` in ``x``'s dtype (computed in float32). ``range_divisor`` defaults to
    ``2^(b-1) - 1`` (127), what vLLM's dynamic int8 kernels use; compressed-tensors' own
    emulation (transformers) divides by half the integer range, ``(2^b - 1) / 2`` (127.5).
    All-zero rows stay zero.
    """
    qmax = (1 << (bits - 1)) - 1
    divisor = float(qmax) if range_divisor is None else float(range_divisor)
    h = x.float()
    scale = h.abs().amax(dim=-1, keepdim=True) / divisor
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(h / scale), -qmax - 1, qmax)
    return (q * scale).to(x.dtype)


def apply_activation_quant(
    model: nn.Module, schemes: dict[str, ActivationScheme], range_divisor: float | None = None
) -> list[RemovableHandle]:
    """Make the named Linears of a runner model fake-quantize their inputs per token.

    ``schemes`` maps module names to schemes; HF names (``model.layers.0.self_attn.q_proj``, as
    :meth:`CompressedTensorsSource.activation_schemes` returns) and runner names (without the
    ``model.`` prefix) are both accepted. Returns the hook handles (``handle.remove()`` undoes).
    """
    handles: list[RemovableHandle] = []
    for name, scheme in schemes.items():
        runner_name = name.removeprefix("model.")
        try:
            module = model.get_submodule(runner_name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise InvalidOption(f"activation quantization targets {name}, which is not a Linear of this model")
        handles.append(module.register_forward_pre_hook(_hook(scheme, range_divisor)))
    return handles


def _hook(scheme: ActivationScheme, range_divisor: float | None) -> Callable[..., tuple[torch.Tensor, ...]]:
    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (fake_quant_per_token(args[0], scheme.bits, range_divisor), *args[1:])

    return pre_hook
