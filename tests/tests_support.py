"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_tokenizer(directory: Path, vocab_size: int, fill: bool = False) -> None:
    """Give a tiny checkpoint a real tokenizer: a byte-level BPE (gpt-2 pre-tokenizer) trained on
    a fixed text, at most ``vocab_size`` tokens (llama.cpp and calibration need a vocabulary).

    ``fill``: add ``<unusedN>`` tokens until the tokenizer accounts for all ``vocab_size`` rows,
    counted as llama.cpp's Gemma 3 converter counts them (vocabulary plus added tokens): it drops
    embedding rows past that count."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Once upon a time there was a tiny model that could count 1 2 3 4 5. " * 50], trainer)
    if fill:
        counted = len(tok.get_vocab(with_added_tokens=False)) + len(json.loads(tok.to_str())["added_tokens"])
        tok.add_tokens([AddedToken(f"<unused{i}>", special=True) for i in range(vocab_size - counted)])
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer.json").write_text(tok.to_str())
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def extract_converter(sdist: Path, root: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion package and gguf-py, out of the
    llama-cpp-python sdist (its vendor/llama.cpp) into ``root``; returns ``root``."""
    import tarfile

    prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/")))]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(root, members=members, filter="data")
    return root


def output_bytes(path: Path) -> dict[str, bytes]:
    """An output's contents to compare runs by: a file's bytes, or a directory's files' by name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
