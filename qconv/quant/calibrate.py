"""``qconv calibrate``: run a model over calibration text and record activation statistics."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qconv.atomic import atomic_output, check_output
from qconv.checkpoint import open_model
from qconv.checkpoint.safetensors_file import SafetensorsFileWriter
from qconv.errors import InvalidOption
from qconv.progress import progress
from qconv.quant.calibration import ActivationStats, calibration_windows, load_calibration_rows
from qconv.quant.pipeline import LayerPipeline

FORMATS = ("safetensors", "imatrix")


@dataclass
class CalibrateResult:
    output: str
    format: str
    modules: int
    samples: int
    seqlen: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_sorted(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file with a byte-for-byte reproducible header (every key sorted; larger
    items first, then by name, as safetensors lays files out)."""
    writer = SafetensorsFileWriter(path, metadata)
    try:
        for name in sorted(tensors):
            writer.add(name, tensors[name])
        writer.close()
    except BaseException:
        writer.discard()
        raise


def collect_stats(pipeline: LayerPipeline, on_layer: Any = None) -> ActivationStats:
    """One fp pass through every layer, recording the input statistics of every Linear."""
    stats = ActivationStats()
    for ctx in pipeline.layers():
        ctx.outputs = ctx.forward(lambda name, x, ctx=ctx: stats.get(ctx.module_name(name)).add(x))
        if on_layer:
            on_layer()
    return stats


def calibrate(
    model_path: Path | str,
    data: str,
    out: Path | str,
    samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_field: str = "text",
    fmt: str = "safetensors",
    force: bool = False,
    device: str = "cpu",
    quiet: bool = True,
    chat_template: bool = False,
) -> CalibrateResult:
    """Record per-channel input statistics of every Linear; write safetensors or a llama.cpp imatrix."""
    if fmt not in FORMATS:
        raise InvalidOption(f"unknown stats format {fmt!r} (valid: {', '.join(FORMATS)})")
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    with open_model(model_path) as source:
        tok = source.tokenizer()
        rows = load_calibration_rows(data, text_field, tok if chat_template else None, samples * seqlen)
        tokens = calibration_windows(tok, rows, samples, seqlen, seed)
        del rows
        config = source.config
        pipeline = LayerPipeline(source, tokens, device)
        with progress("calibrating", source.config.num_layers, quiet) as advance:
            stats = collect_stats(pipeline, advance)
    if fmt == "imatrix":
        from qconv.quant.imatrix import write_imatrix

        write_imatrix(stats, config, out, Path(data).name, samples, seqlen, force)
    else:
        meta = {"data": str(data), "samples": str(samples), "seqlen": str(seqlen), "seed": str(seed)}
        with atomic_output(out, force=force) as tmp:
            save_sorted(stats.to_tensors(), tmp, meta)
    return CalibrateResult(str(out), fmt, len(stats.modules), samples, seqlen, int(tokens.numel()),
                           time.perf_counter() - t0)
