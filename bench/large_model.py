"""An 8B-shaped model on a 24 GB machine: peak memory and time of qconv's streaming paths.

    python bench/large_model.py [--dir .cache/llama3-8b-shaped] [--steps make rtn gguf gptq ppl]
                                [--gptq-layers 2] [--gptq-samples 16] [--ppl-windows 2]

A random checkpoint with Llama-3-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocabulary 128,256, untied head, bf16, 5 GB shards: 16 GB on disk, 32 GB as float32,
more than this machine's RAM) is written once (``make``; the example model's tokenizer, padded
with reserved special tokens to the vocabulary). Each measured command runs in its own child
process (wall time and peak RSS from a small parent, as ``/usr/bin/time`` reports them):

* ``rtn``: ``qconv quantize --method rtn --bits 4 --group-size 128`` (goal: peak RSS <= 4 GB);
* ``gguf``: ``qconv convert --type f16``, then q4_k_m from that f16 GGUF by qconv and by
  llama.cpp's ``llama_model_quantize`` (llama-cpp-python, 2 threads), side by side, with the
  per-tensor byte-identity verdict (goals: qconv <= 4 GB and <= 1.5x llama.cpp's time);
* ``gptq``: ``--dry-run`` of GPTQ W4 g128 at 128 x 2048 (the mode chosen for this machine and
  its estimate; goal <= 24 GB), then a measured GPTQ run at ``--gptq-samples`` x 2048 on a
  ``--gptq-layers``-layer checkpoint of the same widths (the peak is per layer), against the
  estimate at that count (goal: within 10%);
* ``ppl``: the runner's perplexity of the whole model on ``--ppl-windows`` windows of 512 tokens
  of WikiText-2, loaded (``--dtype auto``: the checkpoint's bf16 weights, since float32 would
  not fit) and with ``--stream-layers`` (one layer in memory): both must fit this machine, and
  the two perplexities agree (bf16 weights vs float32 layers: to bf16 round-off).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model, measure  # noqa: E402
from gguf_export import LLAMA_QUANTIZE, identical_tensors, tensor_digests  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                 tie_word_embeddings=False, hidden_act="silu", bos_token_id=0, eos_token_id=0)
Q4_K_M_FTYPE = 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M


def padded_tokenizer(base: Path, vocab: int) -> dict[str, bytes]:
    """``base``'s tokenizer files with reserved special tokens added up to ``vocab`` ids."""
    tok = json.loads((base / "tokenizer.json").read_text())
    used = len(tok["model"]["vocab"]) + sum(1 for t in tok["added_tokens"] if t["id"] >= len(tok["model"]["vocab"]))
    tok["added_tokens"] += [{"id": i, "content": f"<|reserved_special_token_{i}|>", "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                            for i in range(used, vocab)]
    return {"tokenizer.json": json.dumps(tok).encode(),
            "tokenizer_config.json": (base / "tokenizer_config.json").read_bytes()}


def make_checkpoint(out: Path, layers: int, tokenizer: dict[str, bytes]) -> Path:
    """A random bf16 checkpoint with Llama-3-8B's widths and ``layers`` layers (5 GB shards),
    written tensor by tensor with qconv's shard writer."""
    import torch

    from qconv.checkpoint.config import load_config
    from qconv.checkpoint.hf_writer import ShardWriter, write_config_and_tokenizer

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_config_and_tokenizer(tmp, {**LLAMA3_8B, "num_hidden_layers": layers}, torch.bfloat16, tokenizer)
    gen = torch.Generator().manual_seed(0)
    shards = ShardWriter(tmp, 5 * 10**9)
    for name, shape in load_config(tmp).expected_shapes().items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        shards.add(name, t.to(torch.bfloat16))
    shards.finish()
    tmp.rename(out)
    return out


def gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def dry_run(model: Path, samples: int) -> dict:
    out = subprocess.run([*QCONV, "quantize", str(model), "-o", "/tmp/unused", "--method", "gptq", "--bits", "4",
                          "--group-size", "128", "--data", str(SHARED / "c4-sample.jsonl"), "--samples", str(samples),
                          "--dry-run", "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["memory_plan"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(".cache/llama3-8b-shaped"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--steps", nargs="+", default=["make", "rtn", "gguf", "gptq", "ppl"])
    parser.add_argument("--gptq-layers", type=int, default=2)
    parser.add_argument("--gptq-samples", type=int, default=16)
    parser.add_argument("--ppl-windows", type=int, default=2)
    args = parser.parse_args()
    tokenizer = padded_tokenizer(example_model(args.cache), LLAMA3_8B["vocab_size"])
    model = make_checkpoint(args.dir, LLAMA3_8B["num_hidden_layers"], tokenizer)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"checkpoint {model}: {size / 1e9:.1f} GB bf16 in {len(list(model.glob('*.safetensors')))} shards\n")
    rows: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.dir.parent) as tmp:
        work = Path(tmp)
        if "rtn" in args.steps:
            m = measure([*QCONV, "quantize", str(model), "--method", "rtn", "--bits", "4", "--group-size", "128",
                         "-o", str(work / "rtn"), "--quiet"])
            rows.append(f"| RTN W4 g128 (`qconv quantize`) | {m['wall']:.0f} | {gb(m['rss_mb'])} | ≤ 4 GB |")
            shutil.rmtree(work / "rtn")
            print(rows[-1], flush=True)
        if "gguf" in args.steps:
            f16 = work / "f16.gguf"
            m = measure([*QCONV, "convert", str(model), "-o", str(f16), "--type", "f16", "--quiet"])
            rows.append(f"| f16 GGUF (`qconv convert`) | {m['wall']:.0f} | {gb(m['rss_mb'])} | |")
            print(rows[-1], flush=True)
            ours, theirs = work / "qconv-q4_k_m.gguf", work / "llama-q4_k_m.gguf"
            q = measure([*QCONV, "convert", str(f16), "-o", str(ours), "--type", "q4_k_m", "--quiet"])
            # the f16 file and both outputs need ~26 GB at once: compare by digests instead
            digests = tensor_digests(ours)
            ours.unlink()
            ref = measure([sys.executable, "-c", LLAMA_QUANTIZE, str(f16), str(theirs), str(Q4_K_M_FTYPE)])
            same, total = identical_tensors(digests, theirs)
            rows.append(f"| q4_k_m from the f16 GGUF, qconv | {q['wall']:.0f} | {gb(q['rss_mb'])} | ≤ 4 GB, "
                        f"≤ 1.5x llama.cpp: **{q['wall'] / ref['wall']:.2f}x**; identical tensors {same}/{total} |")
            rows.append(f"| q4_k_m from the f16 GGUF, llama.cpp `llama_model_quantize` (2 threads) | {ref['wall']:.0f} "
                        f"| {gb(ref['rss_mb'])} | |")
            print(*rows[-2:], sep="\n", flush=True)
            for p in (f16, theirs):
                p.unlink()
        if "gptq" in args.steps:
            full = dry_run(model, 128)
            rows.append(f"| GPTQ W4 g128, 128 x 2048, `--dry-run` on this machine: mode **{full['mode']}** | | "
                        f"{full['estimate']['total'] / 2**30:.2f} (estimate) | ≤ 24 GB; other modes: "
                        + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in full["alternatives"].items()) + " |")
            print(rows[-1], flush=True)
            small = make_checkpoint(args.dir.with_name(args.dir.name + f"-{args.gptq_layers}l"), args.gptq_layers,
                                    tokenizer)
            est = dry_run(small, args.gptq_samples)
            m = measure([*QCONV, "quantize", str(small), "-o", str(work / "gptq"), "--method", "gptq", "--bits", "4",
                         "--group-size", "128", "--data", str(SHARED / "c4-sample.jsonl"),
                         "--samples", str(args.gptq_samples), "--quiet"])
            ratio = m["rss_mb"] * 2**20 / est["estimate"]["total"]
            rows.append(f"| GPTQ W4 g128, {args.gptq_samples} x 2048, {args.gptq_layers} layers, mode {est['mode']} | "
                        f"{m['wall']:.0f} | {gb(m['rss_mb'])} (estimate {est['estimate']['total'] / 2**30:.2f}) | "
                        f"within 10%: measured / estimate = **{ratio:.3f}** |")
            print(rows[-1], flush=True)
        if "ppl" in args.steps:
            for how, extra in (("loaded (`--dtype auto`: bf16 weights)", []), ("`--stream-layers`", ["--stream-layers"])):
                result = work / "ppl.json"
                m = measure(["sh", "-c", '"$@" > ' + str(result), "sh", *QCONV, "run", str(model), "--ppl",
                             str(SHARED / "wikitext-2-raw-test.txt"), "--ctx", "512", "--max-windows",
                             str(args.ppl_windows), "--json", "--quiet", *extra])
                value = json.loads(result.read_text())["ppl"]
                rows.append(f"| runner perplexity, {args.ppl_windows} x 512 tokens, {how} | {m['wall']:.0f} | "
                            f"{gb(m['rss_mb'])} | fits 24 GB; PPL {value:.1f} (random weights) |")
                print(rows[-1], flush=True)
    print("\n| step | wall s | peak RSS GiB | goal / note |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
