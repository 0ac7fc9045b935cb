"""HF tokenizer files -> GGUF tokenizer metadata (the inverse of :mod:`qconv.checkpoint.gguf_vocab`).

llama.cpp never reads ``tokenizer.json``. It rebuilds the tokenizer from ``tokenizer.ggml.*`` keys:
the token strings in id order, a type per token, and then, per vocab kind,

``gpt2``  (byte-level BPE: GPT-2, Llama-3, SmolLM, Qwen2, ...)
    the merges, plus the *name* (``tokenizer.ggml.pre``) of a pre-tokenizer whose split regexes
    are compiled into llama.cpp. A wrong or missing name does not fail loudly: llama.cpp falls back
    to its "default" split and prints "GENERATION QUALITY WILL BE DEGRADED", and every id after
    the first disagreeing split differs. convert_hf_to_gguf finds the name by hashing the ids of a
    probe string; we instead read the split steps out of ``tokenizer.json`` and look them up in
    :data:`~qconv.checkpoint.gguf_vocab.PRE_TOKENIZERS` (the same table the GGUF importer uses, so
    export and import agree by construction). No match is an error, not a guess.

``llama``  (SentencePiece-style BPE with ``byte_fallback``: Llama-1/2, Mistral-v0.1, stories*)
    per-token scores. llama.cpp merges the adjacent pair whose *result* has the highest score,
    HF the pair with the lowest merge rank; scoring each token by minus the rank of the first
    merge that produces it makes the two agree (:func:`_spm_scores`). convert_hf_to_gguf's
    ``_set_vocab_llama_hf`` (gguf-py ``LlamaHfVocab``) writes a placeholder -1000 for every
    score, which turns llama.cpp's merging into plain left-to-right order; we do not copy that.

Both kinds also get the special token ids, ``add_bos_token``/``add_eos_token`` (written always:
llama.cpp's defaults differ per vocab kind and per pre-tokenizer name) and the chat template.

Token types follow convert_hf_to_gguf: added special tokens are CONTROL (llama.cpp cuts them out of
the text only when asked to parse specials), other added tokens USER_DEFINED (always cut out, like
HF's added tokens), ids the tokenizer lacks up to the embedding size become ``[PAD{i}]`` UNUSED,
and for the ``llama`` kind ``<0xNN>`` pieces are BYTE and the ``unk_token`` is UNKNOWN.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType, Keys

from qconv.checkpoint.gguf_vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    SPIECE_SPACE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    PreTokenizerSpec,
)
from qconv.errors import CheckpointMismatch, CorruptFile, MissingTokenizer, UnsupportedModel

log = logging.getLogger(__name__)

#: ``{key: (value, value_type)}``; apply with ``writer.add_key_value(key, value, value_type)``.
#: Arrays are plain Python lists of ``str`` / ``int`` / ``float``, so gguf-py infers the element
#: types llama.cpp insists on (STRING, INT32, FLOAT32).
GGUFMetadata = dict[str, tuple[Any, GGUFValueType]]

_K = Keys.Tokenizer
_STR, _ARR, _BOOL, _U32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.BOOL, GGUFValueType.UINT32

#: When several ``pre`` names mean the same split, write the one convert_hf_to_gguf writes for the
#: best-known family, so the file looks like llama.cpp's own conversion of the model.
_PREFERRED_PRE_NAMES = ("gpt-2", "llama-bpe", "qwen2", "smollm", "dbrx", "default")

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
#: ``(?i:...)`` groups without nested groups, classes or escapes (HF's contraction alternatives).
_CASE_INSENSITIVE_GROUP = re.compile(r"\(\?i:([^()\[\]\\]*)\)")


def gguf_tokenizer_metadata(
    files: Mapping[str, bytes], vocab_size: int, pre_override: str | None = None
) -> GGUFMetadata:
    """The ``tokenizer.*`` GGUF keys for an HF tokenizer, ready for ``GGUFWriter.add_key_value``.

    ``files`` are the HF side files (``tokenizer.json`` and, where present,
    ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``,
    ``chat_template.jinja``); ``vocab_size`` is the number of embedding rows, which llama.cpp
    expects the token list to match. ``pre_override`` (``--tokenizer-pre``) replaces the detected
    byte-level pre-tokenizer name.

    Raises :class:`MissingTokenizer` when there is no ``tokenizer.json`` (llama.cpp needs a vocabulary),
    :class:`UnsupportedModel` for a tokenizer llama.cpp cannot reproduce (not BPE, or a
    byte-level split that matches no known ``pre`` name and no override),
    :class:`CheckpointMismatch` when the tokenizer has ids beyond ``vocab_size``, and
    :class:`CorruptFile` for unreadable JSON.
    """
    if "tokenizer.json" not in files:
        raise MissingTokenizer("no tokenizer.json: llama.cpp cannot load a GGUF without a vocabulary")
    tj = _json(files, "tokenizer.json")
    config = _json(files, "tokenizer_config.json")
    special_map = _json(files, "special_tokens_map.json")
    generation = _json(files, "generation_config.json")

    kind = _vocab_kind(tj)
    vocab = _HfVocab.build(tj, vocab_size, kind)
    meta: GGUFMetadata = {_K.MODEL: (kind, _STR)}
    if kind == "gpt2":
        if not vocab.merges:
            raise UnsupportedModel("byte-level BPE tokenizer.json has no merges (llama.cpp needs them)")
        meta[_K.PRE] = (_resolve_pre(tj, pre_override), _STR)
        meta[_K.LIST] = (vocab.tokens, _ARR)
        meta[_K.TOKEN_TYPE] = (vocab.types, _ARR)
        meta[_K.MERGES] = (_merge_strings(vocab.merges), _ARR)
    else:
        if pre_override:
            log.warning("--tokenizer-pre only applies to byte-level BPE vocabs; ignored for this SentencePiece one")
        meta[_K.PRE] = ("default", _STR)  # unused for SentencePiece; convert_hf_to_gguf writes it too
        meta[_K.LIST] = (vocab.tokens, _ARR)
        meta[_K.SCORES] = (_spm_scores(vocab), _ARR)
        meta[_K.TOKEN_TYPE] = (vocab.types, _ARR)
        if not _spm_space_prefix(tj):
            meta[_K.ADD_PREFIX] = (False, _BOOL)  # llama.cpp's SentencePiece default is True

    specials = _special_ids(tj, config, special_map, generation, vocab)
    add_bos, add_eos = _add_special_flags(tj, config, specials, vocab)
    for name, key in (("bos", _K.BOS_ID), ("eos", _K.EOS_ID), ("unk", _K.UNK_ID), ("pad", _K.PAD_ID)):
        if name in specials:
            meta[key] = (specials[name], _U32)
    meta[_K.ADD_BOS] = (add_bos, _BOOL)
    meta[_K.ADD_EOS] = (add_eos, _BOOL)
    meta.update(_chat_template(files, config))
    return meta


# --- reading the files -----------------------------------------------------------------------


def _json(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        obj = json.loads(files[name])
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFile(f"unreadable {name}: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptFile(f"{name} is not a JSON object")
    return obj


def _steps(node: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """A normalizer / pre-tokenizer / post-processor / decoder as a flat list of its steps."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = next((node[k] for k in ("pretokenizers", "normalizers", "processors", "decoders") if k in node), [])
        return [step for child in children for step in _steps(child)]
    return [node]


def _vocab_kind(tj: Mapping[str, Any]) -> str:
    """``"gpt2"`` for byte-level BPE, ``"llama"`` for SentencePiece-style BPE with byte fallback."""
    model = tj.get("model") or {}
    mtype = model.get("type") or ("BPE" if "merges" in model else None)
    if mtype != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedModel(
            f"tokenizer.json model {mtype!r} cannot be written to GGUF "
            "(supported: byte-level BPE and SentencePiece-style BPE with byte_fallback)"
        )
    byte_level = any(s.get("type") == "ByteLevel" for s in _steps(tj.get("pre_tokenizer")) + _steps(tj.get("decoder")))
    if byte_level:
        return "gpt2"
    if model.get("byte_fallback"):
        return "llama"
    raise UnsupportedModel(
        "tokenizer.json is a BPE with neither a ByteLevel pre-tokenizer nor byte_fallback; "
        "llama.cpp has no tokenizer that reproduces it"
    )


@dataclass
class _HfVocab:
    """The token list llama.cpp will see: one unique string and one type per embedding row."""

    tokens: list[str]
    types: list[int]
    merges: list[tuple[str, str]]
    ids: dict[str, int]  # token string -> id

    @classmethod
    def build(cls, tj: Mapping[str, Any], vocab_size: int, kind: str) -> _HfVocab:
        model = tj["model"]
        texts: dict[int, str] = {int(i): str(t) for t, i in model["vocab"].items()}
        added_types: dict[int, int] = {}
        for added in tj.get("added_tokens") or []:
            tid = int(added["id"])
            # HF matches added tokens on the raw text, and so does llama.cpp for CONTROL and
            # USER_DEFINED tokens: their GGUF string is the content, not a byte-level spelling.
            texts[tid] = str(added["content"])
            added_types[tid] = CONTROL if added.get("special") else USER_DEFINED
            if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
                log.warning(
                    "added token %r strips whitespace or matches whole words only; llama.cpp matches "
                    "it plainly, so ids next to it may differ",
                    added["content"],
                )
        if not texts:
            raise UnsupportedModel("tokenizer.json has an empty vocabulary")
        top = max(texts)
        if top >= vocab_size:
            raise CheckpointMismatch(
                f"the tokenizer has token ids up to {top} but the model's embedding has {vocab_size} rows"
            )
        unk = model.get("unk_token") if kind == "llama" else None
        tokens: list[str] = []
        types: list[int] = []
        ids: dict[str, int] = {}
        for tid in range(vocab_size):
            text = texts.get(tid)
            if text is None:
                text, ty = f"[PAD{tid}]", UNUSED  # convert_hf_to_gguf's filler for unused rows
            else:
                ty = added_types.get(tid, NORMAL)
                if kind == "llama" and text == unk:
                    ty = UNKNOWN
                elif kind == "llama" and ty == NORMAL and _BYTE_PIECE.fullmatch(text):
                    ty = BYTE
            if text in ids or not text:
                # llama.cpp maps strings to ids and aborts on a repeat; an empty string it renames.
                log.warning("token %d %r repeats an earlier token or is empty; written as [DUP%d]", tid, text, tid)
                text = f"[DUP{tid}]"
            ids[text] = tid
            tokens.append(text)
            types.append(ty)
        return cls(tokens, types, _merge_pairs(model.get("merges") or []), ids)


def _merge_pairs(raw: list[Any]) -> list[tuple[str, str]]:
    """tokenizers writes merges as ``"a b"`` strings (older files) or ``["a", "b"]`` pairs."""
    pairs = []
    for m in raw:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise CorruptFile(f"tokenizer.json: malformed merge {m!r}")
        pairs.append((str(parts[0]), str(parts[1])))
    return pairs


def _merge_strings(merges: list[tuple[str, str]]) -> list[str]:
    """llama.cpp's ``"a b"`` merge strings (it splits at the first space after the first byte).

    Byte-level tokens spell a space as ``Ġ``, so a raw space cannot occur in either half.
    """
    bad = [m for m in merges if " " in m[0] or " " in m[1]]
    if bad:
        raise UnsupportedModel(f"byte-level merges containing a raw space cannot be written to GGUF: {bad[0]!r}")
    return [f"{a} {b}" for a, b in merges]


# --- byte-level pre-tokenizer -> tokenizer.ggml.pre ------------------------------------------


def _canonical_regex(rx: str) -> str:
    """One spelling per split regex, so HF's and llama.cpp's versions of a pattern compare equal.

    llama.cpp's regex engine has no inline flags, so it spells HF's ``(?i:'s|'t|...)`` with
    character classes (``(?:'[sS]|'[tT]|...)``); and it drops GPT-2's final ``|\\s+`` after
    ``\\s+(?!\\S)``, which splits identically because an isolating split keeps unmatched text
    as its own piece anyway.
    """

    def fold(m: re.Match[str]) -> str:
        return "(?:" + re.sub(r"[A-Za-z]", lambda c: f"[{c[0].lower()}{c[0].upper()}]", m[1]) + ")"

    rx = _CASE_INSENSITIVE_GROUP.sub(fold, rx)
    tail = r"\s+(?!\S)|\s+"
    return rx[: -len(r"|\s+")] if rx.endswith(tail) else rx


def _split_regexes(node: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The chain of isolating split regexes a byte-level pre-tokenizer runs, or None.

    None means the pipeline has a step llama.cpp cannot express: ByteLevel not last or adding
    a prefix space, splits that drop or merge text, literal-string splits, other pre-tokenizers.
    ``Digits`` and ByteLevel's own regex (GPT-2's, the "gpt-2" entry of the table) are spelled
    as the regexes llama.cpp uses for them.
    """
    steps = _steps(node)
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    regexes = []
    for step in steps[:-1]:
        kind = step.get("type")
        pattern = step.get("pattern") or {}
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and "Regex" in pattern:
            regexes.append(_canonical_regex(pattern["Regex"]))
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        else:
            return None
    if steps[-1].get("use_regex", True):
        regexes.append(_canonical_regex(PRE_TOKENIZERS["gpt-2"].regexes[0]))
    return tuple(regexes)


def _same_split(spec: PreTokenizerSpec, regexes: tuple[str, ...], ignore_merges: bool) -> bool:
    return spec.ignore_merges == ignore_merges and tuple(_canonical_regex(r) for r in spec.regexes) == regexes


def _describe(node: Mapping[str, Any] | None) -> str:
    """A pre-tokenizer as a short readable expression, for error messages."""
    if not node:
        return "none"
    if node.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(n) for n in node.get("pretokenizers", [])) + "]"
    args = []
    for key, value in node.items():
        if key == "type":
            continue
        if isinstance(value, dict) and len(value) == 1:  # {"Regex": "..."} / {"String": "..."}
            value = next(iter(value.values()))
        args.append(f"{key}={value!r}")
    return f"{node.get('type')}({', '.join(args)})"


def detect_pre_tokenizer(tokenizer_json: Mapping[str, Any]) -> str | None:
    """The ``tokenizer.ggml.pre`` name whose llama.cpp split equals this byte-level pipeline.

    Compares the split regexes (and BPE ``ignore_merges``, which llama.cpp ties to the name)
    with every entry of :data:`PRE_TOKENIZERS`; None when nothing matches.
    """
    regexes = _split_regexes(tokenizer_json.get("pre_tokenizer"))
    if regexes is None:
        return None
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges", False))
    names = [n for n, spec in PRE_TOKENIZERS.items() if _same_split(spec, regexes, ignore_merges)]
    preferred = [n for n in _PREFERRED_PRE_NAMES if n in names]
    return (preferred or names or [None])[0]


def _resolve_pre(tj: Mapping[str, Any], override: str | None) -> str:
    """The detected ``pre`` name, or the user's override (with a warning where it changes ids)."""
    detected = detect_pre_tokenizer(tj)
    described = _describe(tj.get("pre_tokenizer"))
    if tj.get("normalizer"):
        # Qwen2 ships NFC; llama.cpp (like convert_hf_to_gguf) has no byte-level normalizer.
        log.warning(
            "tokenizer.json normalizes text (%s) before splitting; llama.cpp does not, so ids differ "
            "for text the normalizer changes",
            _describe(tj["normalizer"]),
        )
    if override:
        spec = PRE_TOKENIZERS.get(override)
        if spec is None:
            log.warning(
                "--tokenizer-pre %r is not a name qconv knows; llama.cpp refuses to load a file "
                "whose pre-tokenizer name it does not know",
                override,
            )
        elif detected is None or not _same_split(spec, *_split_of(detected)):
            log.warning(
                "writing tokenizer.ggml.pre=%r as told, but tokenizer.json splits text with %s; "
                "llama.cpp's ids may differ from the HF tokenizer's",
                override,
                described,
            )
        return override
    if detected is None:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise UnsupportedModel(
            f"tokenizer.json's pre-tokenizer {described} matches none of llama.cpp's pre-tokenizers; "
            f"pass --tokenizer-pre NAME to choose one (known: {known})"
        )
    return detected


def _split_of(name: str) -> tuple[tuple[str, ...], bool]:
    spec = PRE_TOKENIZERS[name]
    return tuple(_canonical_regex(r) for r in spec.regexes), spec.ignore_merges


# --- SentencePiece-style BPE -----------------------------------------------------------------


def _spm_scores(vocab: _HfVocab) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merging follow the HF merge ranks.

    llama.cpp repeatedly merges the adjacent pair whose concatenation has the highest score; HF
    BPE merges the pair with the lowest rank. A token scored by minus the rank of the first merge
    that produces it therefore wins exactly when HF's merge would. That holds because in these
    vocabs all merges yielding one token are contiguous in rank (SentencePiece-converted lists
    order merges by the result's score) or there is only one (trained BPE). NORMAL tokens no
    merge produces (single characters) rank after every merge; other types score 0 as
    SentencePiece gives control and byte pieces, and llama.cpp never merges into them unless
    their text could be spelled by two vocab pieces.
    """
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(vocab.merges):
        first_rank.setdefault(left + right, rank)
    n = len(vocab.merges)
    return [
        -float(first_rank.get(text, n + tid)) if ty == NORMAL else 0.0
        for tid, (text, ty) in enumerate(zip(vocab.tokens, vocab.types))
    ]


def _spm_space_prefix(tj: Mapping[str, Any]) -> bool:
    """Whether the HF pipeline prepends ``▁`` to the text (llama.cpp's ``add_space_prefix``).

    Legacy HF Llama tokenizers do it in the normalizer (``Prepend("▁")`` + ``Replace(" ", "▁")``),
    which is exactly llama.cpp: one ``▁`` before every run of text that starts the input or follows
    a special token. Newer ones use ``Metaspace``, which skips the ``▁`` when the text already
    starts with a space (and, with ``prepend_scheme="first"``, after special tokens); llama.cpp
    cannot do that, so such text gets different ids and we say so.
    """
    normalizers = _steps(tj.get("normalizer"))
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == SPIECE_SPACE for n in normalizers)
    replace = any(
        n.get("type") == "Replace"
        and (n.get("pattern") or {}).get("String") == " "
        and n.get("content") == SPIECE_SPACE
        for n in normalizers
    )
    others = [n for n in normalizers if n.get("type") not in ("Prepend", "Replace")]
    if others:
        log.warning("llama.cpp does not apply tokenizer.json's normalizer steps %s", [_describe(n) for n in others])
    for step in _steps(tj.get("pre_tokenizer")):
        if step.get("type") != "Metaspace":
            log.warning("llama.cpp's SentencePiece tokenizer does not apply pre-tokenizer %s", _describe(step))
            continue
        replace = True
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        if scheme != "never":
            prepend = True
            log.warning(
                "tokenizer.json prepends '▁' with Metaspace(prepend_scheme=%r), which skips it when the "
                "text already starts with a space; llama.cpp always prepends, so ids differ for such text",
                scheme,
            )
    if not replace:
        raise UnsupportedModel(
            "SentencePiece-style tokenizer.json does not turn spaces into '▁'; llama.cpp always does"
        )
    return prepend


# --- special tokens --------------------------------------------------------------------------


def _content(entry: Any) -> str | None:
    """tokenizer_config / special_tokens_map give a token as a string or an AddedToken dict."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_ids(
    tj: Mapping[str, Any],
    config: Mapping[str, Any],
    special_map: Mapping[str, Any],
    generation: Mapping[str, Any],
    vocab: _HfVocab,
) -> dict[str, int]:
    """bos/eos/unk/pad ids: named in tokenizer_config, else special_tokens_map, else by id.

    The same precedence as gguf-py's SpecialVocab (token names first, config ids as fallback).
    For eos a list of ids (Llama-3's generation_config) gives its first; llama.cpp finds the
    other end-of-turn tokens itself by their text.
    """

    def named(name: str) -> int | None:
        for source in (config, special_map):
            content = _content(source.get(f"{name}_token"))
            if content is not None and content in vocab.ids:
                return vocab.ids[content]
        return None

    def numbered(key: str) -> int | None:
        value = generation.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and 0 <= value < len(vocab.tokens) else None

    model_unk = (tj.get("model") or {}).get("unk_token")
    fallbacks = {
        "bos": numbered("bos_token_id"),
        "eos": numbered("eos_token_id"),
        "unk": vocab.ids.get(model_unk) if isinstance(model_unk, str) else None,
        "pad": numbered("pad_token_id"),
    }
    found = {}
    for name, fallback in fallbacks.items():
        tid = named(name)
        if tid is None:
            tid = fallback
        if tid is not None:
            found[name] = tid
    return found


def _template_ends(post_processor: Mapping[str, Any] | None, vocab: _HfVocab) -> tuple[int | None, int | None]:
    """Ids of the special tokens the post-processor puts before / after a single sequence."""
    for proc in _steps(post_processor):
        kind = proc.get("type")
        if kind in ("RobertaProcessing", "BertProcessing"):
            cls, sep = proc.get("cls") or [None, None], proc.get("sep") or [None, None]
            return cls[1], sep[1]
        if kind != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        table = proc.get("special_tokens") or {}
        first = _template_special_id(single[0], table, vocab) if single else None
        last = _template_special_id(single[-1], table, vocab) if len(single) > 1 else None
        return first, last
    return None, None


def _template_special_id(piece: Mapping[str, Any], table: Mapping[str, Any], vocab: _HfVocab) -> int | None:
    """The id of a TemplateProcessing ``{"SpecialToken": ...}`` piece (None for ``$A``)."""
    name = (piece.get("SpecialToken") or {}).get("id")
    if name is None:
        return None
    ids = (table.get(name) or {}).get("ids") or []
    return int(ids[0]) if ids else vocab.ids.get(name)


def _add_special_flags(
    tj: Mapping[str, Any], config: Mapping[str, Any], specials: dict[str, int], vocab: _HfVocab
) -> tuple[bool, bool]:
    """``add_bos_token`` / ``add_eos_token``: tokenizer_config's, else what tokenizer.json adds.

    transformers' model-specific tokenizer classes rebuild the post-processor from the config
    flags, so the config wins when both are present. When the flags come from the post-processor
    its tokens become bos/eos, since those are what HF actually adds. llama.cpp adds its bos/eos
    ids, so a flag without a token to add is dropped.
    """
    first, last = _template_ends(tj.get("post_processor"), vocab)
    flags = []
    for name, edge in (("bos", first), ("eos", last)):
        configured = config.get(f"add_{name}_token")
        if isinstance(configured, bool):
            add = configured
            if add != (edge is not None):
                log.warning(
                    "tokenizer_config.json says add_%s_token=%s but tokenizer.json's post-processor %s; "
                    "following tokenizer_config",
                    name, add, "adds one" if edge is not None else "adds none",
                )
        else:
            add = edge is not None
            if edge is not None:
                specials[name] = edge
        if add and name not in specials:
            log.warning("the tokenizer adds a %s token but names none; llama.cpp will not add one", name)
            add = False
        flags.append(add)
    return flags[0], flags[1]


def _chat_template(files: Mapping[str, bytes], config: Mapping[str, Any]) -> GGUFMetadata:
    """``tokenizer.chat_template`` (and named extra templates, as convert_hf_to_gguf writes them).

    ``chat_template.jinja`` wins over tokenizer_config's copy, as in qconv's own Tokenizer.
    """
    template: Any = files["chat_template.jinja"].decode("utf-8") if "chat_template.jinja" in files else None
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, str):
        return {_K.CHAT_TEMPLATE: (template, _STR)} if template else {}
    if not isinstance(template, list):
        return {}
    meta: GGUFMetadata = {}
    names = []
    for choice in template:
        name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name", "")))
        text = choice.get("template")
        if not name or not isinstance(text, str):
            continue
        if name == "default":
            meta[_K.CHAT_TEMPLATE] = (text, _STR)
        else:
            names.append(name)
            meta[_K.CHAT_TEMPLATE_N.format(name=name)] = (text, _STR)
    if names:
        meta[_K.CHAT_TEMPLATES] = (names, _ARR)
    return meta

