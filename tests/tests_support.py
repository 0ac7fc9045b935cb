"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """Give a tiny checkpoint a real tokenizer: a byte-level BPE (gpt-2 pre-tokenizer) trained on
    a fixed text, at most ``vocab_size`` tokens (llama.cpp and calibration need a vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Once upon a time there was a tiny model that could count 1 2 3 4 5. " * 50], trainer)
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer.json").write_text(tok.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
