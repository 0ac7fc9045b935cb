"""GGUF export on the example model, side by side with llama.cpp's own quantizer.

    python bench/gguf_export.py [--cache .cache] [--types q8_0,q4_k_m,q6_k] [--chunks 100] [--repeat 1]
                                [--synthetic-gb 2 [--synthetic-dtype bf16] [--synthetic-types q8_0,q4_k_m]]

For each type: wall time and peak RSS of ``qconv convert HF -> TYPE.gguf`` and of
``llama_model_quantize`` (llama-cpp-python) from qconv's f32 GGUF of the same weights, each in
its own child process (with ``--repeat N``, the fastest of N interleaved runs per side); the
ratio; the per-tensor byte-identity verdict; and llama.cpp's perplexity of both files
(llama-perplexity's protocol: ctx 512, BOS at each chunk start, the second half of each chunk
scored) on the WikiText-2 test text.

``--synthetic-gb N`` adds the streaming-memory check: a random Llama-shaped checkpoint of about
N GB (Llama-3.2-1B's widths, as many layers as the size asks for) is written to a temp dir and
qconv's peak RSS converting it is reported against the input size and the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model, measure  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


#: Llama-3.2-1B's widths (untied embeddings here); the vocabulary is the example model's tokenizer.
SYNTHETIC_WIDTHS = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, tie_word_embeddings=False)


def fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    """Best of repeated measurements: the shortest wall time (other load only ever adds to it)
    and the largest peak RSS."""
    return {"wall": min(r["wall"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs)}


def tensor_digests(path: Path) -> dict[str, tuple[str, str]]:
    """Each tensor's type and SHA-256 of its bytes (so a file can be compared after it is gone)."""
    import hashlib

    import gguf
    import numpy as np

    return {t.name: (t.tensor_type.name, hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest())
            for t in gguf.GGUFReader(str(path)).tensors}


def identical_tensors(a: Path | dict[str, tuple[str, str]], b: Path) -> tuple[int, int]:
    """(tensors of ``a`` whose type and bytes equal ``b``'s, tensors of ``a``); ``a`` may be the
    :func:`tensor_digests` of a file already deleted."""
    ta = a if isinstance(a, dict) else tensor_digests(a)
    tb = tensor_digests(b)
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


def synthetic_model(base: Path, out: Path, gigabytes: float, dtype: str) -> Path:
    """A random Llama-shaped HF checkpoint of about ``gigabytes`` GB in ``dtype`` at ``out``, with
    ``base``'s tokenizer: written tensor by tensor with qconv's own shard writer (1 GB shards)."""
    import torch

    from qconv.checkpoint.config import load_config
    from qconv.checkpoint.hf_writer import ShardWriter, parse_dtype, write_config_and_tokenizer
    from qconv.checkpoint.tokenizer import read_tokenizer_files

    cfg = {**json.loads((base / "config.json").read_text()), **SYNTHETIC_WIDTHS}
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    qkv_rows = cfg["head_dim"] * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = h * qkv_rows + cfg["num_attention_heads"] * cfg["head_dim"] * h + 3 * h * inter + 2 * h
    torch_dtype = parse_dtype(dtype)
    elements = gigabytes * 1e9 / torch.empty(0, dtype=torch_dtype).element_size()
    cfg["num_hidden_layers"] = max(1, round((elements - 2 * vocab * h - h) / per_layer))
    out.mkdir()
    write_config_and_tokenizer(out, cfg, torch_dtype, read_tokenizer_files(base))
    gen = torch.Generator().manual_seed(0)
    shards = ShardWriter(out, 10**9)
    for name, shape in load_config(out).expected_shapes().items():
        shards.add(name, (torch.randn(shape, generator=gen) * 0.02).to(torch_dtype))
    shards.finish()
    return out


def synthetic_table(base: Path, gigabytes: float, dtype: str, types: list[str]) -> None:
    """qconv's wall time and peak RSS converting a ~``gigabytes`` GB checkpoint, against its size."""
    from qconv.checkpoint.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        model = synthetic_model(base, Path(tmp) / "synthetic", gigabytes, dtype)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        config = load_config(model)
        name, shape = max(config.expected_shapes().items(), key=lambda kv: math.prod(kv[1]))
        stored = math.prod(shape) * {"f32": 4, "f16": 2, "bf16": 2}[dtype]
        print(f"\nSynthetic {dtype} checkpoint: {config.num_layers} layers of hidden {config.hidden_size}, {size / 2**20:,.0f} MiB; "
              f"largest tensor {name} {list(shape)}: {stored / 2**20:,.0f} MiB stored, "
              f"{math.prod(shape) * 4 / 2**20:,.0f} MiB as float32\n")
        print("| type | qconv s | qconv peak RSS MiB | input MiB | RSS / input |")
        print("|---|---|---|---|---|")
        for t in types:
            out = Path(tmp) / f"synthetic-{t}.gguf"
            q = measure([*QCONV, "convert", str(model), "-o", str(out), "--type", t, "--quiet"])
            out.unlink()
            print(f"| {t} | {q['wall']:.2f} | {q['rss_mb']:,.0f} | {size / 2**20:,.0f} | {q['rss_mb'] * 2**20 / size:.2f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--types", default="q8_0,q4_k_m,q6_k")
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per side; the fastest is reported")
    parser.add_argument("--text", type=Path, default=SHARED / "wikitext-2-raw-test.txt")
    parser.add_argument("--synthetic-gb", type=float, default=0.0,
                        help="also convert a random Llama-shaped checkpoint of this many GB and report peak RSS")
    parser.add_argument("--synthetic-dtype", default="bf16", help="f32, f16 or bf16")
    parser.add_argument("--synthetic-types", default="q8_0,q4_k_m")
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
            pairs = [(measure([*QCONV, "convert", str(hf), "-o", str(ours), "--type", t, "--quiet", "--force"]),
                      measure([sys.executable, "-c", LLAMA_QUANTIZE, str(base), str(ref), str(int(file_type(t).ftype))]))
                     for _ in range(args.repeat)]  # interleaved, so both sides see the same load
            q, r = fastest([a for a, _ in pairs]), fastest([b for _, b in pairs])
            same, total = identical_tensors(ours, ref)
            scored = text and args.chunks > 0  # --chunks 0: timing and bytes only
            ppl_q = llama_cpp_perplexity(ours, text, 512, args.chunks) if scored else float("nan")
            ppl_r = llama_cpp_perplexity(ref, text, 512, args.chunks) if scored else float("nan")
            rows.append((t, q, r, same, total, ours.stat().st_size, ppl_q, ppl_r))
    print("| type | qconv s | llama.cpp s | ratio | qconv RSS MB | llama.cpp RSS MB | identical tensors | size B | PPL qconv file | PPL llama.cpp file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, q, r, same, total, size, pq, pr in rows:
        print(f"| {t} | {q['wall']:.2f} | {r['wall']:.2f} | {q['wall'] / r['wall']:.2f}x | {q['rss_mb']:.0f} | "
              f"{r['rss_mb']:.0f} | {same}/{total} | {size:,} | {pq:.3f} | {pr:.3f} |")
    print("\nqconv times include Python start-up and reading the HF f32 checkpoint; llama.cpp reads the f32 GGUF.")
    if args.synthetic_gb > 0:
        synthetic_table(hf, args.synthetic_gb, args.synthetic_dtype, args.synthetic_types.split(","))


if __name__ == "__main__":
    main()
