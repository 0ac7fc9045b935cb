"""qconv's Tokenizer (tokenizers + HF side files) against transformers' AutoTokenizer on the
same files: ids, special tokens and the rendered chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from qconv.checkpoint.tokenizer import Tokenizer, read_tokenizer_files
from qconv.errors import MissingTokenizer

TEMPLATE = (
    "{% for m in messages %}{{ bos_token if loop.first else '' }}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. 12345 " * 20], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def test_matches_transformers(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer.from_files(read_tokenizer_files(tok_dir), tok_dir)
    text = "The lazy fox, 2024 — jumps!"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.bos_id == ref.bos_token_id and ours.eos_ids == [ref.eos_token_id]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.decode(ours.encode(text)) == text


def test_missing_tokenizer_and_template(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(MissingTokenizer, match="tokenizer.json"):
        Tokenizer.from_files({}, tmp_path)
    files = read_tokenizer_files(tok_dir)
    files["tokenizer_config.json"] = b'{"bos_token": "<s>"}'
    with pytest.raises(MissingTokenizer, match="chat template"):
        Tokenizer.from_files(files, tok_dir).apply_chat_template([{"role": "user", "content": "x"}])
