"""qconv.core.ggml checked byte for byte against llama.cpp's own quantizer.

The oracle is libggml as shipped by llama-cpp-python: ``ggml_quantize_chunk(type, src, dst, 0,
nrows, n_per_row, imatrix=NULL)`` is exactly what ``llama-quantize`` runs without an imatrix.
Those tests skip when llama_cpp is not importable; the round-trip tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggml_oracle import byte_failures, datasets, ggml_deq, ggml_ref, importances, libggml, mismatches  # noqa: F401 - libggml is a fixture
from qconv.core import ggml
from qconv.core.ggml._common import nearest_int, roundf, seq_sum
from qconv.core.ggml._schedule import ChunkTuner

QTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")
_mismatches = mismatches


# ------------------------------------------------------------------------------------ byte equality

@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(6, 512), (3, 1536)])
def test_bytes_match_libggml(libggml, qtype, shape):
    failures = byte_failures(libggml, qtype, shape, {"none": None})
    assert not failures, f"{qtype} {shape}: " + "; ".join(failures)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(6, 512), (3, 1536)])
def test_imatrix_bytes_match_libggml(libggml, qtype, shape):
    """With an importance vector: llama.cpp's weighted searches (``quantize_row_<type>_impl``)."""
    failures = byte_failures(libggml, qtype, shape, importances(shape[1], seed=shape[0]))
    assert not failures, f"{qtype} {shape}: " + "; ".join(failures)


@pytest.mark.parametrize("qtype", QTYPES)
def test_imatrix_large_random_on_threads(libggml, qtype):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((96, 2048)) * 0.03).astype(np.float32)
    qw = importances(2048, seed=2)["lognormal"]
    ref = ggml_ref(libggml, x, qtype, qw)
    assert _mismatches(ggml.quantize(x, qtype, imatrix=qw, threads=2, chunk_blocks=40), ref, qtype) == 0
    assert _mismatches(ggml.quantize(x[3:8], qtype, imatrix=qw, threads=1), ref[3:8], qtype) == 0


def test_imatrix_changes_what_it_should():
    """An imatrix moves the error toward the unimportant columns (Q8_0 ignores it)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    qw = np.where(np.arange(1024) % 2 == 0, 100.0, 0.01).astype(np.float32)
    for qtype in ("Q4_0", "Q4_K", "Q6_K"):
        plain = ggml.dequantize(ggml.quantize(x, qtype), qtype, 1024) - x
        weighted = ggml.dequantize(ggml.quantize(x, qtype, imatrix=qw), qtype, 1024) - x
        assert (weighted ** 2 * qw).mean() < (plain ** 2 * qw).mean(), qtype
    np.testing.assert_array_equal(ggml.quantize(x, "Q8_0"), ggml.quantize(x, "Q8_0", imatrix=qw))
    assert ggml.uses_imatrix("Q4_K") and not ggml.uses_imatrix("Q8_0")
    with pytest.raises(ValueError, match="imatrix has 512 values"):
        ggml.quantize(x, "Q4_K", imatrix=qw[:512])


@pytest.mark.parametrize("qtype", QTYPES)
def test_bytes_match_libggml_large_random(libggml, qtype):
    """Many blocks of realistic weights, split over chunks and threads."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((96, 2048)) * 0.03).astype(np.float32)
    x[:, rng.integers(0, 2048, 8)] *= 20.0  # outlier columns
    ref = ggml_ref(libggml, x, qtype)
    assert _mismatches(ggml.quantize(x, qtype, threads=2), ref, qtype) == 0
    assert _mismatches(ggml.quantize(x[:5], qtype, threads=1), ref[:5], qtype) == 0


@pytest.mark.parametrize("qtype", ("Q8_0", "Q5_0", "Q4_1"))
def test_legacy_odd_row_length(libggml, qtype):
    x = datasets(4, 96, seed=3)["normal"]
    assert _mismatches(ggml.quantize(x, qtype), ggml_ref(libggml, x, qtype), qtype) == 0


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_libggml(libggml, qtype):
    x = datasets(4, 512, seed=11)["outliers"]
    q = ggml.quantize(x, qtype)
    np.testing.assert_array_equal(ggml.dequantize(q, qtype, 512), ggml_deq(libggml, q, qtype, 512))


# ------------------------------------------------------------------------------------ round trip (no oracle)

# rough upper bounds on RMSE / RMS(x) for gaussian data
_REL_ERR = {"Q8_0": 0.01, "Q4_0": 0.15, "Q4_1": 0.13, "Q5_0": 0.07, "Q5_1": 0.06,
            "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}


@pytest.mark.parametrize("qtype", QTYPES)
def test_roundtrip_error_small(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 1024)) * 0.05).astype(np.float32)
    q = ggml.quantize(x, qtype)
    qk, nbytes = ggml.block_size(qtype)
    assert q.shape == (16, 1024 // qk * nbytes) and q.dtype == np.uint8
    y = ggml.dequantize(q, qtype, 1024)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, gguf_dequantize(q, GGMLQuantizationType[qtype]).reshape(16, 1024))
    rel = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert rel < _REL_ERR[qtype], rel
    # degenerate inputs decode to (nearly) themselves
    z = np.zeros((2, 256), np.float32)
    assert not ggml.dequantize(ggml.quantize(z, qtype), qtype, 256).any()
    c = np.full((2, 256), 0.25, np.float32)
    np.testing.assert_allclose(ggml.dequantize(ggml.quantize(c, qtype), qtype, 256), c, rtol=2e-2)


def test_kquant_error_not_worse_than_plain_rounding():
    """The Q4_K scale search must beat naive min/max rounding on the same 6-bit grid layout."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    err_k = np.mean((ggml.dequantize(ggml.quantize(x, "Q4_K"), "Q4_K", 1024) - x) ** 2)
    err_41 = np.mean((ggml.dequantize(ggml.quantize(x, "Q4_1"), "Q4_1", 1024) - x) ** 2)
    assert err_k < err_41


# ------------------------------------------------------------------------------------ API and helpers

def test_api_shapes_and_errors():
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    for qt in QTYPES:
        assert ggml.block_size(qt) == tuple(GGML_QUANT_SIZES[GGMLQuantizationType[qt]])
    x = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    a = ggml.quantize(x, "Q4_K")
    assert a.shape == (1, 288)
    np.testing.assert_array_equal(a, ggml.quantize(x[None], GGMLQuantizationType.Q4_K))
    np.testing.assert_array_equal(a, ggml.quantize(x[None].astype(np.float64), "q4_k"))
    assert ggml.quantize(np.zeros((0, 256), np.float32), "Q6_K").shape == (0, 210)
    with pytest.raises(ValueError):
        ggml.quantize(np.zeros((2, 100), np.float32), "Q4_K")
    with pytest.raises(ValueError):
        ggml.quantize(np.zeros((2, 256), np.float32), "IQ2_XXS")
    with pytest.raises(ValueError):
        ggml.dequantize(np.zeros((2, 100), np.uint8), "Q4_K", 256)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_threads_and_chunking_do_not_change_bytes(qtype):
    x = datasets(40, 1024, seed=5)["outliers"]
    one = ggml.quantize(x, qtype, threads=1)
    np.testing.assert_array_equal(one, ggml.quantize(x, qtype, threads=3))
    np.testing.assert_array_equal(one[7:9], ggml.quantize(x[7:9], qtype))


def test_chunk_tuner_times_real_work_and_keeps_its_choice():
    """The trials quantize the tensor's own leading blocks (nothing twice, nothing skipped); the
    choice is one of the candidates and is kept; before it exists, small tensors use the fallback."""
    sizes: list[int] = []

    def fn(b: np.ndarray, o: np.ndarray) -> None:
        sizes.append(b.shape[0])
        o[:] = b.sum(axis=1, keepdims=True) + 1

    tuner = ChunkTuner(candidates=(8, 2, 4), fallback=3)
    assert tuner.trial_blocks(threads=2) == 2 * 3 * 2 * 8
    blocks = np.arange(300 * 4, dtype=np.float64).reshape(300, 4)
    out = np.zeros((300, 1))
    def span(offset: int):
        return lambda a, b: fn(blocks[offset + a:offset + b], out[offset + a:offset + b])

    tuner.run("k", 50, span(0), threads=2)  # too small to tune: fallback chunks
    assert tuner.chosen("k") is None and max(sizes) == 3
    sizes.clear()
    tuner.run("k", 250, span(50), threads=2)
    np.testing.assert_array_equal(out[:, 0], blocks.sum(axis=1) + 1)
    assert sum(sizes) == 250 and {2, 4, 8} <= set(sizes)
    assert tuner.chosen("k") in (2, 4, 8)
    sizes.clear()
    tuner.run("k", 20, span(0), threads=1)
    assert len(sizes) == -(-20 // tuner.chosen("k")) and max(sizes) <= tuner.chosen("k")


def test_tuned_chunks_do_not_change_bytes(monkeypatch):
    monkeypatch.setattr(ggml, "_TUNER", ChunkTuner(candidates=(4, 8, 16), fallback=8))
    x = datasets(96, 1024, seed=6)["outliers"]  # 384 Q4_K blocks: twice the 2-thread trials
    one = ggml.quantize(x, "Q4_K", threads=1)
    np.testing.assert_array_equal(one, ggml.quantize(x, "Q4_K", threads=2))
    assert ggml._TUNER.chosen(("Q4_K", 2)) in (4, 8, 16)
    np.testing.assert_array_equal(one, ggml.quantize(x, "Q4_K", threads=2))


def test_seq_sum_is_sequential_float32():
    rng = np.random.default_rng(3)
    for S in (1, 2, 3, 17, 1000):
        a = (rng.standard_normal((32, S)) * np.exp(rng.standard_normal((32, S)) * 6)).astype(np.float32)
        acc = a[0].copy()
        for i in range(1, 32):
            acc = (acc + a[i]).astype(np.float32)
        np.testing.assert_array_equal(seq_sum(np.ascontiguousarray(a)), acc)


def test_rounding_helpers():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 4194303.0, -3.7], np.float32)
    np.testing.assert_array_equal(nearest_int(v), [0, 2, 2, 0, -2, -2, 0, 4194303, -4])   # half-even
    np.testing.assert_array_equal(roundf(v), [1, 2, 3, -1, -2, -3, 0, 4194303, -4])        # half-away
