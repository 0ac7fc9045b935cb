"""qconv's GGUF metadata/tensor-table parser against gguf-py's ``GGUFReader`` (the oracle): the
same values, the same tensor table and the same bytes, on a real GGUF and on a file gguf-py's
writer fills with every metadata value type; and a clean error wherever a file is cut short."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from qconv.checkpoint import open_model
from qconv.checkpoint.gguf_file import GGUFFile
from qconv.errors import CorruptFile

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K.gguf"


def _every_type(path: Path) -> Path:
    """A GGUF with each scalar type, strings, arrays (numeric, bool, string, nested), an F32,
    an F16 and two quantized tensors, written by gguf-py."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁wörld")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.strs", ["a", "", "ü" * 40])
    w.add_array("t.nested", [["x", "y"], ["z"]])
    rng = np.random.default_rng(0)
    w.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.f16", rng.standard_normal((2, 4, 8)).astype(np.float16))
    for name, qtype in (("c.q8_0", gguf.GGMLQuantizationType.Q8_0), ("d.q4_k", gguf.GGMLQuantizationType.Q4_K)):
        x = rng.standard_normal((4, 256)).astype(np.float32)
        data = gguf.quants.quantize(x, qtype) if qtype != gguf.GGMLQuantizationType.Q4_K else \
            rng.integers(0, 256, (4, 144), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _files(tmp_path: Path) -> list[Path]:
    files = [_every_type(tmp_path / "every.gguf")]
    if STORIES.is_file():
        files.append(STORIES)
    return files


def test_matches_gguf_py_reader(tmp_path: Path) -> None:
    for path in _files(tmp_path):
        ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
        expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        if "t.nested" in expected:  # gguf-py flattens arrays of arrays; the structure is kept here
            assert ours.meta.pop("t.nested") == [["x", "y"], ["z"]] and expected.pop("t.nested") == ["x", "y", "z"]
        assert ours.meta == expected, path.name
        assert all(type(ours.meta[k]) is type(v) for k, v in expected.items())
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for mine, ref in zip(ours.tensors, theirs.tensors):
            assert mine.tensor_type == ref.tensor_type and mine.shape == tuple(ref.shape.tolist())
            assert (mine.n_bytes, mine.data_offset) == (ref.n_bytes, ref.data_offset)
            assert mine.data.shape == ref.data.shape and mine.data.dtype == ref.data.dtype
            np.testing.assert_array_equal(mine.data.view(np.uint8), np.asarray(ref.data).view(np.uint8))
        ours.close()


def test_cut_short_anywhere_is_a_format_error(tmp_path: Path) -> None:
    data = _every_type(tmp_path / "every.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    # the header, the middle of the metadata, the tensor table, the data section, its last byte
    for n in (0, 3, 12, 200, 420, len(data) - 2000, len(data) - 1):
        cut.write_bytes(data[:n])
        with pytest.raises(CorruptFile):
            GGUFFile(cut)
    cut.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + data[8:])
    with pytest.raises(CorruptFile, match="version 7"):
        GGUFFile(cut)


def test_open_model_reports_a_cut_gguf_in_one_line(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_every_type(tmp_path / "every.gguf").read_bytes()[:300])
    with pytest.raises(CorruptFile) as e:
        open_model(cut)
    assert "not a readable GGUF file" in str(e.value) and "\n" not in str(e.value)
