"""libggml (as shipped by llama-cpp-python) as the byte-level oracle of qconv.core.ggml.

``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)`` is exactly what
``llama-quantize`` runs for one tensor: with ``imatrix=NULL`` its plain path, with a per-column
importance vector (``--imatrix``) its weighted search. Importable because pytest puts tests/ on
sys.path; the fixture skips when llama_cpp is not importable.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import numpy as np
import pytest

from qconv.core import ggml

# qconv reproduces the x86-64 build of libggml, whose C code is compiled without FMA contraction.
# Compilers for other targets (aarch64 gcc/clang) may fuse ``a*b - c*d`` into FMAs, which moves
# the last bit of a few K-quant scales; there we only require near-total agreement.
STRICT = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@pytest.fixture(scope="module")
def libggml():
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - any import failure means "no oracle"
        pytest.skip(f"llama_cpp (llama-cpp-python) not importable, no libggml oracle: {exc}")
    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*"))
    lib = None
    for path in cands:
        try:
            cand = ctypes.CDLL(str(path))
            cand.ggml_quantize_chunk  # noqa: B018 - symbol probe
        except (OSError, AttributeError):
            continue
        lib = cand
        break
    if lib is None:
        pytest.skip(f"no libggml with ggml_quantize_chunk under {libdir}")
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def ggml_ref(lib, x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """libggml's bytes for ``x`` ``[rows, n]`` (and the per-column ``imatrix``, if given)."""
    from gguf import GGMLQuantizationType

    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    qk, nbytes = ggml.block_size(qtype)
    out = np.zeros((rows, n // qk * nbytes), dtype=np.uint8)
    t = int(GGMLQuantizationType[qtype])
    lib.ggml_quantize_init(t)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if qw is None else qw.ctypes.data)
    assert written == out.size
    return out


def ggml_deq(lib, data: np.ndarray, qtype: str, n: int) -> np.ndarray:
    fn = getattr(lib, f"dequantize_row_{qtype.lower().replace('_k', '_K')}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    data = np.ascontiguousarray(data)
    out = np.empty((data.shape[0], n), dtype=np.float32)
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


def datasets(rows: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that exercise every branch of the reference code."""
    rng = np.random.default_rng(seed)
    g: dict[str, np.ndarray] = {}
    g["normal"] = rng.standard_normal((rows, n))
    w = rng.standard_normal((rows, n)).astype(np.float32) * 0.02  # bf16-rounded weights: many ties
    g["bf16"] = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
    o = rng.standard_normal((rows, n))
    o[rng.random((rows, n)) < 0.01] *= 100.0
    g["outliers"] = o
    g["heavy_tail"] = rng.standard_cauchy((rows, n))
    z = rng.standard_normal((rows, n))
    z[::2] = 0.0
    g["zero_rows"] = z
    g["const_rows"] = np.ones((rows, n)) * rng.standard_normal((rows, 1))
    g["tiny"] = rng.standard_normal((rows, n)) * 1e-20
    g["subnormal"] = rng.standard_normal((rows, n)) * 1e-39
    g["large"] = rng.standard_normal((rows, n)) * 3e4  # fp16 scales near overflow
    g["fp16_overflow"] = rng.standard_normal((rows, n)) * 1e9  # d, dmin become fp16 inf
    g["f32_overflow"] = rng.standard_normal((rows, n)) * 1e30  # x*x overflows: NaN scales
    # a few ulps of the smallest subnormal: scales round badly (or overflow when inverted)
    g["denormal"] = rng.integers(-40, 41, (rows, n)).astype(np.float32) * np.float32(1.4e-45)
    mag = np.abs(rng.standard_normal((rows, n // 32, 32)))
    sign = np.where(rng.random((rows, n // 32, 1)) < 0.5, 1.0, -1.0)
    g["posneg_blocks"] = (mag * sign).reshape(rows, n)
    # sub-blocks of wildly different scales: some get 6-bit scale 0 (the d == 0 path)
    sc = np.exp(rng.uniform(-14, 0, (rows, n // 16, 1)))
    g["mixed_scales"] = (rng.standard_normal((rows, n // 16, 16)) * sc).reshape(rows, n)
    g["shifted"] = (rng.standard_normal((rows, n // 32, 32)) + rng.uniform(-40, 40, (rows, n // 32, 1))).reshape(rows, n)
    sp = rng.standard_normal((rows, n))
    sp[rng.random((rows, n)) < 0.7] = 0.0
    g["sparse"] = sp
    nz = rng.standard_normal((rows, n))
    nz[rng.random((rows, n)) < 0.3] = -0.0
    g["neg_zero"] = nz
    g["signed_zeros"] = np.where(rng.random((rows, n)) < 0.5, -0.0, 0.0)
    g["integers"] = rng.integers(-8, 9, (rows, n)).astype(np.float64)  # exact rounding ties
    g["halves"] = rng.integers(-40, 41, (rows, n)) / 2.0
    g["uniform_pos"] = rng.uniform(0.0, 1.0, (rows, n))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in g.items()}


def importances(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-column importance vectors as imatrix files hold them (mean squared activations):
    realistic (log-normal, a few hot channels), with exact zeros (dead channels, columns never
    seen), uniform, and extreme ranges."""
    rng = np.random.default_rng(seed)
    g: dict[str, np.ndarray] = {}
    v = np.exp(rng.standard_normal(n) * 1.5) * 1e-2
    v[rng.integers(0, n, max(1, n // 64))] *= 300.0
    g["lognormal"] = v
    z = np.exp(rng.standard_normal(n))
    z[rng.random(n) < 0.2] = 0.0
    g["zeros"] = z
    g["ones"] = np.ones(n)
    g["wide"] = np.exp(rng.uniform(-30, 30, n))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in g.items()}


def mismatches(a: np.ndarray, b: np.ndarray, qtype: str) -> int:
    """Number of blocks whose bytes differ (0 required on x86-64, < 1% elsewhere)."""
    nbytes = ggml.block_size(qtype)[1]
    bad = int((a.reshape(-1, nbytes) != b.reshape(-1, nbytes)).any(axis=1).sum())
    if not STRICT and bad * 100 < a.size // nbytes:
        return 0
    return bad


def byte_failures(lib, qtype: str, shape: tuple[int, int], imatrices: dict[str, np.ndarray | None]) -> list[str]:
    """Every :func:`datasets` input of ``shape`` quantized by qconv and by libggml with each of
    ``imatrices`` (name -> importance vector, None: none): one line per pair whose blocks differ."""
    failures = []
    for name, x in datasets(*shape, seed=shape[1]).items():
        for iname, qw in imatrices.items():
            ours = ggml.quantize(x, qtype, imatrix=qw)
            ref = ggml_ref(lib, x, qtype, qw)
            assert ours.shape == ref.shape and ours.dtype == np.uint8
            bad = mismatches(ours, ref, qtype)
            if bad:
                failures.append(f"{name}/{iname}: {bad} blocks differ")
    return failures
