"""Conformance report: every supported model family against the independent implementations.

For each family's tiny random checkpoint (the one the tests build, ``tests/conftest.py``), the
measured figure of each check the test suite asserts, in one table (docs/architectures.md):

- runner vs transformers: max |Δ logit| over 2 x 40 tokens;
- GGUF f32 vs llama.cpp's own ``convert_hf_to_gguf.py``: tensors differing, and llama.cpp's
  perplexity on the two files (relative difference);
- GGUF import back: max |Δ| over every tensor;
- compressed-tensors (RTN W4 g32 symmetric) in transformers vs the runner: max |Δ logit|;
- layer-0 output error (relative MSE on its calibration inputs, W4 g32 asymmetric) of RTN, GPTQ,
  AWQ + RTN, SmoothQuant (α 0.5) + RTN, or why the method is refused;
- rotation: max |Δ logit| of the rotated fp checkpoint in transformers, or the refusal.

Each family's checkpoint is the tests' tiny one with :data:`EXPORTABLE`'s changes, where the
tests' config holds something llama.cpp computes differently (there the GGUF export refuses).

    python bench/conformance/families.py --sdist ~/.cache/qconv/llama-cpp-python-0.3.36-*/llama_cpp_python-0.3.36.tar.gz

Needs the test extras (transformers, llama-cpp-python, compressed-tensors).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import TINY_ARCHS, build_tiny_hf_model  # noqa: E402
from tests_support import extract_converter, write_tokenizer  # noqa: E402

from qconv import api  # noqa: E402
from qconv.checkpoint import open_model  # noqa: E402
from qconv.core.grid import WeightScheme  # noqa: E402
from qconv.errors import QconvError  # noqa: E402
from qconv.model import load_model  # noqa: E402
from qconv.quant.methods import get_method  # noqa: E402
from qconv.quant.pipeline import LayerPipeline  # noqa: E402
from qconv.quant.schemes import SchemeMap  # noqa: E402

VOCAB = 384
#: Where the tests' tiny config has something llama.cpp would run differently (and qconv's GGUF
#: export refuses or warns about), the variant llama.cpp can run, so every column has a figure.
EXPORTABLE = {
    "llama": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3_text": {"query_pre_attn_scalar": 16},
    "phi3": {"sliding_window": None},
}


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def runner_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    with open_model(path) as src, torch.no_grad():
        return load_model(src)(tokens)


def converter_check(model: Path, sdist: Path, work: Path) -> str:
    """Tensors differing from the converter's f32 file, and llama.cpp's PPL on both."""
    import test_gguf_export as t  # the converter wrapper and metadata splice the tests use

    root = extract_converter(sdist, work / "llama.cpp")
    ref, ours, spliced = work / "conv.gguf", work / "ours.gguf", work / "conv-model.gguf"
    subprocess.run([sys.executable, "-c", t._CONVERT, str(root), str(model), "--outfile", str(ref), "--outtype", "f32"],
                   check=True, capture_output=True)
    api.convert(model, ours, gguf_type="f32", force=True)
    a, b = t.tensors_of(ours), t.tensors_of(ref)
    differing = [n for n in a if n not in b or a[n] != b[n]]
    t._with_tokenizer_of(ref, ours, spliced)
    ids = [(i * 37 + 11) % VOCAB for i in range(48)]
    p1, p2 = (t._perplexity(t._llama_logits(f, ids), ids) for f in (ours, spliced))
    return f"{len(differing)} of {len(a)} tensors differ{' (' + ', '.join(differing) + ')' if differing else ''}; PPL rel. diff {abs(p1 - p2) / p2:.1e}"


def layer_errors(model: Path) -> dict[str, str]:
    scheme = WeightScheme(4, 32, False)
    out: dict[str, str] = {}
    for label, stages in (("RTN", [("rtn", {})]), ("GPTQ", [("gptq", {})]), ("AWQ+RTN", [("awq", {}), ("rtn", {})]),
                          ("SQ+RTN", [("smoothquant", {}), ("rtn", {})])):
        source = open_model(model)
        methods = [get_method(n)(**o) for n, o in stages]
        unfit = [m.name for m in methods if not m.supports_experts]
        if source.config.spec.experts and unfit:
            out[label] = "refused (MoE)"
            continue
        tokens = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
        ctx = next(LayerPipeline(source, tokens, batch_size=4).layers())
        ref = ctx.forward()
        for m in methods:
            m.apply(ctx, SchemeMap(scheme)) if m.role == "transform" else m.quantize(ctx, SchemeMap(scheme))
        out[label] = f"{((ctx.forward() - ref).pow(2).mean() / ref.pow(2).mean()).item():.2e}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, required=True, help="the llama-cpp-python sdist make test keeps")
    parser.add_argument("--families", nargs="*", default=list(TINY_ARCHS))
    args = parser.parse_args()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    rows = []
    for arch in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            hf = build_tiny_hf_model(arch, vocab_size=VOCAB, **EXPORTABLE.get(arch, {}))
            hf.save_pretrained(work / "hf")
            write_tokenizer(work / "hf", VOCAB, fill=arch == "gemma3_text")
            ref = hf_logits(work / "hf", tokens)
            runner = f"{(runner_logits(work / 'hf', tokens) - ref).abs().max().item():.1e}"
            try:
                conv = converter_check(work / "hf", args.sdist, work)
            except (QconvError, subprocess.CalledProcessError) as e:
                conv = f"refused: {str(e).split(': ', 1)[-1]}"
            try:
                api.convert(work / "hf", work / "rt.gguf", gguf_type="f32", force=True)
                api.convert(work / "rt.gguf", work / "back", force=True)
                with open_model(work / "hf") as a, open_model(work / "back") as b:
                    imp = f"{max((a.get_tensor(n) - b.get_tensor(n)).abs().max().item() for n in a.tensor_names()):.1e}"
            except QconvError as e:
                imp = f"refused: {str(e).split(': ', 1)[-1]}"
            with open_model(work / "hf") as a:
                spec = a.config.spec
            api.quantize(work / "hf", work / "ct", method="rtn", bits=4, group_size=32, symmetric=True, force=True)
            ct = f"{(hf_logits(work / 'ct', tokens) - runner_logits(work / 'ct', tokens)).abs().max().item():.1e}"
            errors = layer_errors(work / "hf")
            if spec.rotation_refused:
                rot = "refused"
            else:
                from qconv.checkpoint.hf_writer import write_hf_checkpoint
                from qconv.quant.methods.rotate import Rotate

                with open_model(work / "hf") as src:
                    write_hf_checkpoint(Rotate().wrap(src), work / "rot")
                rot = f"{(hf_logits(work / 'rot', tokens) - ref).abs().max().item():.1e}"
            rows.append((arch, runner, conv, imp, ct, errors, rot))
    print("| family | runner vs transformers max Δlogit | GGUF f32 vs llama.cpp converter | GGUF import max Δ | "
          "CT W4 in transformers vs runner | layer-0 rel. MSE RTN / GPTQ / AWQ+RTN / SQ+RTN (W4 g32) | "
          "rotated fp in transformers max Δlogit |")
    print("|---|---|---|---|---|---|---|")
    for arch, runner, conv, imp, ct, errors, rot in rows:
        e = " / ".join(errors[k] for k in ("RTN", "GPTQ", "AWQ+RTN", "SQ+RTN"))
        print(f"| {arch} | {runner} | {conv} | {imp} | {ct} | {e} | {rot} |")


if __name__ == "__main__":
    main()
