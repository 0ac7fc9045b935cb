"""Compare qconv's GGUF-rebuilt tokenizer with transformers' GGUF tokenizer on a whole text file.

    python bench/check_gguf_tokenizer.py MODEL.gguf TEXT.txt

Prints whether the two id sequences are identical and, if not, where they first differ (with
the surrounding text and tokens). For byte-level vocabs whose llama.cpp pre-tokenizer splits
digits ("smollm", "starcoder", ...), it also builds the tokenizer HF model repos ship for them
(``Sequence[Digits(individual_digits=True), ByteLevel]``) from the same vocab and merges and
compares against that too: transformers' GGUF loader has no entry for those pre names and falls
back to plain GPT-2 splitting, so it is the odd one out when the results disagree.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gguf
from tokenizers import Tokenizer, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconv.checkpoint.gguf_vocab import PRE_TOKENIZERS, tokenizer_files_from_gguf  # noqa: E402

DIGIT_SPLIT_PRES = {name for name, spec in PRE_TOKENIZERS.items() if spec.regexes[0] == r"\p{N}"}


def transformers_tokenizer(path: Path):
    """transformers' GGUF loader, with llama.cpp's 0xFFFFFFFF "no token" ids dropped first
    (transformers indexes the vocab with them and crashes)."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf import reader

    original = reader.read_gguf_metadata

    def sanitized(gguf_path, string_arrays=()):
        metadata, names = original(gguf_path, tuple(string_arrays) + ("tokenizer.ggml.tokens",))
        n = len(metadata["tokenizer.ggml.tokens"])
        for key in [k for k in metadata if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")]:
            if not 0 <= metadata[key] < n:
                del metadata[key]
        return metadata, names

    reader.read_gguf_metadata = sanitized
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        reader.read_gguf_metadata = original


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def report(name_a: str, a, name_b: str, b, text: str, tok: Tokenizer) -> bool:
    """Print identical / first mismatch between two encodings of ``text``."""
    ids_a, ids_b = a.ids, b.ids
    i = first_mismatch(ids_a, ids_b)
    if i is None:
        print(f"  {name_a} vs {name_b}: IDENTICAL ({len(ids_a)} tokens)")
        return True
    print(f"  {name_a} vs {name_b}: MISMATCH at token {i} ({len(ids_a)} vs {len(ids_b)} tokens)")
    offsets = a.offsets if i < len(a.offsets) else b.offsets
    start = offsets[min(i, len(offsets) - 1)][0]
    print(f"    text around char {start}: {text[max(0, start - 40):start + 40]!r}")
    print(f"    {name_a}: {[tok.id_to_token(t) for t in ids_a[max(0, i - 3):i + 5]]}")
    print(f"    {name_b}: {[tok.id_to_token(t) for t in ids_b[max(0, i - 3):i + 5]]}")
    return False


def line_stats(name_a: str, encode_a, name_b: str, encode_b, text: str) -> None:
    """How widespread a mismatch is: encode line by line and count the lines that differ."""
    lines = [ln for ln in text.splitlines(keepends=True) if ln.strip()]
    bad = [ln for ln, x, y in zip(lines, encode_a(lines), encode_b(lines)) if x != y]
    print(f"    line by line, {name_a} vs {name_b}: {len(bad)} of {len(lines)} non-blank lines differ")
    for ln in bad[:3]:
        print(f"      e.g. {ln[:100]!r}")


class _Enc:
    """Just the ids and offsets of an encoding (transformers returns its own types)."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        self.ids, self.offsets = ids, offsets


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    model, text_path = Path(argv[1]), Path(argv[2])
    text = text_path.read_text(encoding="utf-8")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(model).fields.items()}
    pre = meta.get("tokenizer.ggml.pre")
    print(f"{model.name}: tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r} pre={pre!r}, "
          f"{len(meta['tokenizer.ggml.tokens'])} tokens; text {len(text)} chars")

    t0 = time.perf_counter()
    files = tokenizer_files_from_gguf(meta)
    ours = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    print(f"  qconv tokenizer built in {time.perf_counter() - t0:.2f}s")
    hf = transformers_tokenizer(model)

    t0 = time.perf_counter()
    enc_ours = ours.encode(text)
    t1 = time.perf_counter()
    hf_out = hf(text, return_offsets_mapping=True, verbose=False)
    t2 = time.perf_counter()
    print(f"  encode: qconv {t1 - t0:.2f}s, transformers {t2 - t1:.2f}s")
    enc_hf = _Enc(hf_out["input_ids"], hf_out["offset_mapping"])
    ok = report("qconv", enc_ours, "transformers-gguf", enc_hf, text, ours)

    def ours_batch(lines: list[str]) -> list[list[int]]:
        return [e.ids for e in ours.encode_batch(lines)]

    def hf_batch(lines: list[str]) -> list[list[int]]:
        return hf(lines, verbose=False)["input_ids"]

    if not ok:
        line_stats("qconv", ours_batch, "transformers-gguf", hf_batch, text)

    round_trip = ours.decode(enc_ours.ids, skip_special_tokens=True) == text
    print(f"  qconv decode(encode(text)) == text: {round_trip}")

    if pre in DIGIT_SPLIT_PRES:
        # The pipeline SmolLM2 / StarCoder ship in their tokenizer.json, on the same vocab/merges.
        data = json.loads(files["tokenizer.json"])
        data["pre_tokenizer"] = json.loads(
            pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            ).__getstate__()
        )
        reference = Tokenizer.from_str(json.dumps(data))
        enc_ref = reference.encode(text)
        report("qconv", enc_ours, "HF Digits+ByteLevel", enc_ref, text, ours)
        if not report("transformers-gguf", enc_hf, "HF Digits+ByteLevel", enc_ref, text, ours):
            line_stats("transformers-gguf", hf_batch, "HF Digits+ByteLevel",
                       lambda lines: [e.ids for e in reference.encode_batch(lines)], text)
        probes = ["x² + y³ = ½", "Ⅻ ⅔ ٣٤٥ ①②", "in 1999, 2024 and 3.14159", "abc123def 007"]
        print("  digit probes (qconv / transformers-gguf / HF Digits+ByteLevel):")
        for p in probes:
            toks = [
                [ours.id_to_token(i) for i in ids]
                for ids in (ours.encode(p).ids, hf(p)["input_ids"], reference.encode(p).ids)
            ]
            same = "same" if toks[0] == toks[1] == toks[2] else ("qconv==HF" if toks[0] == toks[2] else "DIFF")
            print(f"    {p!r}: {same}\n      {toks[0]}\n      {toks[1]}\n      {toks[2]}")
    return 0 if ok and round_trip else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
