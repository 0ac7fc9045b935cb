"""Quantized KV caches: the quantizers, KIVI's residual rules, chunked == token-by-token, options."""

from __future__ import annotations

import copy
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qconv import api
from qconv.checkpoint import open_model
from qconv.errors import InvalidOption
from qconv.model.decoder import Transformer, load_model
from qconv.model.generate import generate
from qconv.model.kv_cache import causal_attention
from qconv.model.kv_caches import Fp8KVCache, Int8KVCache, KiviKVCache
from qconv.model.kv_quant import (
    dequantize_asym,
    dequantize_int8,
    pack_codes,
    quantize_asym,
    quantize_int8,
    unpack_codes,
)
from qconv.model.kv_spec import KVCacheSpec
from qconv.model.perplexity import logits_nll_sum, perplexity, windows

QCONV = str(Path(sys.executable).parent / "qconv")
STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.gguf not present")
perplexity_mod = importlib.import_module("qconv.model.perplexity")  # the package re-exports a function of that name

# Cache-level tests: 2 KV heads of head_dim 16 under 4 query heads, group 8, residual 16.
CFG = SimpleNamespace(num_layers=1, num_kv_heads=2, num_heads=4, head_dim=16)
G, R = 8, 16


def qkv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, t, 16, generator=gen)
    k = torch.randn(1, 2, t, 16, generator=gen) * torch.linspace(0.2, 4, 16)  # outlier-ish channels
    v = torch.randn(1, 2, t, 16, generator=gen)
    return q, k, v


def feed(cache, q, k, v, cuts: list[int]) -> torch.Tensor:
    """Attend the sequence through ``cache`` in the chunks ``cuts`` delimits."""
    return torch.cat([cache.attend(0, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], a) for a, b in zip(cuts, cuts[1:])], 2)


# ---- quantizers -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [-1, -2])
def test_pack_unpack_round_trip(bits: int, dim: int) -> None:
    codes = torch.randint(0, 1 << bits, (2, 3, 16, 8), dtype=torch.uint8)
    packed = pack_codes(codes, bits, dim)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack_codes(packed, bits, dim), codes)


def test_pack_layout_is_low_bits_first() -> None:
    assert pack_codes(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2, -1).tolist() == [0b11100100]
    assert pack_codes(torch.tensor([5, 12], dtype=torch.uint8), 4, -1).tolist() == [0xC5]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asym_error_within_half_a_step_and_groups_independent(bits: int) -> None:
    x = torch.randn(1, 2, 32, 16)
    x[0, 0, 3, 5] = 50.0  # an outlier in the first token-group of channel 5 only
    packed, scale, zero = quantize_asym(x, bits, 8, -2, torch.float16)
    assert scale.shape == zero.shape == (1, 2, 4, 16)
    y = dequantize_asym(packed, scale, zero, bits, 8, -2, torch.float32)
    step = scale.float().repeat_interleave(8, dim=-2)
    assert ((y - x).abs() <= step / 2 + 1e-2 * x.abs().clamp_min(1) * 2**-10 + 1e-6).all()
    # The outlier widens its own group only: the next token-group of that channel keeps a fine scale.
    assert scale[0, 0, 0, 5] > 40 / (2**bits - 1) and scale[0, 0, 1, 5] < 10 / (2**bits - 1)
    # Each group's min and max are representable (codes 0 and 2^bits-1).
    codes = unpack_codes(packed, bits, -2).unflatten(-2, (4, 8))
    assert (codes.amin(-2) == 0).all() and (codes.amax(-2) == 2**bits - 1).all()


def test_constant_and_zero_groups_dequantize_exactly() -> None:
    x = torch.zeros(1, 1, 4, 16)
    x[..., 8:] = 0.75
    packed, scale, zero = quantize_asym(x, 2, 8, -1, torch.float16)
    assert torch.equal(dequantize_asym(packed, scale, zero, 2, 8, -1, torch.float32), x)
    codes, s = quantize_int8(torch.zeros(3, 16), torch.float16)
    assert torch.equal(dequantize_int8(codes, s, torch.float32), torch.zeros(3, 16))


def test_int8_per_token_error() -> None:
    x = torch.randn(4, 7, 64) * torch.logspace(-3, 2, 7)[None, :, None]
    codes, scale = quantize_int8(x, torch.float16)
    assert codes.dtype == torch.int8 and scale.shape == (4, 7, 1)
    err = (dequantize_int8(codes, scale, torch.float32) - x).abs()
    assert (err <= scale.float() / 2 * 1.001 + 1e-7).all()


# ---- KIVI cache rules -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, G - 1, R - 1, R, R + 1, 2 * R - 1, 2 * R, 2 * R + 3])
def test_residual_boundary(n: int) -> None:
    """Keys quantize R at a time once R are held; values one at a time once more than R are held."""
    q, k, v = qkv(n)
    cache = KiviKVCache(CFG, 1, 64, bits=2, group=G, residual=R)
    feed(cache, q, k, v, list(range(n + 1)))
    assert cache.k_fp[0].shape[2] == n % R
    assert cache.v_fp[0].shape[2] == min(n, R)
    mem = cache.memory()
    nk, nv = n // R * R, max(0, n - R)
    keys = nk * 16 // 4 + (nk // G) * 16 * 2 * 2 + (n - nk) * 16 * 2  # codes + fp16 scale/zero + residual
    values = nv * 16 // 4 + nv * (16 // G) * 2 * 2 + (n - nv) * 16 * 2
    per_head = keys + values
    assert mem.tokens == n and mem.bytes == 2 * per_head and mem.fp16_bytes == 2 * 2 * n * 16 * 2


def test_sink_tokens_are_counted_once_quantized() -> None:
    """A sink still in the 16-bit residual costs nothing extra; once its position is quantized
    (keys after R tokens, values after R + 1), its 16-bit copy is counted on top."""
    q, k, v = qkv(2 * R)
    plain, sunk = KiviKVCache(CFG, 1, 64, 2, G, R), KiviKVCache(CFG, 1, 64, 2, G, R, sink=2)
    for n in range(1, 2 * R + 1):
        for c in (plain, sunk):
            c.attend(0, q[:, :, n - 1: n], k[:, :, n - 1: n], v[:, :, n - 1: n], n - 1)
        extra = 2 * 16 * 2 * (min(2, n // R * R) + min(2, max(0, n - R)))  # 2 heads x 16 ch x fp16
        assert sunk.memory().bytes - plain.memory().bytes == extra, n


def test_sink_keeps_an_outlier_first_token_from_costing_its_groups() -> None:
    t = 3 * R
    q, k, v = qkv(t, seed=3)
    k[:, :, 0] *= 30
    ref = causal_attention(q, k, v)
    err = {s: (feed(KiviKVCache(CFG, 1, t, 2, G, R, sink=s), q, k, v, [0, t]) - ref).abs().mean() for s in (0, 1)}
    assert err[1] < 0.5 * err[0], err


def test_shorter_than_a_group_is_plain_16bit_attention() -> None:
    q, k, v = qkv(G - 3)
    out = feed(KiviKVCache(CFG, 1, 16, bits=2, group=G, residual=R), q, k, v, [0, G - 3])
    ref = causal_attention(q, k.half().float(), v.half().float())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def reference_kivi(q, k, v, bits: int, sink: int = 0) -> torch.Tensor:
    """KIVI attention built straight from the rules, one query at a time, no cache object.
    ``sink``: the first positions stay 16-bit and the next token stands in for them in the
    key groups' ranges."""
    k, v = k.half().float(), v.half().float()
    t = k.shape[2]
    nk_all = t // R * R
    stand_in = k.clone()
    stand_in[:, :, :sink] = k[:, :, sink: sink + 1]
    kq = dequantize_asym(*quantize_asym(stand_in[:, :, :nk_all], bits, G, -2, torch.float16), bits, G, -2,
                         torch.float32)
    vq = dequantize_asym(*quantize_asym(v, bits, G, -1, torch.float16), bits, G, -1, torch.float32)
    kq[:, :, :sink], vq[:, :, :sink] = k[:, :, :sink], v[:, :, :sink]
    outs = []
    for p in range(t):
        nk, nv = p // R * R, max(0, p - R)
        keys = torch.cat((kq[:, :, :nk], k[:, :, nk: p + 1]), 2)
        values = torch.cat((vq[:, :, :nv], v[:, :, nv: p + 1]), 2)
        outs.append(causal_attention(q[:, :, p: p + 1], keys, values))
    return torch.cat(outs, 2)


@pytest.mark.parametrize(("bits", "sink"), [(2, 0), (4, 0), (8, 0), (2, 3), (4, 1)])
def test_chunks_equal_single_steps_equal_the_rules(bits: int, sink: int) -> None:
    t = 3 * R + 5
    q, k, v = qkv(t, seed=bits)
    k[:, :, :sink] *= 30  # sink keys are outliers: they must not stretch their groups' ranges
    single = KiviKVCache(CFG, 1, t, bits, G, R, sink=sink)
    chunked = KiviKVCache(CFG, 1, t, bits, G, R, sink=sink)
    out_single = feed(single, q, k, v, list(range(t + 1)))
    out_chunked = feed(chunked, q, k, v, [0, 2, 5, R, R + 1, 2 * R + 7, t])  # chunks straddle every boundary
    atol = 1e-5 if sink else 2e-6  # the outlier sink keys make larger scores: float summation order shows more
    torch.testing.assert_close(out_chunked, out_single, rtol=0, atol=atol)
    torch.testing.assert_close(out_chunked, reference_kivi(q, k, v, bits, sink), rtol=0, atol=atol)
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        assert torch.equal(getattr(single, name), getattr(chunked, name)), name
    # Quantization really happened: the output differs from full precision.
    assert (out_single - causal_attention(q, k, v)).abs().max() > 1e-4


def test_int8_chunks_equal_single_steps() -> None:
    q, k, v = qkv(40)
    single = feed(Int8KVCache(CFG, 1, 40), q, k, v, list(range(41)))
    chunked = feed(Int8KVCache(CFG, 1, 40), q, k, v, [0, 13, 14, 40])
    torch.testing.assert_close(chunked, single, rtol=0, atol=2e-6)
    assert Int8KVCache(CFG, 1, 40).memory().bytes == 0


def test_fp8_cache_matches_library_and_chunks_equal_single_steps() -> None:
    """The FP8 cache holds exactly compressed-tensors' FP8 fake-quantization of keys and values
    with the static per-layer scales (what vLLM's ``kv_cache_dtype=fp8`` stores), attends over
    them, and chunked calls equal single steps; without scales it uses 1.0, as vLLM does."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from qconv.core.compressed_layout import FP8_KV_SCHEME

    q, k, v = qkv(40)
    scales = torch.tensor([[0.011, 0.004]])
    args = QuantizationArgs.model_validate({k_: v_ for k_, v_ in FP8_KV_SCHEME.items() if v_ is not None})
    kq = fake_quantize(k, scales[0, 0].reshape(1), torch.zeros(1), args)
    vq = fake_quantize(v, scales[0, 1].reshape(1), torch.zeros(1), args)
    single = feed(Fp8KVCache(CFG, 1, 40, scales=scales), q, k, v, list(range(41)))
    chunked = feed(Fp8KVCache(CFG, 1, 40, scales=scales), q, k, v, [0, 13, 14, 40])
    torch.testing.assert_close(chunked, single, rtol=0, atol=2e-6)
    torch.testing.assert_close(chunked, causal_attention(q, kq, vq), rtol=0, atol=2e-6)
    assert not torch.allclose(chunked, causal_attention(q, k, v), atol=1e-3)
    unscaled = feed(Fp8KVCache(CFG, 1, 40), q, k, v, [0, 40])
    torch.testing.assert_close(unscaled, causal_attention(q, k.to(torch.float8_e4m3fn).float(),
                                                          v.to(torch.float8_e4m3fn).float()), rtol=0, atol=2e-6)
    assert Fp8KVCache(CFG, 1, 40).memory().bytes == 0


def test_kivi_cache_is_append_only() -> None:
    q, k, v = qkv(4)
    cache = KiviKVCache(CFG, 1, 8, 4, G, R)
    cache.attend(0, q, k, v, 0)
    with pytest.raises(ValueError, match="append-only"):
        cache.attend(0, q[:, :, :1], k[:, :, :1], v[:, :, :1], 2)


# ---- through the model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Transformer:
    path = tmp_path_factory.mktemp("kv-llama")
    tiny_hf_model_builder("llama").save_pretrained(path)  # head_dim 16
    with open_model(path) as source:
        return load_model(source)


@pytest.fixture(scope="module")
def runner64(runner: Transformer) -> Transformer:
    """The tiny model in float64: batched and single-row matmuls then agree to ~1e-16, so no
    rounding-boundary flip of a 16-bit or 2-bit code can blur an exact-equality check."""
    return copy.deepcopy(runner).double()


def token_by_token_ppl(model: Transformer, ids: list[int], ctx: int, spec: KVCacheSpec) -> float:
    """What generation sees: every window decoded one token at a time through a fresh cache."""
    total, n = 0.0, 0
    for window in windows(ids, ctx):
        cache = spec.make(model.config, 1, ctx, "cpu", model.dtype)
        logits = torch.cat([model(window[None, i: i + 1], cache, i) for i in range(ctx - 1)], 1)[0]
        total += logits_nll_sum(logits, window[1:])
        n += ctx - 1
    return math.exp(total / n)


@pytest.mark.parametrize("spec", [KVCacheSpec.from_options("kivi", 2, G, R), KVCacheSpec.from_options("int8"),
                                  KVCacheSpec.from_options("kivi", 2, G, R, sink=1), KVCacheSpec.from_options("fp8")],
                         ids=["kivi2", "int8", "kivi2-sink", "fp8"])
def test_chunked_ppl_equals_token_by_token_decoding(runner64: Transformer, spec: KVCacheSpec, monkeypatch) -> None:
    ids = torch.randint(0, 300, (2 * 56,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = token_by_token_ppl(runner64, ids, 56, spec)
    one_chunk = perplexity(runner64, ids, ctx=56, kv_cache=spec)
    monkeypatch.setattr(perplexity_mod, "PREFILL_CHUNK", 13)  # chunks straddling residual boundaries
    many_chunks = perplexity(runner64, ids, ctx=56, kv_cache=spec)
    for got in (one_chunk, many_chunks):
        assert got.ppl == pytest.approx(expected, rel=1e-12)
    plain = perplexity(runner64, ids, ctx=56).ppl
    assert one_chunk.ppl != pytest.approx(plain, rel=1e-6)  # the cache is really in the loop
    assert one_chunk.kv_cache["tokens"] == 56 and one_chunk.kv_cache["ratio"] < 1


def test_kivi8_greedy_generation_matches_fp(runner: Transformer) -> None:
    """Measure: 8-bit KIVI keeps every greedy token of 40 on the tiny model, and its logits stay
    within 2% of the fp logits' range."""
    prompt = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    spec = KVCacheSpec.from_options("kivi", 8, G, R)
    fp = generate(runner, prompt, 40, eos_ids=(300,))
    kivi = generate(runner, prompt, 40, eos_ids=(300,), cache=spec.make(runner.config, 1, 60, "cpu", torch.float32))
    assert kivi == fp
    seq = torch.tensor([prompt + fp])
    ref = runner(seq)
    cache = spec.make(runner.config, 1, seq.shape[1], "cpu", torch.float32)
    got = torch.cat([runner(seq[:, i: i + 1], cache, i) for i in range(seq.shape[1])], 1)
    assert (got - ref).abs().max() < 0.02 * (ref.max() - ref.min())


# ---- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("kivi", 3, None, None), "--kv-bits must be one of 2, 4, 8"),
        (("kivi", 2, 6, None), "--kv-group must be a positive multiple of 4"),
        (("kivi", 4, 32, 100), "--kv-residual must be a positive multiple of --kv-group 32"),
        (("kivi", 4, 32, 0), "--kv-residual"),
        (("int8", 4, None, None), "--kv-bits applies only to --kv-cache kivi"),
        (("int8", None, None, None, 1), "--kv-sink applies only to --kv-cache kivi"),
        (("kivi", 4, 32, 128, 128), "--kv-sink must be at least 0 and less than --kv-residual 128"),
        (("kivi", 4, 32, 128, -1), "--kv-sink must be at least 0"),
        (("q4", None, None, None), "unknown --kv-cache"),
    ],
)
def test_bad_options(args: tuple, needle: str) -> None:
    with pytest.raises(InvalidOption, match=needle.replace("-", r"\-")):
        KVCacheSpec.from_options(*args)


def test_group_must_divide_head_dim(runner: Transformer) -> None:
    with pytest.raises(InvalidOption, match="must divide the model's head_dim 16"):
        KVCacheSpec.from_options("kivi", 4, 32, 128).check(runner.config)


@needs_stories
def test_api_ppl_and_generation_on_gguf(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little cat who liked to play in the sun. " * 40)
    kw = dict(ctx=64, max_windows=2, device="cpu")
    fp = api.perplexity(STORIES, text, **kw)
    k8 = api.perplexity(STORIES, text, **kw, kv_cache=api.kv_cache_spec("kivi", 8, 8, 16))
    k2 = api.perplexity(STORIES, text, **kw, kv_cache=api.kv_cache_spec("kivi", 2, 8, 16))
    assert k8.ppl == pytest.approx(fp.ppl, rel=0.01) and fp.kv_cache is None
    assert k2.kv_cache["bytes"] < k8.kv_cache["bytes"] < k8.kv_cache["fp16_bytes"]
    g = api.generate_text(STORIES, "Once upon a time", 8, device="cpu", kv_cache=api.kv_cache_spec("int8"))
    # stories260K has head_dim 8: 8 int8 codes + one 2-byte scale per token per head, vs 16 bytes in fp16.
    assert g.kv_cache["mode"] == "int8" and g.kv_cache["ratio"] == pytest.approx((8 + 2) / 16)


@needs_stories
def test_cli_kv_options(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The dog ran to the park and found a ball. " * 40)
    base = [QCONV, "run", str(STORIES), "--ppl", str(text), "--ctx", "64", "--max-windows", "1", "--device", "cpu"]
    res = subprocess.run([*base, "--kv-cache", "kivi", "--kv-bits", "3"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--kv-bits" in res.stderr
    res = subprocess.run([*base, "--kv-cache", "kivi", "--kv-group", "8", "--kv-residual", "16", "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)["kv_cache"]
    assert report["name"] == "kivi4-g8-r16" and report["tokens"] == 64 and report["bytes"] < report["fp16_bytes"]
