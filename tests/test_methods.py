"""Methods on one decoder layer of a tiny random model, through the real layer pipeline.

- SmoothQuant's transform leaves the fp layer's outputs unchanged (to 1e-5);
- AWQ (+ RTN) and GPTQ give a smaller layer-output error than RTN alone on the calibration inputs;
- every method is deterministic;
for every supported family (the tiny models of ``conftest.TINY_ARCHS``).
The layer's input norms get a few large channels, as trained LLMs have (activation outliers are
what SmoothQuant and AWQ exist for).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qconv.arch import FAMILIES
from qconv.arch.spec import GroupSpec
from qconv.checkpoint import open_model
from qconv.errors import InvalidOption
from qconv.core.grid import WeightScheme, fake_quantize
from qconv.model.act_quant import fake_quant_per_token
from qconv.quant.methods import get_method
from qconv.quant.pipeline import LayerPipeline
from qconv.quant.schemes import SchemeMap
from conftest import TINY_ARCHS


@pytest.fixture(scope="module", params=TINY_ARCHS)
def outlier_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  tiny_hf_model_builder) -> Path:
    """Each family's tiny model, the norms feeding its Linear groups given a few large channels."""
    overrides = {"rope_scaling": None} if request.param == "llama" else {}
    model = tiny_hf_model_builder(request.param, **overrides)
    norms = [g.source for g in FAMILIES[request.param].groups if g.source_kind == "norm"]
    with torch.no_grad():
        for layer in model.model.layers:
            for name in norms:
                layer.get_submodule(name).weight[:4] *= 20.0
    path = tmp_path_factory.mktemp(f"outliers-{request.param}")
    model.save_pretrained(path)
    return path


def first_layer(path: Path, seed: int = 0, **options):
    """(pipeline, context of layer 0) over 8 random sequences of 64 tokens."""
    source = open_model(path)
    tokens = torch.randint(0, source.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(seed))
    pipeline = LayerPipeline(source, tokens, batch_size=4, **options)
    return pipeline, next(pipeline.layers())


def layer_error(path: Path, stages: list[tuple[str, dict]], scheme: WeightScheme) -> float:
    """MSE of layer 0's output after the stages vs the fp layer, on the calibration inputs."""
    _, ctx = first_layer(path)
    inputs = ctx.inputs.clone()  # a sequential pass leaves the layer's outputs in ctx.inputs
    ref = ctx.forward()
    schemes = SchemeMap(scheme)
    for name, opts in stages:
        method = get_method(name)(**opts)
        if method.role == "transform":
            method.apply(ctx, schemes)
        else:
            method.quantize(ctx, schemes)
    return (ctx.forward(inputs=inputs) - ref).pow(2).mean().item()


SCHEMES = [WeightScheme(4, 32, False), WeightScheme(3, 32, False), WeightScheme(4, -1, True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
def test_awq_beats_rtn(outlier_model: Path, scheme: WeightScheme) -> None:
    rtn = layer_error(outlier_model, [("rtn", {})], scheme)
    awq = layer_error(outlier_model, [("awq", {}), ("rtn", {})], scheme)
    assert awq <= rtn, (awq, rtn)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_beats_rtn(outlier_model: Path, scheme: WeightScheme, sequential: bool) -> None:
    if not sequential and open_model(outlier_model).config.spec.experts:
        pytest.skip("mixtures of experts need the sequential pass (experts see routed inputs); refused")
    rtn = layer_error(outlier_model, [("rtn", {})], scheme)
    gptq = layer_error(outlier_model, [("gptq", {"true_sequential": sequential})], scheme)
    assert gptq <= rtn, (gptq, rtn)


def test_smoothquant_preserves_fp_outputs(outlier_model: Path) -> None:
    _, ctx = first_layer(outlier_model)
    ref = ctx.forward()
    before = ctx.layer.input_layernorm.weight.clone()
    get_method("smoothquant")(alpha=0.8).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))
    assert not torch.equal(before, ctx.layer.input_layernorm.weight)  # it did smooth something
    out = ctx.forward()
    # float32 rounding only: relative to the output's scale (these outlier layers reach |y| ~ 30)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (out - ref).abs().max()


def pair(ctx, kind: str) -> GroupSpec:
    """The family's first Linear group fed by a ``kind`` source (norm, or a Linear: up -> down)."""
    group = next((g for g in ctx.spec.groups if g.source_kind == kind), None)
    if group is None:
        pytest.skip(f"{ctx.spec.model_type} has no {kind}-fed Linear group (fused projections)")
    return group


@pytest.mark.parametrize("kind", ["norm", "linear"])
def test_smoothquant_flattens_activations(outlier_model: Path, kind: str) -> None:
    """After smoothing, the per-channel max of a smoothed input is flatter (lower max/median)."""
    _, ctx = first_layer(outlier_model)
    inner = pair(ctx, kind).linears[0]

    def spread(ctx) -> float:
        maxes: list[torch.Tensor] = []
        ctx.forward(lambda name, x: maxes.append(x.abs().amax((0, 1))) if name == inner else None)
        m = torch.stack(maxes).amax(0)
        return (m.max() / m.median()).item()

    before = spread(ctx)
    get_method("smoothquant")(alpha=0.8, down_proj=True).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))
    assert spread(ctx) < before / 2


def test_smoothquant_down_proj_is_opt_in(outlier_model: Path) -> None:
    """By default up_proj -> down_proj is not smoothed (the paper's two mappings only); with
    ``down_proj: true`` the fp layer still computes the same function."""
    _, ctx = first_layer(outlier_model)
    group = pair(ctx, "linear")
    up_w, down_w = ctx.layer.get_submodule(group.source).weight, ctx.layer.get_submodule(group.linears[0]).weight
    ref = ctx.forward()
    up, down = up_w.clone(), down_w.clone()
    get_method("smoothquant")(alpha=0.8).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))
    assert torch.equal(down_w, down)
    assert not torch.equal(up_w, up)  # still balanced against the norm
    get_method("smoothquant")(alpha=0.8, down_proj=True).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))
    assert not torch.equal(down_w, down)
    out = ctx.forward()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (out - ref).abs().max()


def test_smoothquant_norms_off(outlier_model: Path) -> None:
    """``norms: false`` (for rotated models) smooths only up -> down; the function is unchanged."""
    _, ctx = first_layer(outlier_model)
    down_w = ctx.layer.get_submodule(pair(ctx, "linear").linears[0]).weight
    ref = ctx.forward()
    names = [g.source for g in ctx.spec.groups if g.source_kind == "norm"]
    norms = [ctx.layer.get_submodule(n).weight.clone() for n in names]
    down = down_w.clone()
    get_method("smoothquant")(alpha=0.8, norms=False, down_proj=True).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))
    for n, before in zip(names, norms):
        assert torch.equal(ctx.layer.get_submodule(n).weight, before)
    assert not torch.equal(down_w, down)
    out = ctx.forward()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_smoothquant_search(outlier_model: Path) -> None:
    """``search: true`` picks, per pair, the grid α with the least W8A8 output error (never worse
    than the configured α, which is in the grid), and still leaves the fp function unchanged."""
    from qconv.quant.methods.smoothquant import alpha_errors, smoothing_scales, token_errors

    _, ctx = first_layer(outlier_model)
    xs: dict[str, torch.Tensor] = {}
    ctx.forward(lambda name, x: xs.__setitem__(name, x.reshape(-1, x.shape[-1]).clone()) if name not in xs else None)
    linears = pair(ctx, "norm").linears
    x = xs[linears[0]]
    ws = [ctx.layer.get_submodule(n).weight for n in linears]
    quant = [lambda w: fake_quantize(w, WeightScheme(8, -1, True))] * len(ws)
    act_max = x.abs().amax(0)
    grid = [i / 10 for i in range(11)]
    errors = alpha_errors(act_max, x, ws, quant, grid)
    # the per-α error is the plain W8A8 output error (fp outputs minus per-token int8 inputs
    # through int8 weights), summed over tokens
    for a, e in zip(grid, errors.tolist()):
        s = smoothing_scales(act_max, ws, a)
        plain = sum(((fake_quant_per_token(x / s) @ fake_quantize(w * s, WeightScheme(8, -1, True)).T)
                     - x @ w.T).pow(2).sum().item() for w in ws)
        assert e == pytest.approx(plain, rel=1e-5)
    # sums over a split of the tokens add up to the whole's (the data-parallel combination)
    halves = alpha_errors(act_max, x[:7], ws, quant, grid) + alpha_errors(act_max, x[7:], ws, quant, grid)
    assert torch.allclose(halves, errors, rtol=1e-12)
    s = smoothing_scales(act_max, ws, 0.5)
    refs = [x @ w.T for w in ws]
    assert token_errors(x, ws, s, quant, lambda t, _: fake_quant_per_token(t), act_max.max(), refs).shape == (x.shape[0],)
    ref = ctx.forward()
    get_method("smoothquant")(alpha=0.8, down_proj=True, search=True, search_tokens=256).apply(
        ctx, SchemeMap(WeightScheme(8, -1, True)))
    out = ctx.forward()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_smoothquant_down_proj_alpha(outlier_model: Path) -> None:
    """``down_proj_alpha`` sets the up -> down pair's α alone; the function is still unchanged."""
    scales = []
    for down_alpha in (None, 0.5):
        _, ctx = first_layer(outlier_model)
        first_norm, up_name = pair(ctx, "norm").source, pair(ctx, "linear").source
        ref, up = ctx.forward(), ctx.layer.get_submodule(up_name).weight.clone()
        norm = ctx.layer.get_submodule(first_norm).weight.clone()
        get_method("smoothquant")(alpha=0.8, down_proj=True, down_proj_alpha=down_alpha).apply(
            ctx, SchemeMap(WeightScheme(8, -1, True)))
        out = ctx.forward()
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        scales.append((ctx.layer.get_submodule(first_norm).weight / norm, ctx.layer.get_submodule(up_name).weight / up))
    assert torch.equal(scales[0][0], scales[1][0])  # the norm -> q/k/v pair keeps α 0.8
    assert not torch.allclose(scales[0][1], scales[1][1])
    _, ctx = first_layer(outlier_model)
    with pytest.raises(InvalidOption, match="down_proj_alpha must be between 0 and 1"):
        get_method("smoothquant")(down_proj=True, down_proj_alpha=1.5).apply(ctx, SchemeMap(WeightScheme(8, -1, True)))


@pytest.mark.parametrize("stages", [[("rtn", {"mse": True})], [("awq", {}), ("rtn", {})], [("smoothquant", {}), ("rtn", {})],
                                    [("awq", {}), ("gptq", {})]],
                         ids=lambda s: "+".join(n for n, _ in s))
def test_methods_are_deterministic(outlier_model: Path, stages) -> None:
    scheme = WeightScheme(4, 32, False)
    assert layer_error(outlier_model, stages, scheme) == layer_error(outlier_model, stages, scheme)


def test_mse_clip_never_worse_than_minmax() -> None:
    from qconv.core.grid import fake_quantize
    from qconv.quant.methods.rtn import rtn_weight

    w = torch.randn(64, 128) * torch.rand(1, 128) * 3
    scheme = WeightScheme(3, 32, False)
    plain = (fake_quantize(w, scheme) - w).abs().pow(2.4).sum()
    mse = (rtn_weight(w, scheme, mse=True).dequantize() - w).abs().pow(2.4).sum()
    assert mse <= plain


@pytest.mark.parametrize("mode", ["keep", "stream"])
def test_sequential_pass_equals_forward(outlier_model: Path, mode: str) -> None:
    """The staged pass GPTQ uses computes exactly the layer's forward when nothing changes, and
    shows each group the inputs the hooks of a plain forward see, whether the group inputs are
    kept or recomputed batch by batch."""
    _, ctx = first_layer(outlier_model, mode=mode)
    hooked: dict[str, torch.Tensor] = {}
    ref = ctx.forward(lambda inner, x: hooked.setdefault(inner, x.clone()) if inner not in hooked else None)
    seen: dict[tuple[str, ...], torch.Tensor] = {}
    # buffers are recycled: copy
    out = ctx.sequential(lambda group, x, fp: seen.__setitem__(group.linears, x.tensor().clone()))
    x = ctx.spec.experts
    experts = [g.linears for e in range(ctx.pipeline.config.num_experts) for g in x.groups(e)] if x else []
    assert list(seen) == [g.linears for g in ctx.spec.groups] + experts
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert ctx.outputs is out
    for group in [g.linears for g in ctx.spec.groups]:  # the hook saw the first batch
        first = hooked[group[0]]
        torch.testing.assert_close(seen[group][:len(first)].float(), first, rtol=0, atol=1e-6)
    for group in experts[::2]:  # an expert's gate/up: the tokens routed to it, all of them
        assert seen[group].shape[1] <= ctx.inputs.shape[0] * ctx.inputs.shape[1]


@pytest.mark.parametrize("mode", ["keep", "stream"])
def test_sequential_pass_feeds_quantized_groups_forward(outlier_model: Path, mode: str) -> None:
    """A change made at one group boundary is what every later group computes with."""
    _, ctx = first_layer(outlier_model, mode=mode)
    inputs = ctx.inputs.clone()
    ref = ctx.forward()

    def visit(group: GroupSpec, _x, _fp) -> None:
        if group.linears[0] == "self_attn.o_proj":
            ctx.layer.self_attn.o_proj.weight.data.mul_(0.5)

    out = ctx.sequential(visit)
    assert out is ctx.inputs  # updated in place
    torch.testing.assert_close(out, ctx.forward(inputs=inputs), rtol=0, atol=1e-6)
    assert not torch.allclose(out, ref)


def test_sequential_pass_stores_group_inputs_in_compute_dtype(outlier_model: Path) -> None:
    """With bf16 calibration the group inputs are handed over (and held) in bf16, the residual
    stream stays in its float32 storage, in one buffer from layer to layer."""
    source = open_model(outlier_model)
    tokens = torch.randint(0, source.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    layers = LayerPipeline(source, tokens, compute_dtype=torch.bfloat16).layers()
    buffers = set()
    for _ in range(2):
        ctx = next(layers)

        def visit(group: GroupSpec, x, _fp) -> None:
            assert x.dtype == torch.bfloat16 and x.tensor().dtype == torch.bfloat16, group

        out = ctx.sequential(visit)
        assert out.dtype == torch.float32
        buffers.add(out.data_ptr())
    assert len(buffers) == 1


def test_bfloat16_calibration_close_to_float32(outlier_model: Path) -> None:
    """bf16 autocast in the pipeline changes outputs only by bf16 rounding of the products."""
    source = open_model(outlier_model)
    tokens = torch.randint(0, source.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    fp = next(LayerPipeline(source, tokens).layers()).forward()
    bf = next(LayerPipeline(source, tokens, compute_dtype=torch.bfloat16).layers()).forward()
    assert bf.dtype == torch.float32
    rel = (bf - fp).norm() / fp.norm()
    # bf16 keeps 8 significant bits (0.4%); through the 20x outlier channels and attention the
    # layer output moves by 1-2.5% on these random models (2.5%: qwen2, whose biases add terms)
    assert 0 < rel < 3e-2, rel


@pytest.mark.parametrize("native", [True, False])
def test_bf16_calibration_warns_without_native_bf16(outlier_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture, native: bool) -> None:
    """On a CPU without AVX512-BF16/AMX, bf16 GEMMs are emulated (measured ~250x slower than
    float32 on an AVX2 EPYC): asking for bf16 calibration there gets a warning, not silence."""
    import qconv.quant.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "native_bf16", lambda device: native)
    source = open_model(outlier_model)
    tokens = torch.zeros((1, 8), dtype=torch.long)
    with caplog.at_level("WARNING", logger="qconv.quant.pipeline"):
        LayerPipeline(source, tokens, compute_dtype=torch.bfloat16)
        LayerPipeline(source, tokens)
    warned = [r for r in caplog.records if "--calib-dtype float32" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """Four layers with outlier norms: enough depth for quantization error to build up."""
    model = tiny_hf_model_builder("llama", rope_scaling=None, num_hidden_layers=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20.0
    path = tmp_path_factory.mktemp("deep")
    model.save_pretrained(path)
    return path


def run_layers(path: Path, gptq: dict | None, fp_stream: bool = False,
               awq: dict | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (AWQ with options ``awq``, or not; GPTQ W3 g32 with options ``gptq``, or none):
    (inputs, fp inputs if streamed) as the pipeline fed them, then (outputs,)."""
    source = open_model(path)
    tokens = torch.randint(0, source.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[torch.Tensor, ...]] = []
    schemes = SchemeMap(WeightScheme(3, 32, False))
    for ctx in LayerPipeline(source, tokens, fp_stream=fp_stream).layers():
        seen.append((ctx.inputs.clone(), *([ctx.fp_inputs.clone()] if fp_stream else [])))
        if awq is not None:
            get_method("awq")(**awq).apply(ctx, schemes)
        if gptq is not None:
            get_method("gptq")(**gptq).quantize(ctx, schemes)
        seen.append(((ctx.outputs if ctx.outputs is not None else ctx.forward()).clone(),))
    return seen


def test_fp_stream_carries_the_fp_model(deep_model: Path) -> None:
    """With GPTQ's fp targets every layer's fp inputs are the unquantized model's hidden states,
    while its quantized inputs drift away from them."""
    fp = run_layers(deep_model, None)
    quantized = run_layers(deep_model, {"fp_targets": True}, fp_stream=True)
    for i in range(0, len(fp), 2):
        torch.testing.assert_close(quantized[i][1], fp[i][0], rtol=0, atol=1e-5)
    assert not torch.allclose(quantized[-2][0], fp[-2][0], atol=1e-3)


def test_fp_stream_follows_the_fp_model_through_awq_clip(deep_model: Path) -> None:
    """AWQ's scales preserve the layer's outputs, its clip does not: the fp stream (and GPTQ's
    fp targets) must still follow the unquantized model, not the clipped one."""
    fp = run_layers(deep_model, None)
    clipped = run_layers(deep_model, {"fp_targets": True}, fp_stream=True, awq={"grid": 4})
    for i in range(0, len(fp), 2):
        torch.testing.assert_close(clipped[i][1], fp[i][0], rtol=1e-3, atol=1e-3)  # without: 3.4 apart


def test_fp_targets_refuse_a_transform_after_awq_clip() -> None:
    from qconv.quant.recipe import recipe_from_dict

    with pytest.raises(InvalidOption, match="smoothquant after a stage that changes the layer's outputs"):
        recipe_from_dict({"stages": [{"method": "awq"}, {"method": "smoothquant"},
                                     {"method": "gptq", "fp_targets": True}]})
    recipe_from_dict({"stages": [{"method": "awq", "clip": False}, {"method": "smoothquant"},
                                 {"method": "gptq", "fp_targets": True}]})


def test_gptq_fp_targets_track_the_fp_model_better(deep_model: Path) -> None:
    fp = run_layers(deep_model, None)[-1][0]
    plain = run_layers(deep_model, {})[-1][0]
    targeted = run_layers(deep_model, {"fp_targets": True}, fp_stream=True)[-1][0]
    assert (targeted - fp).pow(2).mean() < (plain - fp).pow(2).mean()


def test_fp_stream_needs_the_sequential_pass(deep_model: Path) -> None:
    source = open_model(deep_model)
    tokens = torch.zeros((2, 8), dtype=torch.long)
    layers = LayerPipeline(source, tokens, fp_stream=True).layers()
    next(layers)
    with pytest.raises(RuntimeError, match="sequential pass"):
        next(layers)


def test_fp_targets_need_true_sequential() -> None:
    from qconv.quant.recipe import recipe_from_dict

    with pytest.raises(InvalidOption, match="fp_targets needs true_sequential"):
        recipe_from_dict({"stages": [{"method": "gptq", "fp_targets": True, "true_sequential": False}]})


def test_awq_error_through_second_moments_equals_the_error_over_tokens() -> None:
    """AWQ measures a single Linear's error (scale search) and each group's (clip search) through
    ``H = Σ x xᵀ`` instead of re-running the Linear over every token: the same numbers."""
    from qconv.quant.methods.awq import clip_search, quadratic_error

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 64, dtype=torch.float64)
    w = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    d = torch.randn(16, 64, generator=gen, dtype=torch.float64) * 0.01
    h = x.T @ x
    direct = (x @ d.T).pow(2).sum().item()
    assert quadratic_error(d, h) == pytest.approx(direct, rel=1e-10)
    scheme = WeightScheme(bits=3, group_size=16)
    clipped = clip_search(w.float(), h.float(), scheme)
    # per (row, group) the chosen range's error over the tokens is the least of the 10 ranges
    xg, wg = x.float().reshape(-1, 4, 16), w.float().reshape(16, 4, 16)
    m0 = wg.abs().amax(-1, keepdim=True)
    errs = torch.stack([(torch.einsum("tng,cng->ctn", xg, fake_quantize(torch.clamp(wg, -m0 * (1 - i / 20), m0 * (1 - i / 20))
                                                                       .reshape(16, 64), scheme).reshape(16, 4, 16) - wg))
                        .pow(2).sum(1) for i in range(10)])
    got = (torch.einsum("tng,cng->ctn", xg, fake_quantize(clipped, scheme).reshape(16, 4, 16) - wg)).pow(2).sum(1)
    assert torch.allclose(got, errs.amin(0), rtol=1e-4)
