"""``qconv quantize``: checkpoint reader -> layer pipeline -> recipe stages -> format writer."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qconv import __version__
from qconv.atomic import check_output
from qconv.arch.config import ModelConfig
from qconv.arch.spec import EMBED, FINAL_NORM, LAYER_PREFIX, LM_HEAD
from qconv.checkpoint import open_model
from qconv.checkpoint.hf_writer import parse_dtype, parse_size
from qconv.checkpoint.source import ModelSource, fingerprint
from qconv.errors import InvalidOption, UnsupportedModel
from qconv.progress import progress
from qconv.quant.calibration import calibration_windows, load_calibration_rows
from qconv.quant.distributed import data_parallel
from qconv.quant.memory import Workload, plan, release_memory
from qconv.quant.methods import Method, Quantizer, SourceTransform, Transform, get_method
from qconv.core.device import native_bf16
from qconv.core.compressed_layout import FP8_KV
from qconv.quant.observe import static_ranges
from qconv.quant.pipeline import LayerPipeline
from qconv.quant.recipe import Recipe
from qconv.quant.resume import RunState, resumable
from qconv.quant.reduce import BUCKETS, bucket_sizes, bucket_span

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    output: str
    recipe: dict[str, Any]
    quantized_modules: int
    seconds: float
    dry_run: bool = False
    memory_estimate: dict[str, int] = field(default_factory=dict)
    #: the memory mode chosen, its estimate, the limit and the other modes' estimates
    memory_plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linear_widths(source: ModelSource) -> dict[str, int]:
    """HF module name -> input width of every Linear the model stores (the head included)."""
    shapes = source.config.expected_shapes()
    return {m: shapes[f"{m}.weight"][1] for m in source.config.spec.linear_modules(source.config)}


def activation_dtype(name: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of calibration activations: ``auto`` is the checkpoint's own 16-bit
    dtype (what the deployed model holds them in), and bfloat16 for a float32 checkpoint: it
    keeps float32's exponent range (nothing overflows), only the mantissa is rounded, and GPTQ
    on SmolLM2 (float32 checkpoint, W4 g64, 128 x 2048) measured the same perplexity with it
    (27.07 against 27.23 with float32 storage) at 2.13 GiB instead of 3.40 GiB peak."""
    if name != "auto":
        return getattr(torch, name)
    return checkpoint_dtype if checkpoint_dtype == torch.float16 else torch.bfloat16


def compute_dtype(name: str, device: torch.device, stages: list[Method]) -> torch.dtype:
    """The calibration passes' arithmetic: ``auto`` is bfloat16 where the device has native
    bf16 GEMMs (AMX/AVX512-BF16 CPUs measured ~4x float32; CUDA) and float32 elsewhere (an AVX2
    CPU emulates bf16, hundreds of times slower); and float32 when a stage asks for it (GPTQ:
    its Hessians would sum bf16-rounded inputs). AWQ's and SmoothQuant's statistics
    are means and maxima, which bf16 changes in the third digit, as the fp16 runs of their
    reference implementations do."""
    if name != "auto":
        return getattr(torch, name)
    exact = any(m.float32_calibration for m in stages)
    return torch.bfloat16 if native_bf16(device) and not exact else torch.float32


class _Discard:
    """The writer of a data-parallel rank other than 0: it computes, rank 0 writes."""

    def add(self, *_args: object) -> None:
        pass

    def add_kv_scales(self, *_args: object) -> None:
        pass

    def __enter__(self) -> "_Discard":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def quantize_model(
    model_path: Path | str,
    out: Path | str,
    recipe: Recipe,
    force: bool = False,
    device: str = "cpu",
    quiet: bool = True,
    dry_run: bool = False,
    batch_size: int = 4,
    max_memory: int | None = None,
    max_device_memory: int | None = None,
    resume: bool = False,
) -> QuantizeResult:
    """Quantize ``model_path`` with ``recipe`` into a compressed-tensors checkpoint at ``out``.

    ``max_memory``: host bytes the run may use (default: what the machine has available); the
    memory mode is chosen to fit it (:func:`qconv.quant.memory.plan`); on a CUDA device,
    ``max_device_memory`` (default: its free memory) decides whether the activations live on it. Started by ``torchrun``
    with several processes, each rank calibrates on its share of the samples and rank 0 writes
    (:mod:`qconv.quant.distributed`). Each finished layer is kept beside ``out`` until the
    output is in place; ``resume`` continues a killed run of the same inputs from there
    (:mod:`qconv.quant.resume`)."""
    from qconv.formats.compressed_tensors import CompressedTensorsWriter, Fp8BlockWriter

    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    stages = [get_method(s.method)(**s.options) for s in recipe.stages]
    transforms = [m for m in stages if isinstance(m, Transform)]
    rewrites = [m for m in stages if isinstance(m, SourceTransform)]
    quantizer = stages[-1]
    assert isinstance(quantizer, Quantizer)
    calib = recipe.calibration
    # the windows the stages read: AWQ then RTN reads only AWQ's search samples
    wanted = max(m.calibration_samples(calib.samples) for m in stages)
    if recipe.needs_calibration and not wanted:  # static activation scales after a data-free method
        wanted = calib.samples
    torch_device = torch.device(device)
    parallel = data_parallel(torch_device) if recipe.needs_calibration else None
    if parallel is not None:
        refused = [m.name for m in stages if not m.supports_parallel]
        if refused:
            raise InvalidOption(f"{', '.join(refused)}: data-parallel calibration is not implemented for this "
                                f"method yet; run it in one process")
        if wanted < BUCKETS:
            raise InvalidOption(f"data-parallel calibration needs at least {BUCKETS} samples (got {wanted})")
        if torch_device.type == "cuda":
            torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", parallel.rank)))
        quiet = quiet or not parallel.writes
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
        gguf_plan = _gguf_plan(source.config, recipe) if recipe.output_format == "gguf" else None
        schemes = recipe.schemes(scale_dtype=model_dtype) if gguf_plan is None else gguf_plan.schemes
        widths = _linear_widths(source)
        schemes.check_shapes(widths)
        store_dtype = activation_dtype(calib.act_dtype, model_dtype)
        samples = wanted
        if parallel is not None:
            lo, hi = bucket_span(parallel.rank, parallel.world)
            samples = sum(bucket_sizes(samples)[lo:hi])
        # the calibration windows first (a dry run too, when it has data): the tokenizer and the
        # text are what the process holds before its first layer, which the estimate measures
        tokens = torch.zeros((0, 1), dtype=torch.long)
        if recipe.needs_calibration:
            if calib.data:
                tok = source.tokenizer()
                rows = load_calibration_rows(calib.data, calib.text_field, tok if calib.chat_template else None,
                                             wanted * calib.seqlen)
                tokens = calibration_windows(tok, rows, wanted, calib.seqlen, calib.seed)
                del rows, tok
            elif not dry_run:
                raise InvalidOption(f"recipe {recipe.name!r} needs calibration data: pass --data FILE")
        release_memory()
        arithmetic = compute_dtype(calib.dtype, torch_device, stages)
        work = Workload(samples, calib.seqlen, arithmetic, store_dtype, batch_size,
                        sequential=quantizer.sequential, fp_stream=quantizer.fp_stream)
        work = replace(work, extra=_method_memory(stages, source.config, work))
        memory = plan(source.config, work, calib.memory, max_memory, torch_device, max_device_memory)
        quantized = [m for m in widths if schemes.scheme_for(m) is not None]
        if dry_run:
            return QuantizeResult(str(out), recipe.to_dict(), len(quantized), time.perf_counter() - t0, True,
                                  memory.estimate, memory.to_dict())
        if memory.mode != calib.memory and memory.placement != "device" and memory.estimate["total"] > memory.limit:
            log.warning("no memory mode fits %.1f GiB (the %s mode needs ~%.1f GiB): running it anyway",
                        memory.limit / 2**30, memory.mode, memory.estimate["total"] / 2**30)
        act = schemes.activations
        input_sha256 = fingerprint(original)
        # a data-free run (RTN without static scales) saves no state: redoing it costs what saving would
        state = resumable(out, resume, parallel, recipe.needs_calibration, input=input_sha256, recipe=recipe.to_dict(), tokens=tokens,
                          arithmetic=str(arithmetic), store=str(store_dtype), version=__version__)
        pipeline = LayerPipeline(source, tokens, torch_device, batch_size, arithmetic,
                                 quantizer.fp_stream, store_dtype, memory.mode, parallel, placement=memory.placement)
        writes = parallel is None or parallel.writes
        if gguf_plan is not None:
            with progress(f"quantizing ({recipe.name})", source.config.num_layers, quiet) as advance:
                _write_gguf(source, out, recipe, gguf_plan, pipeline, transforms, quantizer, force, writes,
                            input_sha256, advance, state)
            if parallel is not None:
                parallel.finish()
            state.remove()
            return QuantizeResult(str(out), recipe.to_dict(), len(quantized), time.perf_counter() - t0, False,
                                  memory.estimate, memory.to_dict())
        writer_class = Fp8BlockWriter if recipe.output_format == "fp8" else CompressedTensorsWriter
        writer = state.recording(writer_class(
            out, source.config, source.tokenizer_files(), parse_size(recipe.max_shard_size), force,
            {"recipe": recipe.to_dict(), "qconv_version": __version__, "input_sha256": input_sha256},
            dtype=model_dtype, expected_bytes=_expected_bytes(source.config, schemes, model_dtype))) \
            if writes else _Discard()
        with writer, progress(f"quantizing ({recipe.name})", source.config.num_layers, quiet) as advance:
            writer.add(f"{EMBED}.weight", source.get_tensor(f"{EMBED}.weight"))
            if writes:
                state.replay(writer)
            for _ in range(state.done + 1):
                advance()
            for ctx in pipeline.layers(state):
                for t in transforms:
                    t.apply(ctx, schemes)
                # static activation and KV-cache scales: what the layer sees after its transforms
                ranges = static_ranges(ctx, act is not None and act.needs_scale, recipe.kv_cache == "fp8")
                qweights = quantizer.quantize(ctx, schemes)
                if ranges.kv is not None:
                    writer.add_kv_scales(ctx.index, *(FP8_KV.static_scale(r) for r in ranges.kv))
                prefix = LAYER_PREFIX.format(ctx.index)
                for name, tensor in ctx.layer.state_dict().items():
                    inner = name.rsplit(".", 1)[0]
                    if inner in qweights and name.endswith(".weight"):
                        scale = act.static_scale(ranges.inputs[inner]) if act is not None and act.needs_scale else None
                        writer.add(prefix + name, qweights[inner], act, scale)
                    else:
                        writer.add(prefix + name, tensor)
                advance()
            writer.add(f"{FINAL_NORM}.weight", source.get_tensor(f"{FINAL_NORM}.weight"))
            if not source.config.tie_word_embeddings:
                writer.add(f"{LM_HEAD}.weight", source.get_tensor(f"{LM_HEAD}.weight"))
    if parallel is not None:
        parallel.finish()
    state.remove()
    return QuantizeResult(str(out), recipe.to_dict(), len(quantized), time.perf_counter() - t0, False,
                          memory.estimate, memory.to_dict())


@dataclass
class _GGUFPlan:
    """A GGUF output's tensors (llama.cpp's order and mix) and the scheme map they give the methods."""

    ft: Any
    tensors: list[Any]
    schemes: Any


def _gguf_plan(config: ModelConfig, recipe: Recipe) -> _GGUFPlan:
    """The file type's mix for this model, as ``llama-quantize --imatrix`` chooses it (the methods
    calibrate, so the imatrix rules apply: files compare at equal size with llama.cpp's)."""
    from qconv.core.ggml_target import GGMLScheme
    from qconv.core import ggml
    from qconv.formats.gguf_writer import check_llama_cpp_runs, gguf_options, plan_tensors
    from qconv.quant.schemes import GGUFSchemeMap

    check_llama_cpp_runs(config)
    ft, overrides, _ = gguf_options(str(recipe.gguf_type), recipe.tensor_types)
    tensors = plan_tensors(config, ft, True, overrides)
    types: dict[str, GGMLScheme] = {}
    linears = set(config.spec.linear_modules(config))
    for p in tensors:
        for hf in p.sources:
            module = hf.removesuffix(".weight")
            if module in linears and module != LM_HEAD and p.type.name in ggml.QTYPES:
                types[module] = GGMLScheme(p.type.name)
    return _GGUFPlan(ft, tensors, GGUFSchemeMap(types))


def _write_gguf(source: ModelSource, out: Path, recipe: Recipe, plan: _GGUFPlan, pipeline: LayerPipeline,
                transforms: list[Transform], quantizer: Quantizer, force: bool, writes: bool, input_sha256: str,
                advance: Any, state: RunState) -> None:
    """The layer pipeline into a GGUF file, streamed in llama.cpp's tensor order: the tensors
    outside the layers (embeddings, head, final norm) first, from the source and quantized by
    the writer as llama-quantize would (no imatrix entry), then each layer's as the pipeline
    finishes it: its quantized Linears as the method's ggml blocks, the rest (norms with AWQ's
    folded scales, biases) from the layer."""
    import json

    from qconv.formats.gguf_writer import GGUFStream, encode, tensor_data

    config = source.config
    extra = {"qconv.recipe": json.dumps(recipe.to_dict(), sort_keys=True), "qconv.version": __version__,
             "qconv.input_sha256": input_sha256}
    stream = state.recording(GGUFStream(out, config, source.tokenizer_files(), plan.ft, plan.tensors, force,
                                        extra=extra)) if writes else None
    with stream if stream is not None else _Discard():
        while stream is not None and stream.pending is not None and not stream.pending.name.startswith("blk."):
            p = stream.pending
            stream.write(p.name, encode(tensor_data(source.get_array, config, p), p.type))
        if stream is not None:
            state.replay(stream)
        for _ in range(state.done + 1):
            advance()
        for ctx in pipeline.layers(state):
            for t in transforms:
                t.apply(ctx, plan.schemes)
            qweights = quantizer.quantize(ctx, plan.schemes)
            if stream is not None:
                prefix = LAYER_PREFIX.format(ctx.index)
                tensors = ctx.layer.state_dict()
                blocks = {f"{prefix}{inner}.weight": qw.data for inner, qw in qweights.items()}

                def get(hf: str) -> Any:
                    return blocks[hf] if hf in blocks else tensors[hf[len(prefix):]].detach().float().cpu().numpy()

                layer = f"blk.{ctx.index}."
                while stream.pending is not None and stream.pending.name.startswith(layer):
                    p = stream.pending
                    stream.write(p.name, encode(tensor_data(get, config, p), p.type))
            advance()


def _expected_bytes(config: ModelConfig, schemes: Any, dtype: torch.dtype) -> int:
    """About what a compressed-tensors checkpoint of ``config`` under ``schemes`` takes: the
    quantized Linears' codes and scales, every other tensor in ``dtype`` (config and tokenizer
    files aside)."""
    total, linears = 0, set(config.spec.linear_modules(config))
    for name, shape in config.expected_shapes().items():
        n, module = math.prod(shape), name.removesuffix(".weight")
        s = schemes.scheme_for(module) if module in linears else None
        total += n * dtype.itemsize if s is None else \
            n * s.bits // 8 + shape[0] * s.groups(shape[1]) * s.scale_dtype.itemsize
    return total


def _method_memory(stages: list[Method], config: ModelConfig, work: Workload) -> dict[str, int]:
    """Each stage's own scratch memory at the run's peak (named parts; the larger where two
    stages name the same part)."""
    out: dict[str, int] = {}
    for m in stages:
        for name, n in m.memory_bytes(config, work).items():
            out[name] = max(n, out.get(name, 0))
    return out
