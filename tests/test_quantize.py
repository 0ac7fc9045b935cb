"""quantize end to end on a tiny model: recipes, validation errors, the CLI, determinism, and
the runner reading the compressed-tensors output back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qconv import api
from qconv.checkpoint import open_model
from qconv.errors import InvalidOption
from qconv.quant.calibration import calibration_windows, load_calibration_rows
from qconv.quant.recipe import load_recipe, recipe_from_dict

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
QCONV = str(Path(sys.executable).parent / "qconv")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe_from_dict(recipe.to_dict()) == recipe  # the embedded form reads back


@pytest.mark.parametrize("raw,message", [
    ({"scheme": {"bitz": 4}}, "unknown key 'bitz' in scheme (did you mean 'bits'?)"),
    ({"stages": [{"method": "gptq", "dampp": 0.1}]}, "did you mean 'damp'"),
    ({"scheme": {"bits": "four"}}, "scheme.bits must be int"),
    ({"scheme": {"bits": 9}}, "bits must be between 2 and 8"),
    ({"stages": [{"method": "rtn"}, {"method": "awq"}]}, "exactly one quantizer"),
    ({"stages": [{"method": "magic"}]}, "unknown method 'magic'"),
    ({"scheme": {"bits": 4, "activations": {"bits": 8}}}, "W8A8"),
    ({"calibration": {"dtype": "float16"}}, "calibration.dtype must be one of auto, float32, bfloat16, got 'float16'"),
    ({"stages": [{"method": "gptq", "damp": "high"}]}, "stages[0].damp must be int or float, got 'high'"),
    ({"stages": [{"method": "gptq", "act_order": 1}]}, "stages[0].act_order must be bool, got 1"),
])
def test_invalid_recipes(raw: dict, message: str) -> None:
    with pytest.raises(InvalidOption, match=re.escape(message)):
        recipe_from_dict(raw)


def test_group_size_must_divide_width(model: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidOption, match=r"group size 48 does not divide the input width 64 of model\.layers\.0"):
        api.quantize(model, tmp_path / "o", method="rtn", group_size=48, dry_run=True)


def _logits(path: Path, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the model at ``path`` on ``tokens`` ``[n, T]`` (default: tokens 0..31, one row)."""
    from qconv.model import load_model

    with open_model(path) as src:
        out = load_model(src)(torch.arange(32)[None] if tokens is None else tokens)
    return out[0] if tokens is None else out


@pytest.mark.parametrize("method,flags", [
    ("rtn", {"bits": 4, "group_size": 32}),
    ("gptq", {"bits": 4, "group_size": 32, "samples": 4, "seqlen": 32}),
    ("awq", {"bits": 4, "group_size": 32, "samples": 4, "seqlen": 32}),
    ("smoothquant", {"samples": 4, "seqlen": 32}),
])
def test_quantize_roundtrip_and_determinism(model: Path, calib: Path, tmp_path: Path, method: str, flags: dict) -> None:
    data = None if method == "rtn" else str(calib)
    a = api.quantize(model, tmp_path / "a", method=method, data=data, **flags)
    api.quantize(model, tmp_path / "b", method=method, data=data, **flags)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["qconv"]["recipe"] == a.recipe
    ref, out = _logits(model), _logits(tmp_path / "a")
    assert torch.isfinite(out).all()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 0.5, kl  # quantized, but still the same model


def test_shipped_w4_recipe_stages_end_to_end(model: Path, calib: Path, tmp_path: Path) -> None:
    """The W4 recipe's stages together (AWQ with its clip, then GPTQ with fp targets and refine:
    the fp stream then runs through AWQ's held reference layer) write a checkpoint that loads."""
    import yaml

    shipped = load_recipe(RECIPE_DIR / "w4a16-awq-gptq.yaml").to_dict()
    recipe = {**shipped, "scheme": {"bits": 4, "group_size": 32, "symmetric": False},
              "calibration": {"samples": 4, "seqlen": 32}}
    path = tmp_path / "w4.yaml"
    path.write_text(yaml.safe_dump(recipe))
    api.quantize(model, tmp_path / "w4", recipe=path, data=str(calib))
    assert torch.isfinite(_logits(tmp_path / "w4")).all()


def test_gptq_fp_targets_and_refine_end_to_end(model: Path, calib: Path, tmp_path: Path) -> None:
    """rotate + GPTQ with fp targets and refinement: a valid, deterministic checkpoint closer to
    the fp model than plain GPTQ on the same calibration (KL of the logits on the calibration
    windows, what both fit: measured there the gap is ~10x; on the 32 arbitrary tokens of
    ``_logits`` the two are within noise of each other and their order depends on the CPU's
    float kernels, which made this test fail on AMX machines)."""
    from qconv.quant.calibration import calibration_windows, load_calibration_rows

    import yaml

    def run(out: str, gptq: dict) -> Path:
        recipe = {"name": "w3-fpt", "scheme": {"bits": 3, "group_size": 32, "symmetric": False},
                  "calibration": {"samples": 4, "seqlen": 32},
                  "stages": [{"method": "rotate"}, {"method": "gptq", "mse": True, **gptq}]}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        api.quantize(model, tmp_path / out, recipe=path, data=str(calib))
        return tmp_path / out

    a = run("a", {"fp_targets": True, "refine": 2})
    b = run("b", {"fp_targets": True, "refine": 2})
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    with open_model(model) as src:
        windows = calibration_windows(src.tokenizer(), load_calibration_rows(str(calib), "text"), 4, 32, 0)
    ref = _logits(model, windows).log_softmax(-1).flatten(0, 1)

    def kl(path: Path) -> float:
        out = _logits(path, windows).log_softmax(-1).flatten(0, 1)
        return torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean").item()

    assert kl(a) < kl(run("plain", {}))


def test_cli_quantize_errors(model: Path, tmp_path: Path) -> None:
    def run(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([QCONV, "quantize", *map(str, args)], capture_output=True, text=True)

    res = run(model, "-o", tmp_path / "o", "--method", "gptq")
    assert res.returncode == 2 and "group size 128 does not divide the input width 64" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--method", "gptq", "-g", "32")
    assert res.returncode == 2 and "needs calibration data" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--method", "rtn", "--bits", "1")
    assert res.returncode == 2 and "bits must be between 2 and 8" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--method", "rtn", "-g", "32", "--act-order")
    assert res.returncode == 2 and "--act-order does not apply" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--method", "rtn", "-g", "32", "--fp-targets")
    assert res.returncode == 2 and "--fp-targets does not apply" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--method", "gptq", "-g", "32", "--refine", "-1")
    assert res.returncode == 2 and "refine must be a non-negative" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--recipe", tmp_path / "missing.yaml")
    assert res.returncode == 2 and "recipe not found" in res.stderr
    res = run(model, "-o", tmp_path / "o", "--method", "gptq", "-g", "32", "--data", tmp_path / "none.jsonl")
    assert res.returncode == 2 and "none.jsonl" in res.stderr and "not found" in res.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = run(model, "-o", tmp_path / "o", "--method", "gptq", "-g", "32", "--data", empty, "--seqlen", "16")
    assert res.returncode == 2 and "empty.txt" in res.stderr
    assert not (tmp_path / "o").exists()
    res = run(model, "-o", tmp_path / "o", "--method", "rtn", "-g", "32", "--dry-run", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["dry_run"] is True
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("keep me")
    res = run(model, "-o", tmp_path / "o", "--method", "rtn", "-g", "32")
    assert res.returncode == 2 and "--force" in res.stderr
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep"]


def test_entry_point_plugin(monkeypatch: pytest.MonkeyPatch, model: Path, tmp_path: Path) -> None:
    """A third-party method registered under the ``qconv.methods`` entry-point group is usable by
    name, from recipes and flags, without touching qconv (the docs/methods.md example)."""
    import qconv.quant.methods as methods
    from qconv.quant.methods import Quantizer
    from qconv.quant.methods.base import set_weight
    from qconv.quant.methods.rtn import rtn_weight

    class HalfRange(Quantizer):
        name = "halfrange"
        needs_calibration = False
        options = {"factor": 0.9}

        def quantize(self, ctx, schemes):
            out = {}
            for inner in ctx.linears:
                scheme = schemes.scheme_for(ctx.module_name(inner))
                if scheme is None:
                    continue
                out[inner] = qw = rtn_weight(ctx.layer.get_submodule(inner).weight * self.config["factor"], scheme)
                set_weight(ctx, inner, qw)
            return out

    class FakeEntryPoint:
        name = "halfrange"

        @staticmethod
        def load():
            return HalfRange

    monkeypatch.setattr(methods, "entry_points", lambda group: [FakeEntryPoint()] if group == "qconv.methods" else [])
    r = api.quantize(model, tmp_path / "o", method="halfrange", group_size=32)
    assert r.recipe["stages"] == [{"method": "halfrange"}]
    with pytest.raises(InvalidOption, match="did you mean 'factor'"):
        recipe_from_dict({"stages": [{"method": "halfrange", "facter": 0.5}]})


def test_moe_rtn_gptq_and_refused_methods(tiny_hf_model_builder, calib: Path, tmp_path: Path) -> None:
    """A mixture of experts quantizes with RTN, GPTQ and AWQ (every expert's Linears, the router
    kept in full precision, deterministic; GPTQ's experts fitted on their routed tokens, and AWQ's
    scales, end closer to the fp model than RTN); GPTQ's fp targets are refused in one line."""
    from tests_support import write_tokenizer

    tiny_hf_model_builder("qwen3_moe", vocab_size=384).save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf", 384)
    flags = dict(bits=3, group_size=32, data=str(calib), samples=8, seqlen=32)
    for out in ("a", "b"):
        api.quantize(tmp_path / "hf", tmp_path / out, method="gptq", **flags)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    api.quantize(tmp_path / "hf", tmp_path / "rtn", method="rtn", bits=3, group_size=32)
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in qc["ignore"]
    with open_model(tmp_path / "hf") as src:
        windows = calibration_windows(src.tokenizer(), load_calibration_rows(str(calib), "text"), 8, 32, 0)
    ref = _logits(tmp_path / "hf", windows).log_softmax(-1).flatten(0, 1)

    def kl(path: Path) -> float:
        out = _logits(path, windows).log_softmax(-1).flatten(0, 1)
        return torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean").item()

    assert kl(tmp_path / "a") < kl(tmp_path / "rtn")
    api.quantize(tmp_path / "hf", tmp_path / "awq", method="awq", **flags)
    assert kl(tmp_path / "awq") < kl(tmp_path / "rtn")
    r = subprocess.run([QCONV, "quantize", str(tmp_path / "hf"), "--method", "gptq", "--fp-targets", "--data",
                        str(calib), "-o", str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "gptq fp_targets: not implemented for mixture-of-experts models (qwen3_moe)" in r.stderr
    assert not (tmp_path / "w").exists()


def test_moe_expert_without_tokens(tiny_hf_model_builder, calib: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An expert the router never picks gets no Hessian: GPTQ stores RTN's codes for it (with a
    warning) instead of zeroing it as dead columns; ``moe_all_tokens`` fits it on every token."""
    import yaml
    from safetensors import safe_open

    from qconv.model.decoder import SparseMoE
    from tests_support import write_tokenizer

    route = SparseMoE.route

    def never_three(self: SparseMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = route(self, x)
        return weights, torch.where(chosen == 3, (chosen + 1) % 3, chosen)  # expert 3 sees no token

    monkeypatch.setattr(SparseMoE, "route", never_three)
    model = tiny_hf_model_builder("qwen3_moe", vocab_size=384)
    model.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf", 384)

    def run(out: str, method: str, **options: object) -> dict[str, torch.Tensor]:
        recipe = {"name": out, "scheme": {"bits": 4, "group_size": 32, "symmetric": False},
                  "calibration": {"samples": 4, "seqlen": 32}, "stages": [{"method": method, **options}]}
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(recipe))
        api.quantize(tmp_path / "hf", tmp_path / out, recipe=tmp_path / f"{out}.yaml", data=str(calib))
        with safe_open(str(tmp_path / out / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if ".mlp.experts." in k}

    rtn, gptq, every = run("rtn", "rtn"), run("gptq", "gptq"), run("all", "gptq", moe_all_tokens=True)
    unused = [k for k in rtn if ".experts.3." in k]
    used = [k for k in rtn if ".experts.0." in k and "weight_packed" in k]
    assert unused and all(torch.equal(gptq[k], rtn[k]) for k in unused)
    assert any(not torch.equal(every[k], rtn[k]) for k in unused)
    assert any(not torch.equal(gptq[k], rtn[k]) for k in used)


def test_moe_smoothquant_and_rotation(tiny_hf_model_builder, calib: Path, tmp_path: Path) -> None:
    """SmoothQuant on a mixture of experts: one scale from the norm into the router and every
    expert's gate/up (the router stays fp, scaled to match), each expert's up -> down; the fp
    layer computes the same function. rotate + smoothquant + RTN W8A8 writes a checkpoint."""
    from qconv.core.grid import WeightScheme
    from qconv.quant.methods import get_method
    from qconv.quant.pipeline import LayerPipeline
    from qconv.quant.schemes import SchemeMap
    from tests_support import write_tokenizer

    tiny_hf_model_builder("qwen3_moe", vocab_size=384).save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf", 384)
    source = open_model(tmp_path / "hf")
    tokens = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    ctx = next(LayerPipeline(source, tokens).layers())
    ref, router = ctx.forward(), ctx.layer.mlp.gate.weight.clone()
    down = ctx.layer.mlp.experts[1].down_proj.weight.clone()
    get_method("smoothquant")(alpha=0.8, down_proj=True).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))
    out = ctx.forward()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (out - ref).abs().max()
    assert not torch.equal(ctx.layer.mlp.gate.weight, router) and not torch.equal(ctx.layer.mlp.experts[1].down_proj.weight, down)
    api.quantize(tmp_path / "hf", tmp_path / "q", method="smoothquant", data=str(calib), samples=4, seqlen=32,
                 rotate=True)
    assert torch.isfinite(_logits(tmp_path / "q")).all()


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """A tiny Llama with hidden size 128: FP8_BLOCK's 128-wide blocks and activation groups fit."""
    from conftest import write_tokenizer

    path = tmp_path_factory.mktemp("wide")
    tiny_hf_model_builder("llama", rope_scaling=None, vocab_size=384, hidden_size=128,
                          intermediate_size=256).save_pretrained(path)
    write_tokenizer(path, 384)
    return path


@pytest.mark.parametrize("method,scheme", [
    ("rtn", "fp8"), ("gptq", "fp8a16"), ("rtn", "fp8-static"), ("gptq", "fp8-block"), ("smoothquant", "fp8"),
    ("gptq", "nvfp4a16"), ("awq", "nvfp4"), ("rtn", "mxfp4a16"), ("gptq", "mxfp4"),
])
def test_float_schemes_end_to_end(wide_model: Path, calib: Path, tmp_path: Path, method: str, scheme: str) -> None:
    """Every named float scheme through a method: deterministic bytes, a config compressed-tensors
    validates, static input scales where the scheme has them, and a runner (activation
    emulation included) that stays close to the float model."""
    from compressed_tensors.quantization import QuantizationConfig

    flags = dict(scheme=scheme, samples=4, seqlen=32)
    data = str(calib) if method != "rtn" or scheme == "fp8-static" else None
    for out in ("a", "b"):
        api.quantize(wide_model, tmp_path / out, method=method, data=data, **flags)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    with open_model(tmp_path / "a") as src:
        acts, scales = src.activation_schemes(), src.input_scales()
        model = api.load_runner(src, "cpu", "f32")
    from qconv.inspect import inspect_model

    counts = inspect_model(tmp_path / "a").dtype_counts()
    assert ("fp4 (packed U8)" if "fp4" in scheme else "F8_E4M3") in counts, counts
    if scheme.startswith("nvfp4"):  # the Linears vLLM fuses share one global scale (llm-compressor does too)
        from safetensors.torch import load_file

        t = load_file(tmp_path / "a" / "model.safetensors")
        gs = {k.split(".")[-2]: float(v) for k, v in t.items() if k.startswith("model.layers.0.") and
              k.endswith("weight_global_scale")}
        assert gs["q_proj"] == gs["k_proj"] == gs["v_proj"] and gs["gate_proj"] == gs["up_proj"]
        assert len(set(gs.values())) == 4, gs
    static = scheme in ("fp8-static", "nvfp4")
    assert bool(scales) == static and (not static or set(scales) == set(acts))
    assert bool(acts) == (not scheme.endswith("a16"))
    with torch.no_grad():
        out = model(torch.arange(32)[None])[0]
    ref = _logits(wide_model)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert torch.isfinite(out).all() and kl < 0.5, kl


def test_float_scheme_errors(wide_model: Path, model: Path, tmp_path: Path) -> None:
    """Named schemes refuse what their formats cannot hold, in one line."""
    with pytest.raises(InvalidOption, match="calibration data"):
        api.quantize(wide_model, tmp_path / "x", method="rtn", scheme="fp8-static")
    with pytest.raises(InvalidOption, match="unknown --scheme"):
        api.quantize(wide_model, tmp_path / "x", method="rtn", scheme="fp7")
    with pytest.raises(InvalidOption, match="drop --bits"):
        api.quantize(wide_model, tmp_path / "x", method="rtn", scheme="fp8", bits=4)
    with pytest.raises(InvalidOption, match="group size 128 does not divide the input width 64"):
        api.quantize(model, tmp_path / "x", method="rtn", scheme="fp8-block")
    with pytest.raises(InvalidOption, match="no refine"):
        api.quantize(wide_model, tmp_path / "x", method="gptq", scheme="nvfp4a16", refine=1, data="x.jsonl")
    with pytest.raises(InvalidOption, match="cannot be combined"):
        recipe_from_dict({"scheme": {"preset": "fp8", "bits": 4}})
    assert recipe_from_dict({"scheme": "nvfp4"}).preset == "nvfp4"


def test_fp8_output_format(wide_model: Path, tmp_path: Path) -> None:
    """``--output-format fp8`` writes the published FP8 block layout, which qconv reads back;
    other schemes are refused before the model is read."""
    api.quantize(wide_model, tmp_path / "a", method="rtn", scheme="fp8-block", output_format="fp8")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    with open_model(tmp_path / "a") as src:
        assert src.format == "fp8" and len(src.module_schemes()) == 14
    with pytest.raises(InvalidOption, match="fp8-block scheme only"):
        api.quantize(wide_model, tmp_path / "b", method="rtn", scheme="nvfp4a16", output_format="fp8")


def test_fp8_kv_cache_scales(wide_model: Path, calib: Path, tmp_path: Path) -> None:
    """``--kv-cache fp8``: per-layer k/v scales (``max|k| / 448`` after RoPE over the calibration
    tokens) under compressed-tensors' FP8 ``kv_cache_scheme``, read back and used by the runner's
    FP8 cache. (transformers 5.25 + compressed-tensors 0.20 on CPU ignore the scales, so they are
    no oracle here; the cache's rounding is checked against the library in test_kv_cache.py.)"""
    from compressed_tensors.quantization import QuantizationConfig

    from qconv.model.perplexity import perplexity

    api.quantize(wide_model, tmp_path / "a", method="rtn", scheme="fp8", kv_cache="fp8", data=str(calib),
                 samples=4, seqlen=32)
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert QuantizationConfig.model_validate(qc).kv_cache_scheme.type == "float"
    with open_model(tmp_path / "a") as src:
        scales = src.kv_scales()
        model = api.load_runner(src, "cpu", "f32")
    assert scales.shape == (2, 2) and (scales > 0).all() and (scales < 1).all()
    ids = torch.randint(0, 384, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    spec = api.kv_cache_spec("fp8")
    with_fp8 = perplexity(model, ids, ctx=32, kv_cache=spec).ppl
    plain = perplexity(model, ids, ctx=32).ppl
    assert with_fp8 != plain and abs(with_fp8 / plain - 1) < 0.05
    with pytest.raises(InvalidOption, match="no KV-cache scales"):
        api.quantize(wide_model, tmp_path / "b", method="rtn", scheme="fp8-block", output_format="fp8",
                     kv_cache="fp8", data=str(calib))


@pytest.mark.parametrize("scheme,fmt", [("nvfp4a16", "compressed-tensors"), ("fp8-block", "fp8")])
def test_float_checkpoints_convert_to_gguf(wide_model: Path, tmp_path: Path, scheme: str, fmt: str) -> None:
    """FP4 / FP8 inputs convert to GGUF: the f32 GGUF holds exactly the dequantized weights."""
    api.quantize(wide_model, tmp_path / "q", method="rtn", scheme=scheme, output_format=fmt)
    api.convert(tmp_path / "q", tmp_path / "x.gguf", gguf_type="f32")
    with open_model(tmp_path / "q") as q, open_model(tmp_path / "x.gguf") as g:
        name = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(g.get_tensor(name), q.get_tensor(name))
