"""compressed-tensors checkpoints: qconv's writer and reader against the compressed-tensors library
(the layout oracle) and transformers (the loader oracle), plus determinism and bad inputs.

Oracles: (a) the library's own ``pack_to_int32``, ``compress`` and ``decompress`` agree with
qconv's tensors bit for bit; (b) transformers loads the checkpoint and its logits match qconv's
runner; (c) same inputs give the same bytes; (d) unreadable variants fail with one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qconv.checkpoint import open_model
from qconv.checkpoint.compressed_source import CompressedTensorsSource
from qconv.checkpoint.hf import HFSource
from qconv.checkpoint.hf_writer import write_hf_checkpoint
from qconv.errors import CheckpointMismatch, InvalidOption, UnsupportedModel
from qconv.core.quantized import ActivationScheme, QuantizedWeight
from qconv.core.compressed_layout import compress, pack_fp4, pack_int32, unpack_int32, weight_args
from qconv.formats.compressed_tensors import CompressedTensorsWriter
from qconv.model import load_model
from qconv.model.act_quant import apply_activation_quant, fake_quant_input, fake_quant_per_token
from qconv.api import load_runner
from qconv.core.grid import E8M0, FP8, WeightScheme, dequantize, round_float, rtn, tensor_global_scale
from conftest import TINY_ARCHS

W4_ASYM = WeightScheme(4, 32, symmetric=False)
W4_SYM = WeightScheme(4, 32, symmetric=True)
W8_CH = WeightScheme(8, -1, symmetric=True)
W3_ASYM = WeightScheme(3, 32, symmetric=False)
W2_ASYM = WeightScheme(2, 32, symmetric=False)
W4_SYM_BF16 = WeightScheme(4, 32, symmetric=True, scale_dtype=torch.bfloat16)
A8 = ActivationScheme()
# the float formats (compressed-tensors presets FP8_DYNAMIC, FP8, FP8_BLOCK, NVFP4A16, NVFP4, MXFP4A16, MXFP4)
FP8_CH = WeightScheme(8, -1, True, torch.float32, "float")
FP8_TENSOR = WeightScheme(8, -1, True, torch.bfloat16, "float", block_rows=0)
FP8_BLOCK = WeightScheme(8, 32, True, torch.bfloat16, "float", block_rows=32)  # 128x128 on real models
NVFP4_W = WeightScheme(4, 16, True, FP8, "float", global_scale=True)
MXFP4_W = WeightScheme(4, 32, True, E8M0, "float")
A_FP8_TOKEN = ActivationScheme(8, type="float")
A_FP8_STATIC = ActivationScheme(8, strategy="tensor", dynamic=False, type="float")
A_FP8_GROUP = ActivationScheme(8, strategy="group", type="float", group_size=128)
A_NVFP4 = ActivationScheme(4, strategy="tensor_group", dynamic="local", type="float", group_size=16)
A_MXFP4 = ActivationScheme(4, strategy="group", type="float", group_size=32)

#: A per-module plan: HF module name -> (weight scheme, activation scheme) or None (keep float).
Plan = Callable[[str], "tuple[WeightScheme, ActivationScheme | None] | None"]


def uniform(scheme: WeightScheme, act: ActivationScheme | None = None) -> Plan:
    return lambda m: None if m == "lm_head" else (scheme, act)


def mixed_pack(m: str) -> tuple[WeightScheme, ActivationScheme | None] | None:
    """Attention W8 per channel, MLP W4 g32, one MLP projection left in float."""
    if m == "lm_head" or m == "model.layers.1.mlp.down_proj":
        return None
    return (W8_CH, None) if "self_attn" in m else (W4_SYM, None)


def mixed_formats(m: str) -> tuple[WeightScheme, ActivationScheme | None] | None:
    """Attention W8A8 (int-quantized), MLP W4A16 (pack-quantized): a mixed-precision checkpoint."""
    if m == "lm_head":
        return None
    return (W8_CH, A8) if "self_attn" in m else (W4_SYM, None)


PLANS: dict[str, Plan] = {
    "w4a16-asym": uniform(W4_ASYM),
    "w4a16-sym": uniform(W4_SYM),
    "w8a16": uniform(W8_CH),
    "w3a16-asym": uniform(W3_ASYM),
    "w2a16-asym": uniform(W2_ASYM),
    "w4a16-bf16-scales": uniform(W4_SYM_BF16),
    "w8a8": uniform(W8_CH, A8),
    "mixed-pack": mixed_pack,
    "mixed-formats": mixed_formats,
    "fp8-dynamic": uniform(FP8_CH, A_FP8_TOKEN),
    "fp8-static": uniform(FP8_TENSOR, A_FP8_STATIC),
    "fp8-block": uniform(FP8_BLOCK, A_FP8_GROUP),
    "fp8-weight-only": uniform(FP8_CH),
    "nvfp4a16": uniform(NVFP4_W),
    "nvfp4": uniform(NVFP4_W, A_NVFP4),
    "mxfp4a16": uniform(MXFP4_W),
    "mxfp4": uniform(MXFP4_W, A_MXFP4),
}
#: the base model the float plans are written from
WIDE = "llama-wide"
FLOAT_PLANS = [p for p in PLANS if p.startswith(("fp8", "nvfp4", "mxfp4"))]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> dict[str, Path]:
    """Float checkpoints of the tiny architectures."""
    dirs = {}
    for arch in TINY_ARCHS:
        dirs[arch] = tmp_path_factory.mktemp(f"ct-base-{arch}")
        tiny_hf_model_builder(arch).save_pretrained(dirs[arch])
    # hidden 128: FP8_BLOCK's activations come in groups of 128 features
    dirs[WIDE] = tmp_path_factory.mktemp("ct-base-wide")
    tiny_hf_model_builder("llama", hidden_size=128, intermediate_size=256).save_pretrained(dirs[WIDE])
    return dirs


def quantize_checkpoint(src_dir: Path, out: Path, plan: Plan, **writer_kw: object) -> dict[str, QuantizedWeight]:
    """RTN-quantize a float checkpoint per ``plan`` and write it; returns the weights written."""
    written: dict[str, QuantizedWeight] = {}
    src = HFSource(src_dir)
    linears = set(src.config.spec.linear_modules(src.config))  # not embeddings, norms, MoE routers
    with CompressedTensorsWriter(out, src.config, src.tokenizer_files(), **writer_kw) as w:  # type: ignore[arg-type]
        for name in src.tensor_names():
            t = src.get_tensor(name)
            module = name[: -len(".weight")]
            choice = plan(module) if module in linears else None
            if choice is None:
                w.add(name, t)
                continue
            scheme, act = choice
            gs = tensor_global_scale(t, scheme)
            qw = QuantizedWeight(*rtn(t, scheme, gs), scheme, gs)
            # a static input scale as calibration would give it (|x| <= 3 seen)
            w.add(name, qw, act, act.static_scale(torch.tensor(3.0)) if act and act.needs_scale else None)
            written[name] = qw
    return written


@pytest.fixture(scope="module")
def written(base_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Every plan written once for llama (lazily, cached): plan -> (dir, quantized weights)."""
    cache: dict[tuple[str, str], tuple[Path, dict[str, QuantizedWeight]]] = {}

    def get(plan: str, arch: str | None = None) -> tuple[Path, dict[str, QuantizedWeight]]:
        arch = arch or (WIDE if plan in FLOAT_PLANS else "llama")
        if (plan, arch) not in cache:
            out = tmp_path_factory.mktemp(f"ct-{arch}-{plan}") / "model"
            cache[plan, arch] = (out, quantize_checkpoint(base_dirs[arch], out, PLANS[plan]))
        return cache[plan, arch]

    return get


# --------------------------------------------------------------------------- (a) library oracle


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_library(bits: int) -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    for shape in [(5, 37), (64, 128), (3, 1), (1, 33), (33, 100)]:
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g).to(torch.int8)
        for dim in (0, 1):
            packed = pack_int32(q, bits, dim)
            assert torch.equal(packed, ct.pack_to_int32(q, bits, packed_dim=dim)), (shape, dim)
            assert torch.equal(unpack_int32(packed, bits, shape[dim], dim), q)
            assert torch.equal(ct.unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim), q)


@pytest.mark.parametrize("scheme,act", [
    (W4_ASYM, None), (W4_SYM, None), (W8_CH, None), (W3_ASYM, None), (W2_ASYM, None), (W4_SYM_BF16, None),
    (W8_CH, A8), (FP8_CH, A_FP8_TOKEN), (FP8_TENSOR, A_FP8_STATIC), (FP8_BLOCK, A_FP8_GROUP), (FP8_CH, None),
    (NVFP4_W, None), (NVFP4_W, A_NVFP4), (MXFP4_W, None), (MXFP4_W, A_MXFP4)])
def test_compress_matches_library(scheme: WeightScheme, act: ActivationScheme | None) -> None:
    """The library's own compressor, fed qconv's grid, stores exactly the tensors qconv stores."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from qconv.core.compressed_layout import module_format, weight_args

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    gs = tensor_global_scale(w, scheme)
    qw = QuantizedWeight(*rtn(w, scheme, gs), scheme, gs)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(scheme),
                                   input_activations=act.to_args() if act else None)
    compressor = BaseCompressor.get_value_from_registry(module_format(scheme, act))
    input_scale = act.static_scale(torch.tensor(3.0)) if act and act.needs_scale else None
    ours = compress(qw, act, input_scale)
    # the library takes scales as floats (E8M0 as the power of two) and the float weights; FP4
    # gets the original weights: a negative weight that rounds to zero is stored as -0 (code 8),
    # which its dequantized value (-0, whose sign the library's cast drops) no longer says
    scale = ours["weight_scale"]
    scale = torch.exp2(scale.float() - 127) if scheme.scale_dtype == E8M0 else \
        scale.float() if scheme.scale_dtype == FP8 else scale
    fp4 = scheme.is_float and scheme.bits == 4
    state = {"weight": w if fp4 else qw.dequantize() if scheme.is_float else qw.dequantize().to(scheme.scale_dtype),
             "weight_scale": scale}
    if not scheme.is_float:
        state["weight_zero_point"] = qw.zero.to(torch.int8)
    state.update({k: v for k, v in ours.items() if k.endswith("global_scale") or k == "input_scale"})
    theirs = compressor.compress(state, ct_scheme)
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype or k == "weight_shape", k
        assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k


@pytest.mark.parametrize("plan", list(PLANS))
def test_library_decompresses_checkpoint(plan: str, written) -> None:
    """compressed-tensors validates the config, resolves each module to the intended group, and
    its decompress gives exactly grid.dequantize (in the scale dtype, as it computes)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    out, weights = written(plan)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = load_file(out / "model.safetensors")
    linear = torch.nn.Linear(1, 1)
    quantized = {n[: -len(".weight")] for n in weights}
    compared = 0
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight", ".weight_packed"))}):
        if "norm" in name or "embed_tokens" in name:
            continue
        groups = [g for g in qc.config_groups.values() if is_match(name, linear, g.targets, qc.ignore)]
        assert bool(groups) == (name in quantized), name
        if not groups:
            continue
        assert len(groups) == 1, name
        scheme = groups[0]
        fmt = scheme.format or qc.format
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        dense = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]
        qw = weights[name + ".weight"]
        # the library computes in the scale dtype, FP4 in bfloat16
        fp4 = qw.scheme.is_float and qw.scheme.bits == 4
        expected = dequantize(qw.q, qw.scale, qw.zero, qw.scheme).to(torch.bfloat16 if fp4 else qw.scheme.scale_dtype)
        assert dense.dtype == expected.dtype and torch.equal(dense, expected), name
        compared += 1
    assert compared == len(weights) > 0


# --------------------------------------------------------------------------- qconv's reader


@pytest.mark.parametrize("plan", ["w4a16-asym", "w3a16-asym", "w4a16-bf16-scales", "w8a8", "mixed-formats",
                                  *FLOAT_PLANS])
def test_reader_round_trip(plan: str, written, tmp_path: Path) -> None:
    out, weights = written(plan)
    with open_model(out) as src:
        assert isinstance(src, CompressedTensorsSource)
        assert "quantization_config" not in src.config.raw  # the float view has a dense config
        for name, qw in weights.items():
            back = src.quantized_weight(name)
            assert torch.equal(back.q, qw.q) and torch.equal(back.zero, qw.zero)
            assert torch.equal(back.scale, qw.scale.float()) and back.scheme == qw.scheme
            assert (back.global_scale is None and qw.global_scale is None) or \
                torch.equal(back.global_scale, qw.global_scale)
            assert torch.equal(src.get_tensor(name), qw.dequantize())
        acts = src.activation_schemes()
        assert set(acts) == {n[: -len(".weight")] for n in weights if PLANS[plan](n[: -len(".weight")])[1]}
        # a dense HF export of the compressed model loads as a plain checkpoint
        write_hf_checkpoint(src, tmp_path / "dense")
    dense = open_model(tmp_path / "dense")
    assert type(dense) is HFSource
    name = next(iter(weights))
    assert torch.equal(dense.get_tensor(name), weights[name].dequantize())


def test_sharded_and_deterministic(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """(c) Same inputs -> identical bytes, also when sharded; sharded output reads back."""
    def files(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}

    meta = {"recipe": {"scheme": "mixed"}, "qconv_version": "test", "input_sha256": "0" * 64}
    for i in range(2):
        quantize_checkpoint(base_dirs["qwen2"], tmp_path / f"a{i}", mixed_formats, metadata=meta)
        quantize_checkpoint(base_dirs["qwen2"], tmp_path / f"s{i}", mixed_formats, max_shard_size=20_000)
    assert files(tmp_path / "a0") == files(tmp_path / "a1")
    assert files(tmp_path / "s0") == files(tmp_path / "s1")
    assert (tmp_path / "s0" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "s0").glob("model-*.safetensors"))) > 2
    config = json.loads((tmp_path / "a0" / "config.json").read_text())
    assert config["qconv"] == meta and config["quantization_config"]["format"] == "mixed-precision"
    a, s = open_model(tmp_path / "a0"), open_model(tmp_path / "s0")
    assert a.qconv_metadata == meta
    for name in a.tensor_names():
        assert torch.equal(a.get_tensor(name), s.get_tensor(name)), name


# --------------------------------------------------------------------------- (b) transformers oracle


def _transformers_logits(path: Path, tokens: torch.Tensor, dequantize: bool) -> torch.Tensor:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _runner_logits(path: Path, tokens: torch.Tensor, act_range: float | None = None) -> torch.Tensor:
    with open_model(path) as src:
        model = load_model(src)
        if act_range is not None:
            apply_activation_quant(model, src.activation_schemes(), range_divisor=act_range)
    with torch.no_grad():
        return model(tokens)


TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,plan,dequantize", [
    ("llama", "w4a16-sym", False),     # transformers' default: compressed modules, decompressed on forward
    ("mistral", "w8a16", False),
    ("qwen2", "w4a16-sym", False),
    ("qwen3", "w4a16-sym", False),
    ("gemma2", "w4a16-sym", False),
    ("gemma3_text", "w4a16-sym", False),
    ("phi3", "w4a16-sym", False),
    ("qwen3_moe", "w4a16-sym", False),  # every expert's Linears quantized, the router in full precision
    ("mixtral", "w4a16-sym", False),
    ("llama", "mixed-pack", False),    # per-module groups need the default path (see docs/formats.md)
    ("llama", "w4a16-asym", True),     # asymmetric: only the dequantize-at-load path (library bug)
    ("qwen2", "w3a16-asym", True),
    ("mistral", "w2a16-asym", True),
    ("llama", "w8a8", True),           # dense weights, no activation emulation on either side
])
def test_transformers_matches_runner(arch: str, plan: str, dequantize: bool, written) -> None:
    out, _ = written(plan, arch)
    theirs = _transformers_logits(out, TOKENS, dequantize)
    ours = _runner_logits(out, TOKENS)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()


@pytest.mark.parametrize("plan", ["w8a8", "mixed-formats"])
def test_transformers_w8a8_emulation_matches_runner(plan: str, written) -> None:
    """transformers (compressed-tensors) fake-quantizes W8A8 inputs per token with scale
    absmax/127.5; the runner's hooks with the same range agree, and differ without them."""
    out, _ = written(plan)
    theirs = _transformers_logits(out, TOKENS, dequantize=False)
    assert torch.allclose(theirs, _runner_logits(out, TOKENS, act_range=127.5), atol=1e-4, rtol=0)
    assert not torch.allclose(theirs, _runner_logits(out, TOKENS), atol=1e-3, rtol=0)


@pytest.mark.xfail(reason="compressed-tensors 0.20 + transformers 5.23 default load of asymmetric pack-quantized: "
                          "weight_zero_point size mismatch (zero point not packed on meta)", strict=False)
def test_transformers_default_path_asymmetric(written) -> None:
    out, _ = written("w4a16-asym")
    assert torch.allclose(_transformers_logits(out, TOKENS, False), _runner_logits(out, TOKENS), atol=1e-4)


@pytest.mark.parametrize("plan", ["fp8-dynamic", "fp8-static", "fp8-block", "fp8-weight-only"])
def test_transformers_fp8_matches_runner(plan: str, written) -> None:
    """FP8 checkpoints: transformers' default load (compressed-tensors' FP8 emulation of the
    weights and of the input activations, dynamic per token / per 1x128 group or static per
    tensor) gives the runner's logits, activation emulation included."""
    out, _ = written(plan)
    with open_model(out) as src:
        model = load_runner(src, "cpu", "f32")
    with torch.no_grad():
        ours = model(TOKENS)
    theirs = _transformers_logits(out, TOKENS, dequantize=False)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()


@pytest.mark.parametrize("plan", ["nvfp4a16", "mxfp4a16"])
def test_transformers_fp4_matches_runner(plan: str, written) -> None:
    """FP4 weights: transformers' CPU path decompresses them in bfloat16 (its compressed path
    fails on CPU for a float32 model: a bf16/f32 matmul); the runner with the same weights
    rounded to bfloat16 gives its logits. W4A4 activations (NVFP4, MXFP4) are checked against
    compressed-tensors' own quantizer in :func:`test_activation_grids_match_library`, not here."""
    out, _ = written(plan)
    with open_model(out) as src:
        model = load_runner(src, "cpu", "f32")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.shape[0] != 300:  # not the head
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
        ours = model(TOKENS)
    theirs = _transformers_logits(out, TOKENS, dequantize=True)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()


@pytest.mark.parametrize("scheme", [FP8_CH, FP8_TENSOR, FP8_BLOCK, NVFP4_W, MXFP4_W], ids=str)
def test_weight_grids_match_library(scheme: WeightScheme) -> None:
    """qconv's float grids against compressed-tensors' own qparams and quantizer (the code
    llm-compressor's RTN runs): same scales, same fake-quantized weights."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    torch.manual_seed(0)
    w = torch.randn(96, 128) * torch.logspace(-2, 1, 96)[:, None]
    w[3, :32] = 0  # an all-zero group
    args = QuantizationArgs.model_validate({k: v for k, v in weight_args(scheme).items() if v is not None})
    gs = generate_gparam(w.amin(), w.amax()) if scheme.global_scale else None
    if scheme.block_rows == 0:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif scheme.block_rows > 1:
        b = w.reshape(96 // scheme.block_rows, scheme.block_rows, 128 // scheme.group_size, scheme.group_size)
        lo, hi = b.amin((1, 3)), b.amax((1, 3))
    else:
        g = w.reshape(96, scheme.groups(128), scheme.group_width(128))
        lo, hi = g.amin(-1), g.amax(-1)
    scale, zp = calculate_qparams(lo, hi, args, global_scale=gs)
    if scheme.scale_dtype in (torch.bfloat16, torch.float16):  # llm-compressor's scales have the model dtype
        scale = scale.to(scheme.scale_dtype)
    theirs = fake_quantize(w, scale.float(), zp, args, global_scale=gs)
    ours_gs = tensor_global_scale(w, scheme)
    assert (gs is None) == (ours_gs is None) and (gs is None or torch.equal(gs, ours_gs))
    q, s, z = rtn(w, scheme, ours_gs)
    assert torch.equal(dequantize(q, s, z, scheme), theirs)


def test_e2m1_rounding_matches_library() -> None:
    """FP4 rounding (every tie, its float32 neighbours, both signs, zeros, saturation, random
    values) equals compressed-tensors' ``cast_to_fp4``, down to the sign of zero (its packer
    stores -0 as code 8)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e9])
    near = torch.cat([points, points.nextafter(torch.tensor(0.0)), points.nextafter(torch.tensor(1e10))])
    x = torch.cat([near, -near, torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3])
    ours, theirs = round_float(x.clone(), 4), cast_to_fp4(x.clone())
    assert torch.equal(ours, theirs) and torch.equal(torch.signbit(ours), torch.signbit(theirs))


@pytest.mark.parametrize("scheme", [NVFP4_W, MXFP4_W], ids=str)
def test_fp4_packed_bytes_match_library(scheme: WeightScheme) -> None:
    """The packed FP4 codes equal compressed-tensors' ``quantize`` + ``pack_fp4_to_uint8`` byte
    for byte, including the -0 code (8) of negative values that round to zero and the +0 of
    exact zeros."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(2)
    w = torch.randn(64, 128) * torch.logspace(-3, 0, 128)  # many columns round to ±0
    w[5, :40] = 0
    w[6, 7] = -0.0
    gs = tensor_global_scale(w, scheme)
    q, _, _ = rtn(w, scheme, gs)
    args = QuantizationArgs.model_validate({k: v for k, v in weight_args(scheme).items() if v is not None})
    g = w.reshape(64, scheme.groups(128), scheme.group_width(128))
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
    theirs = ct_quantize(w, scale.float(), zp, args, global_scale=gs)
    assert (torch.signbit(q) & (q == 0)).any()  # the case that matters is present
    assert torch.equal(pack_fp4(q), pack_fp4_to_uint8(theirs))


@pytest.mark.parametrize("act", [A_FP8_TOKEN, A_FP8_STATIC, A_FP8_GROUP, A_NVFP4, A_MXFP4],
                         ids=lambda a: f"{a.type}{a.bits}-{a.strategy}")
def test_activation_grids_match_library(act: ActivationScheme) -> None:
    """The runner's input fake-quantization equals compressed-tensors' ``forward_quantize`` for
    every float activation kind (dynamic scales from each token / group, static ones stored)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_config import QuantizationStatus

    torch.manual_seed(1)
    x = torch.randn(2, 5, 256) * torch.logspace(-1, 1, 256)
    args = QuantizationArgs.model_validate({k: v for k, v in act.to_args().items() if v is not None})
    module = torch.nn.Linear(256, 4)
    module.quantization_status = QuantizationStatus.FROZEN
    scale = act.static_scale(x.abs().amax()) if act.needs_scale else None
    if scale is not None:
        setattr(module, act.scale_name, torch.nn.Parameter(scale, requires_grad=False))
        if act.scale_name == "input_scale":
            module.input_zero_point = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    theirs = forward_quantize(module, x, "input", args)
    assert torch.equal(fake_quant_input(x, act, scale), theirs)


# --------------------------------------------------------------------------- activation fake-quant


def test_fake_quant_per_token() -> None:
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 1] = 0
    y = fake_quant_per_token(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.equal(y[0, 1], torch.zeros(64))
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = y / torch.where(scale > 0, scale, 1)
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 127 + 1e-4
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)  # absmax maps to +-127 exactly
    ct = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus

    module = torch.nn.Linear(64, 64)
    module.quantization_status = QuantizationStatus.FROZEN
    args = QuantizationArgs(**A8.to_args())
    theirs = ct.forward_quantize(module, x[1:], "input", args)
    assert torch.equal(fake_quant_per_token(x[1:], range_divisor=127.5), theirs)


def test_apply_activation_quant_hooks(written) -> None:
    out, _ = written("w8a8")
    with open_model(out) as src:
        model = load_model(src)
        schemes = src.activation_schemes()
    handles = apply_activation_quant(model, schemes)
    assert len(handles) == len(schemes) == 14
    seen = {}
    model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    model(TOKENS)
    x = seen["x"]
    assert torch.equal(fake_quant_per_token(x), x)  # the Linear saw already-quantized inputs
    for h in handles:
        h.remove()
    with pytest.raises(InvalidOption, match="not a Linear"):
        apply_activation_quant(model, {"model.layers.9.mlp.up_proj": A8})


def test_activation_rounding_once_per_input(monkeypatch) -> None:
    """Linears reading one tensor (q/k/v, gate/up) round it once; another scale, scheme or an
    in-place change rounds afresh, and the outputs equal rounding per Linear."""
    import qconv.model.act_quant as aq

    calls: list[int] = []
    real = aq.fake_quant_input
    monkeypatch.setattr(aq, "fake_quant_input", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Three(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(32, 4) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x), self.c(x)], dim=-1)

    torch.manual_seed(0)
    m = Three()
    x = torch.randn(3, 32)
    expected = torch.cat([lin(real(x, A_NVFP4, s)) for lin, s in
                          ((m.a, torch.tensor(100.0)), (m.b, torch.tensor(100.0)), (m.c, torch.tensor(7.0)))], -1)
    apply_activation_quant(m, {"a": A_NVFP4, "b": A_NVFP4, "c": A_NVFP4},
                           scales={"a": torch.tensor(100.0), "b": torch.tensor(100.0), "c": torch.tensor(7.0)})
    with torch.no_grad():
        assert torch.equal(m(x), expected)
        assert len(calls) == 2  # a and b share one rounding, c's scale differs
        x.mul_(2)
        m(x)
        assert len(calls) == 4  # changed in place: rounded again


# --------------------------------------------------------------------------- (d) bad inputs


def _edit_config(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["quantization_config"].update(format="float-quantized"), "'float-quantized' is not supported"),
    (lambda c: c["quantization_config"].update(format="marlin-24"), "'marlin-24' is not supported"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(type="float"), "float"),
    (lambda c: c["quantization_config"].update(kv_cache_scheme={"num_bits": 8}), "KV-cache"),
    (lambda c: c["quantization_config"].update(quantization_status="frozen"), "quantization_status"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}), "input activations"),
    (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "quant_method 'gptq'"),
    (lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method 'awq'"),
])
def test_unsupported_variants_one_line(edit: Callable[[dict], None], needle: str, written, tmp_path: Path) -> None:
    out, _ = written("w4a16-sym")
    bad = _edit_config(out, tmp_path / "bad", edit)
    with pytest.raises(UnsupportedModel) as e:
        open_model(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_corrupt_layouts_rejected(written, tmp_path: Path) -> None:
    out, _ = written("w4a16-sym")
    # config claims 8-bit: every weight_packed has the wrong width -> names the tensor and both shapes
    bad = _edit_config(out, tmp_path / "bits", lambda c: c["quantization_config"]["config_groups"]["group_0"]
                       ["weights"].update(num_bits=8))
    with pytest.raises(CheckpointMismatch, match="weight_packed has shape"):
        open_model(bad)
    # a group size that does not divide the input width
    bad = _edit_config(out, tmp_path / "gs", lambda c: c["quantization_config"]["config_groups"]["group_0"]
                       ["weights"].update(group_size=48))
    with pytest.raises(CheckpointMismatch, match="group size 48"):
        open_model(bad)


def test_writer_refuses_bad_input(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = HFSource(base_dirs["llama"])
    out = tmp_path / "out"
    name = "model.layers.0.self_attn.q_proj.weight"
    w = src.get_tensor(name)
    # incomplete model: nothing is left behind
    with pytest.raises(CheckpointMismatch, match="never written"):
        with CompressedTensorsWriter(out, src.config) as writer:
            writer.add(name, QuantizedWeight(*rtn(w, W4_SYM), W4_SYM))
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):  # an interrupted write leaves nothing either
        with CompressedTensorsWriter(out, src.config) as writer:
            writer.add(name, w)
            raise KeyboardInterrupt
    assert not list(tmp_path.iterdir())
    with CompressedTensorsWriter(out, src.config) as writer:
        with pytest.raises(InvalidOption, match="8-bit symmetric per-channel"):
            writer.add(name, QuantizedWeight(*rtn(w, W4_SYM), W4_SYM), A8)
        with pytest.raises(InvalidOption, match="not a Linear"):
            e = src.get_tensor("model.embed_tokens.weight")
            writer.add("model.embed_tokens.weight", QuantizedWeight(*rtn(e, W4_SYM), W4_SYM))
        with pytest.raises(CheckpointMismatch, match="shape"):
            writer.add(name, w[:, :32])
        with pytest.raises(ValueError, match="codes outside"):
            q, s, z = rtn(w, W4_SYM)
            writer.add(name, QuantizedWeight(q * 2, s, z, W4_SYM))
        with pytest.raises(InvalidOption):
            ActivationScheme(strategy="tensor")
        for n in src.tensor_names():
            writer.add(n, src.get_tensor(n))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # nothing quantized


# --------------------------------------------------------------------------- the published FP8 block layout


def test_fp8_block_layout_round_trip_and_transformers(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """``--output-format fp8``: FP8 128x128-block weights as published FP8 models store them
    (``quant_method: fp8``, ``weight_scale_inv``). qconv reads the file back to the weights it
    wrote (as the FP8_BLOCK compressed-tensors checkpoint it is equivalent to), transformers'
    FineGrainedFP8 integration (dequantizing on CPU) gives the runner's logits, and a layer
    transformers would not convert is left in float in both readings."""
    from qconv.formats.compressed_tensors import Fp8BlockWriter

    src = HFSource(base_dirs[WIDE])
    scheme = WeightScheme(8, 128, True, torch.float32, "float", block_rows=128)
    written: dict[str, QuantizedWeight] = {}
    out = tmp_path / "fp8"
    with Fp8BlockWriter(out, src.config, src.tokenizer_files()) as w:
        for name in src.tensor_names():
            t = src.get_tensor(name)
            quantize = name.endswith("proj.weight") and "layers.1.mlp.down_proj" not in name
            if quantize:
                written[name] = QuantizedWeight(*rtn(t, scheme), scheme)
                w.add(name, written[name], A_FP8_GROUP)
            else:
                w.add(name, t)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    assert "model.layers.1.mlp.down_proj" in config["modules_to_not_convert"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight_scale_inv"].dtype == torch.float32
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    with open_model(out) as back:
        assert back.format == "fp8"
        for name, qw in written.items():
            assert torch.equal(back.get_tensor(name), qw.dequantize()), name
        assert set(back.activation_schemes()) == {n[: -len(".weight")] for n in written}
        ours = load_model(back)(TOKENS)
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = theirs(TOKENS).logits.float()
    assert torch.allclose(logits, ours, atol=1e-4, rtol=0), (logits - ours).abs().max()


def _corrupted(src: Path, dst: Path, tensors: Callable[[dict], dict] | None = None,
               config: Callable[[dict], None] | None = None) -> Path:
    """A copy of checkpoint ``src`` with its tensors and/or config.json edited."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors(load_file(dst / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _run_fails(path: Path, *needles: str) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "qconv", "run", str(path), "--prompt", "a", "-n", "1", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("scheme", ["fp8", "fp8-static", "nvfp4a16", "nvfp4", "mxfp4a16", "fp8-block",
                                    "fp8-block-published"])
def test_corrupt_float_checkpoints_one_line(scheme: str, tmp_path: Path, tiny_hf_model_builder) -> None:
    """FP8 / NVFP4 / MXFP4 checkpoints (and the published FP8 block layout) with a scale missing
    or mis-shaped, a block size that does not divide the weights, or an unknown format: one
    line naming the problem, exit 2."""
    import subprocess
    import sys

    from tests_support import write_tokenizer

    block = scheme.startswith("fp8-block")
    base = tmp_path / "base"  # fp8-block: 128 x 128 blocks need 128-wide Linears
    tiny_hf_model_builder("llama", rope_scaling=None, vocab_size=384,
                          **(dict(hidden_size=128, intermediate_size=256) if block else {})).save_pretrained(base)
    write_tokenizer(base, 384)
    good = tmp_path / "good"
    fmt = ["--format", "fp8"] if scheme == "fp8-block-published" else []
    res = subprocess.run([sys.executable, "-m", "qconv", "quantize", str(base), "--method", "rtn", "--scheme",
                          scheme.removesuffix("-published"), *fmt, "-o", str(good), "--quiet",
                          *(["--data", str(_calib_file(tmp_path))] if scheme in ("fp8-static", "nvfp4") else [])],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    scale = "model.layers.0.self_attn.q_proj." + ("weight_scale_inv" if fmt else "weight_scale")
    _run_fails(_corrupted(good, tmp_path / "missing", tensors=lambda t: {k: v for k, v in t.items() if k != scale}),
               f"{scale} is missing")
    def three(x: torch.Tensor) -> torch.Tensor:  # 3 scales fit no Linear (float8 has no repeat)
        raw = x.flatten()[:1].view(torch.uint8) if x.element_size() == 1 else x.flatten()[:1]
        return raw.repeat(3).view(x.dtype)
    _run_fails(_corrupted(good, tmp_path / "shape", tensors=lambda t: {**t, scale: three(t[scale])}),
               scale, "has shape [3]")

    def unknown(q: dict) -> None:
        if fmt:
            q["quant_method"] = "fp9"
        else:
            q["format"] = "foo-quantized"
    _run_fails(_corrupted(good, tmp_path / "format", config=unknown), "fp9" if fmt else "'foo-quantized'")
    if block:
        def blocks(q: dict) -> None:
            if fmt:
                q["weight_block_size"] = [96, 96]
            else:
                q["config_groups"]["group_0"]["weights"]["block_structure"] = [96, 96]
        _run_fails(_corrupted(good, tmp_path / "block", config=blocks), "96")


def _calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Calibration line {i} for static scales. " * 6}) for i in range(20)))
    return path
