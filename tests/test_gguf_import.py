"""GGUF import checked against transformers' own GGUF loader (the independent oracle).

Two inputs: the real tiny model in ``../shared/data/stories260K.gguf`` (SentencePiece vocab)
and tiny GGUFs written here from random transformers models, in F32 and in quantized types
gguf-py can produce (Q8_0, Q4_1), for the llama (Q/K permuted) and qwen2 (biases) archs.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qconv import api
from qconv.checkpoint import open_model
from qconv.arch.rope_layout import permute_rows, unpermute_rows

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.gguf not present")


def _transformers_gguf(directory: Path, name: str) -> torch.nn.Module:
    """transformers' GGUF loader, tolerating the u32 -1 'no pad token' id it chokes on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(directory, gguf_file=name)
    if cfg.pad_token_id is not None and cfg.pad_token_id >= cfg.vocab_size:
        cfg.pad_token_id = None
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, config=cfg, dtype=torch.float32).eval()


def write_gguf(path: Path, model: torch.nn.Module, arch: str, qtype: gguf.GGMLQuantizationType) -> None:
    """Write a transformers model as GGUF the way convert_hf_to_gguf lays it out."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(hd)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([1] * cfg.vocab_size)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        stem, _, kind = name.rpartition(".")
        if stem.startswith("model.layers."):
            i, rest = stem[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{layer[rest]}.{kind}"
        else:
            if stem == "lm_head" and cfg.tie_word_embeddings:
                continue
            gname = f"{names[stem]}.{kind}"
        a = t.float().numpy()
        if arch == "llama" and ".attn_q." in gname:
            a = permute_rows(a, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            a = permute_rows(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unpermute_inverts_converter_permutation() -> None:
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    assert np.array_equal(unpermute_rows(permute_rows(w, 6), 6), w)


@needs_stories
def test_stories_tensors_equal_transformers_loader() -> None:
    ref = _transformers_gguf(STORIES.parent, STORIES.name).state_dict()
    with open_model(STORIES) as src:
        assert set(src.tensor_names()) <= set(ref)
        for name in src.tensor_names():
            assert torch.equal(src.get_tensor(name), ref[name]), name


@needs_stories
def test_stories_convert_and_greedy_generation(tmp_path: Path) -> None:
    """GGUF -> HF with qconv, then transformers on qconv's checkpoint generates what
    transformers generates from the GGUF, and so does qconv's runner."""
    from transformers import AutoModelForCausalLM

    out = api.convert(STORIES, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out.output, dtype=torch.float32).eval()
    ref = _transformers_gguf(STORIES.parent, STORIES.name)
    bos = torch.tensor([[1]])
    expect = ref.generate(bos, max_new_tokens=24, do_sample=False)
    assert torch.equal(hf.generate(bos, max_new_tokens=24, do_sample=False), expect)
    g = api.generate_text(STORIES, "", max_new_tokens=24, device="cpu")
    assert g.text.startswith("Once upon a time, there was a little girl named Lily.")


@pytest.mark.parametrize(
    "arch,qtype",
    [("llama", gguf.GGMLQuantizationType.F32), ("llama", gguf.GGMLQuantizationType.Q8_0),
     ("qwen2", gguf.GGMLQuantizationType.F32), ("qwen2", gguf.GGMLQuantizationType.Q4_1)],
)
def test_tiny_gguf_matches_transformers_loader(tmp_path: Path, arch: str, qtype: gguf.GGMLQuantizationType) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=arch == "qwen2")
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, arch, qtype)
    ref = _transformers_gguf(tmp_path, path.name).state_dict()
    with open_model(path) as src:
        assert src.config.tie_word_embeddings == (arch == "qwen2")
        assert src.config.qkv_bias == (arch == "qwen2")
        for name in src.tensor_names():
            assert torch.equal(src.get_tensor(name), ref[name]), name
        if qtype == gguf.GGMLQuantizationType.F32:  # lossless: the original weights come back
            orig = model.state_dict()
            for name in src.tensor_names():
                assert torch.equal(src.get_tensor(name), orig[name]), name


def test_reading_a_gguf_does_not_keep_its_pages(tmp_path: Path, tiny_hf_model_builder) -> None:
    """Tensors are read through gguf-py's file mapping; each tensor's pages are dropped after it
    is decoded, so streaming a file does not grow the process by the file's size."""
    from qconv.quant.memory import resident_bytes

    out = tmp_path / "big.gguf"
    model = tiny_hf_model_builder("llama", rope_scaling=None, vocab_size=32768, hidden_size=256, intermediate_size=512)
    write_gguf(out, model, "llama", gguf.GGMLQuantizationType.F32)
    size = out.stat().st_size
    with open_model(out) as source:
        before = resident_bytes()
        for name in source.tensor_names():
            source.get_array(name)
        grown = resident_bytes() - before
    assert size > 60 * 2**20
    assert grown < size / 4, (grown, size)
