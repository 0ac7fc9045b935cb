"""Check qconv's GGUF tokenizer export against the HF tokenizer it came from, with llama.cpp.

    python bench/check_gguf_tokenizer_export.py HF_DIR TEXT.txt [REFERENCE.gguf] [--tokenizer-pre NAME]

Builds the ``tokenizer.*`` GGUF keys from HF_DIR's tokenizer files
(qconv.formats.gguf_tokenizer), writes them into a vocab-only GGUF, loads that with llama.cpp
(llama-cpp-python) and tokenizes the whole of TEXT.txt, comparing with `tokenizers` on HF_DIR's
``tokenizer.json``. With REFERENCE.gguf (e.g. the model as llama.cpp's own converter wrote it)
llama.cpp on that file is compared too. Prints llama.cpp's load warnings, whether the id
sequences are identical and, if not, where they first differ. Exit status 0 when all agree.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconv.checkpoint.tokenizer import read_tokenizer_files  # noqa: E402
from qconv.formats.gguf_tokenizer import gguf_tokenizer_metadata  # noqa: E402

#: ggml.h's ggml_log_level values for warnings and errors, and "continues the previous line".
_WARN, _ERROR, _CONT = 3, 4, 5


def load_llama(path: Path) -> tuple[llama_cpp.Llama, list[str]]:
    """llama.cpp's vocab for ``path`` and the warnings it logged while loading the file."""
    records: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level == _CONT and records:
            level = records[-1][0]
        records.append((level, text.decode("utf-8", "replace")))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    finally:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    # "llama_context:" lines are about the context llama-cpp-python creates, not the file.
    warnings = [t.strip() for lvl, t in records if lvl in (_WARN, _ERROR) and not t.startswith("llama_context:")]
    return llm, warnings


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def report(name_a: str, a: list[int], name_b: str, b: list[int], hf: Tokenizer) -> bool:
    i = first_mismatch(a, b)
    if i is None:
        print(f"  {name_a} == {name_b}: identical ({len(a)} ids)")
        return True
    lo, hi = max(0, i - 5), i + 6
    print(f"  {name_a} != {name_b}: first mismatch at token {i} of {len(a)} / {len(b)}")
    print(f"    {name_a}: {a[lo:hi]} {hf.decode(a[lo:hi], skip_special_tokens=False)!r}")
    print(f"    {name_b}: {b[lo:hi]} {hf.decode(b[lo:hi], skip_special_tokens=False)!r}")
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("text", type=Path)
    ap.add_argument("reference", type=Path, nargs="?")
    ap.add_argument("--tokenizer-pre", default=None)
    args = ap.parse_args()

    files = read_tokenizer_files(args.hf_dir)
    hf = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    config_path = args.hf_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    vocab_size = int(config.get("vocab_size") or hf.get_vocab_size(with_added_tokens=True))
    meta = gguf_tokenizer_metadata(files, vocab_size, args.tokenizer_pre)
    print(
        f"{args.hf_dir}: model={meta['tokenizer.ggml.model'][0]} pre={meta['tokenizer.ggml.pre'][0]} "
        f"tokens={len(meta['tokenizer.ggml.tokens'][0])} add_bos={meta['tokenizer.ggml.add_bos_token'][0]}"
    )

    text = args.text.read_text(encoding="utf-8")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        for key, (value, vtype) in meta.items():
            w.add_key_value(key, value, vtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        llm, warnings = load_llama(path)
    print(f"llama.cpp load warnings: {warnings or 'none'}")
    ok &= not warnings

    t0 = time.perf_counter()
    want = hf.encode(text, add_special_tokens=False).ids
    t1 = time.perf_counter()
    got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    t2 = time.perf_counter()
    print(f"{args.text.name}: {len(text)} chars; tokenizers {t1 - t0:.2f}s, llama.cpp {t2 - t1:.2f}s")
    ok &= report("llama.cpp(export)", got, "tokenizers", want, hf)

    first_line = next((line for line in text.splitlines() if line.strip()), "x")
    with_special = llm.tokenize(first_line.encode("utf-8"), add_bos=True, special=True)
    ok &= report("llama.cpp(export, add_special)", with_special, "tokenizers(add_special_tokens)",
                 hf.encode(first_line, add_special_tokens=True).ids, hf)

    if args.reference:
        ref, ref_warnings = load_llama(args.reference)
        print(f"{args.reference.name} load warnings: {ref_warnings or 'none'}")
        ok &= report("llama.cpp(export)", got, f"llama.cpp({args.reference.name})",
                     ref.tokenize(text.encode("utf-8"), add_bos=False, special=True), hf)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
