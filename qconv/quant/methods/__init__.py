"""Quantization methods and their registry.

Built-ins are registered here; other packages add methods through the entry-point group
``qconv.methods`` (``name = "package.module:Class"``), loaded on first lookup.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from qconv.errors import InvalidOption
from qconv.quant.methods.base import Method, Quantizer, SourceTransform, Transform
from qconv.quant.methods.awq import AWQ
from qconv.quant.methods.gptq import GPTQ
from qconv.quant.methods.rotate import Rotate
from qconv.quant.methods.rtn import RTN
from qconv.quant.methods.smoothquant import SmoothQuant

ENTRY_POINT_GROUP = "qconv.methods"
_BUILTIN: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, SmoothQuant, Rotate)}


def registry() -> dict[str, type[Method]]:
    """Every available method by name: built-ins, then entry points (which may not shadow them)."""
    methods = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in methods:
            methods[ep.name] = ep.load()
    return methods


def get_method(name: str) -> type[Method]:
    methods = registry()
    try:
        return methods[name]
    except KeyError:
        raise InvalidOption(f"unknown method {name!r} (available: {', '.join(sorted(methods))})") from None


__all__ = ["Method", "Quantizer", "SourceTransform", "Transform", "get_method", "registry"]
