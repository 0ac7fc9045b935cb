"""The grid/level codec of qconv.core.ggml.levels, for every ggml type qconv writes.

The split ``scale * values[L] + offset`` must be the dequantizer exactly (gguf-py's always,
libggml's ``dequantize_row_*`` when llama_cpp is importable), both on the quantizer's own bytes
and after arbitrary levels are written; writing levels must leave every scale byte alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggml_oracle import datasets, ggml_deq, importances, libggml  # noqa: F401 - libggml is a fixture
from qconv.core import ggml
from qconv.core.ggml.levels import BlockGrid, block_grid, levels, with_levels

N = 512
ROWS = 4

#: Bytes of each block that are not level bits (ggml-common.h): fp16 d/m/dmin and packed scales.
HEADER = {
    "Q8_0": [(0, 2)], "Q4_0": [(0, 2)], "Q4_1": [(0, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 4)],
    "Q4_K": [(0, 16)], "Q5_K": [(0, 16)], "Q6_K": [(192, 210)], "Q2_K": [(0, 16), (80, 84)],
    "Q3_K": [(96, 110)], "IQ4_NL": [(0, 2)], "IQ4_XS": [(0, 8)],
}
#: (number of levels, first value, group size, has an offset)
SHAPE = {
    "Q8_0": (256, -128, 32, False), "Q4_0": (16, -8, 32, False), "Q4_1": (16, 0, 32, True),
    "Q5_0": (32, -16, 32, False), "Q5_1": (32, 0, 32, True), "Q4_K": (16, 0, 32, True),
    "Q5_K": (32, 0, 32, True), "Q6_K": (64, -32, 16, False), "Q2_K": (4, 0, 16, True),
    "Q3_K": (8, -4, 16, False), "IQ4_NL": (16, -127, 32, False), "IQ4_XS": (16, -127, 32, False),
}


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical float32 arrays, except that any NaN equals any NaN."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan]))


def decoded(data: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return block_grid(data, qtype, N).dequantize(levels(data, qtype, N))


def gguf_deq(data: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return ggml.dequantize(data, qtype, N)


@pytest.fixture(scope="module")
def quantized() -> dict[str, dict[str, np.ndarray]]:
    """Per type, the bytes of every oracle dataset, without an imatrix and with two."""
    imps = {"none": None, **{k: v for k, v in importances(N, seed=3).items() if k in ("lognormal", "zeros")}}
    xs = datasets(ROWS, N, seed=5)
    return {t: {f"{dn}/{iname}": ggml.quantize(x, t, imatrix=v) for dn, x in xs.items() for iname, v in imps.items()}
            for t in ggml.QTYPES}


def random_levels(data: np.ndarray, qtype: str, seed: int) -> np.ndarray:
    nlev = SHAPE[qtype][0]
    return np.random.default_rng(seed).integers(0, nlev, (data.shape[0], N)).astype(np.uint8)


def test_every_type_has_a_codec():
    assert set(SHAPE) == set(ggml.QTYPES) == set(HEADER)


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_grid_shape(qtype, quantized):
    nlev, first, group, has_offset = SHAPE[qtype]
    g = block_grid(quantized[qtype]["normal/none"], qtype, N)
    assert isinstance(g, BlockGrid) and g.group == group
    assert g.values.dtype == np.float32 and g.values.shape == (nlev,) and g.values[0] == first
    assert np.all(np.diff(g.values) > 0)
    assert g.scale.dtype == np.float32 and g.scale.shape == (ROWS, N // group)
    assert (g.offset is not None) == has_offset
    if has_offset:
        assert g.offset.dtype == np.float32 and g.offset.shape == (ROWS, N // group)
    L = levels(quantized[qtype]["normal/none"], qtype, N)
    assert L.dtype == np.uint8 and L.shape == (ROWS, N) and int(L.max()) < nlev


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_decomposition_is_the_dequantizer(qtype, quantized):
    """On the quantizer's bytes (every dataset: zeros, constant rows, outliers, fp16 overflow...)
    and with random levels written onto them, bit for bit as gguf-py decodes."""
    bad = []
    for name, q in quantized[qtype].items():
        q2 = with_levels(q, qtype, N, random_levels(q, qtype, len(name)))
        for tag, data in (("own", q), ("random", q2)):
            if not same_floats(decoded(data, qtype), gguf_deq(data, qtype)):
                bad.append(f"{name}/{tag}")
    assert not bad, bad


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_decomposition_matches_libggml(libggml, qtype, quantized):
    bad = []
    for name, q in quantized[qtype].items():
        q2 = with_levels(q, qtype, N, random_levels(q, qtype, len(name)))
        for tag, data in (("own", q), ("random", q2)):
            if not same_floats(decoded(data, qtype), ggml_deq(libggml, data, qtype, N)):
                bad.append(f"{name}/{tag}")
    assert not bad, bad


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_own_levels_round_trip(qtype, quantized):
    for name, q in quantized[qtype].items():
        assert np.array_equal(with_levels(q, qtype, N, levels(q, qtype, N)), q), name


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_written_levels_read_back_and_keep_the_scales(qtype, quantized):
    nbytes = ggml.block_size(qtype)[1]
    header = np.zeros(nbytes, dtype=bool)
    for a, b in HEADER[qtype]:
        header[a:b] = True
    nlev = SHAPE[qtype][0]
    for name in ("normal/none", "outliers/lognormal", "zero_rows/zeros", "const_rows/none"):
        q = quantized[qtype][name]
        g = block_grid(q, qtype, N)
        for seed, L in enumerate([random_levels(q, qtype, 0), random_levels(q, qtype, 1),
                                  np.zeros((ROWS, N), np.uint8), np.full((ROWS, N), nlev - 1, np.int64)]):
            q2 = with_levels(q, qtype, N, L)
            assert q2.shape == q.shape and q2.dtype == np.uint8
            assert np.array_equal(levels(q2, qtype, N), L), (name, seed)
            blocks, blocks2 = q.reshape(-1, nbytes), q2.reshape(-1, nbytes)
            assert np.array_equal(blocks[:, header], blocks2[:, header]), (name, seed)
            g2 = block_grid(q2, qtype, N)
            assert same_floats(g.scale, g2.scale)
            assert g.offset is None or same_floats(g.offset, g2.offset)
    # every non-header bit is a level bit: the extreme levels set and clear all of them
    lo = with_levels(q, qtype, N, np.zeros((ROWS, N), np.uint8)).reshape(-1, nbytes)[:, ~header]
    hi = with_levels(q, qtype, N, np.full((ROWS, N), nlev - 1, np.uint8)).reshape(-1, nbytes)[:, ~header]
    assert np.all(lo ^ hi == 0xFF)


def test_q3_k_index_is_low_bits_with_the_hmask_bit():
    """Q3_K level ``i`` is ``v = i - 4``: low 2 bits in ``qs``, bit 2 in ``hmask`` (set: ``v = low2``)."""
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    q = ggml.quantize(x, "Q3_K")
    L = np.zeros((1, 256), np.uint8)
    L[0, 0], L[0, 32], L[0, 1] = 7, 6, 3  # element 32: bits 2-3 of qs[0], bit 1 of hmask[0]
    b = with_levels(q, "Q3_K", 256, L)[0]
    hmask, qs = b[0:32], b[32:96]
    assert hmask[0] == 0b11 and hmask[1] == 0 and not hmask[2:].any()
    assert qs[0] == 0b1011 and qs[1] == 0b11 and not qs[2:].any()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "IQ4_XS"])
def test_one_dimensional_data_is_one_row(qtype, quantized):
    q = quantized[qtype]["normal/none"]
    row = q[1]
    assert np.array_equal(levels(row, qtype, N), levels(q, qtype, N)[1:2])
    assert same_floats(block_grid(row, qtype, N).scale, block_grid(q, qtype, N).scale[1:2])
    L = random_levels(q, qtype, 2)[1]
    out = with_levels(row, qtype, N, L)
    assert out.shape == row.shape and np.array_equal(levels(out, qtype, N)[0], L)


def test_invalid_arguments():
    q = ggml.quantize(np.ones((2, 256), np.float32), "Q4_K")
    L = np.zeros((2, 256), np.uint8)
    with pytest.raises(ValueError):
        with_levels(q, "Q4_K", 256, L[:1])  # wrong shape
    with pytest.raises(ValueError):
        with_levels(q, "Q4_K", 256, L.ravel())  # 1-D levels only for 1-D data
    with pytest.raises(ValueError):
        with_levels(q, "Q4_K", 256, L + 16)  # out of range
    with pytest.raises(ValueError):
        with_levels(q, "Q4_K", 256, L.astype(np.int32) - 1)
    with pytest.raises(ValueError):
        with_levels(q, "Q4_K", 256, L.astype(np.float32))
    with pytest.raises(ValueError):
        levels(q, "Q4_K", 512)  # rows of another length
    with pytest.raises(ValueError):
        levels(q[:, :-1], "Q4_K", 256)
    with pytest.raises(ValueError):
        block_grid(q, "Q4_K", 100)
    with pytest.raises(ValueError):
        levels(q, "Q7_K", 256)
