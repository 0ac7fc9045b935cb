"""GGUF export with an importance matrix and ``--tensor-type`` overrides, against llama.cpp.

The oracle is ``llama_model_quantize`` given the same importances through its C API
(``llama_model_quantize_params.imatrix``, an array of name / values / size) and the same overrides
(``tt_overrides``): every tensor's type and bytes must equal qconv's. The importances are what
``llama-quantize`` computes from an imatrix GGUF (``in_sum2 / counts``, 1 where a count is 0).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconv import api
from qconv.checkpoint import open_model
from qconv.checkpoint.imatrix_file import read_imatrix
from qconv.formats.gguf_types import FILE_TYPES
from qconv.formats.gguf_writer import plan_tensors
from test_cli import assert_user_error, qconv
from test_gguf_export import assert_same_tensors, build_export_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")

QUANT_TYPES = [n for n, ft in FILE_TYPES.items() if ft.quantized]
#: families whose imatrix differs in kind: dense, merged experts (4 and 8: llama.cpp's 8-expert rules)
IMATRIX_ARCHS = ("llama", "qwen3_moe", "mixtral")


def write_imatrix_gguf(model: Path, out: Path, seed: int = 0, skip: str | None = None,
                       widen: str | None = None) -> dict[str, np.ndarray]:
    """A llama-imatrix-style GGUF for every quantizable layer weight of ``model`` (random Σx² and
    token counts; one expert never reached). Returns the importances llama-quantize derives."""
    rng = np.random.default_rng(seed)
    with open_model(model) as src:
        plan = plan_tensors(src.config, FILE_TYPES["q4_k_m"])
    w = gguf.GGUFWriter(str(out), arch="")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["synthetic.txt"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    expected: dict[str, np.ndarray] = {}
    for p in plan:
        if not p.name.startswith("blk.") or p.type.name == "F32" or p.name == skip:
            continue
        n_mat, width = (p.shape[0] if len(p.shape) == 3 else 1), p.shape[-1] + (32 if p.name == widen else 0)
        counts = rng.integers(100, 4000, (n_mat, 1)).astype(np.float32)
        if n_mat > 1:
            counts[1] = 0
        sums = (np.exp(rng.standard_normal((n_mat, width)) * 1.5) * counts).astype(np.float32)
        sums[:, rng.integers(0, width, 3)] *= 100.0
        w.add_tensor(f"{p.name}.in_sum2", sums if n_mat > 1 else sums.reshape(-1))
        w.add_tensor(f"{p.name}.counts", counts if n_mat > 1 else counts.reshape(-1))
        with np.errstate(invalid="ignore"):
            expected[p.name] = np.where(counts > 0, sums / counts, np.float32(1)).astype(np.float32).reshape(-1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def llama_quantize_imatrix(src: Path, dst: Path, file_type: str, importances: dict[str, np.ndarray],
                           overrides: dict[str, str] | None = None) -> None:
    """``llama_model_quantize`` with an imatrix (and ``--tensor-type``-style overrides)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPES[file_type].ftype)
    params.nthread = 2
    keep = []
    if importances:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importances) + 1))()
        for i, (name, v) in enumerate(sorted(importances.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [name.encode(), v]
            entries[i].name, entries[i].size = keep[-2], v.size
            entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(importances)].name = None
        params.imatrix = entries
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides.items()):
            keep.append(pattern.encode())
            tt[i].pattern, tt[i].type = keep[-1], int(gguf.GGMLQuantizationType[t.upper()])
        tt[len(overrides)].pattern = None
        params.tt_overrides = tt
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {file_type} with an imatrix"


@pytest.fixture(scope="module", params=IMATRIX_ARCHS)
def export_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    return build_export_model(request.param, tmp_path_factory.mktemp(f"imatrix-{request.param}"), tiny_hf_model_builder)


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    return build_export_model("llama", tmp_path_factory.mktemp("imatrix-llama-only"), tiny_hf_model_builder)


@pytest.fixture()
def imatrix_case(export_model: Path, tmp_path: Path):
    imx = tmp_path / "imatrix.gguf"
    importances = write_imatrix_gguf(export_model, imx)
    base = tmp_path / "base.gguf"
    api.convert(export_model, base, gguf_type="f32")
    return export_model, imx, importances, base


def test_imatrix_byte_identical_to_llama_quantize(imatrix_case, tmp_path: Path) -> None:
    model, imx, importances, base = imatrix_case
    for ft in QUANT_TYPES:
        ours, ref = tmp_path / f"ours-{ft}.gguf", tmp_path / f"ref-{ft}.gguf"
        api.convert(model, ours, gguf_type=ft, imatrix=imx)
        llama_quantize_imatrix(base, ref, ft, importances)
        assert_same_tensors(ours, ref)
        meta = {f.name: f for f in gguf.GGUFReader(str(ours)).fields.values()}
        assert "quantize.imatrix.entries_count" in meta and "quantize.imatrix.dataset" in meta


def test_tensor_type_overrides_match_llama_quantize(imatrix_case, tmp_path: Path) -> None:
    model, imx, importances, base = imatrix_case
    overrides = {"attn_v": "q8_0", r"blk\.[01]\.ffn_up": "q5_k", "attn_k": "q4_0"}
    for ft in ("q4_k_m", "q4_0"):
        ours, ref = tmp_path / f"ours-{ft}.gguf", tmp_path / f"ref-{ft}.gguf"
        api.convert(model, ours, gguf_type=ft, imatrix=imx, tensor_types=[f"{k}={v}" for k, v in overrides.items()])
        llama_quantize_imatrix(base, ref, ft, importances, overrides)
        assert_same_tensors(ours, ref)


def test_imatrix_reader_matches_llama_quantize_loader(tmp_path: Path, llama_model: Path) -> None:
    """GGUF and legacy .dat files give llama-quantize's importances (legacy: values / ncall)."""
    imx = tmp_path / "i.gguf"
    expected = write_imatrix_gguf(llama_model, imx, seed=3)
    got = read_imatrix(imx)
    assert sorted(got.entries) == sorted(expected) and got.datasets == ["synthetic.txt"] and got.chunk_count == 7
    for name, v in expected.items():
        np.testing.assert_array_equal(got.entries[name], v)
    dat = tmp_path / "i.dat"
    with open(dat, "wb") as f:
        f.write(np.int32(len(expected)).tobytes())
        for name, v in sorted(expected.items()):
            f.write(np.int32(len(name)).tobytes() + name.encode() + np.int32(3).tobytes() + np.int32(v.size).tobytes())
            f.write((v * np.float32(3)).astype(np.float32).tobytes())
        f.write(np.int32(9).tobytes() + np.int32(4).tobytes() + b"c4.x")
    legacy = read_imatrix(dat)
    assert legacy.datasets == ["c4.x"] and legacy.chunk_count == 9
    for name, v in expected.items():
        np.testing.assert_array_equal(legacy.entries[name], (v * np.float32(3)) / np.float32(3))


def test_calibrate_imatrix_feeds_convert(tmp_path: Path, tiny_hf_model_builder) -> None:
    """qconv's own ``calibrate --format imatrix`` output is accepted by ``convert --imatrix``."""
    from tests_support import write_tokenizer

    model = tmp_path / "m"
    tiny_hf_model_builder("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2).save_pretrained(model)
    write_tokenizer(model, 300)
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a tiny model that could count 1 2 3 4 5. " * 400)
    r = qconv("calibrate", model, "--data", text, "--samples", 4, "--seqlen", 64, "--format", "imatrix",
              "-o", tmp_path / "im.gguf", "--quiet")
    assert r.returncode == 0, r.stderr
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    api.convert(model, plain, gguf_type="q4_k_m")
    r = qconv("convert", model, "-o", weighted, "--type", "q4_k_m", "--imatrix", tmp_path / "im.gguf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] > 0
    a, b = gguf.GGUFReader(str(plain)), gguf.GGUFReader(str(weighted))
    differ = [t.name for t, u in zip(a.tensors, b.tensors) if bytes(t.data) != bytes(u.data)]
    assert any(".attn_q." in n for n in differ) and not any("norm" in n for n in differ)


@pytest.mark.parametrize("case, needle", [
    ("skip", "has no entry for blk.1.attn_q.weight"),
    ("widen", "has 288 values, the model's tensor needs 256"),
    ("stray", "names no tensor of this model"),
    ("not_imatrix", "not an imatrix GGUF"),
    ("truncated", "not a readable GGUF file"),
])
def test_bad_imatrix_one_line_exit_2(llama_model: Path, tmp_path: Path, case: str, needle: str) -> None:
    imx = tmp_path / "im.gguf"
    if case == "skip":
        write_imatrix_gguf(llama_model, imx, skip="blk.1.attn_q.weight")
    elif case == "widen":
        write_imatrix_gguf(llama_model, imx, widen="blk.1.attn_q.weight")
    elif case == "stray":  # layer 3 renamed to a layer this 4-layer model lacks
        write_imatrix_gguf(llama_model, imx)
        imx.write_bytes(imx.read_bytes().replace(b"blk.3.", b"blk.9."))
    elif case == "not_imatrix":
        api.convert(llama_model, imx, gguf_type="f16")
    else:
        write_imatrix_gguf(llama_model, imx)
        imx.write_bytes(imx.read_bytes()[:1000])
    out = tmp_path / "x.gguf"
    assert_user_error(qconv("convert", llama_model, "-o", out, "--type", "q4_k_m", "--imatrix", imx), needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf"]


@pytest.mark.parametrize("args, needle", [
    (["--tensor-type", "nothing_like_this=q8_0"], "matches no tensor"),
    (["--tensor-type", "attn_v=q9_9"], "unknown or unsupported tensor type"),
    (["--tensor-type", "attn_v"], "expected PATTERN=TYPE"),
    (["--tensor-type", "attn_v(=q8_0"], "bad pattern"),
])
def test_bad_tensor_type_one_line_exit_2(llama_model: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "x.gguf"
    assert_user_error(qconv("convert", llama_model, "-o", out, "--type", "q4_k_m", *args), needle)
    assert not out.exists()


def test_layer_rules_on_a_deeper_grouped_model(tmp_path: Path, tiny_hf_model_builder) -> None:
    """17 layers (so the n/16 and n/8 layer rules pick layers) and 4 query heads per KV head (the
    n_gqa >= 4 rules): every mix, with and without an imatrix, against llama_model_quantize."""
    from tests_support import write_tokenizer

    model = tmp_path / "deep"
    tiny_hf_model_builder("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=17,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=300,
                          rope_scaling=None).save_pretrained(model)
    write_tokenizer(model, 300)
    imx = tmp_path / "im.gguf"
    importances = write_imatrix_gguf(model, imx, seed=5)
    base = tmp_path / "base.gguf"
    api.convert(model, base, gguf_type="f32")
    for ft in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_xs", "iq4_nl", "q4_0", "q5_0", "q4_k_s", "q4_k_m"):
        for weighted in (False, True):
            ours, ref = tmp_path / f"ours-{ft}-{weighted}.gguf", tmp_path / f"ref-{ft}-{weighted}.gguf"
            api.convert(model, ours, gguf_type=ft, imatrix=imx if weighted else None)
            llama_quantize_imatrix(base, ref, ft, importances if weighted else {})
            assert_same_tensors(ours, ref)
            ours.unlink()
            ref.unlink()
