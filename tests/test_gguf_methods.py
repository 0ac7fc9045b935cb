"""Calibrated methods into GGUF: RTN, AWQ and GPTQ rounding onto llama.cpp's block types.

- GPTQ onto a ggml grid (:func:`qconv.quant.gptq.gptq_quantize_ggml`): the scales stay those of
  llama.cpp's importance-weighted quantizer (every non-level byte identical to libggml's), and
  the output error ``(w - ŵ) H (w - ŵ)ᵀ`` is below that quantizer's own rounding, for every type;
- ``quantize --format gguf``: RTN through the layer pipeline writes ``convert``'s bytes (so
  llama-quantize's); AWQ + GPTQ files have llama.cpp's mix (the tensor types and sizes of
  ``convert --imatrix``), llama.cpp loads them and computes what qconv's runner computes on them;
  same inputs give the same bytes, and two data-parallel ranks the bytes of one process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ggml_oracle import ggml_ref, libggml  # noqa: F401 - libggml is a fixture
from qconv import api
from qconv.core import ggml
from qconv.core.ggml import levels
from qconv.core.ggml_target import GGMLScheme
from qconv.errors import InvalidOption
from qconv.quant.gptq import gptq_quantize_ggml
from qconv.quant.recipe import recipe_from_dict
from test_cli import assert_user_error, qconv
from test_gguf_export import _agreement, _llama_logits, _runner_logits, tensors_of
from test_memory_modes import _torchrun

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _correlated(n: int, out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few hot channels (and a dead one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.1 + torch.eye(n))
    x[:, :4] *= 8.0
    x[:, 5] = 0.0
    return torch.randn(out, n, generator=g) * 0.05, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_gptq_on_ggml_grid_keeps_llama_cpp_scales_and_lowers_the_error(libggml, qtype: str) -> None:
    w, H = _correlated(512, 64)
    r = gptq_quantize_ggml(w, H, GGMLScheme(qtype), damp=0.1, act_order=True)
    assert not r.fell_back_to_rtn
    importance = H.diagonal().numpy().copy()
    w_used = w.clone()
    w_used[:, 5] = 0.0  # a dead input's weight is zeroed before the scales are searched
    ref = ggml_ref(libggml, w_used.numpy(), qtype, importance)
    ref_levels = levels.levels(ref, qtype, 512)
    # only level bits differ from llama.cpp's importance-weighted bytes: the scales are its own
    np.testing.assert_array_equal(levels.with_levels(ref, qtype, 512, levels.levels(r.weight.data, qtype, 512)),
                                  r.weight.data)
    assert (levels.levels(r.weight.data, qtype, 512) != ref_levels).any()

    def err(wq: np.ndarray) -> float:
        d = torch.from_numpy(wq) - w
        return float(((d @ H) * d).sum())

    ours = err(ggml.dequantize(r.weight.data, qtype, 512))
    theirs = err(ggml.dequantize(ref, qtype, 512))
    assert ours < 0.8 * theirs, (ours, theirs)
    again = gptq_quantize_ggml(w, H, GGMLScheme(qtype), damp=0.1, act_order=True)
    np.testing.assert_array_equal(again.weight.data, r.weight.data)


def test_rtn_pipeline_writes_convert_bytes(model: Path, tmp_path: Path) -> None:
    for qtype in ("q4_k_m", "q4_0", "q3_k_s"):
        api.quantize(model, tmp_path / f"rtn-{qtype}.gguf", method="rtn", output_format="gguf", gguf_type=qtype)
        api.convert(model, tmp_path / f"conv-{qtype}.gguf", gguf_type=qtype)
        assert tensors_of(tmp_path / f"rtn-{qtype}.gguf") == tensors_of(tmp_path / f"conv-{qtype}.gguf")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder, request) -> Path:
    from test_gguf_export import build_export_model

    return build_export_model(request.param, tmp_path_factory.mktemp(f"gguf-methods-{request.param}"),
                              tiny_hf_model_builder)


def _calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calib.jsonl"
    rng = np.random.default_rng(0)
    words = ["time", "model", "count", "tiny", "there", "once", "upon", "was", "a", "that", "could", "1", "2", "3"]
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 80))}) for _ in range(30)))
    return path


@pytest.mark.parametrize("gguf_model, file_type", [("llama", "q4_k_m"), ("llama", "q3_k_m"), ("llama", "iq4_xs"),
                                                   ("qwen3_moe", "q4_k_m"), ("gemma2", "q2_k")],
                         indirect=["gguf_model"])
def test_awq_gptq_gguf_loads_and_agrees(gguf_model: Path, tmp_path: Path, file_type: str) -> None:
    """AWQ then GPTQ into GGUF: llama.cpp's mix (tensor types and sizes as ``convert --imatrix``
    plans them), loaded by llama.cpp, which computes what the runner computes on the same file
    (only llama.cpp's activation rounding between them)."""
    out = tmp_path / "m.gguf"
    recipe = tmp_path / "awq-gptq.yaml"
    recipe.write_text("name: awq-gptq\nstages: [{method: awq}, {method: gptq}]\noutput: {format: gguf, type: q4_k_m}\n")
    r = qconv("quantize", gguf_model, "--recipe", recipe, "--type", file_type,
              "--data", _calibration(tmp_path), "--samples", 6, "--seqlen", 32, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    ours = gguf.GGUFReader(str(out))
    api.convert(gguf_model, tmp_path / "plain.gguf", gguf_type=file_type)
    imx = tmp_path / "im.gguf"
    assert qconv("calibrate", gguf_model, "--data", _calibration(tmp_path), "--samples", 4, "--seqlen", 32,
                 "--format", "imatrix", "-o", imx, "--quiet").returncode == 0
    api.convert(gguf_model, tmp_path / "imatrix.gguf", gguf_type=file_type, imatrix=imx)
    planned = {t.name: (t.tensor_type, int(t.n_bytes)) for t in gguf.GGUFReader(str(tmp_path / "imatrix.gguf")).tensors}
    assert {t.name: (t.tensor_type, int(t.n_bytes)) for t in ours.tensors} == planned
    assert json.loads(bytes(ours.fields["qconv.recipe"].parts[-1]).decode())["name"] == "awq-gptq"
    ids = [(i * 37 + 11) % 384 for i in range(40)]
    top1, kl = _agreement(_runner_logits(out, ids), _llama_logits(out, ids))
    assert kl <= 2e-2, (top1, kl)


def test_gguf_quantize_is_deterministic_and_rank_independent(model: Path, calib: Path, tmp_path: Path) -> None:
    """The shipped recipe (GPTQ with fp targets), at another type than its own."""
    args = ["quantize", str(model), "--data", str(calib), "--samples", "10", "--seqlen", "32", "--quiet",
            "--recipe", str(RECIPES / "gguf-q4_k_m.yaml"), "--type", "q4_0"]
    for name in ("one", "again"):  # the file name is the model name in the metadata: the same in both
        res = subprocess.run([sys.executable, "-m", "qconv", *args, "-o", str(tmp_path / name / "m.gguf")],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert res.returncode == 0, res.stderr
    assert (tmp_path / "one" / "m.gguf").read_bytes() == (tmp_path / "again" / "m.gguf").read_bytes()
    res = _torchrun(2, *args, "-o", str(tmp_path / "two" / "m.gguf"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "one" / "m.gguf").read_bytes() == (tmp_path / "two" / "m.gguf").read_bytes()


@pytest.mark.parametrize("raw, message", [
    ({"output": {"format": "gguf"}}, "needs output.type"),
    ({"output": {"format": "gguf", "type": "f16"}}, "is not quantized"),
    ({"output": {"format": "gguf", "type": "q9_k"}}, "unknown GGUF type"),
    ({"output": {"type": "q4_k_m"}}, "are for output.format gguf"),
    ({"output": {"format": "gguf", "type": "q4_k_m"}, "stages": [{"method": "gptq", "mse": True}]}, "no mse"),
    ({"output": {"format": "gguf", "type": "q4_k_m"}, "stages": [{"method": "gptq", "refine": 1}]}, "no refine"),
    ({"output": {"format": "gguf", "type": "q4_k_m"}, "stages": [{"method": "rtn", "mse": True}]}, "searches its own"),
    ({"output": {"format": "gguf", "type": "q4_k_m"}, "scheme": "fp8"}, "no scheme preset"),
    ({"output": {"format": "gguf", "type": "q4_k_m", "tensor_types": ["attn_v=q9"]}}, "unknown or unsupported"),
])
def test_gguf_recipe_errors(raw: dict, message: str) -> None:
    with pytest.raises(InvalidOption, match=re.escape(message)):
        recipe_from_dict(raw)


def test_gguf_cli_errors(model: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    assert_user_error(qconv("quantize", model, "--method", "smoothquant", "-o", out, "--type", "q4_k_m",
                            "--data", calib), "no scheme preset, activation bits")
    assert_user_error(qconv("quantize", model, "--method", "gptq", "-o", out, "--data", calib), "needs output.type")
    assert_user_error(qconv("quantize", model, "--method", "gptq", "-o", out, "--type", "q4_k_m", "--data", calib,
                            "--tensor-type", "nothing=q8_0"), "matches no tensor")
    assert not out.exists()
