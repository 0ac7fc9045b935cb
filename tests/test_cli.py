"""The CLI contract, through the installed ``qconv`` console script: help, version, exit codes,
--json, --force, and one-line errors (exit 2, no traceback, nothing written) for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qconv.atomic import atomic_output

QCONV = str(Path(sys.executable).parent / "qconv")
STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.gguf not present")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """One tiny llama checkpoint: the CLI contract does not depend on the architecture."""
    path = tmp_path_factory.mktemp("cli-llama")
    tiny_hf_model_builder("llama").save_pretrained(path)
    return path


def qconv(*args: object, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QCONV, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_user_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, exactly one line on stderr mentioning every needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_and_version() -> None:
    res = qconv("--help")
    assert res.returncode == 0
    for cmd in ("convert", "inspect", "run"):
        assert cmd in res.stdout
        sub = qconv(cmd, "--help")
        assert sub.returncode == 0 and "Examples" in sub.stdout, sub.stdout
    v = qconv("--version")
    assert v.returncode == 0 and v.stdout.startswith("qconv ")


def test_usage_error_exits_2() -> None:
    assert qconv("convert").returncode == 2
    assert qconv("no-such-command").returncode == 2
    assert_user_error(qconv("run", "x", "--prompt", "a", "--ppl", "b"), "exactly one of")


def test_convert_json_force_and_dtype(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    res = qconv("convert", model_dir, "-o", out, "--dtype", "bf16", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["output"] == str(out) and data["tensors"] > 0
    info = json.loads(qconv("inspect", out, "--json").stdout)
    assert set(info["dtype_counts"]) == {"BF16"}
    assert info["bits_per_weight"] == 16.0
    # exists -> refused, untouched; --force -> replaced
    before = sorted(p.name for p in out.iterdir())
    assert_user_error(qconv("convert", model_dir, "-o", out), str(out), "--force")
    assert sorted(p.name for p in out.iterdir()) == before
    res = qconv("convert", model_dir, "-o", out, "--force", "--dtype", "f16", "--quiet")
    assert res.returncode == 0 and res.stdout == "", res.stdout
    assert set(json.loads(qconv("inspect", out, "--json").stdout)["dtype_counts"]) == {"F16"}


def test_convert_shards(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    assert qconv("convert", model_dir, "-o", out, "--max-shard-size", "100KB").returncode == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    # the sharded checkpoint reads back identical
    from safetensors.torch import load_file

    from qconv.checkpoint import open_model

    orig = load_file(model_dir / "model.safetensors")
    with open_model(out) as src:
        for name in src.tensor_names():
            assert src.get_tensor(name).equal(orig[name]), name


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_bad_inputs(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases: list[tuple[Path, tuple[str, ...]]] = []

    cases.append((tmp_path / "missing", ("missing", "no such file")))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, ("empty",)))

    no_config = _copy(model_dir, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    cases.append((no_config, ("config.json not found",)))

    unsupported = _copy(model_dir, tmp_path / "unsupported")
    cfg = _config(unsupported)
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (unsupported / "config.json").write_text(json.dumps(cfg))
    cases.append((unsupported, ("unsupported architecture GPT2LMHeadModel", "supported: LlamaForCausalLM")))

    truncated = _copy(model_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((truncated, ("model.safetensors", "truncated")))

    corrupt = _copy(model_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{nope:}" + data[15:])
    cases.append((corrupt, ("model.safetensors", "corrupt")))

    shape = _copy(model_dir, tmp_path / "shape")
    cfg = _config(shape)
    cfg["intermediate_size"] += 8
    (shape / "config.json").write_text(json.dumps(cfg))
    cases.append((shape, ("mlp.", "shape", "config implies")))

    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"GGUX" + b"\x00" * 64)
    cases.append((bad_magic, ("bad.gguf", "not a readable GGUF")))

    if STORIES.is_file():
        trunc_gguf = tmp_path / "trunc.gguf"
        trunc_gguf.write_bytes(STORIES.read_bytes()[:200_000])
        cases.append((trunc_gguf, ("trunc.gguf",)))

    for path, needles in cases:
        res = qconv("convert", path, "-o", out)
        assert_user_error(res, *needles)
        assert not out.exists(), path
        assert not list(tmp_path.glob(".out.qconv-tmp-*")), path


def test_gguf_output_errors(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    assert_user_error(qconv("convert", model_dir, "-o", out, "--type", "q9_k"), "unknown GGUF type", "q4_k_m")
    # no tokenizer: llama.cpp cannot load a GGUF without a vocabulary
    assert_user_error(qconv("convert", model_dir, "-o", out, "--type", "q8_0"), "tokenizer")
    assert not out.exists()
    out.write_bytes(b"keep")
    assert_user_error(qconv("convert", model_dir, "-o", out, "--type", "q8_0"), "--force")
    assert out.read_bytes() == b"keep"


def test_gguf_export_bad_checkpoints(model_dir: Path, tmp_path: Path) -> None:
    """GGUF export of an unsupported architecture, or of a checkpoint missing a tensor the
    config implies, is refused up front in one line: no output, no temp file."""
    from safetensors.numpy import load_file, save_file

    from tests_support import write_tokenizer

    out = tmp_path / "m.gguf"
    unsupported = _copy(model_dir, tmp_path / "unsupported")
    write_tokenizer(unsupported, 300)
    cfg = _config(unsupported)
    cfg.update(architectures=["PhiForCausalLM"], model_type="phi")
    (unsupported / "config.json").write_text(json.dumps(cfg))
    assert_user_error(qconv("convert", unsupported, "-o", out, "--type", "q8_0"), "unsupported architecture PhiForCausalLM")

    missing = _copy(model_dir, tmp_path / "missing")
    write_tokenizer(missing, 300)
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    assert_user_error(qconv("convert", missing, "-o", out, "--type", "q4_k_m"), "model.layers.1.self_attn.k_proj.weight")
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".m.gguf*"))


def test_missing_tokenizer(model_dir: Path) -> None:
    assert_user_error(qconv("run", model_dir, "--prompt", "hi", "--device", "cpu"), "tokenizer")


def test_unknown_dtype(model_dir: Path, tmp_path: Path) -> None:
    assert_user_error(qconv("convert", model_dir, "-o", tmp_path / "o", "--dtype", "f8"), "unknown dtype", "bf16")
    assert not (tmp_path / "o").exists()


def test_atomic_output_removes_partial_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, directory=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@needs_stories
def test_run_json_outputs(tmp_path: Path) -> None:
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": "Once upon a time there was a cat. " * 20}) for _ in range(3)))
    res = qconv("run", STORIES, "--ppl", text, "--ctx", "64", "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    ppl = json.loads(res.stdout)
    assert 1.0 < ppl["ppl"] < 100 and ppl["n_windows"] >= 1
    res = qconv("run", STORIES, "--compare", STORIES, "--text", text, "--ctx", "64", "--json", "--device", "cpu")
    cmp = json.loads(res.stdout)
    assert cmp["kl_mean"] == pytest.approx(0.0, abs=1e-9) and cmp["top1_agreement"] == 1.0
    res = qconv("run", STORIES, "--prompt", "Once upon a time", "-n", "8", "--json", "--device", "cpu")
    gen = json.loads(res.stdout)
    assert gen["new_tokens"] == 8 and gen["text"]
    assert_user_error(qconv("run", STORIES, "--ppl", text, "--ctx", "100000", "--device", "cpu"), "fewer than one window")
    assert_user_error(qconv("run", STORIES, "--ppl", text, "--text-field", "body", "--device", "cpu"), "no field 'body'")


def test_progress_off_a_terminal_prints_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """CI logs see a line per layer (a long run is visibly alive); --quiet silences it."""
    from qconv.progress import progress

    with progress("quantizing", 3) as advance:
        for _ in range(3):
            advance()
    with progress("quiet", 3, quiet=True) as advance:
        advance()
    err = capsys.readouterr()
    assert err.out == ""
    lines = err.err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["quantizing: 1/3", "quantizing: 2/3", "quantizing: 3/3"]
