"""Inputs users type: Hub model ids (from a pre-populated cache, offline), streamed dataset names
that stop after the documents they need, and chat-formatted calibration rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qconv.errors import InvalidOption
from qconv.checkpoint.hub import looks_like_repo_id

QCONV = str(Path(sys.executable).parent / "qconv")


def hub_cache(root: Path, repo: str, model: Path) -> Path:
    """A Hugging Face Hub cache holding ``model`` as ``repo``'s main revision (its layout:
    ``models--owner--name/{refs/main, snapshots/<commit>/...}``)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_repo_ids_are_told_from_paths() -> None:
    assert looks_like_repo_id("meta-llama/Llama-3.1-8B") and looks_like_repo_id("owner/name@v1.0")
    for path in ("/abs/model", "./model", "~/m", "a/b/c", "model", "owner/model.gguf"):
        assert not looks_like_repo_id(path), path


def test_hub_id_opens_from_the_cache_offline(model: Path, tmp_path: Path) -> None:
    cache = hub_cache(tmp_path / "hub", "qconv-test/tiny", model)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([QCONV, "inspect", "qconv-test/tiny", "--json"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["architecture"]
    q = subprocess.run([QCONV, "quantize", "qconv-test/tiny", "--method", "rtn", "-g", "32", "-o",
                        str(tmp_path / "q"), "--quiet"], capture_output=True, text=True, env=env)
    assert q.returncode == 0, q.stderr
    missing = subprocess.run([QCONV, "inspect", "qconv-test/absent"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert "not in the local cache" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


class _Stream:
    """A stand-in for a streamed ``datasets`` split that counts the rows handed out."""

    def __init__(self, rows: int) -> None:
        self.rows, self.taken = rows, 0

    def __iter__(self):
        for i in range(self.rows):
            self.taken += 1
            yield {"text": f"document {i} " + "word " * 200, "messages": [{"role": "user", "content": f"q{i}"}]}


def test_dataset_names_stream_only_the_documents_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from qconv.quant.calibration import CHARS_PER_TOKEN, load_calibration_rows

    stream = _Stream(10_000)
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False, **_kw):
        calls.append((name, config, split, streaming))
        return stream

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_calibration_rows("allenai/c4:en", tokens=4 * 128)
    assert calls == [("allenai/c4", "en", "train", True)]
    assert sum(map(len, rows)) >= 4 * 128 * CHARS_PER_TOKEN
    assert stream.taken == len(rows) < 10_000  # stopped after the documents it needed
    with pytest.raises(InvalidOption, match="no field 'body'"):
        load_calibration_rows("allenai/c4:en", text_field="body", tokens=16)


def test_chat_rows_are_rendered_with_the_chat_template(model: Path, tmp_path: Path) -> None:
    from qconv.checkpoint.tokenizer import Tokenizer
    from qconv.quant.calibration import load_calibration_rows

    files = {n: (model / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    files["tokenizer_config.json"] = json.dumps(config).encode()
    tok = Tokenizer.from_files(files, model)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                       {"role": "assistant", "content": "hi"}]}) for i in range(3)))
    rows = load_calibration_rows(str(data), "messages", tok)
    assert rows[1] == "<user>hello 1</user>\n<assistant>hi</assistant>\n"
    plain = tmp_path / "plain.txt"
    plain.write_text("just text")
    with pytest.raises(InvalidOption, match="needs rows of messages"):
        load_calibration_rows(str(plain), "text", tok)
