"""GGUF vocab -> HF tokenizer (qconv.checkpoint.gguf_vocab), checked against independent oracles.

* SentencePiece kind: the real tiny ``../shared/data/stories260K.gguf`` against transformers' own
  GGUF tokenizer loader. transformers builds that tokenizer with ``Metaspace(prepend_scheme=
  "first")``, which leaves out the dummy ``▁`` prefix when the text already starts with a space
  (``" hi"`` -> ``▁hi``) and after a special token. llama.cpp (``llama_vocab::tokenize``, SPM
  branch: ``if (add_space_prefix && is_prev_special) text = ' ' + text``) and SentencePiece's
  ``add_dummy_prefix`` always prepend it (``" hi"`` -> ``▁ + ▁hi``), and qconv follows them. So text
  with no leading whitespace and no special tokens must match transformers' ids exactly; for the
  rest the oracle is transformers' own BPE model (same vocab and merges) run on the text
  escaped the way llama.cpp escapes it.
* Byte-level BPE kind: a small BPE trained here with `tokenizers`, written into GGUFs with
  gguf-py under several ``tokenizer.ggml.pre`` names, against the HF pipeline each pre-name
  stands for (the original tokenizer for "gpt-2", the split regexes HF repos ship for
  Llama-3 / Qwen2 / SmolLM) and against transformers' GGUF loader.

Provenance: all of the above was also cross-checked once against real llama.cpp
(``llama-tokenize --ids`` built from the source vendored in llama-cpp-python 0.3.36): ids identical
on the whole wikitext-2 test file for stories260K and SmolLM2-135M, on every string here, and for
the tiny vocab under the pre names "gpt-2", "llama-bpe", "qwen2", "smollm", "default",
"starcoder", "dbrx". A few of llama.cpp's outputs are recorded in ``LLAMA_CPP_STORIES``.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from qconv.checkpoint.gguf_vocab import SPIECE_SPACE, _spm_merges, _Vocab, tokenizer_files_from_gguf

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = DATA / "stories260K.gguf"
WIKITEXT = DATA / "wikitext-2-raw-test.txt"
needs_data = pytest.mark.skipif(
    not (STORIES.is_file() and WIKITEXT.is_file()), reason="../shared/data/{stories260K.gguf,wikitext} not present"
)

#: Strings covering the usual tokenizer traps. None starts with whitespace (see module doc).
PLAIN_TEXTS = [
    "Hello world",
    "The year 2024 had 365 days; pi is 3.14159 and 1,000,000 is a million.",
    "I'm sure you'll see THEY'RE right, isn't it? We'd've gone.",
    "tabs\there\t\tand  double  spaces   and trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows\n",
    "Café crème brûlée, naïve façade, Ångström, Über",
    "日本語のテキストと中文字符，한국어도",
    "emoji 😀🎉👍🏽 and flags 🇫🇷, zero-width\u200bjoiner\u200d",
    "digits everywhere: ٣٤٥ ½ x² ⅔ Ⅻ 0x1F 007",
    "symbols <>&|~^$+= @-@ [brackets] {braces} (parens) #tag %50",
    "a\u00a0non-breaking space and an\u200athin one",
    "x",
    "",
]
#: Leading whitespace and embedded special tokens. transformers' Metaspace gives other ids for a
#: leading space and for text right after a special token (see module doc).
EDGE_TEXTS = [
    " leading space",
    "   three leading spaces",
    "\n newline first",
    "\tTab first",
    "Hello</s>world and <s> again",
]


def _gguf_meta(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def _ours(meta: dict) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_files_from_gguf(meta)["tokenizer.json"].decode("utf-8"))


def _transformers_gguf_tokenizer(path: Path):
    """transformers' GGUF tokenizer loader, tolerating llama.cpp's u32 -1 "no token" ids.

    stories260K.gguf has ``padding_token_id = 0xFFFFFFFF`` (llama.cpp's "none"), which
    transformers indexes the vocab with and crashes; drop out-of-range ids before it sees them.
    """
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

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "read_gguf_metadata", sanitized)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- SentencePiece: stories260K ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_meta() -> dict:
    return _gguf_meta(STORIES)


@pytest.fixture(scope="module")
def stories(stories_meta: dict) -> Tokenizer:
    return _ours(stories_meta)


@pytest.fixture(scope="module")
def stories_hf():
    return _transformers_gguf_tokenizer(STORIES)


@pytest.fixture(scope="module")
def wikitext() -> str:
    return WIKITEXT.read_text(encoding="utf-8")[:20_000]


def _llama_cpp_spm(hf_model, text: str, bos: int = 1, specials: dict[str, int] | None = None) -> list[int]:
    """llama.cpp's SPM tokenize(add_special=True, parse_special=True), run on transformers' BPE
    model: BOS, then each run of text between special tokens gets a space prepended, spaces
    become ▁, and the run is merged whole."""
    specials = specials or {"<s>": 1, "</s>": 2}
    ids, rest = [bos], text
    while rest:
        hits = [(rest.find(s), s) for s in specials if s in rest]
        cut, tok = min(hits) if hits else (len(rest), None)
        if cut:
            ids += [t.id for t in hf_model.tokenize(SPIECE_SPACE + rest[:cut].replace(" ", SPIECE_SPACE))]
        if tok is None:
            break
        ids.append(specials[tok])
        rest = rest[cut + len(tok):]
    return ids


@needs_data
def test_spm_matches_transformers_on_wikitext(stories: Tokenizer, stories_hf, wikitext: str) -> None:
    assert stories.encode(wikitext).ids == stories_hf(wikitext).input_ids


@needs_data
@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_spm_matches_transformers(stories: Tokenizer, stories_hf, text: str) -> None:
    assert stories.encode(text).ids == stories_hf(text).input_ids


@needs_data
@pytest.mark.parametrize("text", EDGE_TEXTS + PLAIN_TEXTS)
def test_spm_follows_llama_cpp_whitespace(stories: Tokenizer, stories_hf, text: str) -> None:
    assert stories.encode(text).ids == _llama_cpp_spm(stories_hf.backend_tokenizer.model, text)


@needs_data
def test_spm_wikitext_with_leading_space(stories: Tokenizer, stories_hf, wikitext: str) -> None:
    text = "  " + wikitext  # where transformers' Metaspace would drop the dummy prefix
    assert stories.encode(text).ids == _llama_cpp_spm(stories_hf.backend_tokenizer.model, text)


@needs_data
def test_spm_dummy_prefix_is_always_added(stories: Tokenizer) -> None:
    """SentencePiece / llama.cpp: " Hello" is "▁" + "▁Hello", not "▁Hello"."""
    enc = stories.encode(" he", add_special_tokens=False)
    assert enc.tokens == [SPIECE_SPACE, SPIECE_SPACE + "he"]
    assert stories.encode("he").tokens == ["<s>", SPIECE_SPACE + "he"]


#: ``printf %s TEXT | llama-tokenize -m stories260K.gguf --stdin --ids --no-escape`` (llama.cpp as vendored
#: in llama-cpp-python 0.3.36).
LLAMA_CPP_STORIES = {
    " hi": [1, 410, 270, 417],
    "Hello</s>world <s> x": [1, 346, 306, 414, 2, 263, 304, 341, 410, 1, 410, 410, 444],
    "  two\n": [1, 410, 410, 259, 424, 414, 13],
    "\n newline first": [1, 410, 13, 404, 424, 421, 271, 411, 272, 315, 356],
    "café 😀": [1, 280, 412, 431, 485, 410, 243, 162, 155, 131],
}


@needs_data
@pytest.mark.parametrize("text", LLAMA_CPP_STORIES)
def test_spm_matches_recorded_llama_cpp(stories: Tokenizer, text: str) -> None:
    assert stories.encode(text).ids == LLAMA_CPP_STORIES[text]


@needs_data
@pytest.mark.parametrize("text", PLAIN_TEXTS + EDGE_TEXTS[:-1])
def test_spm_round_trip(stories: Tokenizer, text: str) -> None:
    assert stories.decode(stories.encode(text).ids) == text


@needs_data
def test_spm_round_trip_wikitext(stories: Tokenizer, wikitext: str) -> None:
    assert stories.decode(stories.encode(wikitext).ids) == wikitext


@needs_data
def test_spm_side_files(stories_meta: dict) -> None:
    files = tokenizer_files_from_gguf(stories_meta)
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["unk_token"] == "<unk>"
    assert "pad_token" not in cfg  # 0xFFFFFFFF = none
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False  # SPM default: BOS
    assert cfg["model_max_length"] == 2048
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2}
    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert tok.get_vocab_size() == 512
    assert tok.id_to_token(3) == "<0x00>"


@needs_data
def test_spm_side_files_load_in_transformers(stories_meta: dict, stories: Tokenizer, tmp_path: Path) -> None:
    """transformers reading qconv's files must not rebuild the pipeline differently."""
    from transformers import AutoTokenizer

    for name, data in tokenizer_files_from_gguf(stories_meta).items():
        (tmp_path / name).write_bytes(data)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in PLAIN_TEXTS + EDGE_TEXTS:
        assert hf(text).input_ids == stories.encode(text).ids, text


@needs_data
def test_spm_flags_from_metadata(stories_meta: dict) -> None:
    meta = dict(stories_meta, **{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True,
                                 "tokenizer.ggml.add_space_prefix": False})
    tok = _ours(meta)
    assert tok.encode("he").tokens == ["he", "</s>"]  # no ▁ prefix, no BOS, EOS
    assert tok.decode(tok.encode(" he").ids) == " he"


def test_spm_merges_follow_scores() -> None:
    """Score-greedy merging: the pair whose merged piece scores higher is joined first."""

    def tokenize(scores: dict[str, float]) -> list[str]:
        meta = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": ["<unk>", *scores],
            "tokenizer.ggml.scores": [0.0, *scores.values()],
            "tokenizer.ggml.token_type": [2] + [1] * len(scores),
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": False,
        }
        return _ours(meta).encode("abc").tokens

    base = {SPIECE_SPACE: -1.0, "a": -2.0, "b": -3.0, "c": -4.0}
    assert tokenize({**base, "ab": -5.0, "bc": -6.0}) == [SPIECE_SPACE, "ab", "c"]
    assert tokenize({**base, "ab": -6.0, "bc": -5.0}) == [SPIECE_SPACE, "a", "bc"]
    assert tokenize({**base, "ab": -6.0, "bc": -5.0, f"{SPIECE_SPACE}a": -5.5}) == [f"{SPIECE_SPACE}a", "bc"]


def test_spm_merges_skip_non_normal_pieces() -> None:
    vocab = _Vocab(tokens=["<s>", "<", "s", ">", "<s", "ab", "a", "b"], types=[3, 1, 1, 1, 1, 4, 1, 1],
                   scores=[0.0, -1, -2, -3, -4, -5, -6, -7], special_ids={})
    assert _spm_merges(vocab) == [("<", "s")]


def test_no_vocab_gives_no_files() -> None:
    assert tokenizer_files_from_gguf({"general.architecture": "llama"}) == {}


def test_unknown_vocab_kind_is_refused() -> None:
    from qconv.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel):
        tokenizer_files_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]})


# --- byte-level BPE: a tiny trained vocab written as GGUF -------------------------------------

#: The regexes HF tokenizer.json files ship for these models (not llama.cpp's rewrites).
HF_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HF_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
BPE_TEXTS = PLAIN_TEXTS + EDGE_TEXTS + [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>ok</think>",
    "numbers 1234567890 and 12 345 and 3.5%",
]


def _train_byte_level_bpe(corpus: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in USER_DEFINED])
    return tok


def _write_bpe_gguf(path: Path, tok: Tokenizer, pre: str, add_bos: bool | None) -> None:
    """A llama-arch GGUF laid out the way convert_hf_to_gguf writes a byte-level BPE vocab."""
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    n, dim = len(tokens), 8

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // 2)
    w.add_vocab_size(n)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n, dim), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _reference(trained: Tokenizer, pre: str) -> Tokenizer:
    """The HF pipeline the pre-name stands for, built from the trained vocab and merges."""
    ref = Tokenizer.from_str(trained.to_str())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "gpt-2":
        return ref  # the tokenizer the vocab was trained with
    if pre == "smollm":  # SmolLM2's own tokenizer.json
        ref.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        return ref
    split = {"llama-bpe": HF_LLAMA3_SPLIT, "qwen2": HF_QWEN2_SPLIT}[pre]
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    if pre == "llama-bpe":  # Llama-3's tokenizer.json has ignore_merges: true
        data = json.loads(ref.to_str())
        data["model"]["ignore_merges"] = True
        ref = Tokenizer.from_str(json.dumps(data))
    return ref


@pytest.fixture(scope="module")
def trained_bpe() -> Tokenizer:
    corpus = WIKITEXT.read_text(encoding="utf-8")[:40_000] if WIKITEXT.is_file() else ""
    corpus += "\n".join(PLAIN_TEXTS) * 3 + "\n12 345 6789 2024 1999 3.14\n"
    return _train_byte_level_bpe(corpus)


@pytest.fixture(scope="module", params=["gpt-2", "llama-bpe", "qwen2", "smollm"])
def bpe_gguf(request: pytest.FixtureRequest, trained_bpe: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    pre = request.param
    path = tmp_path_factory.mktemp(f"bpe-{pre}") / "tiny.gguf"
    _write_bpe_gguf(path, trained_bpe, pre, add_bos=None)
    return pre, path


@pytest.mark.parametrize("text", BPE_TEXTS)
def test_bpe_matches_reference(bpe_gguf, trained_bpe: Tokenizer, text: str) -> None:
    pre, path = bpe_gguf
    ours = _ours(_gguf_meta(path))
    ref = _reference(trained_bpe, pre)
    bos = [trained_bpe.token_to_id("<|im_start|>")] if pre == "llama-bpe" else []  # llama.cpp default
    assert ours.encode(text).ids == bos + ref.encode(text).ids
    plain = ours.encode(text, add_special_tokens=False).ids
    assert ours.decode(plain, skip_special_tokens=False) == text


def test_bpe_matches_transformers_gguf_loader(bpe_gguf) -> None:
    """transformers' loader agrees, except that it has no digit split for "smollm" (it falls back
    to plain GPT-2 splitting, so ``"1234"`` may merge into multi-digit tokens llama.cpp and
    SmolLM's own tokenizer never produce); there only digit-free text is compared."""
    pre, path = bpe_gguf
    ours = _ours(_gguf_meta(path))
    hf = _transformers_gguf_tokenizer(path)
    for text in BPE_TEXTS:
        if pre == "smollm" and any(c.isnumeric() for c in text):
            continue
        expected = hf(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == expected, text


def test_bpe_special_and_user_tokens(trained_bpe: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    _write_bpe_gguf(path, trained_bpe, "gpt-2", add_bos=True)
    files = tokenizer_files_from_gguf(_gguf_meta(path))
    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    vocab = trained_bpe.get_vocab(with_added_tokens=True)
    ids = tok.encode("<|im_end|>a<think>").ids
    assert ids[0] == vocab["<|im_start|>"]  # add_bos_token = true
    assert ids[1] == vocab["<|im_end|>"] and ids[-1] == vocab["<think>"]
    added = {t["content"]: t["special"] for t in json.loads(files["tokenizer.json"])["added_tokens"]}
    assert added == {**dict.fromkeys(SPECIALS, True), "<think>": False}
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["unk_token"] == cfg["pad_token"] == "<|endoftext|>"
    assert cfg["add_bos_token"] is True and cfg["chat_template"].startswith("{% for m in messages %}")
    assert json.loads(files["generation_config.json"]) == {
        "bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"]}


def test_bpe_side_files_load_in_transformers_and_qconv(trained_bpe: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from qconv.checkpoint.tokenizer import Tokenizer as QTokenizer

    path = tmp_path / "t.gguf"
    _write_bpe_gguf(path, trained_bpe, "llama-bpe", add_bos=None)  # llama.cpp default: BOS on
    files = tokenizer_files_from_gguf(_gguf_meta(path))
    out = tmp_path / "hf"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    ours, hf, q = _ours(_gguf_meta(path)), AutoTokenizer.from_pretrained(out), QTokenizer.from_files(files, path)
    for text in BPE_TEXTS:
        assert hf(text).input_ids == ours.encode(text).ids == q.encode(text), text
    assert q.bos_id == trained_bpe.token_to_id("<|im_start|>")
    assert q.eos_ids == [trained_bpe.token_to_id("<|im_end|>")]
    assert q.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"


def test_bpe_pre_tokenizer_splits(trained_bpe: Tokenizer, tmp_path: Path) -> None:
    """llama.cpp applies its regex list one after the other, each splitting what the last left."""
    cases = {
        # "default": punctuation runs, GPT-2, digit runs, then digit runs cut in threes.
        "default": ["abc", "Ġ", "123", "45", ",", "Ġx", "!!"],
        # "smollm": every digit alone, then GPT-2 on the rest (the space before a digit stays alone).
        "smollm": ["abc", "Ġ", "1", "2", "3", "4", "5", ",", "Ġx", "!!"],
        "gpt-2": ["abc", "Ġ12345", ",", "Ġx", "!!"],
        "llama-bpe": ["abc", "Ġ", "123", "45", ",", "Ġx", "!!"],
    }
    for pre, expected in cases.items():
        path = tmp_path / f"{pre}.gguf"
        _write_bpe_gguf(path, trained_bpe, pre, add_bos=False)
        tok = _ours(_gguf_meta(path))
        assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("abc 12345, x!!")] == expected, pre


def test_bpe_unknown_pre_falls_back_to_gpt2(trained_bpe: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    _write_bpe_gguf(path, trained_bpe, "no-such-pre", add_bos=False)
    ours = _ours(_gguf_meta(path))
    for text in BPE_TEXTS:
        assert ours.encode(text).ids == trained_bpe.encode(text).ids
