"""``qconv quantize``: checkpoint reader -> layer pipeline -> recipe stages -> format writer."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qconv import __version__
from qconv.atomic import check_output
from qconv.arch.spec import EMBED, FINAL_NORM, LAYER_PREFIX, LM_HEAD
from qconv.checkpoint import open_model
from qconv.checkpoint.hf_writer import parse_dtype, parse_size
from qconv.checkpoint.source import ModelSource
from qconv.errors import InvalidOption, UnsupportedModel
from qconv.progress import progress
from qconv.quant.calibration import calibration_windows, load_calibration_rows
from qconv.quant.methods import Quantizer, SourceTransform, Transform, get_method
from qconv.quant.pipeline import LayerPipeline, pipeline_memory_bytes
from qconv.quant.recipe import Recipe


@dataclass
class QuantizeResult:
    output: str
    recipe: dict[str, Any]
    quantized_modules: int
    seconds: float
    dry_run: bool = False
    memory_estimate: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(source: ModelSource) -> str:
    """sha256 of the input's files (config and weights): which checkpoint an output came from."""
    h = hashlib.sha256()
    files = [source.path] if source.path.is_file() else sorted(
        p for p in source.path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _linear_widths(source: ModelSource) -> dict[str, int]:
    """HF module name -> input width of every Linear the model stores (the head included)."""
    shapes = source.config.expected_shapes()
    return {m: shapes[f"{m}.weight"][1] for m in source.config.spec.linear_modules(source.config)}


def quantize_model(
    model_path: Path | str,
    out: Path | str,
    recipe: Recipe,
    force: bool = False,
    device: str = "cpu",
    quiet: bool = True,
    dry_run: bool = False,
    batch_size: int = 4,
) -> QuantizeResult:
    """Quantize ``model_path`` with ``recipe`` into a compressed-tensors checkpoint at ``out``."""
    from qconv.core.quantized import ActivationScheme
    from qconv.formats.compressed_tensors import CompressedTensorsWriter

    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    stages = [get_method(s.method)(**s.options) for s in recipe.stages]
    transforms = [m for m in stages if isinstance(m, Transform)]
    rewrites = [m for m in stages if isinstance(m, SourceTransform)]
    quantizer = stages[-1]
    assert isinstance(quantizer, Quantizer)
    calib = recipe.calibration
    with open_model(model_path) as source:
        original = source
        for m in rewrites:
            source = m.wrap(source)
        unfit = [m.name for m in (*transforms, quantizer) if not m.supports_experts]
        if source.config.spec.experts and (unfit or quantizer.fp_stream):
            what = ", ".join(unfit) or "gptq fp_targets"
            raise UnsupportedModel(f"{what}: not implemented for mixture-of-experts models "
                                   f"({source.config.model_type}) yet; use gptq or rtn", source.path)
        model_dtype = parse_dtype(source.config.torch_dtype)
        schemes = recipe.schemes(scale_dtype=model_dtype)
        widths = _linear_widths(source)
        schemes.check_shapes(widths)
        memory = pipeline_memory_bytes(source.config, calib.samples if recipe.needs_calibration else 0, calib.seqlen,
                                       getattr(torch, calib.dtype), quantizer.fp_stream)
        quantized = [m for m in widths if schemes.scheme_for(m) is not None]
        if dry_run:
            return QuantizeResult(str(out), recipe.to_dict(), len(quantized), time.perf_counter() - t0, True, memory)
        if recipe.needs_calibration:
            if not calib.data:
                raise InvalidOption(f"recipe {recipe.name!r} needs calibration data: pass --data FILE")
            tokens = calibration_windows(source.tokenizer(), load_calibration_rows(calib.data, calib.text_field),
                                         calib.samples, calib.seqlen, calib.seed)
        else:
            tokens = torch.zeros((0, 1), dtype=torch.long)
        act = ActivationScheme(bits=recipe.act_bits) if recipe.act_bits else None
        metadata = {"recipe": recipe.to_dict(), "qconv_version": __version__, "input_sha256": fingerprint(original)}
        pipeline = LayerPipeline(source, tokens, device, batch_size, getattr(torch, calib.dtype), quantizer.fp_stream)
        with CompressedTensorsWriter(out, source.config, source.tokenizer_files(), parse_size(recipe.max_shard_size),
                                     force, metadata, dtype=model_dtype) as writer, \
                progress(f"quantizing ({recipe.name})", source.config.num_layers, quiet) as advance:
            writer.add(f"{EMBED}.weight", source.get_tensor(f"{EMBED}.weight"))
            for ctx in pipeline.layers():
                for t in transforms:
                    t.apply(ctx, schemes)
                qweights = quantizer.quantize(ctx, schemes)
                prefix = LAYER_PREFIX.format(ctx.index)
                for name, tensor in ctx.layer.state_dict().items():
                    inner = name.rsplit(".", 1)[0]
                    if inner in qweights and name.endswith(".weight"):
                        writer.add(prefix + name, qweights[inner], act)
                    else:
                        writer.add(prefix + name, tensor)
                advance()
            writer.add(f"{FINAL_NORM}.weight", source.get_tensor(f"{FINAL_NORM}.weight"))
            if not source.config.tie_word_embeddings:
                writer.add(f"{LM_HEAD}.weight", source.get_tensor(f"{LM_HEAD}.weight"))
    return QuantizeResult(str(out), recipe.to_dict(), len(quantized), time.perf_counter() - t0, False, memory)

