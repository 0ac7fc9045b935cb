"""Shared fixtures: tiny random HF checkpoints covering the architecture variants qconv supports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests_support import write_tokenizer

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral")

#: CPU features the llama.cpp oracle must not be built with (see the Makefile's ORACLE_CMAKE_ARGS):
#: a -march=native build on an AMX / AVX512-BF16 Xeon crashes evaluating quantized GGUFs.
NON_BASELINE = ("AVX512", "AMX")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run against a natively built llama.cpp oracle: it segfaults the whole session on
    AMX machines, and its numbers would depend on the CPU the tests run on."""
    try:
        import llama_cpp
    except ImportError:  # the llama.cpp tests skip themselves
        return
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    enabled = sorted({f.split("=")[0].strip() for f in info.replace("|", "\n").splitlines()
                      if f.strip().endswith("= 1") and f.split("=")[0].strip().startswith(NON_BASELINE)})
    if enabled:
        raise pytest.UsageError(
            f"llama-cpp-python was built for this CPU ({', '.join(enabled)}), not for the AVX2 baseline the "
            "tests use: run `make test`, which builds (once) and installs the portable oracle")


def tiny_hf_config(arch: str, **overrides: object):
    """A tiny transformers config for ``arch`` (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 300).

    Each architecture exercises a different variant: llama has llama3 RoPE scaling and untied
    embeddings, mistral a head_dim override (32 != 64 / 4) and tied embeddings, qwen2 q/k/v bias,
    qwen3 per-head q/k norms, its own head_dim (32) and tied embeddings, gemma2 pre/post norms,
    GeGLU, soft-caps and a sliding window of 6 on every other layer (shorter than the tests'
    sequences) with a query_pre_attn_scalar that is not head_dim, gemma3_text q/k norms and a
    sliding layer with its own RoPE base before a global one, phi3 fused q/k/v and gate/up,
    partial RoPE (3/4 of each head) and a sliding window of 8 on every layer, qwen3_moe 4 experts
    (top 2, renormalized) and mixtral 8 (top 2: llama.cpp's 8-expert K-mix rules apply).
    """
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config, Qwen3MoeConfig)

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        # original_max_position_embeddings=64 puts head_dim 16's frequencies in all three llama3
        # bands (kept, smoothed, divided by factor).
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        kwargs = dict(common, rope_scaling=rope, rope_theta=10000.0, tie_word_embeddings=False)
        return LlamaConfig(**{**kwargs, **overrides})
    if arch == "mistral":
        kwargs = dict(common, head_dim=32, tie_word_embeddings=True, sliding_window=None, rope_theta=1e6)
        return MistralConfig(**{**kwargs, **overrides})
    if arch == "qwen2":
        kwargs = dict(common, tie_word_embeddings=False, rope_theta=1e6)
        return Qwen2Config(**{**kwargs, **overrides})
    if arch == "qwen3":
        kwargs = dict(common, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)
        return Qwen3Config(**{**kwargs, **overrides})
    if arch == "gemma2":
        kwargs = dict(common, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0, query_pre_attn_scalar=24,
                      sliding_window=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      hidden_activation="gelu_pytorch_tanh")
        return Gemma2Config(**{**kwargs, **overrides})
    if arch == "gemma3_text":
        kwargs = dict(common, head_dim=16, tie_word_embeddings=True, query_pre_attn_scalar=24, sliding_window=6,
                      hidden_activation="gelu_pytorch_tanh", layer_types=["sliding_attention", "full_attention"],
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
        return Gemma3TextConfig(**{**kwargs, **overrides})
    if arch == "phi3":
        kwargs = dict(common, tie_word_embeddings=False, sliding_window=8, original_max_position_embeddings=256, pad_token_id=0,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
        return Phi3Config(**{**kwargs, **overrides})
    if arch == "qwen3_moe":
        kwargs = dict(common, head_dim=32, tie_word_embeddings=False, rope_theta=1e6, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=64)
        return Qwen3MoeConfig(**{**kwargs, **overrides})
    if arch == "mixtral":
        kwargs = dict(common, intermediate_size=64, tie_word_embeddings=False, rope_theta=1e6, num_local_experts=8,
                      num_experts_per_tok=2, sliding_window=None)
        return MixtralConfig(**{**kwargs, **overrides})
    raise ValueError(arch)


def build_tiny_hf_model(arch: str, seed: int = 0, **overrides: object):
    """A seeded random float32 model; every parameter (biases and norms too) is randomized so no
    code path can pass by multiplying by a default one or adding a default zero."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf_model_builder():
    """:func:`build_tiny_hf_model`, for tests that need a variant ``tiny_model_dir`` lacks."""
    return build_tiny_hf_model


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF safetensors checkpoint directory (float32, no tokenizer) of a tiny random model."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_hf_model(request.param).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """A tiny Llama with a 384-token tokenizer: what the quantize and inspect tests work on."""
    path = tmp_path_factory.mktemp("qmodel")
    tiny_hf_model_builder("llama", rope_scaling=None, vocab_size=384).save_pretrained(path)
    write_tokenizer(path, 384)
    return path


@pytest.fixture(scope="session")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small jsonl calibration file (field ``text``)."""
    path = tmp_path_factory.mktemp("calib") / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Once upon a time there were {i} tiny models. " * 8})
                              for i in range(40)))
    return path


#: layers of :func:`deep_model`
DEEP_LAYERS = 12


@pytest.fixture(scope="session")
def deep_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """A 12-layer tiny Llama with a tokenizer: runs long enough to be stopped in the middle
    (the resume and fault tests)."""
    path = tmp_path_factory.mktemp("deep")
    tiny_hf_model_builder("llama", rope_scaling=None, vocab_size=384, num_hidden_layers=DEEP_LAYERS).save_pretrained(path)
    write_tokenizer(path, 384)
    return path
