"""Q2_K and Q3_K checked byte for byte against libggml, with and without an importance matrix.

``ggml_quantize_chunk`` runs ``quantize_row_q{2,3}_K_ref`` without an imatrix and
``quantize_row_q{2,3}_K_impl`` with one; both are compared on inputs that reach every branch of
the C code (zeros, subnormals, overflow, ties, ...). The byte tests skip when llama_cpp is not
importable; the round-trip tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggml_oracle import byte_failures, datasets, ggml_deq, ggml_ref, importances, libggml, mismatches  # noqa: F401 - libggml is a fixture
from qconv.core import ggml

LOWK = ("Q2_K", "Q3_K")


@pytest.mark.parametrize("qtype", LOWK)
@pytest.mark.parametrize("shape", [(6, 512), (3, 1536)])
def test_bytes_match_libggml(libggml, qtype, shape):
    imatrices = {"none": None, **importances(shape[1], seed=shape[1])}
    failures = byte_failures(libggml, qtype, shape, imatrices)
    assert not failures, f"{qtype} {shape}: " + "; ".join(failures)


@pytest.mark.parametrize("qtype", LOWK)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_bytes_match_libggml_large_random(libggml, qtype, weighted):
    """Many blocks of realistic weights, split over chunks and threads."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((96, 2048)) * 0.03).astype(np.float32)
    x[:, rng.integers(0, 2048, 8)] *= 20.0  # outlier columns
    qw = importances(2048, seed=7)["lognormal"] if weighted else None
    ref = ggml_ref(libggml, x, qtype, qw)
    assert mismatches(ggml.quantize(x, qtype, imatrix=qw, threads=2), ref, qtype) == 0
    assert mismatches(ggml.quantize(x[:5], qtype, imatrix=qw, threads=1), ref[:5], qtype) == 0


@pytest.mark.parametrize("name", ["posneg_blocks", "shifted"])
def test_q2_k_min_above_max(libggml, name):
    """All-negative sub-blocks under extreme importances: make_qkx3_quants can move its min above
    the sub-block's max (a negative iscale), where levels land far above nmax and must be clamped."""
    x = datasets(96, 2048, seed=0)[name]
    qw = importances(2048, seed=0)["wide"]
    assert mismatches(ggml.quantize(x, "Q2_K", imatrix=qw), ggml_ref(libggml, x, "Q2_K", qw), "Q2_K") == 0


@pytest.mark.parametrize("qtype", LOWK)
def test_dequantize_matches_libggml(libggml, qtype):
    x = datasets(4, 512, seed=11)["outliers"]
    q = ggml.quantize(x, qtype)
    np.testing.assert_array_equal(ggml.dequantize(q, qtype, 512), ggml_deq(libggml, q, qtype, 512))


# ------------------------------------------------------------------------------------ round trip (no oracle)

# rough upper bounds on RMSE / RMS(x) for gaussian data (measured: 0.30 and 0.15)
_REL_ERR = {"Q2_K": 0.35, "Q3_K": 0.18}


def _rel_err(x: np.ndarray, y: np.ndarray, w: np.ndarray | float = 1.0) -> float:
    return float(np.sqrt(np.mean(w * (y - x) ** 2) / np.mean(w * x ** 2)))


@pytest.mark.parametrize("qtype", LOWK)
def test_roundtrip_error_small(qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 1024)) * 0.05).astype(np.float32)
    qw = np.exp(rng.standard_normal(1024)).astype(np.float32)
    qk, nbytes = ggml.block_size(qtype)
    plain = ggml.dequantize(ggml.quantize(x, qtype), qtype, 1024)
    weighted = ggml.dequantize(ggml.quantize(x, qtype, imatrix=qw), qtype, 1024)
    for y in (plain, weighted):
        assert y.shape == x.shape and np.isfinite(y).all()
        assert _rel_err(x, y) < _REL_ERR[qtype]
    # the imatrix search trades plain error for error on the important columns
    assert _rel_err(x, weighted, qw) < _rel_err(x, plain, qw)
    assert ggml.quantize(x, qtype).shape == (16, 1024 // qk * nbytes)


@pytest.mark.parametrize("qtype", LOWK)
def test_degenerate_inputs(qtype):
    z = np.zeros((2, 256), np.float32)
    assert not ggml.dequantize(ggml.quantize(z, qtype), qtype, 256).any()
    assert not ggml.dequantize(ggml.quantize(z, qtype, imatrix=np.ones(256, np.float32)), qtype, 256).any()
    c = np.full((2, 256), 0.25, np.float32)
    np.testing.assert_allclose(ggml.dequantize(ggml.quantize(c, qtype), qtype, 256), c, rtol=2e-2)


@pytest.mark.parametrize("qtype", LOWK)
def test_threads_and_chunking_do_not_change_bytes(qtype):
    x = datasets(40, 1024, seed=5)["outliers"]
    qw = importances(1024, seed=5)["zeros"]
    for im in (None, qw):
        one = ggml.quantize(x, qtype, imatrix=im, threads=1)
        np.testing.assert_array_equal(one, ggml.quantize(x, qtype, imatrix=im, threads=3, chunk_blocks=7))
        np.testing.assert_array_equal(one[7:9], ggml.quantize(x[7:9], qtype, imatrix=im))
