"""The ``qconv`` command line: parse flags, call :mod:`qconv.api`, print.

Contract for scripts: exit 0 on success, 2 on bad input or usage, 1 on an internal failure,
3 when another rank of a ``torchrun`` run failed or was lost, 130 when interrupted (Ctrl-C),
143 when terminated (SIGTERM); ``--json`` prints exactly one JSON object on stdout; progress bars go to
stderr and only when it is a terminal; nothing ever prompts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from qconv import __version__
from qconv.errors import InvalidOption, QconvError

app = typer.Typer(
    name="qconv",
    help="Quantize and convert large language models (HF safetensors, GGUF) and check them with a reference runner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = typer.Option(False, "--json", help="Print one machine-readable JSON object on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or informational output.")
ForceOpt = typer.Option(False, "--force", "-f", help="Overwrite the output if it exists.")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto.")
ResumeOpt = typer.Option(False, "--resume", help="Continue a killed or failed run with the same arguments from its "
                         "last finished layer (kept in .OUTPUT.qconv-resume/ beside the output until it is written).")
DtypeOpt = typer.Option("auto", "--dtype", help="Runner arithmetic: auto (bf16 GEMMs where native: AMX/AVX512-BF16 CPUs, CUDA; else f32), f32, f16 or bf16.")


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _reports() -> bool:
    """Whether this process prints a command's result: under ``torchrun`` rank 0 alone does
    (``--json`` gives one object per run, not one per rank)."""
    return os.environ.get("RANK", "0") == "0"


def _console():
    from rich.console import Console

    return Console()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """qconv: quantize and convert LLMs."""


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Input model: HF checkpoint directory or .gguf file."),
    output: Path = typer.Option(..., "--output", "-o", help="Output: HF checkpoint directory, or a .gguf file."),
    gguf_type: Optional[str] = typer.Option(
        None, "--type", "-t",
        help="GGUF type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, "
        "iq4_xs, iq4_nl, q3_k_l, q3_k_m, q3_k_s, q2_k (default f16).",
    ),
    imatrix: Optional[Path] = typer.Option(
        None, "--imatrix", help="GGUF output: llama.cpp importance matrix (imatrix GGUF or legacy .dat) for "
        "llama.cpp's importance-weighted quantization, as llama-quantize --imatrix."),
    tensor_type: list[str] = typer.Option(
        [], "--tensor-type", help="GGUF output: PATTERN=TYPE, the tensors whose name the regex matches get TYPE "
        "(repeatable; first match wins), as llama-quantize --tensor-type."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="HF output: re-type weights to f32, f16 or bf16 (default: keep)."),
    tokenizer_pre: Optional[str] = typer.Option(
        None, "--tokenizer-pre", help="GGUF output: llama.cpp pre-tokenizer name when it cannot be detected."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB."),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Change a model's format or dtype without quantizing.

    Examples:

      qconv convert SmolLM2.Q4_1.gguf -o smollm2-hf          # GGUF -> HF (dequantized f32)

      qconv convert model-dir -o model-bf16 --dtype bf16 --max-shard-size 2GB

      qconv convert model-dir -o model-Q4_K_M.gguf --type q4_k_m    # HF -> GGUF, as llama-quantize would

      qconv calibrate model-dir --data c4.jsonl --format imatrix -o imatrix.gguf

      qconv convert model-dir -o model-Q4_K_M.gguf --type q4_k_m --imatrix imatrix.gguf --tensor-type attn_v=q8_0
    """
    from qconv import api

    result = api.convert(src, output, dtype=dtype, max_shard_size=max_shard_size, force=force,
                         quiet=quiet or json_out, gguf_type=gguf_type, tokenizer_pre=tokenizer_pre,
                         imatrix=imatrix, tensor_types=tensor_type)
    if json_out:
        _print_json(result.to_dict())
    elif not quiet:
        _console().print(
            f"wrote [bold]{result.output}[/] ({result.tensors} tensors, {result.bytes / 1e6:.1f} MB) in {result.seconds:.1f}s"
        )


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="HF checkpoint directory, .safetensors or .gguf file."),
    json_out: bool = JsonOpt,
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor (default: a summary by type)."),
) -> None:
    """Show architecture, parameter count, tensor types and bits per weight.

    Examples:

      qconv inspect model.gguf

      qconv inspect model-dir --json | jq .bits_per_weight
    """
    from qconv.inspect import inspect_model

    info = inspect_model(path)
    if json_out:
        _print_json(info.to_dict())
        return
    from rich.table import Table

    console = _console()
    console.print(
        f"[bold]{info.path}[/]  format={info.format}  architecture={info.architecture}  "
        f"parameters={info.parameters:,}  size={info.file_size:,} B  bits/weight={info.bits_per_weight:.3f}"
    )
    table = Table("tensor" if tensors else "type", "shape" if tensors else "parameters", "dtype" if tensors else "share")
    if tensors:
        for t in info.tensors:
            shape = "x".join(map(str, t.shape))
            if t.logical_shape is not None:
                shape += f" (holds {'x'.join(map(str, t.logical_shape))})"
            table.add_row(t.name, shape, t.packed_as or t.dtype)
    else:
        for dtype, n in sorted(info.dtype_counts().items(), key=lambda kv: -kv[1]):
            table.add_row(dtype, f"{n:,}", f"{100 * n / max(info.parameters, 1):.1f}%")
    console.print(table)


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="Model: HF checkpoint directory or .gguf file."),
    data: str = typer.Option(..., "--data", help="Calibration text: local txt/json/jsonl/parquet file or folder, "
                             "or a datasets name (name:config:split), streamed only as far as needed."),
    output: Path = typer.Option(..., "--output", "-o", help="Statistics file (.safetensors, or .gguf with --format imatrix)."),
    samples: int = typer.Option(128, "--samples", help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window."),
    seed: int = typer.Option(0, "--seed", help="Seed for the window offsets."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in structured files."),
    chat_template: bool = typer.Option(False, "--chat-template",
                                       help="Rows are conversations (--text-field messages): render them with the model's chat template."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (qconv statistics) or imatrix (llama.cpp)."),
    resume: bool = ResumeOpt,
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run a model over calibration text and record per-channel input statistics of every Linear
    (token count, sum of x^2 = llama.cpp's importance matrix, mean |x|, max |x|).

    Examples:

      qconv calibrate model-dir --data c4-sample.jsonl --samples 128 --seqlen 2048 -o stats.safetensors

      qconv calibrate model-dir --data c4-sample.jsonl --format imatrix -o imatrix.gguf
    """
    from qconv import api

    r = api.calibrate(model, data, output, samples=samples, seqlen=seqlen, seed=seed, text_field=text_field,
                      fmt=fmt, force=force, device=device, quiet=quiet or json_out, chat_template=chat_template,
                      resume=resume)
    if not _reports():
        return
    if json_out:
        _print_json(r.to_dict())
    elif not quiet:
        _console().print(f"wrote [bold]{r.output}[/] ({r.modules} modules, {r.tokens:,} tokens) in {r.seconds:.1f}s")


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Model: HF checkpoint directory, .gguf file or Hub id (owner/name)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output: checkpoint directory (compressed-tensors), or a .gguf file."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="rtn, gptq, awq or smoothquant (instead of a recipe)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", "-s",
                                         help="Named scheme: fp8 (W8A8 FP8 dynamic), fp8a16 (FP8 weight-only), fp8-static, fp8-block (128x128), nvfp4, nvfp4a16, mxfp4, mxfp4a16; int = --bits/--group-size."),
    output_format: Optional[str] = typer.Option(None, "--output-format", "--format",
                                                help="compressed-tensors (default), fp8: the published FP8 block layout (weight_scale_inv; --scheme fp8-block), or gguf (also when -o ends in .gguf)."),
    gguf_type: Optional[str] = typer.Option(None, "--type", "-t",
                                            help="GGUF output: llama.cpp file type (q4_k_m, q4_k_s, q4_0, q3_k_m, q2_k, iq4_xs, ...), whose mix gives every Linear's type; the method rounds onto it."),
    tensor_type: list[str] = typer.Option([], "--tensor-type",
                                          help="GGUF output: PATTERN=TYPE override of the mix, as llama-quantize --tensor-type (repeatable)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", "--kv",
                                           help="fp8: calibrate FP8 KV-cache scales (k_scale/v_scale per layer) for vLLM's fp8 KV cache; fp: none."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Weight bits, 2..8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="Columns per scale; -1 = per channel."),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric or asymmetric grid."),
    data: Optional[str] = typer.Option(None, "--data", help="Calibration text (file, folder or datasets name name:config:split, streamed)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per calibration window."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Calibration seed."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Text field of structured calibration files."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template",
                                                 help="Calibration rows are conversations (--text-field messages): render them with the model's chat template."),
    calib_dtype: Optional[str] = typer.Option(None, "--calib-dtype",
                                              help="Arithmetic of calibration passes: auto (bfloat16 where native, except GPTQ), float32, or bfloat16 (faster only on CPUs with AVX512-BF16/AMX, and GPUs)."),
    act_dtype: Optional[str] = typer.Option(None, "--act-dtype",
                                            help="Storage of calibration activations: auto (the checkpoint's 16-bit dtype; bfloat16 for float32 checkpoints), float32, bfloat16, float16."),
    memory_mode: Optional[str] = typer.Option(None, "--memory-mode",
                                              help="auto, keep (fastest), stream (group inputs recomputed per batch) or spill (buffers in a scratch file)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory",
                                             help="Memory the run may use: 20GB (host) or cpu=20GB,cuda=70GB; default: what is available. Picks the memory mode, and on a GPU whether activations live on it."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: activation order (static groups)."),
    damp: Optional[float] = typer.Option(None, "--damp", help="GPTQ: relative Hessian dampening."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SmoothQuant: migration strength."),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="RTN / GPTQ: MSE-searched grid ranges."),
    fp_targets: Optional[bool] = typer.Option(None, "--fp-targets/--no-fp-targets",
                                              help="GPTQ: fit each Linear to the fp model's outputs (carries an fp stream)."),
    refine: Optional[int] = typer.Option(None, "--refine", help="GPTQ: rounds of scale refit + coordinate descent."),
    rotate: Optional[bool] = typer.Option(None, "--rotate/--no-rotate",
                                          help="Rotate the residual stream (Hadamard, folded into the weights) first."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan and memory estimate; write nothing."),
    resume: bool = ResumeOpt,
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Quantize a model with RTN, GPTQ, AWQ or SmoothQuant into a compressed-tensors checkpoint
    (loadable by vLLM and transformers), or with RTN, GPTQ or AWQ into a GGUF file (llama.cpp).
    Flags override the recipe's fields.

    Examples:

      qconv quantize model-dir --recipe recipes/gguf-q4_k_m.yaml --data c4-sample.jsonl -o model-Q4_K_M.gguf

      qconv quantize model-dir --method gptq --format gguf --type q3_k_m --data c4-sample.jsonl -o model-Q3_K_M.gguf

      qconv quantize model-dir --recipe recipes/w4a16-gptq.yaml --data c4-sample.jsonl -o model-w4

      qconv quantize model-dir --method awq --bits 4 --group-size 64 --data c4-sample.jsonl -o model-awq

      qconv quantize model-dir --method rtn --bits 8 --group-size -1 --sym -o model-w8 --dry-run

      qconv quantize model-dir --method gptq --scheme nvfp4a16 --data c4-sample.jsonl -o model-nvfp4
    """
    from qconv import api

    r = api.quantize(model, output, recipe=recipe, method=method, force=force, device=device,
                     quiet=quiet or json_out, dry_run=dry_run, scheme=scheme,
                     output_format=output_format or ("gguf" if output.suffix.lower() == ".gguf" else None),
                     gguf_type=gguf_type, tensor_types=tensor_type or None, kv_cache=kv_cache, bits=bits, group_size=group_size, symmetric=symmetric,
                     data=data, samples=samples, seqlen=seqlen, seed=seed, text_field=text_field, dtype=calib_dtype,
                     act_dtype=act_dtype, memory=memory_mode, chat_template=chat_template, max_memory=max_memory, act_order=act_order, damp=damp, alpha=alpha, mse=mse, fp_targets=fp_targets, refine=refine,
                     rotate=rotate, resume=resume)
    if not _reports():
        return
    if json_out:
        _print_json(r.to_dict())
        return
    if quiet:
        return
    if r.dry_run:
        p = r.memory_plan
        # on the device: everything but the host process's runtime
        skip = {"total", "runtime"} if p["placement"] == "device" else {"total"}
        parts = " + ".join(f"{k.replace('_', ' ')} {v / 2**20:.0f}" for k, v in p["estimate"].items()
                           if k not in skip and v)
        others = ", ".join(f"{m} {v / 2**30:.2f} GiB" for m, v in p["alternatives"].items())
        where = (f"peak device memory ~ {p['device_bytes'] / 2**20:.0f} MiB (activations on the device) = "
                 if p["placement"] == "device" else
                 f"peak host memory ~ {p['estimate']['total'] / 2**20:.0f} MiB (activations {p['placement']}) = ")
        _console().print(
            f"plan: {r.quantized_modules} Linears with recipe {r.recipe['name']}\n"
            f"memory mode: {p['mode']} ({p['why']}; limit {p['limit'] / 2**30:.2f} GiB; modes: {others})\n"
            f"{where}{parts}", highlight=False)
    else:
        _console().print(f"wrote [bold]{r.output}[/] ({r.quantized_modules} quantized Linears) in {r.seconds:.1f}s")


@app.command()
def run(
    model: Path = typer.Argument(..., help="Model: HF checkpoint directory or .gguf file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Generate a continuation of this text."),
    ppl: Optional[Path] = typer.Option(None, "--ppl", help="Measure perplexity on this text file (txt/json/jsonl/parquet)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Compare MODEL (base) with this model on --text."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file for --compare."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in json/jsonl/parquet files."),
    ctx: int = typer.Option(2048, "--ctx", help="Window length in tokens for --ppl/--compare."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Evaluate only the first N windows."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    stream_layers: bool = typer.Option(False, "--stream-layers",
                                       help="--ppl with one layer in memory at a time (models larger than RAM)."),
    kv_cache: Optional[str] = typer.Option(
        None, "--kv-cache",
        help="KV cache: fp, int8 (per-token absmax), fp8 (E4M3, the checkpoint's k_scale/v_scale or 1.0) or kivi (keys per channel, values per token, fp residual); "
             "reports the bytes it held. With --compare it applies to the compared model only.",
    ),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="KIVI bits: 2, 4 or 8 (default 4)."),
    kv_group: Optional[int] = typer.Option(None, "--kv-group", help="KIVI group size in tokens (keys) / channels (values) (default 32)."),
    kv_residual: Optional[int] = typer.Option(
        None, "--kv-residual", help="KIVI recent tokens kept in 16-bit, a multiple of --kv-group (default 128)."),
    kv_sink: Optional[int] = typer.Option(
        None, "--kv-sink", help="KIVI: also keep the first N tokens (attention sinks) in 16-bit (default 0 = plain KIVI)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The reference runner: generate text, measure perplexity, or compare two models.

    Examples:

      qconv run model-dir --prompt "The capital of France is" -n 16

      qconv run model-dir --ppl wikitext-2-raw-test.txt --ctx 2048 --max-windows 20 --json

      qconv run model-dir --compare model-q4.gguf --text wikitext-2-raw-test.txt

      qconv run model-dir --ppl wikitext-2-raw-test.txt --kv-cache kivi --kv-bits 2 --json   # KV cache cost
    """
    from qconv import api

    modes = [m for m, v in (("--prompt", prompt), ("--ppl", ppl), ("--compare", compare)) if v is not None]
    if len(modes) != 1:
        raise InvalidOption("give exactly one of --prompt, --ppl, --compare")
    quiet_work = quiet or json_out
    kv = dict(kv_cache=api.kv_cache_spec(kv_cache, kv_bits, kv_group, kv_residual, kv_sink))
    if prompt is not None:
        stream = None if quiet_work else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        if stream:
            stream(prompt)
        g = api.generate_text(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, device, dtype, stream,
                              **kv)
        if json_out:
            _print_json(g.to_dict())
        elif quiet:
            sys.stdout.write(g.text + "\n")
        else:
            sys.stdout.write("\n")
            _console().print(f"[dim]{g.new_tokens} tokens, {g.tokens_per_second:.1f} tok/s[/]", highlight=False)
            _print_kv(g.kv_cache)
        return
    if ppl is not None:
        r = api.perplexity(model, ppl, ctx, max_windows, text_field, device, dtype, quiet_work,
                           stream_layers=stream_layers, **kv)
        if json_out:
            _print_json(r.to_dict())
        else:
            sys.stdout.write(f"perplexity {r.ppl:.4f} over {r.n_tokens} tokens ({r.n_windows} windows of {ctx})\n")
            _print_kv(r.kv_cache)
        return
    if text is None:
        raise InvalidOption("--compare needs --text FILE")
    c = api.compare(model, compare, text, ctx, max_windows, text_field, device, dtype, quiet_work, **kv)
    if json_out:
        _print_json(c.to_dict())
        return
    from rich.table import Table

    table = Table("metric", "value")
    for k, v in c.to_dict().items():
        if k != "kv_cache":
            table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    _console().print(table)
    _print_kv(c.kv_cache)


def _print_kv(report: dict[str, Any] | None) -> None:
    """One line on what the KV cache held, when one was chosen."""
    if report:
        sys.stdout.write(
            f"KV cache {report['name']}: {report['bytes']:,} bytes for {report['tokens']} tokens "
            f"({report['ratio']:.3f}x an fp16 cache)\n"
        )


#: the signal that interrupted the run (None: not interrupted)
_interrupted: int | None = None


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM: unwind (so atomic outputs are cleaned up and a layer run's resumable
    state is kept), then exit 128 + the signal's number (130, 143), as shells report it."""
    global _interrupted
    _interrupted = signum
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    signum = _interrupted or signal.SIGINT
    sys.stderr.write(f"error: {'terminated' if signum == signal.SIGTERM else 'interrupted'}\n")
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map every outcome to an exit code.

    Typer's standalone mode handles usage errors (exit 2) and --help; our errors and
    interrupts are mapped here.
    """
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        try:
            app(args=argv, prog_name="qconv")
        except SystemExit:
            if _interrupted:  # click turned the interrupt into an exit: take it back
                raise KeyboardInterrupt from None
            raise
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 -- every outcome gets its exit code here
        _exit_for(e)


def _exit_for(e: BaseException) -> None:
    """Print one line for ``e`` (none where another data-parallel rank tells) and exit with its code."""
    for s in (signal.SIGINT, signal.SIGTERM):  # on the way out already (torchrun may signal the survivors)
        signal.signal(s, signal.SIG_IGN)
    parallel = sys.modules.get("qconv.quant.distributed")  # imported by every data-parallel run
    if parallel is not None:
        e = parallel.explain(e)
    if isinstance(e, QconvError):
        if not getattr(e, "silent", False):
            sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        _exit_interrupted()
    if os.environ.get("QCONV_DEBUG"):  # anything else is our bug: say so in one line, traceback on request
        raise e
    sys.stderr.write(f"internal error: {type(e).__name__}: {e} (set QCONV_DEBUG=1 for a traceback)\n")
    sys.exit(1)
