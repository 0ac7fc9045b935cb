"""``qconv calibrate``: run a model over calibration text and record activation statistics."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qconv import __version__
from qconv.atomic import atomic_output, check_output
from qconv.checkpoint import open_model
from qconv.checkpoint.source import file_identity
from qconv.checkpoint.safetensors_file import SafetensorsFileWriter
from qconv.errors import InvalidOption
from qconv.progress import progress
from qconv.quant.calibration import ActivationStats, calibration_windows, load_calibration_rows
from qconv.quant.distributed import data_parallel
from qconv.quant.pipeline import LayerPipeline
from qconv.quant.reduce import BUCKETS
from qconv.quant.resume import RunState, resumable

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


def collect_stats(pipeline: LayerPipeline, on_layer: Any = None, state: RunState | None = None) -> ActivationStats:
    """One fp pass through every layer, recording the input statistics of every Linear, bucket
    by bucket of the samples (so a data-parallel run sums them in the fixed tree). Each bucket's
    outputs replace its inputs in place: they are the next layer's inputs. ``state``: a
    resumable run's, which carries the statistics so far from layer to layer."""
    p = pipeline
    stats = state.carry if state is not None and state.carry is not None else ActivationStats()
    if state is not None:
        state.carry = stats
        for _ in range(state.done + 1):
            if on_layer:
                on_layer()
    for ctx in p.layers(state):
        for bucket, part in p.subset(p.samples):
            ctx.inputs[part] = ctx.forward(lambda name, x, b=bucket, ctx=ctx: stats.add(ctx.module_name(name), b, x),
                                           inputs=ctx.inputs[part])
        ctx.outputs = ctx.inputs
        if on_layer:
            on_layer()
    maximum = p.parallel.maximum if p.parallel else (lambda t: t)
    stats.finish(p.reduce, p.count, maximum)
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
    resume: bool = False,
) -> CalibrateResult:
    """Record per-channel input statistics of every Linear; write safetensors or a llama.cpp
    imatrix. ``resume``: continue a killed run of the same inputs (:mod:`qconv.quant.resume`)."""
    if fmt not in FORMATS:
        raise InvalidOption(f"unknown stats format {fmt!r} (valid: {', '.join(FORMATS)})")
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    torch_device = torch.device(device)
    parallel = data_parallel(torch_device)
    if parallel is not None:
        if samples < BUCKETS:
            raise InvalidOption(f"data-parallel calibration needs at least {BUCKETS} samples (got {samples})")
        if torch_device.type == "cuda":
            torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", parallel.rank)))
        quiet = quiet or not parallel.writes
    with open_model(model_path) as source:
        tok = source.tokenizer()
        rows = load_calibration_rows(data, text_field, tok if chat_template else None, samples * seqlen)
        tokens = calibration_windows(tok, rows, samples, seqlen, seed)
        del rows
        config = source.config
        pipeline = LayerPipeline(source, tokens, torch_device, parallel=parallel)
        state = resumable(out, resume, parallel, input=file_identity(source), tokens=tokens, format=fmt,
                          data=Path(data).name, version=__version__)
        with progress("calibrating", source.config.num_layers, quiet) as advance:
            stats = collect_stats(pipeline, advance, state)
    if parallel is not None and not parallel.writes:
        parallel.finish()  # rank 0 writes
        return CalibrateResult(str(out), fmt, len(stats.modules), samples, seqlen, int(tokens.numel()),
                               time.perf_counter() - t0)
    if fmt == "imatrix":
        from qconv.quant.imatrix import write_imatrix

        write_imatrix(stats, config, out, Path(data).name, samples, seqlen, force)
    else:
        meta = {"data": str(data), "samples": str(samples), "seqlen": str(seqlen), "seed": str(seed)}
        with atomic_output(out, force=force) as tmp:
            save_sorted(stats.to_tensors(), tmp, meta)
    if parallel is not None:
        parallel.finish()
    state.remove()
    return CalibrateResult(str(out), fmt, len(stats.modules), samples, seqlen, int(tokens.numel()),
                           time.perf_counter() - t0)
