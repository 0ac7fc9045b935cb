"""Which scheme each Linear gets: a default, per-module overrides, and ignore patterns.

Patterns are regular expressions searched in the HF module name (``model.layers.3.mlp.down_proj``),
as llm-compressor's ``re:`` targets are; ``lm_head`` and embeddings are never quantized unless a
pattern names them explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from qconv.errors import InvalidOption
from qconv.arch.spec import LM_HEAD
from qconv.core.ggml_target import GGMLScheme
from qconv.core.grid import E8M0, FP8, WeightScheme
from qconv.core.quantized import ActivationScheme

#: Modules quantization leaves alone unless an override names them.
DEFAULT_IGNORE = (LM_HEAD,)


#: Named schemes, as compressed-tensors' presets define them (``--scheme NAME``, recipe
#: ``scheme: NAME``): weight grid fields, and the activation quantization vLLM runs with them.
#: A preset's scales take the model's dtype unless the format fixes them (NVFP4: FP8, MXFP4: E8M0).
PRESETS: dict[str, tuple[dict[str, Any], ActivationScheme | None]] = {
    # FP8_DYNAMIC: per-channel E4M3 weights, per-token dynamic E4M3 activations (no calibration)
    "fp8": (dict(bits=8, group_size=-1, symmetric=True, type="float"), ActivationScheme(8, type="float")),
    # FP8 weight-only (vLLM's FP8 W8A16, written naive-quantized): per-channel E4M3, 16-bit activations
    "fp8a16": (dict(bits=8, group_size=-1, symmetric=True, type="float"), None),
    # FP8: per-tensor weights, per-tensor static activation scale from calibration
    "fp8-static": (dict(bits=8, group_size=-1, symmetric=True, type="float", block_rows=0),
                   ActivationScheme(8, strategy="tensor", dynamic=False, type="float")),
    # FP8_BLOCK (DeepSeek-V3 style): 128x128 weight blocks, dynamic 1x128 activation groups
    "fp8-block": (dict(bits=8, group_size=128, symmetric=True, type="float", block_rows=128),
                  ActivationScheme(8, strategy="group", type="float", group_size=128)),
    # NVFP4A16 / NVFP4: E2M1, an FP8 scale per 16 under a float32 per-tensor scale; W4A4 adds
    # dynamic NVFP4 activations under a calibrated global scale
    "nvfp4a16": (dict(bits=4, group_size=16, symmetric=True, type="float", scale_dtype=FP8, global_scale=True), None),
    "nvfp4": (dict(bits=4, group_size=16, symmetric=True, type="float", scale_dtype=FP8, global_scale=True),
              ActivationScheme(4, strategy="tensor_group", dynamic="local", type="float", group_size=16)),
    # MXFP4A16 / MXFP4: E2M1, an E8M0 (power of two) scale per 32; MXFP4 adds dynamic MXFP4 activations
    "mxfp4a16": (dict(bits=4, group_size=32, symmetric=True, type="float", scale_dtype=E8M0), None),
    "mxfp4": (dict(bits=4, group_size=32, symmetric=True, type="float", scale_dtype=E8M0),
              ActivationScheme(4, strategy="group", type="float", group_size=32)),
}


def preset_scheme(name: str, scale_dtype: Any) -> tuple[WeightScheme, ActivationScheme | None]:
    """A preset's weight scheme (scales in ``scale_dtype`` unless the format fixes them) and
    activation scheme."""
    if name not in PRESETS:
        raise InvalidOption(f"unknown scheme {name!r} (valid: {', '.join(PRESETS)})")
    fields, act = PRESETS[name]
    return WeightScheme(**{"scale_dtype": scale_dtype, **fields}), act


@dataclass(frozen=True)
class Override:
    """``pattern`` -> replace fields of the default scheme (e.g. bits=8 for down_proj)."""

    pattern: str
    changes: dict[str, Any]

    def matches(self, module: str) -> bool:
        return re.search(self.pattern, module) is not None


@dataclass(frozen=True)
class SchemeMap:
    default: WeightScheme
    overrides: tuple[Override, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    #: how every quantized Linear's inputs are quantized at run time (W8A8, FP8, NVFP4, MXFP4)
    activations: ActivationScheme | None = None

    def __post_init__(self) -> None:
        for pattern in (*self.ignore, *(o.pattern for o in self.overrides)):
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidOption(f"invalid module pattern {pattern!r}: {e}") from None

    def scheme_for(self, module: str) -> WeightScheme | None:
        """The scheme for an HF module name, or None to keep it in full precision."""
        for o in self.overrides:
            if o.matches(module):
                return replace(self.default, **o.changes)
        if any(re.search(p, module) for p in self.ignore):
            return None
        return self.default

    def check_shapes(self, modules: dict[str, int]) -> None:
        """Every quantized module's input width must be divisible by its group size and its
        activations' (``modules``: HF module name -> in_features); the error names the first
        offender."""
        for name, width in modules.items():
            scheme = self.scheme_for(name)
            if scheme is None:
                continue
            if scheme.group_size != -1 and width % scheme.group_size:
                raise InvalidOption(
                    f"group size {scheme.group_size} does not divide the input width {width} of {name}"
                )
            act = self.activations
            if act is not None and act.group_size and width % act.group_size:
                raise InvalidOption(f"activation group size {act.group_size} does not divide the input width "
                                    f"{width} of {name}")
            if act is not None and not act.fits(scheme):
                raise InvalidOption(f"{name}: {act.type}{act.bits} activations do not go with its "
                                    f"{scheme.bits}-bit {scheme.type} weights")


@dataclass(frozen=True)
class GGUFSchemeMap:
    """The scheme map of a GGUF output: each Linear's ggml type, as the file type's mix (and
    ``--tensor-type`` overrides) chose it for the model; the types already fit each row's length
    (llama.cpp's fallbacks). Modules absent from ``types`` (the head and embeddings, which the
    GGUF writer quantizes itself, and tensors stored in 16/32 bits) stay in full precision."""

    types: dict[str, GGMLScheme]
    #: GGUF files hold no activation quantization
    activations: None = None

    def scheme_for(self, module: str) -> GGMLScheme | None:
        return self.types.get(module)

    def check_shapes(self, modules: dict[str, int]) -> None:
        """Nothing to check: the mix chose every type for its row length."""
