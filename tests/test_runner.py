"""The reference runner against transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qconv.checkpoint import open_model
from qconv.errors import InvalidOption
from qconv.model.compare import compare
from qconv.model.decoder import Transformer, load_model, rope_inv_freq
from qconv.model.generate import generate
from qconv.model.kv_cache import FpKVCache
from qconv.model.perplexity import perplexity, windows

transformers = pytest.importorskip("transformers")

VOCAB = 300
CTX = 32


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> Transformer:
    with open_model(tiny_model_dir) as source:
        return load_model(source)


@torch.no_grad()
def test_rope_inv_freq_matches_transformers(runner: Transformer, hf_model) -> None:
    rotary, config = hf_model.model.rotary_emb, runner.config
    if hasattr(rotary, "inv_freq"):
        torch.testing.assert_close(rope_inv_freq(config), rotary.inv_freq, rtol=0, atol=0)
    else:  # a table per layer type (Gemma 3)
        torch.testing.assert_close(rope_inv_freq(config), rotary.full_attention_inv_freq, rtol=0, atol=0)
        torch.testing.assert_close(rope_inv_freq(config, local=True), rotary.sliding_attention_inv_freq, rtol=0, atol=0)


@torch.no_grad()
def test_mistral_sliding_window_matches_transformers(tiny_hf_model_builder, tmp_path: Path) -> None:
    """Mistral's ``sliding_window`` windows every layer (here 8 positions of 40), as transformers does."""
    hf = tiny_hf_model_builder("mistral", sliding_window=8).eval()
    hf.save_pretrained(tmp_path)
    tokens = random_ids(40)[None]
    with open_model(tmp_path) as source:
        ours = load_model(source)(tokens)
    assert (ours - hf(tokens).logits).abs().max().item() <= 1e-4
    full = tiny_hf_model_builder("mistral").eval()
    assert (full(tokens).logits - hf(tokens).logits).abs().max().item() > 1e-3  # the window matters here


@torch.no_grad()
def test_phi3_longrope_matches_transformers(tiny_hf_model_builder, tmp_path: Path) -> None:
    """longrope (Phi-3): short factors up to the original context, long ones past it (decided per
    call by its length, as transformers does), cos/sin scaled by the attention factor."""
    gen = torch.Generator().manual_seed(5)
    rot = int(16 * 0.75) // 2
    scaling = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
               "short_factor": (1 + torch.rand(rot, generator=gen)).tolist(),
               "long_factor": (1 + 4 * torch.rand(rot, generator=gen)).tolist()}
    hf = tiny_hf_model_builder("phi3", original_max_position_embeddings=24, rope_parameters=scaling).eval()
    hf.save_pretrained(tmp_path)
    with open_model(tmp_path) as source:
        runner = load_model(source)
    for length in (16, 40):  # below and past the original context of 24
        tokens = random_ids(length)[None]
        assert (runner(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4, length


@torch.no_grad()
def test_gemma3_global_rope_scaling_matches_transformers(tiny_hf_model_builder, tmp_path: Path) -> None:
    """Gemma 3's global layers scale RoPE (linear, as its 4B+ models) while its sliding layers keep
    their own unscaled base."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    hf = tiny_hf_model_builder("gemma3_text", rope_parameters=rope).eval()
    hf.save_pretrained(tmp_path)
    tokens = random_ids(40)[None]
    with open_model(tmp_path) as source:
        assert source.config.rope_scaling is not None and source.config.rope_local_theta == 10000.0
        ours = load_model(source)(tokens)
    assert (ours - hf(tokens).logits).abs().max().item() <= 1e-4


@torch.no_grad()
def test_full_sequence_logits_match_transformers(runner: Transformer, hf_model) -> None:
    tokens = random_ids(2 * 40).view(2, 40)
    diff = (runner(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff <= 1e-4


@torch.no_grad()
def test_cached_prefill_and_decode_match_transformers(runner: Transformer, hf_model) -> None:
    tokens = random_ids(40)[None]
    expected = hf_model(tokens).logits
    cache = FpKVCache(runner.config, 1, 40)
    # Prefill 30, a 3-token chunk after history (the explicit-mask path), then single tokens.
    pieces = [(0, 30), (30, 33)] + [(p, p + 1) for p in range(33, 40)]
    got = torch.cat([runner(tokens[:, a:b], cache, a) for a, b in pieces], dim=1)
    assert (got - expected).abs().max().item() <= 1e-4


def test_cache_overflow_is_an_error(runner: Transformer) -> None:
    cache = FpKVCache(runner.config, 1, 8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        runner(random_ids(9)[None], cache, 0)


def test_greedy_generation_matches_transformers(runner: Transformer, hf_model) -> None:
    prompt = random_ids(7, seed=3).tolist()
    # An EOS id outside the vocabulary so neither side stops early.
    hf_out = hf_model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=VOCAB, pad_token_id=0
    )[0, len(prompt):].tolist()
    streamed: list[int] = []
    ours = generate(runner, prompt, 20, on_token=streamed.append)
    assert ours == hf_out
    assert streamed == ours and len(ours) == 20


def test_generation_stops_at_eos(runner: Transformer) -> None:
    prompt = random_ids(7, seed=3).tolist()
    greedy = generate(runner, prompt, 10)
    eos = greedy[4]
    assert generate(runner, prompt, 10, eos_ids=[eos]) == greedy[: greedy.index(eos) + 1]


def test_sampling_is_seeded(runner: Transformer) -> None:
    prompt = random_ids(5, seed=4).tolist()
    first = generate(runner, prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert generate(runner, prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=7) == first
    assert generate(runner, prompt, 12, temperature=1.0, seed=8) != first
    # top_k=1 leaves only the argmax, whatever the temperature.
    assert generate(runner, prompt, 12, temperature=2.0, top_k=1, seed=9) == generate(runner, prompt, 12)


@torch.no_grad()
def test_perplexity_matches_transformers(runner: Transformer, hf_model) -> None:
    ids = random_ids(3 * CTX + 11).tolist()  # the trailing 11 tokens are dropped
    result = perplexity(runner, ids, ctx=CTX)
    nll = 0.0
    for i in range(3):
        window = torch.tensor(ids[i * CTX : (i + 1) * CTX])[None]
        logits = hf_model(window).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").double().item()
    expected = math.exp(nll / (3 * (CTX - 1)))
    assert (result.n_windows, result.n_tokens) == (3, 3 * (CTX - 1))
    assert abs(result.ppl - expected) / expected <= 1e-5
    assert result.to_dict()["ppl"] == result.ppl


def test_perplexity_window_limits(runner: Transformer) -> None:
    ids = random_ids(3 * CTX).tolist()
    seen: list[tuple[int, int]] = []
    result = perplexity(runner, ids, ctx=CTX, max_windows=2, on_window=lambda d, t: seen.append((d, t)))
    assert result.n_windows == 2 and seen == [(1, 2), (2, 2)]
    with pytest.raises(InvalidOption, match="fewer than one window"):
        perplexity(runner, ids[: CTX - 1], ctx=CTX)


def test_windows_drop_partial_tail() -> None:
    w = windows(list(range(10)), ctx=4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_compare_with_itself_is_exact(runner: Transformer) -> None:
    ids = random_ids(2 * CTX).tolist()
    result = compare(runner, runner, ids, ctx=CTX)
    assert result.kl_mean == 0.0
    assert result.top1_agreement == 1.0
    assert result.max_abs_dlogit == 0.0
    assert result.ppl_base == result.ppl_other == perplexity(runner, ids, ctx=CTX).ppl
    assert result.n_tokens == 2 * (CTX - 1)


def test_compare_detects_perturbation(runner: Transformer, tiny_model_dir: Path) -> None:
    with open_model(tiny_model_dir) as source:
        other = load_model(source)
    with torch.no_grad():
        last = other.config.spec.block_linears(other.config)[-1]  # the down Linear (of the last expert)
        w = other.layers[0].get_submodule(last).weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    ids = random_ids(2 * CTX).tolist()
    result = compare(runner, other, ids, ctx=CTX)
    assert result.kl_mean > 0.0 and result.max_abs_dlogit > 0.0
    assert result.ppl_base == perplexity(runner, ids, ctx=CTX).ppl
    assert result.ppl_other == pytest.approx(perplexity(other, ids, ctx=CTX).ppl, rel=1e-12)


@torch.no_grad()
def test_linear_rope_scaling_and_attention_bias(tmp_path: Path, tiny_hf_model_builder) -> None:
    """Variants no shared fixture covers: linear RoPE scaling and Llama's attention_bias (o_proj bias)."""
    hf = tiny_hf_model_builder("llama", rope_scaling={"rope_type": "linear", "factor": 4.0}, attention_bias=True)
    hf.save_pretrained(tmp_path)
    with open_model(tmp_path) as source:
        assert source.config.o_bias
        model = load_model(source)
    tokens = random_ids(40)[None]
    assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_streamed_perplexity_equals_the_runner(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One layer at a time over all windows gives the runner's perplexity (float32 storage);
    bf16 storage of the hidden states moves it only by that rounding."""
    from qconv.model.streamed import streamed_perplexity

    with open_model(tiny_model_dir) as src:
        ids = torch.randint(0, src.config.vocab_size, (4 * 48,), generator=torch.Generator().manual_seed(0)).tolist()
        ref = perplexity(load_model(src), ids, ctx=48)
        streamed = streamed_perplexity(src, ids, ctx=48)
        bf16 = streamed_perplexity(src, ids, ctx=48, store_dtype=torch.bfloat16)
    assert streamed.n_tokens == ref.n_tokens and streamed.n_windows == 4
    assert abs(streamed.ppl - ref.ppl) < 1e-5 * ref.ppl
    assert abs(bf16.ppl - ref.ppl) < 2e-2 * ref.ppl


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_uses_bf16_gemms_only_where_native(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      native: bool) -> None:
    """``--dtype auto`` keeps float32 weights and runs the layers' GEMMs in bf16 through autocast
    where bf16 is native (calls of 64 tokens or more), within 1% of the float32 perplexity;
    elsewhere it is plain float32."""
    import qconv.core.device as device_module
    from qconv.api import load_runner

    monkeypatch.setattr(device_module.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    with open_model(tiny_model_dir) as source:
        auto, f32 = load_runner(source, "cpu", "auto"), load_runner(source, "cpu", "f32")
    assert auto.dtype == torch.float32
    assert auto.autocast_dtype == (torch.bfloat16 if native else None) and f32.autocast_dtype is None
    ids = torch.randint(0, auto.config.vocab_size, (3 * 64,), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = perplexity(auto, ids, ctx=64).ppl, perplexity(f32, ids, ctx=64).ppl
    if native:
        assert a != b and a == pytest.approx(b, rel=1e-2)
    else:
        assert a == b


def test_auto_weight_dtype_follows_memory(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dtype auto`` keeps float32 weights while they take at most half the memory available,
    else the checkpoint's 16-bit dtype (bfloat16 for a float32 one): a model too large for float32
    still runs."""
    import qconv.quant.memory as memory
    from qconv import api

    with open_model(tiny_model_dir) as src:
        assert api.load_runner(src, "cpu").embed_tokens.weight.dtype == torch.float32
        monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
        assert api.load_runner(src, "cpu").embed_tokens.weight.dtype == torch.bfloat16
