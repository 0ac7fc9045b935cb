"""The Python API behind every CLI command.

Each function takes paths and plain options, does the work, and returns a result object with
``to_dict()``; the CLI only parses flags and prints. Errors are :class:`qconv.errors.QconvError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconv.atomic import check_output
from qconv.checkpoint import ModelSource, open_model
from qconv.errors import InvalidOption
from qconv.progress import progress
from qconv.textdata import load_text

if TYPE_CHECKING:  # torch is imported where it is used, so HF -> GGUF export never loads it
    import torch

    from qconv.model.kv_spec import KVCacheSpec


@dataclass
class ConvertResult:
    input: str
    output: str
    format: str
    dtype: str | None
    tensors: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    src: Path | str,
    out: Path | str,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    force: bool = False,
    quiet: bool = True,
    gguf_type: str | None = None,
    tokenizer_pre: str | None = None,
    imatrix: Path | str | None = None,
    tensor_types: Sequence[str] = (),
) -> Any:
    """Convert a model (HF dir or GGUF) to an HF checkpoint directory or, when ``out`` ends in
    ``.gguf`` or ``gguf_type`` is given, to a GGUF file of that type (default f16).

    GGUF output only: ``imatrix``, a llama.cpp importance matrix (GGUF or legacy .dat, e.g.
    ``qconv calibrate --format imatrix``) for llama.cpp's importance-weighted quantization;
    ``tensor_types``, ``PATTERN=TYPE`` overrides of the mix as llama-quantize's ``--tensor-type``."""
    t0 = time.perf_counter()
    out = Path(out)
    to_gguf = out.suffix.lower() == ".gguf" or gguf_type is not None
    if not to_gguf and (imatrix is not None or tensor_types):
        raise InvalidOption("--imatrix and --tensor-type apply to GGUF output (-o x.gguf --type T)")
    if to_gguf:
        from qconv.formats.gguf_writer import gguf_options

        if dtype is not None:
            raise InvalidOption("--dtype applies to HF output; for GGUF output use --type")
        ft, overrides, imx = gguf_options(gguf_type or "f16", tensor_types, imatrix)
    else:
        from qconv.checkpoint.hf_writer import parse_dtype, parse_size, write_hf_checkpoint

        torch_dtype = parse_dtype(dtype) if dtype else None
        shard_bytes = parse_size(max_shard_size)
    check_output(out, force)
    with open_model(src) as source:
        if to_gguf:
            from qconv.formats.gguf_writer import plan_tensors, write_gguf

            n = len(plan_tensors(source.config, ft, imx is not None, overrides))
            with progress(f"writing {ft.name}", n, quiet) as advance:
                return write_gguf(source, out, ft, force, tokenizer_pre, on_tensor=lambda _: advance(),
                                  imatrix=imx, overrides=overrides)
        names = source.tensor_names()
        with progress("converting", len(names), quiet) as advance:
            write_hf_checkpoint(source, out, torch_dtype, shard_bytes, force, on_tensor=lambda _: advance())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return ConvertResult(str(src), str(out), "safetensors", dtype, len(names), size, time.perf_counter() - t0)


def resolve_device(device: str) -> torch.device:
    """``cpu|cuda|cuda:N|auto`` -> torch.device, refusing a CUDA device that is not there."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise InvalidOption(f"unknown device {device!r} (valid: cpu, cuda, cuda:N, auto)")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise InvalidOption(f"--device {device}: no CUDA device is available")
        if index and int(index) >= count:
            raise InvalidOption(f"--device {device}: this machine has {count} CUDA device(s)")
    return torch.device(device)


def runner_weight_dtype(source: ModelSource, device: Any) -> Any:
    """The runner's weight dtype under ``--dtype auto``: float32 while the float32 weights take
    at most half the memory there is (host RAM, or the GPU's), else the checkpoint's own 16-bit
    dtype (bfloat16 for a float32 checkpoint), so an 8B model (32 GB in float32, 16 GB in bf16)
    still runs on a 24 GB machine; float32 otherwise, for the exact arithmetic the oracles check."""
    import math

    import torch

    from qconv.checkpoint.hf_writer import parse_dtype
    from qconv.quant.memory import available_bytes

    params = sum(math.prod(s) for s in source.config.expected_shapes().values())
    if device.type == "cuda":
        room = torch.cuda.mem_get_info(device)[0]
    else:
        room = available_bytes()
    if 4 * params <= room // 2:
        return torch.float32
    stored = parse_dtype(source.config.torch_dtype)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_runner(source: ModelSource, device: str = "auto", dtype: str = "auto") -> torch.nn.Module:
    """The reference decoder for ``source`` on ``device``. Checkpoints that quantize activations
    (W8A8 int8, FP8, NVFP4, MXFP4) get it emulated, so measured quality is what their kernels give.

    ``dtype`` ``auto``: float32 weights (:func:`runner_weight_dtype`: the checkpoint's 16-bit
    dtype when float32 would not fit), the decoder layers' GEMMs and attention in bfloat16
    (autocast) where the device has native bf16 (AMX/AVX512-BF16 CPUs, CUDA), plain float32
    elsewhere; ``f32`` / ``f16`` / ``bf16``: every weight and activation in that dtype."""
    import torch

    from qconv.checkpoint.hf_writer import parse_dtype
    from qconv.core.device import native_bf16
    from qconv.model.decoder import load_model

    where = resolve_device(device)
    model = load_model(source, device=where, dtype=runner_weight_dtype(source, where) if dtype == "auto"
                       else parse_dtype(dtype))
    if dtype == "auto" and native_bf16(where):
        model.autocast_dtype = torch.bfloat16
    kv_scales = getattr(source, "kv_scales", None)
    if kv_scales is not None and kv_scales() is not None:
        model.kv_scales = kv_scales()  # the checkpoint's FP8 KV-cache scales, for --kv-cache fp8
    act_schemes = getattr(source, "activation_schemes", None)
    if act_schemes is not None and act_schemes():
        from qconv.model.act_quant import apply_activation_quant

        apply_activation_quant(model, act_schemes(), scales=source.input_scales())  # type: ignore[attr-defined]
    return model


@dataclass
class GenerateResult:
    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    kv_cache: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_text(
    model_path: Path | str,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    on_text: Callable[[str], None] | None = None,
    kv_cache: KVCacheSpec | None = None,
) -> GenerateResult:
    """Generate a continuation of ``prompt``; ``on_text`` receives text as it is decoded.

    ``kv_cache`` (see :func:`kv_cache_spec`) picks the KV cache and adds what it held to the
    result; default: the plain fp cache.
    """
    from qconv.model.generate import generate

    if max_new_tokens < 1:
        raise InvalidOption("--max-new-tokens must be at least 1")
    with open_model(model_path) as source:
        if kv_cache is not None:
            kv_cache.check(source.config)
        tok = source.tokenizer()
        model = load_runner(source, device, dtype)
    text_in = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok.encode(text_in, add_special_tokens=not chat)
    if not ids:
        raise InvalidOption("the prompt is empty and the tokenizer adds no BOS token: give a non-empty --prompt")
    out: list[int] = []
    shown = ""

    def on_token(tid: int) -> None:
        nonlocal shown
        out.append(tid)
        text = tok.decode(out)
        if on_text and not text.endswith("\ufffd"):  # wait for complete UTF-8 sequences
            on_text(text[len(shown):])
            shown = text

    cache = None if kv_cache is None else kv_cache.make(model.config, 1, len(ids) + max_new_tokens, model.device,
                                                       model.dtype, getattr(model, "kv_scales", None))
    t0 = time.perf_counter()
    generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             seed=seed, eos_ids=tuple(tok.eos_ids), on_token=on_token, cache=cache)
    dt = time.perf_counter() - t0
    report = None if cache is None else kv_cache.report(cache)
    return GenerateResult(prompt, tok.decode(out), len(ids), len(out), dt, len(out) / dt if dt else 0.0, report)


def kv_cache_spec(mode: str | None, bits: int | None = None, group: int | None = None,
                  residual: int | None = None, sink: int | None = None) -> KVCacheSpec | None:
    """The validated KV cache choice for ``generate_text``/``perplexity``/``compare`` from
    CLI-style options (``mode``: fp, int8 or kivi; KIVI's unset options take its defaults);
    None (no mode, no options) is the runner's default full-precision path. Validated here,
    before any model is loaded, so a bad option costs nothing."""
    from qconv.model.kv_spec import KVCacheSpec

    if mode is None:
        if (bits, group, residual, sink) != (None, None, None, None):
            raise InvalidOption("--kv-bits/--kv-group/--kv-residual/--kv-sink need --kv-cache kivi")
        return None
    return KVCacheSpec.from_options(mode, bits, group, residual, sink)


def _eval_ids(source: ModelSource, text_path: Path | str, text_field: str, ctx: int,
              max_windows: int | None) -> tuple[list[int], int]:
    """Tokenize the evaluation text once; return the ids and the number of windows scored.

    Validates ctx/max_windows against the text before any model is loaded.
    """
    from qconv.model.perplexity import windows

    tok, text = source.tokenizer(), load_text(text_path, text_field)
    if max_windows is None:
        ids = tok.encode(text)
    else:
        ids = _encode_prefix(tok, text, ctx * max_windows)
    return ids, len(windows(ids, ctx, max_windows))


#: tokens kept back from the end of a prefix's encoding: the cut can change only the last
#: pre-tokenized word's tokens
_PREFIX_MARGIN = 64


def _encode_prefix(tok: Any, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` ids of ``tok.encode(text)`` (all of them if there are fewer), from
    encoding only a prefix of the text, doubled until it is long enough (a 1.3 MB WikiText-2
    costs ~1.6 s to tokenize whole; 5 windows need a tenth of it)."""
    chars = (tokens + _PREFIX_MARGIN) * 6
    while True:
        ids = tok.encode(text[:chars])
        if chars >= len(text):
            return ids
        if len(ids) >= tokens + _PREFIX_MARGIN:
            return ids[:tokens]
        chars *= 2


def perplexity(
    model_path: Path | str,
    text_path: Path | str,
    ctx: int = 2048,
    max_windows: int | None = None,
    text_field: str = "text",
    device: str = "auto",
    dtype: str = "auto",
    quiet: bool = True,
    kv_cache: KVCacheSpec | None = None,
    stream_layers: bool = False,
) -> Any:
    """GPTQ-protocol perplexity of a model on a text file; with ``kv_cache``, the perplexity
    token-by-token decoding through that cache gives, and the bytes it held. ``stream_layers``:
    one decoder layer in memory at a time, the windows' hidden states in the checkpoint's 16-bit
    dtype (:mod:`qconv.model.streamed`), for models larger than the machine's memory."""
    from qconv.model.perplexity import perplexity as ppl

    with open_model(model_path) as source:
        if kv_cache is not None:
            kv_cache.check(source.config)
        ids, n_windows = _eval_ids(source, text_path, text_field, ctx, max_windows)
        if stream_layers:
            if kv_cache is not None or dtype not in ("auto", "f32"):
                raise InvalidOption("--stream-layers computes in float32 without a KV cache "
                                    "(drop --kv-cache / --dtype)")
            import torch

            from qconv.checkpoint.hf_writer import parse_dtype
            from qconv.model.streamed import streamed_perplexity

            stored = parse_dtype(source.config.torch_dtype)
            store = stored if stored in (torch.bfloat16, torch.float16) else torch.float32
            with progress("perplexity (layers)", source.config.num_layers + 1, quiet) as advance:
                return streamed_perplexity(source, ids, ctx, max_windows, resolve_device(device), store,
                                           lambda *_: advance())
        model = load_runner(source, device, dtype)
    with progress("perplexity", n_windows, quiet) as advance:
        return ppl(model, ids, ctx=ctx, max_windows=max_windows, on_window=lambda *_: advance(), kv_cache=kv_cache)


def compare(
    base_path: Path | str,
    other_path: Path | str,
    text_path: Path | str,
    ctx: int = 2048,
    max_windows: int | None = None,
    text_field: str = "text",
    device: str = "auto",
    dtype: str = "auto",
    quiet: bool = True,
    kv_cache: KVCacheSpec | None = None,
) -> Any:
    """PPL of both models, KL(base||other), top-1 agreement and max |dlogit| on one text.

    ``kv_cache`` runs ``other`` (only) through that KV cache: compare a model with itself to
    measure the cache's cost alone.
    """
    from qconv.model.compare import compare as cmp

    with open_model(base_path) as base_src, open_model(other_path) as other_src:
        if kv_cache is not None:
            kv_cache.check(other_src.config)
        if base_src.config.vocab_size != other_src.config.vocab_size:
            raise InvalidOption(
                f"vocabularies differ ({base_src.config.vocab_size} vs {other_src.config.vocab_size} tokens)", other_path
            )
        ids, n_windows = _eval_ids(base_src, text_path, text_field, ctx, max_windows)
        base = load_runner(base_src, device, dtype)
        other = load_runner(other_src, device, dtype)
    with progress("comparing", n_windows, quiet) as advance:
        return cmp(base, other, ids, ctx=ctx, max_windows=max_windows, on_window=lambda *_: advance(), kv_cache=kv_cache)


def calibrate(model_path: Path | str, data: str, out: Path | str, device: str = "cpu", **options: Any) -> Any:
    """Record activation statistics (see :func:`qconv.quant.calibrate.calibrate`); ``device``
    is cpu, cuda or auto."""
    from qconv.quant.calibrate import calibrate as run

    return run(model_path, data, out, device=str(resolve_device(device)), **options)


def quantize(
    model_path: Path | str,
    out: Path | str,
    recipe: Path | str | None = None,
    method: str | None = None,
    force: bool = False,
    device: str = "cpu",
    quiet: bool = True,
    dry_run: bool = False,
    max_memory: str | None = None,
    resume: bool = False,
    **flags: Any,
) -> Any:
    """Quantize with a YAML recipe or a method name; ``flags`` (scheme (a named scheme: fp8,
    fp8a16, fp8-static, fp8-block, nvfp4, nvfp4a16, mxfp4, mxfp4a16; int: bits/group_size), bits, group_size, symmetric, data,
    samples, seqlen, seed, text_field, dtype (calibration arithmetic), act_dtype (activation
    storage), memory (mode), damp, act_order, alpha, mse, fp_targets, refine, rotate; None = not
    given) override it. ``max_memory``: the memory the run may use, ``"20GB"`` (host) or
    ``"cpu=20GB,cuda=70GB"``. ``resume``: continue a killed run with the same arguments from its
    last finished layer (:mod:`qconv.quant.resume`)."""
    from qconv.quant.memory import parse_memory_limits
    from qconv.quant.quantize import quantize_model
    from qconv.quant.recipe import apply_flags, load_recipe, recipe_for_method

    if (recipe is None) == (method is None):
        raise InvalidOption("give exactly one of --recipe and --method")
    base = load_recipe(recipe) if recipe is not None else recipe_for_method(str(method))
    resolved = apply_flags(base, **flags)
    host, gpu = parse_memory_limits(max_memory) if max_memory else (None, None)
    return quantize_model(model_path, out, resolved, force=force, device=str(resolve_device(device)),
                          quiet=quiet, dry_run=dry_run, max_memory=host, max_device_memory=gpu, resume=resume)
