"""HF tokenizer files -> GGUF tokenizer metadata (qconv.formats.gguf_tokenizer), with llama.cpp as the oracle.

Each case writes a tiny 1-layer llama GGUF carrying the exported tokenizer keys, loads it with
llama-cpp-python (``vocab_only``) while capturing llama.cpp's log, and requires

* no warning at load (in particular no "missing pre-tokenizer" / "GENERATION QUALITY WILL BE
  DEGRADED", which is what a wrong or absent ``tokenizer.ggml.pre`` gets), and
* llama.cpp's ids == the source ``tokenizer.json``'s ids (`tokenizers`) on ~4 KB of wikitext and on
  strings with CJK, emoji, accents, digit runs, whitespace runs, newlines, leading spaces and
  special / added tokens; with and without BOS, with and without special-token parsing.

Byte-level cases use small BPEs trained here under SmolLM2's, GPT-2's and Llama-3's
pre-tokenizers; the SentencePiece case uses the tokenizer qconv's GGUF importer rebuilds from
stories260K.gguf, and must also tokenize exactly like llama.cpp on the original file.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from qconv.checkpoint.gguf_vocab import PRE_TOKENIZERS, tokenizer_files_from_gguf
from qconv.errors import MissingTokenizer, CheckpointMismatch, UnsupportedModel
from qconv.formats.gguf_tokenizer import detect_pre_tokenizer, gguf_tokenizer_metadata

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = DATA / "wikitext-2-raw-test.txt"
STORIES = DATA / "stories260K.gguf"

#: Meta's Llama-3 split regex as HF repos ship it (with an inline case-insensitive group).
LLAMA3_HF_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_HF_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "\n newline first",
    "\tTab first",
    "The year 2024 had 365 days; pi is 3.14159 and 1,000,000 is a million.",
    "digit runs 1 12 123 1234 12345 1234567890 and ٣٤٥ ½ x² Ⅻ 007",
    "I'm sure you'll see THEY'RE right, isn't it? We'd've gone.",
    "tabs\there\t\tand  double  spaces   and trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows\n",
    "Café crème brûlée, naïve façade, Ångström, Über",
    "日本語のテキストと中文字符，한국어도",
    "emoji 😀🎉👍🏽 flags 🇫🇷 family 👨\u200d👩\u200d👧 zero\u200bwidth",
    "symbols <>&|~^$+= @-@ [brackets] {braces} (parens) #tag %50 ------=======",
    "a\u00a0non-breaking space",
    "x",
    "",
    "    ",
    "\n\n",
]

#: Fallback training text when the shared wikitext file is absent.
_CORPUS_FALLBACK = "\n".join(TEXTS * 20) + "\n" + "the quick brown fox jumps over the lazy dog 0123456789\n" * 50


def _wikitext(n_chars: int) -> str | None:
    return WIKITEXT.read_text(encoding="utf-8")[:n_chars] if WIKITEXT.is_file() else None


def _corpus() -> list[str]:
    text = _wikitext(300_000) or _CORPUS_FALLBACK
    return text.splitlines(keepends=True) + TEXTS


# --- tokenizers under test -------------------------------------------------------------------

GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
USER_TOKEN = "[[qconv]]"  # a non-special added token: USER_DEFINED in the GGUF

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _train(pre: pre_tokenizers.PreTokenizer, specials: list[str], vocab_size: int = 1500) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_tokens([USER_TOKEN])
    return tok


def _files(tok: Tokenizer, config: dict, ignore_merges: bool = False) -> dict[str, bytes]:
    data = json.loads(tok.to_str())
    if ignore_merges:
        data["model"]["ignore_merges"] = True
    return {
        "tokenizer.json": json.dumps(data).encode(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}).encode(),
    }


def _chatml_config() -> dict:
    return {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
            "add_bos_token": False, "chat_template": CHAT_TEMPLATE}


@pytest.fixture(scope="module")
def byte_level_bpe() -> Tokenizer:
    """A BPE trained under GPT-2's split, so its merges join digits (" 2024" -> "Ġ20", "24")."""
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), GPT2_SPECIALS)


@pytest.fixture(scope="module")
def smollm_files(byte_level_bpe: Tokenizer) -> dict[str, bytes]:
    """SmolLM2's pre-tokenizer (every digit alone, then GPT-2's ByteLevel split) over a vocab with
    digit merges, so exporting it under the wrong name ("gpt-2") changes the ids."""
    tok = Tokenizer.from_str(byte_level_bpe.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return _files(tok, _chatml_config())


@pytest.fixture(scope="module")
def gpt2_files(byte_level_bpe: Tokenizer) -> dict[str, bytes]:
    return _files(byte_level_bpe, _chatml_config())


@pytest.fixture(scope="module")
def llama3_files() -> dict[str, bytes]:
    """Llama-3's layout: one Split regex, ByteLevel without its own regex, ignore_merges, and BOS
    added by the post-processor (tokenizer_config says nothing about add_bos_token)."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_HF_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = _train(pre, LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        ),
    ])
    files = _files(tok, {"bos_token": bos, "eos_token": "<|eot_id|>"}, ignore_merges=True)
    files["generation_config.json"] = json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}).encode()
    return files


# --- llama.cpp harness -----------------------------------------------------------------------


@contextmanager
def _llama_log() -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's log lines (level, text) instead of printing them."""
    records: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_CONT and records:  # continuation: same level as the line before
            level = records[-1][0]
        records.append((level, text.decode("utf-8", "replace")))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield records
    finally:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


#: ggml.h's ggml_log_level (llama-cpp-python's _logger.py still documents an older numbering).
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5


def _write_gguf(path: Path, meta: dict, n_vocab: int) -> Path:
    """A 1-layer llama GGUF with tiny random F32 weights and the given tokenizer metadata."""
    n_embd, n_ff, n_head = 8, 16, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(1)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, (value, vtype) in meta.items():
        w.add_key_value(key, value, vtype)
    shapes = {
        "token_embd.weight": (n_vocab, n_embd),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_vocab, n_embd),
        "blk.0.attn_norm.weight": (n_embd,),
        "blk.0.attn_q.weight": (n_embd, n_embd),
        "blk.0.attn_k.weight": (n_embd, n_embd),
        "blk.0.attn_v.weight": (n_embd, n_embd),
        "blk.0.attn_output.weight": (n_embd, n_embd),
        "blk.0.ffn_norm.weight": (n_embd,),
        "blk.0.ffn_gate.weight": (n_ff, n_embd),
        "blk.0.ffn_up.weight": (n_ff, n_embd),
        "blk.0.ffn_down.weight": (n_embd, n_ff),
    }
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load(path: Path):
    """llama.cpp's tokenizer for ``path`` and the warnings it printed while loading."""
    with _llama_log() as records:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    log = "".join(text for _, text in records)
    assert "llama_model_loader" in log, "captured no llama.cpp log at all"
    # llama-cpp-python also makes a context, which with vocab_only has no trained context length
    # to compare n_ctx with and says so; that is about the harness, not the file.
    warnings = [
        text.strip()
        for level, text in records
        if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR) and not text.startswith("llama_context:")
    ]
    # Independent of the level numbering: the messages a missing or unknown pre name produces.
    warnings += [m for m in ("GENERATION QUALITY WILL BE DEGRADED", "missing pre-tokenizer") if m in log]
    return llm, warnings


def _export(files: dict[str, bytes], tmp_path: Path, vocab_size: int | None = None, pre: str | None = None):
    """Export ``files`` to a GGUF, load it, and insist llama.cpp had nothing to warn about."""
    hf = Tokenizer.from_str(files["tokenizer.json"].decode())
    n_vocab = vocab_size or hf.get_vocab_size(with_added_tokens=True)
    meta = gguf_tokenizer_metadata(files, n_vocab, pre)
    llm, warnings = _load(_write_gguf(tmp_path / "tok.gguf", meta, n_vocab))
    assert warnings == [], warnings
    return meta, llm, hf


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _assert_same(llm, hf: Tokenizer, text: str, add_special: bool, special: bool = True) -> None:
    got = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=special)
    want = hf.encode(text, add_special_tokens=add_special).ids
    if got != want:
        i = _first_diff(got, want)
        pytest.fail(
            f"llama.cpp != tokenizers for {text[:60]!r}... (add_special={add_special}, special={special}) "
            f"at token {i}: llama.cpp {got[max(0, i - 3): i + 4]} vs tokenizers {want[max(0, i - 3): i + 4]} "
            f"({hf.decode(want[max(0, i - 3): i + 4], skip_special_tokens=False)!r})"
        )


def _check_texts(llm, hf: Tokenizer, special_texts: list[str]) -> None:
    texts = TEXTS + ([w] if (w := _wikitext(4096)) else [])
    for text in texts:
        for add_special in (False, True):
            _assert_same(llm, hf, text, add_special)
        _assert_same(llm, hf, text, False, special=False)
    for text in special_texts:
        for add_special in (False, True):
            _assert_same(llm, hf, text, add_special)


GPT2_SPECIAL_TEXTS = [
    "<|im_start|>user\nHi there, 123 apples<|im_end|>\n<|im_start|>assistant\n",
    "end of doc<|endoftext|> next doc",
    f"added {USER_TOKEN}token and {USER_TOKEN} again",
]


# --- byte-level BPE ----------------------------------------------------------------------------


def test_smollm_pre_tokenizer(smollm_files: dict[str, bytes], tmp_path: Path) -> None:
    """(a) Digits(individual) + ByteLevel -> "smollm"; ids identical; ChatML specials as CONTROL."""
    meta, llm, hf = _export(smollm_files, tmp_path)
    assert meta["tokenizer.ggml.model"][0] == "gpt2"
    assert meta["tokenizer.ggml.pre"][0] == "smollm"
    assert meta["tokenizer.chat_template"][0] == CHAT_TEMPLATE
    types = meta["tokenizer.ggml.token_type"][0]
    tokens = meta["tokenizer.ggml.tokens"][0]
    assert [types[hf.token_to_id(t)] for t in GPT2_SPECIALS] == [3, 3, 3]
    assert types[tokens.index(USER_TOKEN)] == 4
    assert meta["tokenizer.ggml.bos_token_id"][0] == hf.token_to_id("<|im_start|>")
    assert meta["tokenizer.ggml.eos_token_id"][0] == hf.token_to_id("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"][0] is False
    assert llm.token_eos() == hf.token_to_id("<|im_end|>")
    _check_texts(llm, hf, GPT2_SPECIAL_TEXTS)


def test_gpt2_pre_tokenizer_and_padding(gpt2_files: dict[str, bytes], tmp_path: Path) -> None:
    """(b) plain ByteLevel -> "gpt-2"; embedding rows beyond the tokenizer become UNUSED [PADi]."""
    n = Tokenizer.from_str(gpt2_files["tokenizer.json"].decode()).get_vocab_size(with_added_tokens=True)
    meta, llm, hf = _export(gpt2_files, tmp_path, vocab_size=n + 3)
    assert meta["tokenizer.ggml.pre"][0] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"][0][n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert meta["tokenizer.ggml.token_type"][0][n:] == [5, 5, 5]
    assert llm.n_vocab() == n + 3
    _check_texts(llm, hf, GPT2_SPECIAL_TEXTS)


def test_llama3_pre_tokenizer(llama3_files: dict[str, bytes], tmp_path: Path) -> None:
    """(c) Llama-3's Split regex + ignore_merges -> "llama-bpe"; add_bos from the post-processor."""
    meta, llm, hf = _export(llama3_files, tmp_path)
    assert meta["tokenizer.ggml.pre"][0] == "llama-bpe"
    assert meta["tokenizer.ggml.add_bos_token"][0] is True
    assert meta["tokenizer.ggml.bos_token_id"][0] == hf.token_to_id("<|begin_of_text|>")
    assert meta["tokenizer.ggml.eos_token_id"][0] == hf.token_to_id("<|eot_id|>")
    _check_texts(llm, hf, ["<|begin_of_text|>Hello<|eot_id|>", "a<|end_of_text|>\n\nb", f"x{USER_TOKEN}y"])


def test_merges_in_either_encoding(gpt2_files: dict[str, bytes]) -> None:
    """tokenizers writes merges as ["a", "b"] pairs (current) or "a b" strings (older files)."""
    data = json.loads(gpt2_files["tokenizer.json"])
    assert isinstance(data["model"]["merges"][0], list)
    as_strings = json.loads(gpt2_files["tokenizer.json"])
    as_strings["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    n = Tokenizer.from_str(gpt2_files["tokenizer.json"].decode()).get_vocab_size(with_added_tokens=True)
    a = gguf_tokenizer_metadata(gpt2_files, n)
    b = gguf_tokenizer_metadata({**gpt2_files, "tokenizer.json": json.dumps(as_strings).encode()}, n)
    assert a == b
    assert a["tokenizer.ggml.merges"][0][:3] == [" ".join(m) for m in data["model"]["merges"][:3]]


def test_detects_real_repo_layouts() -> None:
    """The pre-tokenizer JSON as HF repos ship it for Qwen2 and Llama-3, and SmolLM2's."""

    def tj(pre: dict, ignore_merges: bool = False) -> dict:
        return {"model": {"type": "BPE", "ignore_merges": ignore_merges}, "pre_tokenizer": pre}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

    def split(rx: str) -> dict:
        return {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}

    seq = lambda *steps: {"type": "Sequence", "pretokenizers": list(steps)}  # noqa: E731
    assert detect_pre_tokenizer(tj(seq(split(QWEN2_HF_REGEX), byte_level))) == "qwen2"
    assert detect_pre_tokenizer(tj(seq(split(LLAMA3_HF_REGEX), byte_level), ignore_merges=True)) == "llama-bpe"
    assert detect_pre_tokenizer(tj(seq(split(LLAMA3_HF_REGEX), byte_level))) == "dbrx"  # same split, merges used
    smollm = seq({"type": "Digits", "individual_digits": True}, {**byte_level, "use_regex": True})
    assert detect_pre_tokenizer(tj(smollm)) == "smollm"
    assert detect_pre_tokenizer(tj({**byte_level, "use_regex": True})) == "gpt-2"


def test_import_export_round_trip(gpt2_files: dict[str, bytes]) -> None:
    """Every pre name qconv's GGUF importer knows survives GGUF -> tokenizer.json -> GGUF.

    The importer spells each name as a chain of Split regexes; the exporter must map that chain
    back to a name llama.cpp splits identically with, and keep the vocabulary as it was.
    """
    n = Tokenizer.from_str(gpt2_files["tokenizer.json"].decode()).get_vocab_size(with_added_tokens=True)
    base = {k: v for k, (v, _) in gguf_tokenizer_metadata(gpt2_files, n).items()}
    for name, spec in PRE_TOKENIZERS.items():
        rebuilt = tokenizer_files_from_gguf({**base, "tokenizer.ggml.pre": name, "llama.context_length": 64,
                                             "general.architecture": "llama"})
        back = gguf_tokenizer_metadata(rebuilt, n)
        got = back["tokenizer.ggml.pre"][0]
        assert PRE_TOKENIZERS[got].regexes == spec.regexes, name
        assert PRE_TOKENIZERS[got].ignore_merges == spec.ignore_merges, name
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
            assert back[key][0] == base[key], (name, key)


# --- SentencePiece-style BPE -------------------------------------------------------------------


@pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.gguf not present")
def test_sentencepiece_matches_original_gguf(tmp_path: Path) -> None:
    """(d) stories260K: GGUF -> tokenizer.json (importer) -> GGUF (exporter) tokenizes like the
    original file in llama.cpp, and like the tokenizer.json it was exported from."""
    original = {k: f.contents() for k, f in gguf.GGUFReader(STORIES).fields.items()}
    files = tokenizer_files_from_gguf(original)
    meta, llm, hf = _export(files, tmp_path, vocab_size=512)
    assert meta["tokenizer.ggml.model"][0] == "llama"
    assert meta["tokenizer.ggml.tokens"][0] == original["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.token_type"][0] == original["tokenizer.ggml.token_type"]  # UNKNOWN, CONTROL, BYTE
    scores, orig_scores = meta["tokenizer.ggml.scores"][0], original["tokenizer.ggml.scores"]
    normal = [i for i, t in enumerate(original["tokenizer.ggml.token_type"]) if t == 1]
    # Not the same numbers, but the same order, which is all SentencePiece merging looks at.
    assert sorted(normal, key=lambda i: (-scores[i], i)) == sorted(normal, key=lambda i: (-orig_scores[i], i))
    assert meta["tokenizer.ggml.add_bos_token"][0] is True
    assert (meta["tokenizer.ggml.bos_token_id"][0], meta["tokenizer.ggml.eos_token_id"][0]) == (1, 2)
    assert meta["tokenizer.ggml.unknown_token_id"][0] == 0

    special_texts = ["Hello</s>world and <s> again", "<s> Once upon a time</s>", "<unk>x"]
    _check_texts(llm, hf, special_texts)
    with _llama_log():
        reference = llama_cpp.Llama(model_path=str(STORIES), vocab_only=True, verbose=False)
    texts = TEXTS + special_texts + ([w] if (w := _wikitext(4096)) else [])
    for text in texts:
        for add_bos in (False, True):
            for special in (False, True):
                assert llm.tokenize(text.encode(), add_bos=add_bos, special=special) == reference.tokenize(
                    text.encode(), add_bos=add_bos, special=special
                ), (text, add_bos, special)


# --- refusals and overrides --------------------------------------------------------------------


def test_unknown_pre_tokenizer_refused_unless_overridden(gpt2_files: dict[str, bytes], tmp_path: Path) -> None:
    """(e) a split llama.cpp has no name for is an error naming the option and the known names;
    --tokenizer-pre NAME writes NAME anyway."""
    data = json.loads(gpt2_files["tokenizer.json"])
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    files = {**gpt2_files, "tokenizer.json": json.dumps(data).encode()}
    n = len(data["model"]["vocab"]) + 1
    with pytest.raises(UnsupportedModel) as err:
        gguf_tokenizer_metadata(files, n)
    message = str(err.value)
    assert "Digits(individual_digits=False)" in message
    assert "--tokenizer-pre" in message and "smollm" in message and "llama-bpe" in message

    meta, llm, _ = _export(files, tmp_path, pre="gpt-2")
    assert meta["tokenizer.ggml.pre"][0] == "gpt-2"
    assert llm.tokenize(b"Hello world", add_bos=False, special=True)

    add_prefix = json.loads(gpt2_files["tokenizer.json"])
    add_prefix["pre_tokenizer"]["add_prefix_space"] = True  # llama.cpp never adds one
    with pytest.raises(UnsupportedModel, match="add_prefix_space=True"):
        gguf_tokenizer_metadata({"tokenizer.json": json.dumps(add_prefix).encode()}, n)


def test_unsupported_models_and_sizes(gpt2_files: dict[str, bytes]) -> None:
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(UnsupportedModel, match="WordPiece"):
        gguf_tokenizer_metadata({"tokenizer.json": wordpiece.to_str().encode()}, 2)
    plain_bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    plain_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedModel, match="byte_fallback"):
        gguf_tokenizer_metadata({"tokenizer.json": plain_bpe.to_str().encode()}, 3)
    n = Tokenizer.from_str(gpt2_files["tokenizer.json"].decode()).get_vocab_size(with_added_tokens=True)
    with pytest.raises(CheckpointMismatch, match="embedding"):
        gguf_tokenizer_metadata(gpt2_files, n - 1)
    with pytest.raises(MissingTokenizer):
        gguf_tokenizer_metadata({}, 10)


def test_chat_template_file_and_special_fallbacks(gpt2_files: dict[str, bytes]) -> None:
    """chat_template.jinja wins over tokenizer_config; ids fall back to special_tokens_map and
    generation_config when tokenizer_config names no token."""
    n = Tokenizer.from_str(gpt2_files["tokenizer.json"].decode()).get_vocab_size(with_added_tokens=True)
    files = {
        "tokenizer.json": gpt2_files["tokenizer.json"],
        "tokenizer_config.json": json.dumps({"chat_template": "old"}).encode(),
        "chat_template.jinja": b"{{ messages }}",
        "special_tokens_map.json": json.dumps({"eos_token": {"content": "<|endoftext|>"}}).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}).encode(),
    }
    meta = gguf_tokenizer_metadata(files, n)
    assert meta["tokenizer.chat_template"][0] == "{{ messages }}"
    assert meta["tokenizer.ggml.eos_token_id"][0] == 0  # special_tokens_map beats generation_config
    assert meta["tokenizer.ggml.bos_token_id"][0] == 1
    assert meta["tokenizer.ggml.add_bos_token"][0] is False  # no post-processor template, no flag
