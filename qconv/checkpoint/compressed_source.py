"""Read compressed-tensors checkpoints (llm-compressor / qconv output) as a :class:`ModelSource`.

The runner, writers and pipeline only ever see float weights under HF names, so this reader
dequantizes each quantized Linear on demand (exactly: codes times scales in float32) and
serves everything else as the plain HF reader does. The quantization itself stays available
(:meth:`CompressedTensorsSource.quantized_weight`, :meth:`~CompressedTensorsSource.module_schemes`)
for lossless re-export, and :meth:`~CompressedTensorsSource.activation_schemes` tells the runner
which Linears quantize their inputs at run time (W8A8), so measured quality is what vLLM runs.

The float formats (FP8 per channel / tensor / 128x128 block, NVFP4, MXFP4) are read too, with
their activation schemes and calibrated static input scales (:meth:`~CompressedTensorsSource.input_scales`).
Anything this reader cannot reproduce exactly (act-order ``g_idx``, KV-cache or transform
configs, sparsity, activation kinds vLLM does not run) is refused with a one-line
:class:`~qconv.errors.UnsupportedModel` rather than half-read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qconv.arch.config import ModelConfig
from qconv.arch.spec import EMBED, kv_scale_names
from qconv.checkpoint.hf import HFSource
from qconv.checkpoint.source import ModelSource
from qconv.errors import CheckpointMismatch, CorruptFile, InvalidOption, UnsupportedModel
from qconv.core.quantized import ActivationScheme, QuantizedWeight
from qconv.core.compressed_layout import (
    FLOAT_QUANTIZED,
    FP4_PACKED,
    INT_QUANTIZED,
    MIXED,
    MXFP4_PACKED,
    NAIVE_QUANTIZED,
    NVFP4_PACKED,
    PACKED,
    QUANT_METHOD,
    decompress,
    is_fp8_kv_scheme,
    module_format,
    stored_shapes,
)
from qconv.core.fp8_block_layout import RENAMES, as_compressed_tensors
from qconv.core.grid import E8M0, FP8, WeightScheme

#: Formats whose layout this reader decodes.
READABLE_FORMATS = (PACKED, INT_QUANTIZED, NAIVE_QUANTIZED, FLOAT_QUANTIZED, NVFP4_PACKED, MXFP4_PACKED)
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class ModuleQuant:
    """How one Linear is stored: its compressed-tensors format and weight/activation schemes."""

    format: str
    weights: WeightScheme
    activations: ActivationScheme | None = None
    #: ``strategy: tensor``: one scale for the whole matrix (read only; qconv writes group/channel).
    tensor_strategy: bool = False


def _unsupported(what: str, path: Path) -> UnsupportedModel:
    return UnsupportedModel(f"compressed-tensors checkpoint with {what} is not supported", path)


def _weight_scheme(args: dict[str, Any], path: Path) -> tuple[WeightScheme, bool]:
    """A ``QuantizationArgs`` dict for weights -> (WeightScheme, tensor_strategy of an int grid)."""
    kind = args.get("type", "int")
    bits = int(args.get("num_bits", 8))
    if args.get("dynamic"):
        raise _unsupported("dynamic weight quantization", path)
    if args.get("actorder") == "group" or args.get("actorder") is True:
        raise _unsupported("act-order groups (g_idx)", path)
    group_size = args.get("group_size")
    strategy = args.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1 else "group")
    symmetric = bool(args.get("symmetric", True))
    if kind == "float":
        block = args.get("block_structure")
        try:
            if bits == 4 and strategy in ("tensor_group", "group") and group_size in (16, 32):
                nv = strategy == "tensor_group"
                return WeightScheme(4, group_size, symmetric, FP8 if nv else E8M0, "float", global_scale=nv), False
            if bits == 8 and strategy in ("channel", "tensor"):
                return WeightScheme(8, -1, symmetric, torch.float32, "float", block_rows=int(strategy == "channel")), False
            if bits == 8 and strategy == "block" and isinstance(block, list) and len(block) == 2:
                return WeightScheme(8, int(block[1]), symmetric, torch.float32, "float", block_rows=int(block[0])), False
            if bits == 8 and strategy == "group" and isinstance(group_size, int) and group_size > 0:
                return WeightScheme(8, group_size, symmetric, torch.float32, "float"), False
        except InvalidOption as e:
            raise _unsupported(f"float weights ({e})", path) from None
        raise _unsupported(f"{bits}-bit float weights with strategy {strategy!r}", path)
    if kind != "int":
        raise _unsupported(f"{kind} weights", path)
    if not 2 <= bits <= 8:
        raise _unsupported(f"{bits}-bit weights", path)
    if strategy == "group" and isinstance(group_size, int) and group_size > 0:
        return WeightScheme(bits, group_size, symmetric), False
    if strategy in ("channel", "tensor"):
        return WeightScheme(bits, -1, symmetric), strategy == "tensor"
    raise _unsupported(f"weight strategy {strategy!r}", path)


def _activation_scheme(args: dict[str, Any] | None, path: Path) -> ActivationScheme | None:
    if args is None:
        return None
    dynamic = args.get("dynamic", False)
    try:
        return ActivationScheme(bits=int(args.get("num_bits", 8)), symmetric=bool(args.get("symmetric", True)),
                                strategy=args.get("strategy") or "tensor", dynamic=dynamic,
                                type=args.get("type", "int"), group_size=args.get("group_size"))
    except InvalidOption as e:
        raise _unsupported(f"input activations of this kind ({e})", path) from None


def _rank(name: str, target: str) -> int | None:
    """How specifically ``target`` selects Linear module ``name`` (compressed-tensors' rules:
    exact name, then ``re:`` regex (``re.match``), then class name); None if it does not."""
    if target == name:
        return 0
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    return 2 if target == "Linear" else None


def resolve_modules(qcfg: Any, config: ModelConfig, path: Path) -> dict[str, ModuleQuant]:
    """Validate a ``quantization_config`` and map every quantized Linear (HF module name) to how
    it is stored. Raises UnsupportedModel for anything qconv cannot read exactly."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise _unsupported("a quantization_config that is not compressed-tensors", path)
    status = qcfg.get("quantization_status", "compressed")
    if status != "compressed":
        raise _unsupported(f"quantization_status {status!r} (only compressed checkpoints are read)", path)
    fmt = qcfg.get("format")
    if fmt not in READABLE_FORMATS and fmt != MIXED:
        raise UnsupportedModel(
            f"compressed-tensors format {fmt!r} is not supported (qconv reads {', '.join(READABLE_FORMATS)})", path
        )
    if qcfg.get("kv_cache_scheme") and not is_fp8_kv_scheme(qcfg["kv_cache_scheme"]):
        raise _unsupported("a KV-cache scheme other than FP8 with static per-layer scales", path)
    for key, what in (("sparsity_config", "sparsity"),
                      ("transform_config", "transforms"), ("moe_sparsity_config", "expert sparsity")):
        if qcfg.get(key):
            raise _unsupported(what, path)
    groups: list[tuple[str, list[str], ModuleQuant]] = []
    for gname, group in (qcfg.get("config_groups") or {}).items():
        if not isinstance(group, dict):
            raise _unsupported(f"preset config group {gname!r}", path)
        if group.get("output_activations") is not None:
            raise _unsupported("output activation quantization", path)
        if group.get("weights") is None:
            raise _unsupported(f"config group {gname!r} without weight quantization", path)
        weights, tensor_strategy = _weight_scheme(group["weights"], path)
        act = _activation_scheme(group.get("input_activations"), path)
        if act is not None and not act.fits(weights):
            raise _unsupported(f"{act.type}{act.bits} activations with {weights.type}{weights.bits} weights", path)
        gfmt = group.get("format") or (fmt if fmt != MIXED else INT_QUANTIZED if act else PACKED)
        if gfmt not in READABLE_FORMATS:
            raise UnsupportedModel(
                f"compressed-tensors format {gfmt!r} (group {gname}) is not supported "
                f"(qconv reads {', '.join(READABLE_FORMATS)})", path
            )
        if (weights.is_float or gfmt in (FLOAT_QUANTIZED, *FP4_PACKED)) and gfmt != module_format(weights, act):
            raise UnsupportedModel(f"compressed-tensors format {gfmt!r} is not supported for "
                                   f"{weights.bits}-bit {weights.type} weights (group {gname})", path)
        groups.append((gname, list(group.get("targets") or []), ModuleQuant(gfmt, weights, act, tensor_strategy)))
    ignore = list(qcfg.get("ignore") or [])

    def ignored(name: str, cls: str) -> bool:
        return any(t == cls or _rank(name, t) in (0, 1) for t in ignore)

    embed = EMBED
    if not ignored(embed, "Embedding") and any(
        t == "Embedding" or _rank(embed, t) in (0, 1) for _, targets, _ in groups for t in targets
    ):
        raise _unsupported("quantized embeddings", path)
    modules: dict[str, ModuleQuant] = {}
    for name in config.spec.linear_modules(config):
        if ignored(name, "Linear"):
            continue
        ranked: list[tuple[int, str, ModuleQuant]] = []
        for gname, targets, mq in groups:
            ranks = [r for t in targets if (r := _rank(name, t)) is not None]
            if ranks:
                ranked.append((min(ranks), gname, mq))
        if not ranked:
            continue
        best = min(r for r, _, _ in ranked)  # the most specific target wins, as in compressed-tensors
        winners = [(g, mq) for r, g, mq in ranked if r == best]
        if len(winners) > 1 and len({mq for _, mq in winners}) > 1:
            raise _unsupported(f"module {name} matched by several config groups ({', '.join(g for g, _ in winners)})",
                               path)
        modules[name] = winners[0][1]
    if not modules:
        raise _unsupported("no quantized Linear modules (targets match nothing)", path)
    return modules


def _dtype_ok(mq: ModuleQuant, local: str, dt: str) -> bool:
    """Whether stored tensor ``local`` of a module stored as ``mq`` may have safetensors dtype ``dt``."""
    w = mq.weights
    if local in ("weight_global_scale", "input_global_scale"):
        return dt == "F32"
    if local == "input_scale":
        return dt in _FLOAT_DTYPES
    if local == "weight_scale":
        return {FP8: dt == "F8_E4M3", E8M0: dt == "U8"}.get(w.scale_dtype, dt in _FLOAT_DTYPES)
    if mq.format in FP4_PACKED:
        return dt == "U8"
    if w.is_float:
        return dt == "F8_E4M3"
    if local in ("weight_packed", "weight_zero_point") and mq.format == PACKED:
        return dt == "I32"
    if local == "weight_shape":
        return dt in ("I32", "I64")
    return dt in ("I8", "I32") if local == "weight_zero_point" else dt == "I8"


class CompressedTensorsSource(HFSource):
    """A compressed-tensors checkpoint directory (``pack-quantized``, ``int-quantized``,
    ``naive-quantized`` or a mix): serves dequantized float32 weights under the usual HF names.

    ``config`` is the model's architecture without ``quantization_config`` (and without qconv's
    ``qconv`` provenance key), so writing this source out as a plain HF checkpoint gives a
    correct dense config; the originals are kept in :attr:`quantization_config` and
    :attr:`qconv_metadata`.
    """

    format = "compressed-tensors"
    #: compressed-tensors local tensor names -> the names this layout stores them under
    _renames: dict[str, str] = {}

    def __init__(self, directory: Path | str) -> None:
        self._modules: dict[str, ModuleQuant] = {}
        super().__init__(directory)
        raw = self.config.raw
        self.quantization_config: dict[str, Any] = raw["quantization_config"]
        self.qconv_metadata: dict[str, Any] | None = raw.get("qconv")
        self.config = replace(self.config, raw={k: v for k, v in raw.items()
                                                if k not in ("quantization_config", "qconv")})

    # -- validation (called by HFSource.__init__)

    def _ct_config(self) -> Any:
        """The ``quantization_config`` in compressed-tensors' terms."""
        return self.config.raw.get("quantization_config")

    def _validate(self) -> list[str]:
        self._modules = resolve_modules(self._ct_config(), self.config, self.path)
        kv = isinstance(self._ct_config(), dict) and self._ct_config().get("kv_cache_scheme")
        #: the FP8 KV-cache scales stored (none without a KV-cache scheme)
        self._kv_names = [n for i in range(self.config.num_layers) for n in kv_scale_names(i)] if kv else []
        names = super()._validate()
        self._check_dtypes()
        return names

    def _module_shapes(self, module: str, mq: ModuleQuant, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        try:
            local = stored_shapes(mq.format, mq.weights, (shape[0], shape[1]), mq.tensor_strategy)
        except InvalidOption as e:  # group size does not divide the input width
            raise CheckpointMismatch(f"{module}: {e}", self.path) from None
        if mq.activations is not None and mq.activations.needs_scale:
            local[mq.activations.scale_name] = (1,)
        return {f"{module}.{self._renames.get(k, k)}": v for k, v in local.items()}

    def _local(self, module: str, name: str) -> str:
        """compressed-tensors' local name of stored tensor ``name`` of ``module``."""
        stored = name[len(module) + 1:]
        return next((k for k, v in self._renames.items() if v == stored), stored)

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {n: (1,) for n in self._kv_names}
        for name, shape in self.config.expected_shapes().items():
            mq = self._modules.get(name[: -len(".weight")]) if name.endswith(".weight") else None
            if mq is None:
                shapes[name] = shape
            else:
                shapes.update(self._module_shapes(name[: -len(".weight")], mq, shape))
        return shapes

    def _check_dtypes(self) -> None:
        for module, mq in self._modules.items():
            for name in self._module_shapes(module, mq, self._shape(module)):
                dt, local = self.dtype_of(name), self._local(module, name)
                if not _dtype_ok(mq, local, dt):
                    raise CheckpointMismatch(f"tensor {name} has dtype {dt}, unexpected for {mq.format}",
                                             self._shard_of[name])

    def _shape(self, module: str) -> tuple[int, int]:
        out, n = self.config.expected_shapes()[f"{module}.weight"]
        return out, n

    # -- ModelSource

    def _is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self._modules

    def get_tensor(self, name: str) -> torch.Tensor:
        """Float32 dequantized weight for a quantized Linear, else the stored tensor."""
        if self._is_quantized(name):
            return self.quantized_weight(name).dequantize()
        return super().get_tensor(name)

    def get_array(self, name: str) -> np.ndarray:
        """Quantized Linears dequantize through torch; everything else reads as in HFSource."""
        if self._is_quantized(name):
            return ModelSource.get_array(self, name)
        return super().get_array(name)

    # -- quantization

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Codes, scales and zero points of quantized Linear weight ``name`` (``...q_proj.weight``);
        the scheme's ``scale_dtype`` is the stored scale dtype, so re-writing it is lossless."""
        module = name[: -len(".weight")]
        mq = self._modules[module]
        shape = self._shape(module)
        local = list(self._module_shapes(module, mq, shape))
        zp = f"{module}.weight_zero_point"
        if zp not in local and zp in self._shard_of:
            local.append(zp)
        tensors = {self._local(module, n): HFSource.get_tensor(self, n) for n in local}
        if "weight_shape" in tensors and tuple(int(x) for x in tensors["weight_shape"].tolist()) != shape:
            raise CheckpointMismatch(
                f"{module}.weight_shape is {tensors['weight_shape'].tolist()}, config implies {list(shape)}",
                self._shard_of[f"{module}.weight_shape"],
            )
        scheme = mq.weights if mq.weights.scale_dtype in (FP8, E8M0) else \
            replace(mq.weights, scale_dtype=tensors["weight_scale"].dtype)
        try:
            return decompress(mq.format, scheme, shape, tensors, mq.tensor_strategy)
        except ValueError as e:
            raise CorruptFile(f"{module}: {e}", self._shard_of[local[0]]) from None

    def module_schemes(self) -> dict[str, ModuleQuant]:
        """HF module name -> how it is stored, for every quantized Linear (others are float)."""
        return dict(self._modules)

    def kv_scales(self) -> torch.Tensor | None:
        """The FP8 KV-cache scales ``[layers, 2]`` (k, v; float32), or None without a KV-cache scheme."""
        if not self._kv_names:
            return None
        return torch.stack([HFSource.get_tensor(self, n).float().reshape(()) for n in self._kv_names]).reshape(-1, 2)

    def input_scales(self) -> dict[str, torch.Tensor]:
        """HF module name -> calibrated static input scale (float32 ``[1]``: static FP8's
        ``input_scale``, NVFP4's ``input_global_scale``) of the Linears that store one."""
        return {m: HFSource.get_tensor(self, f"{m}.{mq.activations.scale_name}").float().reshape(1)
                for m, mq in self._modules.items() if mq.activations is not None and mq.activations.needs_scale}

    def activation_schemes(self) -> dict[str, ActivationScheme]:
        """HF module name -> input quantization, for the Linears that quantize activations (W8A8);
        pass to :func:`qconv.model.act_quant.apply_activation_quant` to emulate them."""
        return {m: mq.activations for m, mq in self._modules.items() if mq.activations is not None}


class Fp8BlockSource(CompressedTensorsSource):
    """A checkpoint in the FP8 layout models are published in (``quant_method: fp8``,
    ``weight_scale_inv`` per 128x128 block; :mod:`qconv.core.fp8_block_layout`): read as the
    compressed-tensors FP8_BLOCK checkpoint it is equivalent to."""

    format = "fp8"
    _renames = RENAMES

    def _ct_config(self) -> Any:
        qcfg = self.config.raw.get("quantization_config")
        linears = self.config.spec.linear_modules(self.config)
        fp8 = {m for m in linears if f"{m}.weight" in self._shard_of and self.dtype_of(f"{m}.weight").startswith("F8")}
        try:
            return as_compressed_tensors(qcfg, linears, set(self._shard_of), fp8)
        except ValueError as e:
            raise _unsupported(f"quant_method fp8 with {e}", self.path) from None
        except KeyError as e:
            raise CheckpointMismatch(e.args[0], self.path) from None
