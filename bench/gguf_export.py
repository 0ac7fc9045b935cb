"""GGUF export on the example model, side by side with llama.cpp's own quantizer.

    python bench/gguf_export.py [--cache .cache] [--types q8_0,q4_k_m,q6_k] [--chunks 100]

For each type: wall time and peak RSS of ``qconv convert HF -> TYPE.gguf`` and of
``llama_model_quantize`` (llama-cpp-python) from qconv's f32 GGUF of the same weights, each in
its own child process; the ratio; the per-tensor byte-identity verdict; and llama.cpp's
perplexity of both files (llama-perplexity's protocol: ctx 512, BOS at each chunk start, the
second half of each chunk scored) on the WikiText-2 test text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# Runs a command in a child and reports that child's own wall time and peak RSS.
MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(json.dumps({"wall": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def measure(cmd: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    import gguf
    import numpy as np

    def load(p: Path) -> dict[str, tuple[str, bytes]]:
        return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(p)).tensors}

    ta, tb = load(a), load(b)
    return sum(ta[n] == tb.get(n) for n in ta), len(ta)


def llama_cpp_perplexity(path: Path, text: str, n_ctx: int, chunks: int) -> float:
    """llama-perplexity's number: each chunk starts with BOS, second half scored."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(text.encode(), add_bos=True)
    n_chunks = min(chunks, len(tokens) // n_ctx)
    nll, count = 0.0, 0
    first = n_ctx // 2
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        nll -= logp[np.arange(len(logp)), chunk[first + 1:n_ctx]].sum()
        count += len(logp)
    return float(np.exp(nll / count))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--types", default="q8_0,q4_k_m,q6_k")
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--text", type=Path, default=SHARED / "wikitext-2-raw-test.txt")
    args = parser.parse_args()
    from qconv.formats.gguf_types import file_type

    hf = example_model(args.cache)
    text = args.text.read_text(encoding="utf-8") if args.text.is_file() else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "f32.gguf"
        subprocess.run([*QCONV, "convert", str(hf), "-o", str(base), "--type", "f32", "--quiet"], check=True)
        for t in args.types.split(","):
            ours, ref = Path(tmp) / f"qconv-{t}.gguf", Path(tmp) / f"llama-{t}.gguf"
            q = measure([*QCONV, "convert", str(hf), "-o", str(ours), "--type", t, "--quiet"])
            r = measure([sys.executable, "-c", LLAMA_QUANTIZE, str(base), str(ref), str(int(file_type(t).ftype))])
            same, total = identical_tensors(ours, ref)
            ppl_q = llama_cpp_perplexity(ours, text, 512, args.chunks) if text else float("nan")
            ppl_r = llama_cpp_perplexity(ref, text, 512, args.chunks) if text else float("nan")
            rows.append((t, q, r, same, total, ours.stat().st_size, ppl_q, ppl_r))
    print("| type | qconv s | llama.cpp s | ratio | qconv RSS MB | llama.cpp RSS MB | identical tensors | size B | PPL qconv file | PPL llama.cpp file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, q, r, same, total, size, pq, pr in rows:
        print(f"| {t} | {q['wall']:.2f} | {r['wall']:.2f} | {q['wall'] / r['wall']:.2f}x | {q['rss_mb']:.0f} | "
              f"{r['rss_mb']:.0f} | {same}/{total} | {size:,} | {pq:.3f} | {pr:.3f} |")
    print("\nqconv times include Python start-up and reading the HF f32 checkpoint; llama.cpp reads the f32 GGUF.")


if __name__ == "__main__":
    main()
