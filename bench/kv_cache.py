"""Quantized KV caches on the example model: quality, memory and decode speed, plus llama.cpp's own.

    python bench/kv_cache.py [--cache .cache] [--ctx 2048 4096] [--windows 4 2] [--decode-tokens 32]

For each cache (fp, int8, KIVI-4 and KIVI-2 at two group/residual settings and with one 16-bit
attention-sink token (``-s1``); ``--configs`` adds
e.g. ``kivi8-g32-r128``) it reports, on wikitext-2 test under the GPTQ protocol, the perplexity
generation would see (windows go through the cache in chunks that are exactly equivalent to
token-by-token decoding), its change against the fp cache, and the KV bytes held at the end of
a window against an fp16 cache.

Decode speed is measured after a ``--decode-ctx``-token prompt as the median step time over two
passes in opposite orders, on ``--decode-threads`` threads (default 1: on a shared 2-core
machine a 2-thread pool stalls whenever another process holds a core, which swamps the
differences being measured). The same passes give how closely greedy decoding follows the fp
cache's: the identical prefix when decoding freely, and the top-1 agreement when fed the fp
run's tokens (one early near-tie would otherwise decide the first number alone).

The llama.cpp anchor evaluates the same token windows with llama-cpp-python on an f16 GGUF
(written by ``qconv convert``) with f16, q8_0 and q4_0 K/V caches (flash attention on, as a
quantized V cache requires). Prints markdown tables; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import example_model  # noqa: E402

from qconv.checkpoint import open_model  # noqa: E402
from qconv.model.decoder import Transformer, load_model  # noqa: E402
from qconv.model.kv_spec import KVCacheSpec  # noqa: E402
from qconv.model.perplexity import PREFILL_CHUNK, perplexity, windows  # noqa: E402
from qconv.textdata import load_text  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = ("fp", "int8", "kivi4-g32-r128", "kivi4-g32-r32", "kivi4-g32-r128-s1", "kivi2-g32-r128", "kivi2-g32-r32",
           "kivi2-g32-r128-s1")
#: GGML KV cache types: (type id, bytes per block of 32 values); f16 is 2 bytes a value.
LLAMA_CPP_KV = {"f16": (1, 64), "q8_0": (8, 34), "q4_0": (2, 18)}


def parse_config(name: str) -> KVCacheSpec:
    """``fp``, ``int8`` or ``kivi{bits}-g{group}-r{residual}[-s{sink}]``."""
    if not name.startswith("kivi"):
        return KVCacheSpec.from_options(name)
    bits, group, residual, *sink = name[4:].split("-")
    return KVCacheSpec.from_options("kivi", int(bits), int(group[1:]), int(residual[1:]),
                                    int(sink[0][1:]) if sink else None)


def ppl_rows(model: Transformer, ids: list[int], ctxs: list[int], n_windows: list[int],
             configs: list[str]) -> list[dict]:
    rows = []
    for ctx, nw in zip(ctxs, n_windows):
        base = None
        for name in configs:
            t0 = time.perf_counter()
            r = perplexity(model, ids, ctx=ctx, max_windows=nw, kv_cache=parse_config(name))
            base = r.ppl if name == "fp" else base
            rows.append({"config": name, "ctx": ctx, "windows": r.n_windows, "ppl": r.ppl,
                         "delta": None if base is None else 100 * (r.ppl / base - 1), "kv": r.kv_cache,
                         "seconds": time.perf_counter() - t0})
            print(f"  ppl {name} ctx {ctx}: {r.ppl:.4f} ({rows[-1]['seconds']:.0f}s)", file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def decode_run(
    model: Transformer, prompt: list[int], n: int, spec: KVCacheSpec, follow: list[int] | None = None
) -> tuple[list[int], list[float]]:
    """Greedy-decode ``n`` steps after ``prompt`` through a fresh cache; returns each step's
    argmax and step time. With ``follow`` the model is fed those tokens instead of its own
    (teacher forcing), so its argmax can be compared step by step with the run that made them."""
    device = model.device
    cache = spec.make(model.config, 1, len(prompt) + n, device, model.dtype)
    x = torch.tensor([prompt], device=device)
    for a in range(0, len(prompt), PREFILL_CHUNK):
        logits = model(x[:, a: a + PREFILL_CHUNK], cache, a)
    argmax, times = [], []
    for i in range(n):
        argmax.append(int(logits[0, -1].argmax()))  # .item() waits for the GPU: the step ends here
        fed = argmax[-1] if follow is None else follow[i]
        t0 = time.perf_counter()
        logits = model(torch.tensor([[fed]], device=device), cache, len(prompt) + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return argmax, times


def decode_rows(model: Transformer, prompt: list[int], n: int, configs: list[str], threads: int) -> list[dict]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _decode_rows(model, prompt, n, configs)
    finally:
        torch.set_num_threads(saved)


def _decode_rows(model: Transformer, prompt: list[int], n: int, configs: list[str]) -> list[dict]:
    """Pass 1 decodes freely (first divergence from fp's greedy text); pass 2, in reverse order,
    follows fp's tokens (top-1 agreement per step, immune to one early near-tie). Step times
    of both passes count: the work per step is the same."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    free: dict[str, list[int]] = {}
    forced: dict[str, list[int]] = {}
    for name in configs:
        free[name], ts = decode_run(model, prompt, n, parse_config(name))
        times[name] += ts[1:]  # the first step after prefill pays for allocator warm-up
        print(f"  decode {name}: {1 / statistics.median(ts):.1f} tok/s", file=sys.stderr, flush=True)
    for name in configs[::-1]:
        forced[name], ts = decode_run(model, prompt, n, parse_config(name), follow=free["fp"])
        times[name] += ts[1:]
        print(f"  decode {name} (teacher-forced): {1 / statistics.median(ts):.1f} tok/s", file=sys.stderr, flush=True)
    fp_rate = 1 / statistics.median(times["fp"])
    rows = []
    for name in configs:
        rate = 1 / statistics.median(times[name])
        diverge = next((i for i, (a, b) in enumerate(zip(free[name], free["fp"])) if a != b), n)
        agree = sum(a == b for a, b in zip(forced[name], free["fp"]))
        rows.append({"config": name, "tok_s": rate, "vs_fp": rate / fp_rate, "greedy_prefix": diverge,
                     "agree": agree, "n": n})
    return rows


def llama_cpp_rows(gguf: Path, ids: list[int], ctxs: list[int], n_windows: list[int], threads: int) -> list[dict]:
    import llama_cpp
    import numpy as np

    rows = []
    for ctx, nw in zip(ctxs, n_windows):
        base = None
        for name, (type_id, block_bytes) in LLAMA_CPP_KV.items():
            llm = llama_cpp.Llama(str(gguf), n_ctx=ctx, n_batch=512, logits_all=True, type_k=type_id,
                                  type_v=type_id, flash_attn=True, n_threads=threads, verbose=False)
            nll = 0.0
            chunks = windows(ids, ctx, nw)
            for window in chunks.tolist():
                llm.reset()
                llm.eval(window)
                logits = np.asarray(llm.scores[: ctx - 1], dtype=np.float64)
                top = logits.max(-1)
                lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
                nll += float((lse - logits[np.arange(ctx - 1), window[1:]]).sum())
            del llm
            ppl = math.exp(nll / (len(chunks) * (ctx - 1)))
            base = ppl if name == "f16" else base
            rows.append({"config": name, "ctx": ctx, "windows": len(chunks), "ppl": ppl,
                         "delta": 100 * (ppl / base - 1), "ratio": block_bytes / 64})
            print(f"  llama.cpp {name} ctx {ctx}: {ppl:.4f}", file=sys.stderr, flush=True)
    return rows


def print_tables(ppl: list[dict], decode: list[dict], anchor: list[dict], decode_ctx: int, threads: int,
                 where: str) -> None:
    if ppl:
        print(f"\n### qconv runner (fp32 compute, {where}), wikitext-2 test\n")
        print("| KV cache | ctx | windows | PPL | Δ PPL vs fp | KV bytes held | vs fp16 cache |")
        print("|---|---|---|---|---|---|---|")
    for r in ppl:
        kv = r["kv"]
        print(f"| {r['config']} | {r['ctx']} | {r['windows']} | {r['ppl']:.4f} | {r['delta']:+.3f}% "
              f"| {kv['bytes'] / 2**20:.2f} MiB | {kv['ratio']:.3f}x |")
    if decode:
        on = f"CPU, {threads} thread(s)" if where == "CPU" else where
        print(f"\n### Decode after a {decode_ctx}-token prompt ({on}, median step time)\n")
        print("| KV cache | tok/s | vs fp | free greedy: identical prefix | top-1 = fp on fp's path |")
        print("|---|---|---|---|---|")
    for r in decode:
        print(f"| {r['config']} | {r['tok_s']:.2f} | {r['vs_fp']:.2f}x | {r['greedy_prefix']}/{r['n']} "
              f"| {r['agree']}/{r['n']} |")
    if anchor:
        print("\n### llama.cpp anchor (llama-cpp-python, f16 GGUF from qconv convert, flash attention)\n")
        print("| KV type | ctx | windows | PPL | Δ PPL vs f16 KV | vs fp16 cache |")
        print("|---|---|---|---|---|---|")
        for r in anchor:
            print(f"| {r['config']} | {r['ctx']} | {r['windows']} | {r['ppl']:.4f} | {r['delta']:+.3f}% "
                  f"| {r['ratio']:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--text", type=Path, default=DATA / "wikitext-2-raw-test.txt")
    parser.add_argument("--ctx", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 2], help="max windows, one per --ctx")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--decode-ctx", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32, help="0 skips the decode measurement")
    parser.add_argument("--decode-threads", type=int, default=1)
    parser.add_argument("--gguf", type=Path, default=None, help="f16 GGUF for llama.cpp (default: convert one)")
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity table")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the runner's device; llama.cpp stays on CPU)")
    args = parser.parse_args()
    if len(args.windows) != len(args.ctx):
        parser.error("give one --windows value per --ctx")
    configs = ["fp", *[c for c in args.configs if c != "fp"]]
    for name in configs:
        parse_config(name)  # fail on a bad name before any work
    hf_dir = example_model(args.cache)
    with open_model(hf_dir) as source:
        ids = source.tokenizer().encode(load_text(args.text, "text"))
        model = load_model(source, args.device)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU"
    print(f"{len(ids)} tokens; {where}; torch threads {threads}", file=sys.stderr, flush=True)
    ppl = [] if args.no_ppl else ppl_rows(model, ids, args.ctx, args.windows, configs)
    decode = []
    if args.decode_tokens > 0:
        decode = decode_rows(model, ids[: args.decode_ctx], args.decode_tokens, configs, args.decode_threads)
    anchor = []
    if not args.no_llama_cpp:
        gguf = args.gguf or args.cache / "SmolLM2-135M-Instruct.F16.gguf"
        if not gguf.is_file():
            from qconv import api

            api.convert(hf_dir, gguf, gguf_type="f16")
        anchor = llama_cpp_rows(gguf, ids, args.ctx, args.windows, threads)
    print_tables(ppl, decode, anchor, args.decode_ctx, args.decode_threads, where)


if __name__ == "__main__":
    main()
