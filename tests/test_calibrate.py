"""calibrate: activation statistics against transformers with forward pre-hooks, determinism,
the llama.cpp imatrix file (read back with gguf-py), and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qconv import api
from qconv.checkpoint import open_model
from qconv.quant.calibration import calibration_windows, load_calibration_rows
from tests_support import write_tokenizer

QCONV = str(Path(sys.executable).parent / "qconv")
ARCHS = ("llama", "mistral", "qwen2")
SAMPLES, SEQLEN = 6, 32  # 6 windows: more than one batch of the pipeline (4)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Once upon a time there were {i} tiny models that could count "
                                                  f"{' '.join(str(j) for j in range(i % 7 + 1))}. " * 4})
                              for i in range(40)))
    return path


def _model(tmp_path_factory: pytest.TempPathFactory, builder, arch: str) -> Path:
    path = tmp_path_factory.mktemp(f"calib-{arch}")
    builder(arch, vocab_size=384).save_pretrained(path)
    write_tokenizer(path, 384)
    return path


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    return _model(tmp_path_factory, tiny_hf_model_builder, request.param)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    return _model(tmp_path_factory, tiny_hf_model_builder, "llama")


def _windows(model_path: Path, calib: Path, samples: int = SAMPLES, seqlen: int = SEQLEN, seed: int = 0) -> torch.Tensor:
    """The token windows exactly as ``qconv.quant.calibrate.calibrate`` builds them."""
    with open_model(model_path) as src:
        return calibration_windows(src.tokenizer(), load_calibration_rows(str(calib), "text"), samples, seqlen, seed)


def _oracle_stats(model_path: Path, tokens: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """transformers' model over ``tokens``, a forward pre-hook on every Linear accumulating in float64."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    stats: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name: str):
        def pre(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = stats.setdefault(name, {"count": torch.zeros((), dtype=torch.float64), "sum_sq": 0, "sum_abs": 0,
                                        "max_abs": torch.zeros(x.shape[-1], dtype=torch.float64)})
            s["count"] += x.shape[0]
            s["sum_sq"] = s["sum_sq"] + (x * x).sum(0)
            s["sum_abs"] = s["sum_abs"] + x.abs().sum(0)
            s["max_abs"] = torch.maximum(s["max_abs"], x.abs().amax(0))
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        hf(input_ids=tokens)
    for h in handles:
        h.remove()
    return stats


def test_stats_match_transformers_hooks(arch_model: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.safetensors"
    r = api.calibrate(arch_model, str(calib), out, samples=SAMPLES, seqlen=SEQLEN, seed=3)
    assert (r.samples, r.seqlen, r.tokens) == (SAMPLES, SEQLEN, SAMPLES * SEQLEN)
    got = load_file(str(out))
    oracle = _oracle_stats(arch_model, _windows(arch_model, calib, seed=3))
    # every Linear of the decoder layers; lm_head's input (the final norm's output) is not recorded
    assert "lm_head" in oracle
    expected = sorted(n for n in oracle if n != "lm_head")
    assert len(expected) == 2 * 7
    assert sorted({k.rsplit(".", 1)[0] for k in got}) == expected
    assert r.modules == len(expected)
    for name in expected:
        o = oracle[name]
        assert got[f"{name}.count"].tolist() == [SAMPLES * SEQLEN] == [int(o["count"])], name
        torch.testing.assert_close(got[f"{name}.sum_sq"].double(), o["sum_sq"], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got[f"{name}.mean_abs"].double(), o["sum_abs"] / o["count"], rtol=1e-4, atol=1e-7,
                                   msg=name)
        torch.testing.assert_close(got[f"{name}.max_abs"].double(), o["max_abs"], rtol=1e-4, atol=1e-7, msg=name)
        assert got[f"{name}.sum_sq"].dtype == torch.float32


def test_same_seed_same_bytes_other_seed_other_windows(model: Path, calib: Path, tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{x}.safetensors" for x in "abc")
    api.calibrate(model, str(calib), a, samples=4, seqlen=SEQLEN, seed=7)
    api.calibrate(model, str(calib), b, samples=4, seqlen=SEQLEN, seed=7)
    assert a.read_bytes() == b.read_bytes()  # the header too (safetensors' own metadata order is random)
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == {"data": str(calib), "samples": "4", "seqlen": str(SEQLEN), "seed": "7"}
    for fmt_out in ("x.gguf", "y.gguf"):
        api.calibrate(model, str(calib), tmp_path / fmt_out, samples=4, seqlen=SEQLEN, seed=7, fmt="imatrix")
    assert (tmp_path / "x.gguf").read_bytes() == (tmp_path / "y.gguf").read_bytes()

    w7, w8 = _windows(model, calib, 4, SEQLEN, 7), _windows(model, calib, 4, SEQLEN, 8)
    assert torch.equal(w7, _windows(model, calib, 4, SEQLEN, 7))
    assert not torch.equal(w7, w8)
    api.calibrate(model, str(calib), c, samples=4, seqlen=SEQLEN, seed=8)
    sa, sc = load_file(str(a)), load_file(str(c))
    name = "model.layers.0.self_attn.q_proj.sum_sq"
    assert not torch.equal(sa[name], sc[name])
    assert torch.equal(sa["model.layers.0.self_attn.q_proj.count"], sc["model.layers.0.self_attn.q_proj.count"])


def qconv(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QCONV, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def assert_user_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, exactly one ``error:`` line on stderr mentioning every needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_imatrix_reads_back_with_gguf_py(model: Path, calib: Path, tmp_path: Path) -> None:
    import gguf

    out, st = tmp_path / "m.imatrix.gguf", tmp_path / "m.safetensors"
    res = qconv("calibrate", model, "--data", calib, "--samples", SAMPLES, "--seqlen", SEQLEN, "--seed", 1,
                "--format", "imatrix", "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["output"] == str(out) and info["format"] == "imatrix" and info["modules"] == 14
    api.calibrate(model, str(calib), st, samples=SAMPLES, seqlen=SEQLEN, seed=1)
    stats = load_file(str(st))

    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "imatrix"
    assert "general.architecture" not in fields  # as llama-imatrix writes it
    assert fields["imatrix.datasets"] == [calib.name]
    assert fields["imatrix.chunk_count"] == SAMPLES and fields["imatrix.chunk_size"] == SEQLEN

    # llama.cpp's tensor names, from gguf-py's own HF -> GGUF map (not qconv's)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    tensors = {t.name: t for t in reader.tensors}
    hf_linears = sorted({k.rsplit(".", 1)[0] for k in stats})
    assert len(hf_linears) == 14
    expected = set()
    for hf in hf_linears:
        g = names.get_name(hf + ".weight", try_suffixes=(".weight",))
        assert g is not None and g.startswith("blk."), hf
        expected |= {f"{g}.in_sum2", f"{g}.counts"}
        sums, counts = tensors[f"{g}.in_sum2"], tensors[f"{g}.counts"]
        assert sums.tensor_type == gguf.GGMLQuantizationType.F32 == counts.tensor_type
        width = stats[f"{hf}.sum_sq"].numel()
        assert sums.shape.tolist() == [width] and counts.shape.tolist() == [1]  # as llama-imatrix writes them
        np.testing.assert_array_equal(np.asarray(sums.data).reshape(-1), stats[f"{hf}.sum_sq"].numpy())
        assert np.asarray(counts.data).reshape(-1).tolist() == [float(stats[f"{hf}.count"].item())]
        assert stats[f"{hf}.count"].item() == SAMPLES * SEQLEN
    assert set(tensors) == expected
    assert {n.split(".")[2] for n in expected} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                   "ffn_up", "ffn_down"}


@pytest.mark.parametrize("args,needles", [
    (["--format", "gptq"], ["unknown stats format 'gptq'", "imatrix"]),
    (["--data", "/no/such/dir/c.jsonl"], ["/no/such/dir/c.jsonl", "calibration data not found"]),
    (["--data", "./missing.jsonl"], ["missing.jsonl", "calibration data not found"]),
    (["--data", "qconv-no-such-dataset"], ["'qconv-no-such-dataset'", "could not be loaded", "offline"]),
    (["--data", "qconv-tests/no-such-dataset:en"], ["'qconv-tests/no-such-dataset:en'", "could not be loaded"]),
    (["--seqlen", "100000"], ["fewer than --seqlen 100000"]),
    (["--samples", "0"], ["samples >= 1"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
])
def test_cli_bad_input_one_line_exit_2(model: Path, calib: Path, tmp_path: Path, args: list[str],
                                       needles: list[str]) -> None:
    out = tmp_path / "o.safetensors"
    flags = {"--data": str(calib), "--samples": "2", "--seqlen": str(SEQLEN)}
    for k, v in zip(args[::2], args[1::2]):
        flags[k] = v
    # offline, with an empty HF cache: a dataset name must fail fast without touching the network
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = qconv("calibrate", model, *[x for kv in flags.items() for x in kv], "-o", out, env=env)
    assert_user_error(res, *needles)
    assert not out.exists()


def test_cli_model_without_tokenizer(tiny_hf_model_builder, calib: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    tiny_hf_model_builder("llama").save_pretrained(bare)
    res = qconv("calibrate", bare, "--data", calib, "--samples", 2, "--seqlen", SEQLEN,
                "-o", tmp_path / "o.safetensors")
    assert_user_error(res, "tokenizer")


def test_cli_output_exists_needs_force(model: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    base = ("calibrate", model, "--data", calib, "--samples", 2, "--seqlen", SEQLEN, "-o", out)
    assert_user_error(qconv(*base), str(out), "--force")
    assert out.read_bytes() == b"keep me"
    res = qconv(*base, "--force", "--quiet")
    assert res.returncode == 0 and res.stdout == "", res.stderr
    assert load_file(str(out))["model.layers.1.mlp.down_proj.count"].item() == 2 * SEQLEN


def test_imatrix_stacks_experts(tiny_hf_model_builder, calib: Path, tmp_path: Path) -> None:
    """A mixture of experts' statistics go into llama.cpp's merged tensors, one row per expert
    (``in_sum2 [experts, in]``, ``counts [experts, 1]``), each equal to that expert's own
    statistics; every token is counted once per expert it was routed to (top-2 of 4)."""
    import gguf

    from tests_support import write_tokenizer

    tiny_hf_model_builder("qwen3_moe", vocab_size=384).save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf", 384)
    api.calibrate(tmp_path / "hf", str(calib), tmp_path / "m.gguf", samples=SAMPLES, seqlen=SEQLEN, fmt="imatrix")
    api.calibrate(tmp_path / "hf", str(calib), tmp_path / "m.safetensors", samples=SAMPLES, seqlen=SEQLEN)
    stats = load_file(str(tmp_path / "m.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    sums = np.asarray(tensors["blk.0.ffn_gate_exps.weight.in_sum2"].data).reshape(4, -1)
    counts = np.asarray(tensors["blk.0.ffn_gate_exps.weight.counts"].data).reshape(4)
    assert counts.sum() == 2 * SAMPLES * SEQLEN
    for e in range(4):
        name = f"model.layers.0.mlp.experts.{e}.gate_proj"
        if f"{name}.count" in stats:
            assert counts[e] == stats[f"{name}.count"].item()
            np.testing.assert_array_equal(sums[e], stats[f"{name}.sum_sq"].numpy())
        else:
            assert counts[e] == 0
