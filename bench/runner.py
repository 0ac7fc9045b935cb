"""The reference runner against transformers and llama.cpp, side by side on this machine.

    python bench/runner.py [--cache .cache] [--windows 5] [--new-tokens 128]

1. Perplexity, ctx 2048, the first ``--windows`` windows of WikiText-2 test and of the held-out
   C4 text (:mod:`heldout`: C4 documents no calibration in bench/ uses): wall time of the whole
   command, model load and tokenization included, each in its own child process:
   ``qconv run --ppl`` in its default mode (``--dtype auto``: bf16 GEMMs where the CPU has
   AMX/AVX512-BF16, float32 elsewhere) and in float32, against transformers' model class in
   float32 on the same token windows.
2. Decode tokens/s of ``qconv run --prompt`` against llama.cpp (llama-cpp-python) on the same
   weights as an f16 GGUF written by ``qconv convert``, greedy, ``--new-tokens`` tokens.

Prints a markdown table with the ratios and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model, measure  # noqa: E402
from heldout import heldout_text, shared_data  # noqa: E402

#: transformers' fp32 perplexity over qconv's token windows (the GPTQ protocol), in a child
_HF_PPL = """
import math, sys, torch, transformers
from qconv.api import _eval_ids
from qconv.checkpoint import open_model
from qconv.model.perplexity import windows
model_dir, text, ctx, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open_model(model_dir) as src:
    ids, _ = _eval_ids(src, text, "text", ctx, n)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
total = 0.0
with torch.inference_mode():
    for w in windows(ids, ctx, n):
        lp = model(w[None]).logits[0, :-1].float().log_softmax(-1)
        total -= lp.gather(-1, w[1:, None]).double().sum().item()
print(math.exp(total / (len(windows(ids, ctx, n)) * (ctx - 1))))
"""

#: llama.cpp's greedy decode speed on a GGUF, in a child
_LLAMA_DECODE = """
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]), verbose=False)
prompt = llm.tokenize(b"The history of the city begins")
n, t0 = 0, None
for tok in llm.generate(prompt, top_k=1, temp=0.0):
    if t0 is None:
        t0 = time.perf_counter()  # after the prompt's prefill and the first token
    n += 1
    if n > int(sys.argv[2]):
        break
print(json.dumps({"tokens_per_second": (n - 1) / (time.perf_counter() - t0)}))
"""


def cpu_name() -> str:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    kind = "AMX/AVX512-BF16" if "amx_bf16" in flags or "avx512_bf16" in flags else "AVX2 (no native bf16)"
    return f"{model}, {kind}, {torch.get_num_threads()} threads"


def ppl_row(model: Path, text: Path, windows: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, cmd in (("transformers f32", [sys.executable, "-c", _HF_PPL, str(model), str(text), "2048", str(windows)]),
                      ("qconv auto", [*QCONV, "run", str(model), "--ppl", str(text), "--max-windows", str(windows),
                                      "--dtype", "auto", "--json", "--quiet"]),
                      ("qconv f32", [*QCONV, "run", str(model), "--ppl", str(text), "--max-windows", str(windows),
                                     "--dtype", "f32", "--json", "--quiet"])):
        res = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        value = float(res) if name.startswith("transformers") else json.loads(res)["ppl"]
        out[f"{name} ppl"] = value
        out[f"{name} s"] = measure(cmd)["wall"]
    return out


def decode(model: Path, gguf: Path, tokens: int) -> dict[str, float]:
    import torch

    out = {}
    for dtype in ("auto", "f32"):
        res = subprocess.run([*QCONV, "run", str(model), "--prompt", "The history of the city begins", "-n", str(tokens),
                              "--temperature", "0", "--dtype", dtype, "--json", "--quiet"],
                             check=True, capture_output=True, text=True).stdout
        out[f"qconv {dtype}"] = json.loads(res)["tokens_per_second"]
    res = subprocess.run([sys.executable, "-c", _LLAMA_DECODE, str(gguf), str(tokens), str(torch.get_num_threads())],
                         check=True, capture_output=True, text=True).stdout
    out["llama.cpp f16"] = json.loads(res.strip().splitlines()[-1])["tokens_per_second"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    model = example_model(args.cache)
    gguf = args.cache / "SmolLM2-135M-Instruct.f16.gguf"
    if not gguf.exists():
        subprocess.run([*QCONV, "convert", str(model), "-o", str(gguf), "--type", "f16", "--quiet"], check=True)
    print(f"CPU: {cpu_name()}\n")
    print("| text | transformers f32 s | qconv auto s | qconv f32 s | speed-up auto | speed-up f32 "
          "| PPL transformers | PPL auto | PPL auto vs f32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, text in (("WikiText-2", shared_data() / "wikitext-2-raw-test.txt"), ("held-out C4", heldout_text())):
        r = ppl_row(model, text, args.windows)
        hf, auto, f32 = r["transformers f32 s"], r["qconv auto s"], r["qconv f32 s"]
        print(f"| {label} | {hf:.1f} | {auto:.1f} | {f32:.1f} | {hf / auto:.2f}x | {hf / f32:.2f}x "
              f"| {r['transformers f32 ppl']:.4f} | {r['qconv auto ppl']:.4f} "
              f"| {100 * (r['qconv auto ppl'] / r['qconv f32 ppl'] - 1):+.2f}% |")
    d = decode(model, gguf, args.new_tokens)
    print(f"\n| decode, {args.new_tokens} tokens, greedy | tokens/s | vs llama.cpp |\n|---|---|---|")
    for name, tps in d.items():
        print(f"| {name} | {tps:.1f} | {tps / d['llama.cpp f16']:.2f}x |")


if __name__ == "__main__":
    main()
