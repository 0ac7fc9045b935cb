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
from qconv.core.grid import WeightScheme

#: Modules quantization leaves alone unless an override names them.
DEFAULT_IGNORE = (LM_HEAD,)


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
    #: per-token dynamic int8 activations (W8A8) for every quantized Linear
    act_bits: int | None = None

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
        """Every quantized module's input width must be divisible by its group size
        (``modules``: HF module name -> in_features); the error names the first offender."""
        for name, width in modules.items():
            scheme = self.scheme_for(name)
            if scheme is not None and scheme.group_size != -1 and width % scheme.group_size:
                raise InvalidOption(
                    f"group size {scheme.group_size} does not divide the input width {width} of {name}"
                )
