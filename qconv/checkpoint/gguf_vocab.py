"""Rebuild an HF tokenizer (``tokenizer.json`` and friends) from a GGUF file's metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary as parallel arrays
(``tokenizer.ggml.tokens`` / ``scores`` / ``token_type``), byte-level BPE merges, and a
``tokenizer.ggml.pre`` *name* for the pre-tokenizer whose regexes live in llama.cpp's source
(``src/llama-vocab.cpp``). This module turns that back into a `tokenizers` pipeline that
produces the ids llama.cpp produces, for the two vocab kinds llama-arch GGUFs use:

``gpt2``  (byte-level BPE; Llama-3, SmolLM, Qwen2, GPT-2 style)
    The vocab and merges are taken verbatim; the split regexes are the ones llama.cpp runs for
    the ``pre`` name (chained ``Split(isolated)`` pre-tokenizers, exactly like llama.cpp's
    ``unicode_regex_split`` applies its regex list one after the other), then ``ByteLevel``
    without its own regex.

``llama``  (SentencePiece BPE; Llama-1/2, TinyLlama, Mistral-v0.1, stories*)
    SentencePiece merges adjacent symbols greedily by the *score* of the merged piece; HF
    expresses the same thing as a BPE model whose merge list is ordered by that score
    (:func:`_spm_merges`), with ``byte_fallback`` standing in for SentencePiece's ``<0xNN>``
    pieces. Whitespace follows llama.cpp (and SentencePiece's ``add_dummy_prefix``): every run
    of raw text not preceded by a token gets one ``▁`` prepended, even if it already starts
    with a space, so ``" Hello"`` is ``▁ + ▁Hello``. That is the legacy HF normalizer
    ``Prepend("▁") + Replace(" ", "▁")``, not ``Metaspace``, which skips the prefix when the
    text already starts with one.

Tokens of type CONTROL become special added tokens and USER_DEFINED ones plain added tokens:
llama.cpp matches both whole in the text before any splitting, which is what added tokens do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from qconv.errors import UnsupportedModel

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType / llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

#: SentencePiece's whitespace stand-in.
SPIECE_SPACE = "\u2581"

# --- llama.cpp pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe) ----------------
# llama.cpp rewrites HF's ``(?i:'s|...)`` as explicit character classes because its regex engine
# has no inline flags; the rewritten form is kept here so we run the exact same pattern.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#: GPT-2's pattern. llama.cpp drops the final ``|\s+`` alternative; that changes nothing, since
#: text no alternative matches is kept as its own piece by an isolating split anyway.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """What llama.cpp does for one ``tokenizer.ggml.pre`` family.

    ``regexes`` are applied in order, each one splitting the pieces the previous left;
    ``ignore_merges`` means a pre-token that is itself a vocab entry is emitted whole (Llama-3);
    ``add_bos`` is llama.cpp's default when the GGUF has no ``tokenizer.ggml.add_bos_token``.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_SPEC_GPT2 = PreTokenizerSpec((_GPT2,))
#: llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_DEFAULT`` (``pre == "default"`` or no ``pre`` key at all):
#: punctuation runs, then GPT-2, then digit runs cut into groups of three.
_SPEC_DEFAULT = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_SPEC_LLAMA3 = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
_SPEC_LLAMA3_PLAIN = PreTokenizerSpec((_LLAMA3,))
_SPEC_QWEN2 = PreTokenizerSpec((_QWEN2,))
#: Every digit on its own, then GPT-2: the same as HF's
#: ``Sequence[Digits(individual_digits=True), ByteLevel]`` that SmolLM / StarCoder ship.
_SPEC_DIGITS_GPT2 = PreTokenizerSpec((r"\p{N}", _GPT2))

#: ``tokenizer.ggml.pre`` -> llama.cpp's behaviour for it (the names llama.cpp maps to the same
#: pre-tokenizer type are listed together).
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _SPEC_DEFAULT,
    **dict.fromkeys(
        ("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion",
         "granite-docling", "exaone4"),
        _SPEC_GPT2,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano"),
        _SPEC_LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _SPEC_LLAMA3_PLAIN),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
        _SPEC_QWEN2,
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        _SPEC_DIGITS_GPT2,
    ),
}


def tokenizer_files_from_gguf(meta: Mapping[str, Any]) -> dict[str, bytes]:
    """HF tokenizer side files rebuilt from GGUF metadata.

    ``meta`` is ``{key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}``.
    Returns ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` (UTF-8
    JSON bytes), or an empty dict when the GGUF carries no vocabulary
    (no ``tokenizer.ggml.tokens``). Raises :class:`UnsupportedModel` for a vocab kind other than
    ``gpt2`` / ``llama``.
    """
    raw_tokens = meta.get("tokenizer.ggml.tokens")
    if not raw_tokens:
        return {}
    vocab = _Vocab.from_meta(meta)
    kind = meta.get("tokenizer.ggml.model", "llama")
    if kind == "gpt2":
        tok, add_bos = _byte_level_bpe(vocab, meta)
    elif kind == "llama":
        tok, add_bos = _sentencepiece_bpe(vocab, meta)
    else:
        raise UnsupportedModel(
            f"GGUF tokenizer model {kind!r} cannot be converted (supported: 'gpt2', 'llama')"
        )
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _add_added_tokens(tok, vocab)
    tok.post_processor = _post_processor(vocab, add_bos, add_eos, byte_level=kind == "gpt2")

    config = _tokenizer_config(vocab, meta, add_bos, add_eos)
    generation = _generation_config(vocab, meta)
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "generation_config.json": _json_bytes(generation),
    }


# --- vocabulary ------------------------------------------------------------------------------


@dataclass
class _Vocab:
    """The GGUF vocabulary, with llama.cpp's "no such token" sentinels already resolved."""

    tokens: list[str]  # unique strings, index = token id
    types: list[int]
    scores: list[float] | None
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad"/"eot"/"eom" -> valid id

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "_Vocab":
        tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
        n = len(tokens)
        types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [NORMAL] * n)]
        if len(types) != n:
            types = (types + [NORMAL] * n)[:n]
        scores_raw = meta.get("tokenizer.ggml.scores")
        scores = [float(s) for s in scores_raw] if scores_raw is not None and len(scores_raw) == n else None
        specials: dict[str, int] = {}
        for name in ("bos", "eos", "unk", "pad", "eot", "eom"):
            key = "unknown" if name == "unk" else "padding" if name == "pad" else name
            tid = meta.get(f"tokenizer.ggml.{key}_token_id")
            # llama.cpp writes u32 -1 (0xFFFFFFFF) for "none"; anything out of range means the same.
            if tid is not None and 0 <= int(tid) < n:
                specials[name] = int(tid)
        return cls(_dedupe(tokens), types, scores, specials)

    def token(self, name: str) -> str | None:
        """Content of the special token ``name`` ("bos", "eos", ...), if the GGUF names one."""
        tid = self.special_ids.get(name)
        return None if tid is None else self.tokens[tid]

    def as_dict(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def _dedupe(tokens: list[str]) -> list[str]:
    """Give repeated token strings a unique placeholder.

    A BPE vocab is a string -> id map, so two ids cannot share a string. Some GGUFs repeat
    one (padding fillers); the first occurrence keeps the text (that is the id encoding can
    produce), later ones get ``<gguf_dup_ID>`` so every id still exists in the vocab.
    """
    seen: set[str] = set()
    out = []
    for i, t in enumerate(tokens):
        if t in seen:
            log.warning("GGUF vocab repeats token %r at id %d; renamed to <gguf_dup_%d>", t, i, i)
            t = f"<gguf_dup_{i}>"
        seen.add(t)
        out.append(t)
    return out


# --- byte-level BPE (tokenizer.ggml.model == "gpt2") -----------------------------------------


def _byte_level_bpe(vocab: _Vocab, meta: Mapping[str, Any]) -> tuple[Tokenizer, bool]:
    """GPT-2 style BPE: vocab and merges verbatim, llama.cpp's split regexes, ByteLevel bytes."""
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:
        spec = _SPEC_DEFAULT  # llama.cpp: "missing pre-tokenizer type, using: 'default'"
    else:
        spec = PRE_TOKENIZERS.get(str(pre))
        if spec is None:
            # llama.cpp refuses to load such a file; GPT-2's split is the common ancestor of
            # nearly every byte-level BPE regex, so it is the least surprising guess.
            log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's split", pre)
            spec = _SPEC_GPT2

    token_ids = vocab.as_dict()
    merges = _gguf_merges(meta.get("tokenizer.ggml.merges") or [], token_ids)
    tok = Tokenizer(
        BPE(
            vocab=token_ids,
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=spec.ignore_merges,
        )
    )
    tok.normalizer = None
    splits: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False) for rx in spec.regexes
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spec.add_bos))
    return tok, add_bos


def _gguf_merges(raw: Sequence[str], token_ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """``"a b"`` merge strings as pairs, dropping any the vocab cannot express.

    Byte-level tokens never contain a real space (0x20 is spelled ``Ġ``), so the single space
    separates the two halves. `tokenizers` rejects a merge whose halves or result are not in
    the vocab; llama.cpp could never emit such a merge's result either, so it is skipped.
    """
    merges = []
    dropped = 0
    for m in raw:
        parts = str(m).split(" ")
        if len(parts) == 2 and parts[0] in token_ids and parts[1] in token_ids and parts[0] + parts[1] in token_ids:
            merges.append((parts[0], parts[1]))
        else:
            dropped += 1
    if dropped:
        log.warning("dropped %d GGUF merges that the vocabulary cannot express", dropped)
    return merges


# --- SentencePiece BPE (tokenizer.ggml.model == "llama") -------------------------------------


def _sentencepiece_bpe(vocab: _Vocab, meta: Mapping[str, Any]) -> tuple[Tokenizer, bool]:
    """SentencePiece BPE as HF's LlamaTokenizerFast (legacy) lays it out."""
    token_ids = vocab.as_dict()
    unk = vocab.token("unk")
    tok = Tokenizer(
        BPE(
            vocab=token_ids,
            merges=_spm_merges(vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None  # SentencePiece sees each run of raw text whole
    dec: list[decoders.Decoder] = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # llama.cpp adds BOS to a SentencePiece vocab unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    return tok, add_bos


def _spm_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """The BPE merge list equivalent to SentencePiece's score-greedy merging.

    SentencePiece (and llama.cpp's ``llm_tokenizer_spm``) repeatedly joins the adjacent pair
    whose concatenation is a vocab piece with the highest score. A BPE model does the same if
    it has one merge per way of cutting each piece into two pieces, ranked by the piece's
    score, best first. Only NORMAL pieces take part: SentencePiece never builds control,
    byte, unknown or unused pieces by merging, and user-defined ones are matched whole before
    merging starts (they are added tokens here). Without scores, file order stands in for
    them (SentencePiece BPE scores are minus the merge order anyway).

    Equal scores are ordered by token id then by the longer left half; SentencePiece breaks
    such ties by position in the text instead, which a merge list cannot express. Real BPE
    vocabs have distinct scores, so this only matters for hand-made ones.
    """
    tokens, types = vocab.tokens, vocab.types
    scores = vocab.scores if vocab.scores is not None else [-float(i) for i in range(len(tokens))]
    mergeable = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tid, (piece, ty) in enumerate(zip(tokens, types)):
        if ty != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[tid], tid, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --- shared pieces ---------------------------------------------------------------------------


def _add_added_tokens(tok: Tokenizer, vocab: _Vocab) -> None:
    """CONTROL (and UNKNOWN) tokens become special added tokens, USER_DEFINED plain ones.

    llama.cpp cuts these out of the text before tokenizing the rest (control ones when special
    parsing is on, which is what HF always does), so they must never be split into pieces.
    Their content is already in the model vocab at the right id, so adding them reuses it.
    """
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(vocab.tokens, vocab.types)
        if ty in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(vocab.tokens, vocab.types)
        if ty == USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _post_processor(vocab: _Vocab, add_bos: bool, add_eos: bool, byte_level: bool) -> processors.PostProcessor:
    """BOS/EOS insertion as llama.cpp's ``add_special`` does it (TemplateProcessing)."""
    bos = vocab.token("bos") if add_bos else None
    eos = vocab.token("eos") if add_eos else None
    if add_bos and bos is None:
        log.warning("GGUF asks for a BOS token but names none; not adding one")
    if add_eos and eos is None:
        log.warning("GGUF asks for an EOS token but names none; not adding one")

    def template(seq: str, type_id: int) -> str:
        parts = ([f"{bos}:{type_id}"] if bos else []) + [f"${seq}:{type_id}"] + ([f"{eos}:{type_id}"] if eos else [])
        return " ".join(parts)

    specials = [(t, vocab.special_ids[n]) for t, n in ((bos, "bos"), (eos, "eos")) if t is not None]
    template_proc = processors.TemplateProcessing(
        single=template("A", 0),
        pair=f"{template('A', 0)} {template('B', 1)}",
        special_tokens=list(dict.fromkeys(specials)),
    )
    if not byte_level:
        return template_proc
    # ByteLevel's post-processor only fixes offsets (HF's Llama-3 tokenizer.json does the same).
    return processors.Sequence([processors.ByteLevel(trim_offsets=False), template_proc])


def _tokenizer_config(vocab: _Vocab, meta: Mapping[str, Any], add_bos: bool, add_eos: bool) -> dict[str, Any]:
    """``tokenizer_config.json``: the usage facts HF keeps next to ``tokenizer.json``."""
    config: dict[str, Any] = {
        # The generic class: it uses tokenizer.json as written. A model-specific class could
        # rebuild parts of the pipeline from its own defaults (transformers 5 does for Llama).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unk", "pad"):
        content = vocab.token(name)
        if content is not None:
            config[f"{name}_token"] = content
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length") if arch else None
    if ctx is not None:
        config["model_max_length"] = int(ctx)
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return config


def _generation_config(vocab: _Vocab, meta: Mapping[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: BOS and the id(s) that end generation.

    llama.cpp stops on EOS and also on end-of-turn / end-of-message tokens (Llama-3's
    ``<|eot_id|>``, ``<|eom_id|>``); HF expresses that as a list of EOS ids.
    """
    gen: dict[str, Any] = {}
    if "bos" in vocab.special_ids:
        gen["bos_token_id"] = vocab.special_ids["bos"]
    stops = list(dict.fromkeys(vocab.special_ids[n] for n in ("eos", "eot", "eom") if n in vocab.special_ids))
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return gen


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
