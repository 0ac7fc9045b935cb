"""GGUF export against llama.cpp (through llama-cpp-python), the independent oracle:

- byte identity: every tensor's type and bytes equal what ``llama_model_quantize`` writes from
  qconv's own f32 / f16 GGUF of the same model, for every file type;
- llama.cpp loads every file qconv writes, and its logits agree with qconv's runner on the same
  file;
- round trip HF -> GGUF f32 -> HF gives back identical tensors.

Tiny models use hidden 256 (K-quant rows) and intermediate 320 (not a multiple of 256, so
ffn_down falls back to 32-block types), 4 layers (both "more bits" and plain layers).
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qconv import api
from qconv.checkpoint import open_model
from qconv.formats.gguf_types import FILE_TYPES
from tests_support import extract_converter, write_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")

QUANT_TYPES = [n for n, ft in FILE_TYPES.items() if ft.quantized]
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module", params=ARCHS)
def export_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """A tiny checkpoint (with tokenizer) whose rows exercise both the K-quant and fallback paths."""
    return build_export_model(request.param, tmp_path_factory.mktemp(f"export-{request.param}"), tiny_hf_model_builder)


def build_export_model(arch: str, path: Path, tiny_hf_model_builder) -> Path:
    """The checkpoint of :func:`export_model` for ``arch``, saved in ``path``."""
    overrides = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=384)
    if arch in ("mistral", "qwen3", "qwen3_moe"):
        overrides["head_dim"] = 64
    if arch == "qwen3_moe":  # experts as wide as the dense MLPs of the others (320: the fallback path)
        overrides["moe_intermediate_size"] = 320
    if arch.startswith("gemma"):  # llama.cpp scales gemma's scores by head_dim^-0.5 (query_pre_attn_scalar)
        overrides.update(head_dim=64, query_pre_attn_scalar=64, sliding_window=16)
    if arch == "gemma3_text":  # 5 sliding layers, then a global one: the pattern llama.cpp assumes
        overrides.update(num_hidden_layers=6, layer_types=None)
    if arch == "phi3":  # llama.cpp's phi3 disables sliding windows: none here; longrope, partial RoPE
        gen = torch.Generator().manual_seed(7)
        overrides.update(sliding_window=None, original_max_position_embeddings=32, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [round(1 + f, 3) for f in torch.rand(24, generator=gen).tolist()],
            "long_factor": [round(1 + 4 * f, 3) for f in torch.rand(24, generator=gen).tolist()]})
    if arch == "llama":
        overrides["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = tiny_hf_model_builder(arch, **overrides)
    with torch.no_grad():
        # Trained-model-like numerics: small weights (a random net with large ones is chaotic and
        # amplifies llama.cpp's activation rounding), and peaked next-token distributions so
        # top-1 agreement means something.
        offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0  # RMSNorms scale by offset + w
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(0.2)
            elif offset:
                p.sub_(1.0)  # the same gains, 0.5-1.5, as the other families' norms
        final = model.model.norm.weight
        final.copy_((final + offset) * 20.0 - offset)
    model.save_pretrained(path)
    write_tokenizer(path, 384, fill=arch == "gemma3_text")
    return path


def llama_quantize(src: Path, dst: Path, file_type: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPES[file_type].ftype)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {file_type}"


def tensors_of(path: Path) -> dict[str, tuple[str, bytes]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8).ravel())) for t in reader.tensors}


def assert_same_tensors(ours: Path, ref: Path) -> None:
    a, b = tensors_of(ours), tensors_of(ref)
    assert sorted(a) == sorted(b)
    wrong_type = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b[n][0]}
    assert not wrong_type, wrong_type
    wrong_bytes = [n for n in a if a[n][1] != b[n][1]]
    assert not wrong_bytes, f"{len(wrong_bytes)} tensors differ: {wrong_bytes[:5]}"


@pytest.mark.parametrize("source_dtype", ["f32", "f16", "bf16"])
def test_byte_identical_to_llama_quantize(export_model: Path, tmp_path: Path, source_dtype: str) -> None:
    src = export_model
    if source_dtype != "f32":
        src = tmp_path / f"hf-{source_dtype}"
        api.convert(export_model, src, dtype=source_dtype)
    base = tmp_path / f"base-{source_dtype}.gguf"
    api.convert(src, base, gguf_type=source_dtype)
    types = QUANT_TYPES if source_dtype == "f32" else ["q8_0", "q4_k_m", "q6_k"]
    for ft in types:
        ours, ref = tmp_path / f"ours-{ft}.gguf", tmp_path / f"ref-{ft}.gguf"
        api.convert(src, ours, gguf_type=ft)
        llama_quantize(base, ref, ft)
        assert_same_tensors(ours, ref)


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    # F32 KV cache (type 0): llama.cpp's default f16 cache would add its own rounding.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _agreement(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ours || ref) in nats) over positions."""
    lp, lq = torch.log_softmax(torch.from_numpy(ours), -1), torch.log_softmax(torch.from_numpy(ref), -1)
    return float((ours.argmax(-1) == ref.argmax(-1)).mean()), (lp.exp() * (lp - lq)).sum(-1).mean().item()


def _runner_logits(path: Path, ids: list[int]) -> np.ndarray:
    from qconv.model import load_model

    with open_model(path) as src:
        return load_model(src)(torch.tensor([ids]))[0].double().numpy()


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_1", "q4_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k",
                                       "iq4_xs"])
def test_llama_cpp_loads_and_agrees_with_runner(export_model: Path, tmp_path: Path, file_type: str) -> None:
    """llama.cpp runs every file qconv writes, and means by it what qconv's runner does.

    Two comparisons, because llama.cpp also rounds *activations* (to Q8 blocks, or f16) inside
    its quantized dot products while the runner computes in f32:
    1. qconv's runner on the file vs llama.cpp on an F32 GGUF of the same dequantized weights:
       the same numbers up to f32 summation order (top-1 identical, KL <= 1e-8);
    2. llama.cpp on the file vs llama.cpp on that F32 GGUF: only llama.cpp's activation rounding
       remains (KL <= 5e-3 nats on these random tiny models, whose logits are scaled to be peaked;
       on a trained model the agreement is >= 99% top-1, see test_trained_model_agreement).
    """
    path = tmp_path / f"m-{file_type}.gguf"
    api.convert(export_model, path, gguf_type=file_type)
    deq = tmp_path / "deq-f32.gguf"
    api.convert(path, tmp_path / "deq-hf")
    api.convert(tmp_path / "deq-hf", deq, gguf_type="f32")
    ids = [(i * 37 + 11) % 384 for i in range(48)]
    llama_file, llama_f32 = _llama_logits(path, ids), _llama_logits(deq, ids)
    top1, kl = _agreement(_runner_logits(path, ids), llama_f32)
    with open_model(export_model) as src:
        gelu, arch = src.config.activation != "silu", src.config.model_type
    # llama.cpp's CPU GELU reads a table indexed by the f16-rounded input (GGML_GELU_FP16):
    # measured KL 6.7e-7 on the GeGLU family (gemma2) against the runner's exact tanh-GELU
    assert top1 == 1.0 and kl <= (1e-5 if gelu else 1e-8), (top1, kl)
    top1, kl = _agreement(llama_f32, llama_file)
    # llama.cpp's own activation rounding; the 6-layer gemma3 model (q/k norms, GeGLU through the
    # f16 table) drifts most: measured 0.006-0.011 nats, and the 8-expert mixtral (a top-2 choice
    # the rounding flips moves a token's whole MLP output) 0.006-0.008; the others <= 5e-3
    assert kl <= (2e-2 if arch in ("gemma3_text", "mixtral") else 5e-3), (top1, kl)


# --------------------------------------------------------------------------- llama.cpp's converter

SDIST = os.environ.get("QCONV_LLAMA_CPP_SDIST")
#: The converter picks the vocabulary's pre-tokenizer by hashing how it splits a test text and
#: refuses unknown ones; the tiny test tokenizer is gpt-2 style byte-level BPE, so it is named.
#: Its llama, gemma and phi3 paths ask for a SentencePiece vocabulary (tokenizer.model), which the
#: tiny checkpoints do not have: they get the byte-level BPE one their tokenizer.json holds.
_CONVERT = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base
import conversion.phi
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
conversion.base.TextModel._set_vocab_sentencepiece = conversion.base.TextModel._set_vocab_gpt2
conversion.phi.Phi3MiniModel.set_vocab = conversion.base.TextModel._set_vocab_gpt2
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def converter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion package and gguf-py) from the sdist
    the oracle is built from (``make test`` passes its path in QCONV_LLAMA_CPP_SDIST)."""
    if not SDIST or not Path(SDIST).is_file():
        pytest.skip("QCONV_LLAMA_CPP_SDIST does not name the llama-cpp-python sdist (make test sets it)")
    return extract_converter(Path(SDIST), tmp_path_factory.mktemp("llama.cpp"))


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    lp = torch.log_softmax(torch.from_numpy(logits[:-1]), -1)
    return math.exp(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())


def test_gguf_matches_llama_cpp_converter(export_model: Path, converter: Path, tmp_path: Path) -> None:
    """qconv's f32 GGUF holds the same tensors, bit for bit, as llama.cpp's own converter writes
    from the same checkpoint (names, layouts such as the q/k row permutation, types), and
    llama.cpp computes the same perplexity on both (to 1e-3): so the metadata it reads agrees too.

    One exception: Llama 3's ``rope_freqs`` factors, which qconv computes in float64 and the
    converter in float32 torch ops (pow, then reciprocal-multiply): they differ by 1-2 ulp."""
    ref = tmp_path / "converter.gguf"
    subprocess.run([sys.executable, "-c", _CONVERT, str(converter), str(export_model), "--outfile", str(ref),
                    "--outtype", "f32"], check=True, capture_output=True)
    ours = tmp_path / "qconv.gguf"
    api.convert(export_model, ours, gguf_type="f32")
    a, b = tensors_of(ours), tensors_of(ref)
    embd = "token_embd.weight"
    if len(b[embd][1]) < len(a[embd][1]):  # gemma3's converter drops rows past the tokenizer's vocabulary
        a[embd] = (a[embd][0], a[embd][1][: len(b[embd][1])])
    freqs = "rope_freqs.weight"
    if freqs in a or freqs in b:
        np.testing.assert_allclose(np.frombuffer(a.pop(freqs)[1], np.float32),
                                   np.frombuffer(b.pop(freqs)[1], np.float32), rtol=1e-6)
    assert a == b
    # The vocabulary the patched converter writes is a test artifact, and so is its general.name (the
    # temp directory's: llama.cpp gives a model named "*phi3*" Phi-3 token attributes, then fails
    # on a vocabulary without them): its model metadata gets qconv's tokenizer and name.
    ref_model = tmp_path / "converter-model.gguf"
    _with_tokenizer_of(ref, ours, ref_model)
    ids = [(i * 37 + 11) % 384 for i in range(48)]
    ppl_ours, ppl_ref = _perplexity(_llama_logits(ours, ids), ids), _perplexity(_llama_logits(ref_model, ids), ids)
    assert abs(ppl_ours - ppl_ref) <= 1e-3 * ppl_ref, (ppl_ours, ppl_ref)


def _with_tokenizer_of(model: Path, tokenizer: Path, out: Path) -> None:
    """``model``'s tensors and model metadata, with ``tokenizer``'s ``tokenizer.*`` keys and name."""
    src, tok = gguf.GGUFReader(str(model)), gguf.GGUFReader(str(tokenizer))
    w = gguf.GGUFWriter(str(out), str(src.fields["general.architecture"].contents()))
    taken = ("tokenizer.", "general.name")
    fields = [f for k, f in src.fields.items() if not k.startswith(("GGUF.", "general.architecture", *taken))]
    fields += [f for k, f in tok.fields.items() if k.startswith(taken)]
    for f in fields:
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=[int(d) for d in reversed(t.shape.tolist())],
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_cpp_reads_a_per_layer_sliding_pattern(tmp_path: Path, tiny_hf_model_builder) -> None:
    """A Gemma 3 whose sliding/global layers do not follow llama.cpp's default 5:1 pattern gets the
    pattern written per layer (``attention.sliding_window_pattern``); llama.cpp then computes what
    the runner does over a sequence 3x the window (llama.cpp's converter drops ``layer_types``)."""
    model = tiny_hf_model_builder("gemma3_text", hidden_size=256, intermediate_size=320, num_hidden_layers=4,
                                  head_dim=64, query_pre_attn_scalar=64, sliding_window=16, vocab_size=384,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(0.2) if "norm" not in name else p.sub_(1.0)
    model.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf", 384)
    api.convert(tmp_path / "hf", tmp_path / "m.gguf", gguf_type="f32")
    pattern = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["gemma3.attention.sliding_window_pattern"]
    assert pattern.contents() == [True, False, True, False]
    ids = [(i * 37 + 11) % 384 for i in range(48)]
    top1, kl = _agreement(_runner_logits(tmp_path / "m.gguf", ids), _llama_logits(tmp_path / "m.gguf", ids))
    assert top1 == 1.0 and kl <= 1e-5, (top1, kl)


STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K.gguf"


@pytest.mark.skipif(not STORIES.is_file(), reason="../shared/data/stories260K.gguf not present")
@pytest.mark.parametrize("file_type", ["f16", "q8_0", "q4_0", "q5_1", "q4_k_m", "q6_k"])
def test_trained_model_agreement(tmp_path: Path, file_type: str) -> None:
    """On a real trained model (stories260K), llama.cpp's logits on qconv's file agree with the
    runner's: top-1 >= 99%, mean KL <= 1e-3 nats (measured ~1.5e-4: llama.cpp's activation rounding)."""
    hf = tmp_path / "hf"
    api.convert(STORIES, hf)
    path = tmp_path / f"s-{file_type}.gguf"
    api.convert(hf, path, gguf_type=file_type)
    with open_model(hf) as src:
        ids = src.tokenizer().encode("Once upon a time, there was a little girl named Lily. She loved to play "
                                     "outside in the park with her friends. One day, she saw a big red ball")
    top1, kl = _agreement(_runner_logits(path, ids), _llama_logits(path, ids))
    assert top1 >= 0.99 and kl <= 1e-3, (top1, kl)


def test_round_trip_hf_gguf_hf(export_model: Path, tmp_path: Path) -> None:
    gguf_path = tmp_path / "rt.gguf"
    api.convert(export_model, gguf_path, gguf_type="f32")
    back = tmp_path / "back"
    api.convert(gguf_path, back)
    with open_model(export_model) as a, open_model(back) as b:
        assert a.config.rope_scaling == b.config.rope_scaling
        assert a.tensor_names() == b.tensor_names()
        spec = a.config.spec
        for name in a.tensor_names():
            want = a.get_tensor(name)
            if spec.norm_offset and spec.is_norm(name):  # stored as offset + w in f32, as llama.cpp does
                want = (want + spec.norm_offset) - spec.norm_offset
            assert torch.equal(want, b.get_tensor(name)), name


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_hf_reader_arrays_match_tensors(export_model: Path, tmp_path: Path, dtype: str) -> None:
    """get_array (torch-free, plain file reads) is get_tensor().float() exactly, for every stored dtype."""
    src_dir = tmp_path / f"hf-{dtype}"
    api.convert(export_model, src_dir, dtype=dtype)
    with open_model(src_dir) as src:
        for name in src.tensor_names():
            t = src.get_tensor(name)
            assert str(t.dtype) == {"f32": "torch.float32", "f16": "torch.float16", "bf16": "torch.bfloat16"}[dtype]
            a = src.get_array(name)
            assert a.dtype == np.float32 and a.flags.writeable
            np.testing.assert_array_equal(a, t.float().numpy(), err_msg=name)


def test_gguf_export_does_not_import_torch(export_model: Path, tmp_path: Path) -> None:
    """Reading an HF checkpoint and writing GGUF never imports torch (~1.5 s and ~200 MB)."""
    code = ("import sys\n"
            "from qconv.checkpoint import open_model\n"
            "from qconv.formats.gguf_types import file_type\n"
            "from qconv.formats.gguf_writer import write_gguf\n"
            "with open_model(sys.argv[1]) as src:\n"
            "    write_gguf(src, sys.argv[2], file_type('q4_k_m'))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code, str(export_model), str(tmp_path / "x.gguf")], check=True)


def test_mix_matches_llama_cpp_rules_on_smollm_shapes() -> None:
    """Q4_K_M on SmolLM2's shapes (576-wide rows, 30 layers, tied): Q5_0/Q8_0 fallbacks and
    Q4_K/Q6_K only on ffn_down, as peer-results.md describes."""
    from qconv.arch.config import ModelConfig
    from qconv.formats.gguf_types import file_type
    from qconv.formats.gguf_writer import plan_tensors

    cfg = ModelConfig("llama", 576, 1536, 30, 9, 3, 64, 49152, tie_word_embeddings=True)
    types = {p.name: p.type.name for p in plan_tensors(cfg, file_type("q4_k_m"))}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert sum(t == "Q6_K" for t in types.values()) == sum(
        1 for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2)
    assert math.isclose(len(types), 30 * 9 + 2)


def test_failed_write_leaves_nothing(export_model: Path, tmp_path: Path) -> None:
    """A failure halfway through the tensor data leaves neither the output nor a temp file."""
    from qconv.formats.gguf_types import file_type
    from qconv.formats.gguf_writer import write_gguf

    out = tmp_path / "x.gguf"
    with open_model(export_model) as src:
        real = src.get_array
        calls = 0

        def failing(name: str) -> np.ndarray:
            nonlocal calls
            calls += 1
            if calls > 5:
                raise KeyboardInterrupt
            return real(name)

        src.get_array = failing  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            write_gguf(src, out, file_type("q4_k_m"))
    assert list(tmp_path.iterdir()) == []
