"""IQ4_NL and IQ4_XS checked byte for byte against libggml's ``ggml_quantize_chunk``.

Both types run the same weighted scale search with and without an imatrix (``ntry = 7``), so
every dataset is checked without one and with each importance vector. The oracle tests skip when
llama_cpp is not importable; the round-trip and lookup-table tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggml_oracle import byte_failures, datasets, ggml_deq, ggml_ref, importances, libggml, mismatches  # noqa: F401 - libggml is a fixture
from qconv.core import ggml
from qconv.core.ggml._iq4 import KVALUES, best_index, best_index_int8

QTYPES = ("IQ4_NL", "IQ4_XS")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(6, 512), (3, 1536)])
def test_bytes_match_libggml(libggml, qtype, shape):
    imps = {"none": None, **importances(shape[1], seed=shape[0])}
    failures = byte_failures(libggml, qtype, shape, imps)
    assert not failures, f"{qtype} {shape}: " + "; ".join(failures)


@pytest.mark.parametrize("qtype", QTYPES)
def test_bytes_match_libggml_large_random(libggml, qtype):
    """Many blocks of realistic weights, split over chunks and threads."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((96, 2048)) * 0.03).astype(np.float32)
    x[:, rng.integers(0, 2048, 8)] *= 20.0  # outlier columns
    qw = importances(2048, seed=7)["lognormal"]
    for imatrix in (None, qw):
        ref = ggml_ref(libggml, x, qtype, imatrix)
        assert mismatches(ggml.quantize(x, qtype, imatrix=imatrix, threads=2), ref, qtype) == 0
        ours = ggml.quantize(x[:5], qtype, imatrix=imatrix, threads=1, chunk_blocks=3)
        assert mismatches(ours, ref[:5], qtype) == 0


@pytest.mark.parametrize("qtype", QTYPES)
def test_non_finite_inputs_match_libggml(libggml, qtype):
    """Infinities take the clamped lookup path (``id*x`` is NaN or unbounded there)."""
    x = datasets(4, 512, seed=5)["normal"]
    x[0, 3] = np.inf
    x[1, 40] = -np.inf
    x[2, 7], x[2, 9] = np.inf, -np.inf
    for imatrix in (None, importances(512, seed=5)["zeros"]):
        ours = ggml.quantize(x, qtype, imatrix=imatrix)
        assert mismatches(ours, ggml_ref(libggml, x, qtype, imatrix), qtype) == 0


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_libggml(libggml, qtype):
    x = datasets(4, 512, seed=11)["outliers"]
    q = ggml.quantize(x, qtype)
    np.testing.assert_array_equal(ggml.dequantize(q, qtype, 512), ggml_deq(libggml, q, qtype, 512))


# ------------------------------------------------------------------------------------ no oracle

def test_best_index_matches_scalar_port():
    """The half-unit lookup table agrees with the bisection of ``best_index_int8`` everywhere,
    in particular on both sides of every threshold and at the ends."""
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.uniform(-140, 140, 4000), np.arange(-300, 300) / 2,
                        (KVALUES[1:].astype(np.float64) + KVALUES[:-1]) / 2]).astype(np.float32)
    up, down = np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))
    special = np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, -127, 113])
    al = np.concatenate([v, up, down, special])
    np.testing.assert_array_equal(best_index(al), [best_index_int8(a) for a in al])


@pytest.mark.parametrize("qtype", QTYPES)
def test_roundtrip_error_small(qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 1024)) * 0.05).astype(np.float32)
    for imatrix in (None, importances(1024, seed=1)["lognormal"]):
        q = ggml.quantize(x, qtype, imatrix=imatrix)
        qk, nbytes = ggml.block_size(qtype)
        assert q.shape == (16, 1024 // qk * nbytes) and q.dtype == np.uint8
        y = ggml.dequantize(q, qtype, 1024)
        rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
        assert rel < 0.1, rel


@pytest.mark.parametrize("qtype", QTYPES)
def test_zeros_decode_to_zeros(qtype):
    x = np.zeros((2, 512), dtype=np.float32)
    for imatrix in (None, np.ones(512, dtype=np.float32)):
        q = ggml.quantize(x, qtype, imatrix=imatrix)
        assert not ggml.dequantize(q, qtype, 512).any()
