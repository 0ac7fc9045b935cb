"""compressed-tensors checkpoints (the format vLLM and transformers load): the streaming writer
and the ``quantization_config`` it describes them with. The per-Linear layout (packing, stored
tensor names and shapes) is :mod:`qconv.core.compressed_layout`, shared with the reader.

qconv's own provenance (resolved recipe, qconv version, input hash) goes in a top-level
``config.json["qconv"]`` object, not in ``quantization_config``: compressed-tensors drops
unknown ``quantization_config`` keys when it re-saves a model, transformers keeps unknown
top-level config keys.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from qconv.atomic import atomic_output
from qconv.arch.config import ModelConfig
from qconv.arch.spec import LM_HEAD, kv_scale_names
from qconv.checkpoint.hf_writer import ShardWriter, write_config_and_tokenizer
from qconv.errors import CheckpointMismatch, InvalidOption
from qconv.core.fp8_block_layout import RENAMES, fp8_block_config
from qconv.core.compressed_layout import (
    CT_VERSION,
    FP8_KV_SCHEME,
    MIXED,
    QUANT_METHOD,
    compress,
    module_format,
    weight_args,
)
from qconv.core.grid import WeightScheme
from qconv.core.quantized import ActivationScheme, QuantizedWeight

# --------------------------------------------------------------------------- writer


class CompressedTensorsWriter:
    """Streaming writer of a compressed-tensors checkpoint directory; use as a context manager.

    ``add`` every tensor of the model (plain tensors as they are, Linear weights as
    :class:`QuantizedWeight`), in any order; they are flushed shard by shard (peak memory one
    shard). On a clean exit the writer checks the model is complete (every tensor the config
    implies, with the right shape), then writes the index, ``config.json`` with its
    ``quantization_config`` and the tokenizer files, and renames the temporary directory into
    place; on an exception nothing is left behind. Same inputs in the same order give the same
    bytes (no timestamps, sorted JSON).

    ``dtype`` re-types plain floating tensors (None keeps them); scales keep
    ``scheme.scale_dtype``, which should match the model dtype for loaders that cast scales to it.
    ``metadata`` (JSON-serializable) is stored as ``config.json["qconv"]``; ``expected_bytes``
    (an estimate of the checkpoint's size) is named if the disk fills up.
    """

    def __init__(
        self,
        out_dir: Path | str,
        config: ModelConfig,
        tokenizer_files: dict[str, bytes] | None = None,
        max_shard_size: int = 5 * 10**9,
        force: bool = False,
        metadata: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        expected_bytes: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        #: about what the checkpoint takes on disk (named when the disk fills up)
        self.expected_bytes = expected_bytes
        self.config = config
        self.tokenizer_files = dict(tokenizer_files or {})
        self.max_shard_size = max_shard_size
        self.force = force
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail now, not after the model is written
        self.dtype = dtype
        self.quantization_config: dict[str, Any] | None = None
        self._expected = config.expected_shapes()
        self._linear = set(config.spec.linear_modules(config))
        self._added: set[str] = set()
        self._modules: dict[str, tuple[WeightScheme, ActivationScheme | None]] = {}
        self._float_dtype: torch.dtype | None = dtype
        self._stack: ExitStack | None = None
        self._shards: ShardWriter | None = None
        self._kv_layers: set[int] = set()

    def __enter__(self) -> "CompressedTensorsWriter":
        stack = ExitStack()
        tmp = stack.enter_context(atomic_output(self.out_dir, force=self.force, directory=True,
                                                needed=self.expected_bytes))
        self._stack, self._shards = stack, ShardWriter(tmp, self.max_shard_size)
        return self

    def add(self, hf_name: str, value: torch.Tensor | QuantizedWeight, act: ActivationScheme | None = None,
            input_scale: torch.Tensor | None = None) -> None:
        """Store one model tensor. ``act`` (only with a QuantizedWeight) quantizes the Linear's
        inputs too (W8A8 int8, FP8, NVFP4, MXFP4); ``input_scale`` is its calibrated static
        scale where ``act.needs_scale``."""
        if self._shards is None:
            raise RuntimeError("CompressedTensorsWriter.add outside its with-block")
        expected = self._expected.get(hf_name)
        if expected is None:
            raise CheckpointMismatch(f"tensor {hf_name} is not part of a {self.config.architecture} with this config")
        if hf_name in self._added:
            raise CheckpointMismatch(f"tensor {hf_name} added twice")
        shape = tuple(value.shape)
        if shape != expected:
            raise CheckpointMismatch(f"tensor {hf_name} has shape {list(shape)}, config implies {list(expected)}")
        if not isinstance(value, QuantizedWeight):
            if act is not None:
                raise ValueError(f"{hf_name}: activation quantization needs a QuantizedWeight")
            if self.dtype is not None and value.is_floating_point():
                value = value.to(self.dtype)
            if self._float_dtype is None and value.is_floating_point():
                self._float_dtype = value.dtype
            self._added.add(hf_name)
            self._shards.add(hf_name, value)
            return
        module = hf_name[: -len(".weight")]
        if module not in self._linear:
            raise InvalidOption(f"{hf_name} is not a Linear weight; only Linear weights can be quantized")
        value.check(hf_name)
        s = value.scheme
        if act is not None and not act.fits(s):
            raise InvalidOption(
                f"{hf_name}: {act.type}{act.bits} activations ({act.strategy}) do not go with "
                f"{s.bits}-bit {s.type} weights (int8 activations need 8-bit symmetric per-channel int weights; "
                f"FP8 activations FP8 weights; NVFP4/MXFP4 activations NVFP4/MXFP4 weights)"
            )
        if (input_scale is not None) != (act is not None and act.needs_scale):
            raise ValueError(f"{hf_name}: a static input scale goes with (and only with) static activations")
        self._added.add(hf_name)
        self._modules[module] = (s, act)
        for local, t in self._compress(value, act, input_scale).items():
            self._shards.add(f"{module}.{local}", t)

    def add_kv_scales(self, layer: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Store block ``layer``'s FP8 KV-cache scales (``[1]`` each; calibrated ``max|k| / 448``):
        with them the checkpoint declares an FP8 KV cache (:data:`FP8_KV_SCHEME`), which every
        layer must then have."""
        if self._shards is None:
            raise RuntimeError("CompressedTensorsWriter.add_kv_scales outside its with-block")
        if not 0 <= layer < self.config.num_layers or layer in self._kv_layers:
            raise CheckpointMismatch(f"KV-cache scales of layer {layer} out of range or added twice")
        self._kv_layers.add(layer)
        dtype = self._float_dtype or torch.float32
        for name, t in zip(kv_scale_names(layer), (k_scale, v_scale)):
            self._shards.add(name, t.detach().to("cpu", dtype).reshape(1).contiguous())

    def _compress(self, value: QuantizedWeight, act: ActivationScheme | None,
                  input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One Linear's stored tensors by local name (a layout with other names overrides this)."""
        return compress(value, act, input_scale)

    def _quantization_config(self) -> dict[str, Any]:
        return build_quantization_config(self.config, self._modules)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        stack, self._stack = self._stack, None
        assert stack is not None
        if exc is None:
            try:
                self._finish()
            except BaseException as e:  # let atomic_output remove the partial directory
                if not stack.__exit__(type(e), e, e.__traceback__):
                    raise
                return False
        return bool(stack.__exit__(exc_type, exc, tb))

    def _finish(self) -> None:
        assert self._shards is not None
        missing = [n for n in self._expected if n not in self._added]
        if missing:
            raise CheckpointMismatch(f"tensor {missing[0]} was never written ({len(missing)} missing)", self.out_dir)
        self._shards.finish()
        hf = self.config.to_hf_dict()
        hf.pop("qconv", None)
        hf.pop("quantization_config", None)
        if self._kv_layers and len(self._kv_layers) != self.config.num_layers:
            raise CheckpointMismatch(f"KV-cache scales for {len(self._kv_layers)} of {self.config.num_layers} layers",
                                     self.out_dir)
        if self._modules or self._kv_layers:  # with nothing quantized this is a plain HF checkpoint
            self.quantization_config = self._quantization_config()
            if self._kv_layers:
                self.quantization_config["kv_cache_scheme"] = dict(FP8_KV_SCHEME)
            hf["quantization_config"] = self.quantization_config
        if self.metadata:
            hf["qconv"] = self.metadata
        dtype = self._float_dtype or next((s.scale_dtype for s, _ in self._modules.values()
                                           if s.scale_dtype.is_floating_point and s.scale_dtype.itemsize > 1), None)
        write_config_and_tokenizer(self._shards.directory, hf, dtype, self.tokenizer_files)


def build_quantization_config(
    config: ModelConfig, modules: dict[str, tuple[WeightScheme, ActivationScheme | None]]
) -> dict[str, Any]:
    """``config.json["quantization_config"]`` for per-module schemes (HF module name -> schemes).

    One config group per distinct (weight, activation) scheme, in order of first use. A single
    group targets the class ``"Linear"`` (what llm-compressor writes and every loader handles);
    several groups target exact module names, which compressed-tensors, transformers and vLLM
    all match (vLLM additionally needs the modules it fuses, q/k/v and gate/up, to share a
    group). ``ignore`` lists every Linear left in floating point (``lm_head`` always, since
    transformers builds that module even when it is tied to the embeddings; MoE routers).
    """
    order = config.spec.linear_modules(config)
    quantized = [m for m in order if m in modules]
    distinct: list[tuple[WeightScheme, ActivationScheme | None]] = []
    for m in quantized:
        if modules[m] not in distinct:
            distinct.append(modules[m])
    formats = {module_format(ws, act) for ws, act in distinct}
    fmt = next(iter(formats)) if len(formats) == 1 else MIXED
    groups: dict[str, Any] = {}
    for i, (ws, act) in enumerate(distinct):
        targets = ["Linear"] if len(distinct) == 1 else [m for m in quantized if modules[m] == (ws, act)]
        group: dict[str, Any] = {
            "targets": targets, "weights": weight_args(ws),
            "input_activations": act.to_args() if act else None, "output_activations": None,
        }
        if fmt == MIXED:
            group["format"] = module_format(ws, act)
        groups[f"group_{i}"] = group
    # routers too: vLLM builds them as Linears and would look for their quantized weights
    ignore = [m for m in order if m not in modules] + config.spec.routers(config)
    if config.tie_word_embeddings and LM_HEAD not in ignore:
        ignore.append(LM_HEAD)
    return {
        "quant_method": QUANT_METHOD, "format": fmt, "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "version": CT_VERSION,
    }


class Fp8BlockWriter(CompressedTensorsWriter):
    """The FP8 layout models are published in (``quant_method: fp8``, ``weight_scale_inv``;
    :mod:`qconv.core.fp8_block_layout`), for FP8 block-quantized weights with dynamic per-group
    activations (the ``fp8-block`` scheme): what transformers' FineGrainedFP8 integration and
    vLLM's ``fp8`` method load. Same streaming, checks and atomicity as its base."""

    def _compress(self, value: QuantizedWeight, act: ActivationScheme | None,
                  input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        s = value.scheme
        if not (s.is_float and s.bits == 8 and s.block_rows > 1) or (
                act is not None and (act.type, act.strategy, act.group_size) != ("float", "group", s.group_size)):
            raise InvalidOption("the fp8 output format holds FP8 block-quantized weights with dynamic per-group "
                                "activations (--scheme fp8-block)")
        blocks = {(m.block_rows, m.group_size) for m, _ in self._modules.values()}
        if len(blocks) > 1:
            raise InvalidOption("the fp8 output format has one block size for the whole model")
        out = compress(value, act, input_scale)
        return {RENAMES.get(k, k): (v.float() if k == "weight_scale" else v) for k, v in out.items()}

    def add_kv_scales(self, layer: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        raise InvalidOption("the fp8 output format has no KV-cache scales: write compressed-tensors for --kv-cache fp8")

    def _quantization_config(self) -> dict[str, Any]:
        order = self.config.spec.linear_modules(self.config)
        scheme = next(iter(self._modules.values()))[0]
        skipped = [m for m in order if m not in self._modules] + self.config.spec.routers(self.config)
        return fp8_block_config((scheme.block_rows, scheme.group_size), skipped)
