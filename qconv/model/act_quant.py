"""Activation fake-quantization for the runner: what W8A8 / FP8 / NVFP4 / MXFP4 checkpoints do
to Linear inputs.

Such a checkpoint stores weights (and at most one calibrated scale per Linear); at inference
vLLM quantizes every input of those Linears on the fly: int8 or FP8 per token with its own
absmax scale, FP8 per 1x128 group, FP8 per tensor with the stored static scale, NVFP4 with FP8
scales per 16 values under the stored global scale, MXFP4 with power-of-two scales per 32.
Measuring such a checkpoint with float activations would overstate its quality, so the runner
installs forward pre-hooks that round the inputs to the same grid before the matmul (the grid
math is :mod:`qconv.core.grid`'s, tokens being rows). The result equals the low-precision
matmul rescaled by the scales, up to float accumulation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qconv.core.grid import dequantize, group_minmax, qparams, quantize
from qconv.core.quantized import ActivationScheme
from qconv.errors import InvalidOption


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


def fake_quant_input(x: torch.Tensor, scheme: ActivationScheme, scale: torch.Tensor | None = None,
                     range_divisor: float | None = None) -> torch.Tensor:
    """``x`` rounded as ``scheme`` quantizes a Linear's input (last dim = features), in ``x``'s
    dtype. ``scale``: the stored static scale (static FP8's ``input_scale``, NVFP4's global
    scale). Integer schemes: :func:`fake_quant_per_token` (``range_divisor`` applies)."""
    if scheme.type == "int":
        return fake_quant_per_token(x, scheme.bits, range_divisor)
    if scheme.needs_scale and scale is None:
        raise InvalidOption(f"{scheme.scale_name} missing for static {scheme.type}{scheme.bits} activations")
    g = scheme.grid()
    h = x.float().reshape(-1, x.shape[-1])
    if scheme.strategy == "tensor":
        s = scale.float().to(h.device).reshape(1, 1).expand(h.shape[0], 1)  # type: ignore[union-attr]
        z = torch.zeros_like(s, dtype=torch.int32)
    else:
        gs = scale.float().to(h.device) if g.global_scale else None  # type: ignore[union-attr]
        s, z = qparams(*group_minmax(h, g), g, gs)
    return dequantize(quantize(h, s, z, g), s, z, g).reshape(x.shape).to(x.dtype)


def apply_activation_quant(
    model: nn.Module, schemes: dict[str, ActivationScheme], range_divisor: float | None = None,
    scales: dict[str, torch.Tensor] | None = None,
) -> list[RemovableHandle]:
    """Make the named Linears of a runner model fake-quantize their inputs.

    ``schemes`` maps module names to schemes, ``scales`` to the stored static scales of the
    schemes that need one; HF names (``model.layers.0.self_attn.q_proj``, as
    :meth:`CompressedTensorsSource.activation_schemes` returns) and runner names (without the
    ``model.`` prefix) are both accepted. Returns the hook handles (``handle.remove()`` undoes).
    """
    scales = scales or {}
    memo = _LastRounding(range_divisor)
    handles: list[RemovableHandle] = []
    for name, scheme in schemes.items():
        runner_name = name.removeprefix("model.")
        try:
            module = model.get_submodule(runner_name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise InvalidOption(f"activation quantization targets {name}, which is not a Linear of this model")
        scale = scales.get(name)
        if scheme.needs_scale and scale is None:
            raise InvalidOption(f"{name}: static {scheme.type}{scheme.bits} activations without a stored scale")
        handles.append(module.register_forward_pre_hook(_hook(scheme, scale, memo)))
    return handles


class _LastRounding:
    """The last input a hook rounded and its result, shared by the hooks of one model (which
    share one ``range_divisor``).

    q, k and v (and gate and up) read the same tensor one after another; rounding it once per
    distinct (input, scheme, scale) instead of once per Linear saves about a third of the
    rounding work of a W4A4 evaluation. The input is held, so ``is`` cannot match a recycled
    object, and its version counter is part of the key, so an input changed in place is rounded
    afresh, as is one with another scheme or scale value. (Tensors made under
    ``torch.inference_mode`` keep no version counter; the decoders never change a Linear's input
    in place between the Linears that read it.)
    """

    def __init__(self, range_divisor: float | None) -> None:
        self.range_divisor = range_divisor
        self.key: tuple[torch.Tensor, int | None, ActivationScheme, torch.Tensor | None] | None = None
        self.out: torch.Tensor | None = None

    def round(self, x: torch.Tensor, scheme: ActivationScheme, scale: torch.Tensor | None) -> torch.Tensor:
        key = self.key
        version = None if x.is_inference() else x._version
        if (key is not None and key[0] is x and key[1] == version and key[2] == scheme
                and (key[3] is scale or (key[3] is not None and scale is not None and torch.equal(key[3], scale)))):
            return self.out  # type: ignore[return-value]
        self.key, self.out = None, None  # release the previous pair before rounding anew
        out = fake_quant_input(x, scheme, scale, self.range_divisor)
        self.key, self.out = (x, version, scheme, scale), out
        return out


def _hook(scheme: ActivationScheme, scale: torch.Tensor | None,
          memo: _LastRounding) -> Callable[..., tuple[torch.Tensor, ...]]:
    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (memo.round(args[0], scheme, scale), *args[1:])

    return pre_hook
