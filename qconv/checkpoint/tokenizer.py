"""Tokenizer: a `tokenizers` tokenizer plus the HF side files that say how to use it.

HF keeps the vocabulary in ``tokenizer.json`` and the usage facts (BOS/EOS, whether to add
BOS, the chat template) in ``tokenizer_config.json``. Both travel together as a dict of file
name -> bytes (:data:`TOKENIZER_FILES`), which is what the HF writer copies and what the GGUF
importer produces, so every model source hands out tokenizers the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from qconv.errors import CorruptFile, MissingTokenizer

#: Side files an HF checkpoint may carry for its tokenizer and generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def read_tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The tokenizer side files present in an HF checkpoint directory."""
    return {n: (directory / n).read_bytes() for n in TOKENIZER_FILES if (directory / n).is_file()}


def _token_content(tok: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any], generation: dict[str, Any]) -> None:
        self._tok = tokenizer
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.bos_id = self._special_id("bos_token", generation.get("bos_token_id"))
        eos = generation.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        own = self._special_id("eos_token", None)
        self.eos_ids: list[int] = sorted({*eos_ids, *([own] if own is not None else [])})

    @classmethod
    def from_files(cls, files: dict[str, bytes], where: Path | str) -> "Tokenizer":
        """Build from the side files; ``where`` names the model in error messages."""
        if "tokenizer.json" not in files:
            raise MissingTokenizer("no tokenizer.json (this command needs a tokenizer)", where)
        try:
            tok = _HFTokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
            config = json.loads(files.get("tokenizer_config.json", b"{}"))
            generation = json.loads(files.get("generation_config.json", b"{}"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CorruptFile(f"unreadable tokenizer files: {e}", where) from None
        if "chat_template.jinja" in files:
            config["chat_template"] = files["chat_template.jinja"].decode("utf-8")
        return cls(tok, config, generation)

    def _special_id(self, key: str, fallback: int | None) -> int | None:
        content = _token_content(self.config.get(key))
        tid = self._tok.token_to_id(content) if content else None
        return tid if tid is not None else fallback

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids as ``AutoTokenizer(text)`` gives them (post-processor adds BOS if configured)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's Jinja chat template, as transformers does."""
        if not self.chat_template:
            raise MissingTokenizer("the tokenizer has no chat template (drop --chat)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise MissingTokenizer(f"chat template error: {msg}")

        env.globals["raise_exception"] = raise_exception
        special = {
            k: _token_content(self.config.get(k)) or "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
