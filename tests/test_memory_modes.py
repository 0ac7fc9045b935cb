"""Memory modes, activation storage dtypes and data-parallel calibration.

- the ``keep``, ``stream`` and ``spill`` modes quantize to the same bytes (they only trade memory
  for recomputation), with float32 and with bfloat16 activation storage;
- the bucket tree sums to the same bits for every split of the buckets over ranks;
- ``--dry-run`` reports the mode chosen for a memory limit, the estimate and the alternatives;
- ``torchrun`` with 2 gloo processes writes exactly the single process's checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qconv import api
from qconv.checkpoint import open_model
from qconv.errors import InvalidOption
from qconv.quant.distributed import DataParallel
from qconv.quant.memory import Workload, parse_memory_limits, plan
from qconv.quant.pipeline import LayerPipeline
from qconv.quant.reduce import BUCKETS, TreeSum, bucket_sizes, bucket_span
from tests_support import write_tokenizer

QCONV = str(Path(sys.executable).parent / "qconv")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("act_dtype", ["float32", "bfloat16"])
def test_memory_modes_write_the_same_bytes(model: Path, calib: Path, tmp_path: Path, act_dtype: str) -> None:
    outs = {}
    for mode in ("keep", "stream", "spill"):
        outs[mode] = tmp_path / mode
        r = api.quantize(model, outs[mode], method="gptq", group_size=32, data=str(calib), samples=10, seqlen=32,
                         memory=mode, act_dtype=act_dtype)
        assert r.memory_plan["mode"] == mode
    assert_same_tensors(outs["keep"], outs["stream"])
    assert_same_tensors(outs["keep"], outs["spill"])


def test_bfloat16_activations_are_stored_in_bfloat16(model: Path) -> None:
    """The residual stream is stored in the storage dtype; computing on it changes the layer's
    output only by that rounding."""
    source = open_model(model)
    tokens = torch.randint(0, source.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    fp = next(LayerPipeline(source, tokens).layers())
    bf = next(LayerPipeline(source, tokens, store_dtype=torch.bfloat16).layers())
    assert bf.inputs.dtype == torch.bfloat16 and fp.inputs.dtype == torch.float32
    out_fp, out_bf = fp.forward(), bf.forward()
    assert out_bf.dtype == torch.bfloat16
    rel = ((out_bf.float() - out_fp).norm() / out_fp.norm()).item()
    assert 0 < rel < 1e-2, rel


def test_bucket_tree_is_split_invariant() -> None:
    """Partials summed by one process equal every rank split's subtree roots combined."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(16, 16, generator=gen) * 10 ** float(torch.randint(-3, 4, (), generator=gen))
             for _ in range(BUCKETS)]
    parts[5] = None  # an empty bucket

    def tree(span: tuple[int, int]) -> TreeSum:
        t = TreeSum(lambda: torch.zeros(16, 16), span)
        for b in range(*span):
            if parts[b] is not None:
                t.partial(b).add_(parts[b])
        return t

    single = tree((0, BUCKETS)).total()
    naive = sum(p for p in parts if p is not None)
    assert not torch.equal(single, naive)  # the order matters at these magnitudes
    for world in (2, 4, 8):
        roots = [tree(bucket_span(r, world)).total() for r in range(world)]
        for rank in range(world):  # every rank combines the gathered roots into the same sum
            gathered = [None if v is None else v.clone() for v in roots]
            assert torch.equal(tree(bucket_span(rank, world)).total(lambda _v, _z: gathered), single), world
    assert bucket_sizes(10) == [2, 2, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="power-of-two"):
        bucket_span(0, 3)


def test_dry_run_reports_the_mode_for_a_memory_limit(model: Path, calib: Path, tmp_path: Path) -> None:
    def dry(limit: str | None, **kw):
        return api.quantize(model, tmp_path / "o", method="gptq", group_size=32, data=str(calib), samples=64,
                            seqlen=256, dry_run=True, max_memory=limit, **kw).memory_plan

    roomy = dry("100GB")
    assert roomy["mode"] == "keep" and set(roomy["alternatives"]) == {"keep", "stream", "spill"}
    alts = roomy["alternatives"]
    assert alts["keep"] > alts["stream"] > alts["spill"]
    # a limit between the stream and keep estimates picks stream
    assert dry(str((alts["keep"] + alts["stream"]) // 2))["mode"] == "stream"
    assert dry("1000")["mode"] == "spill"
    assert "no mode fits" in dry("1000")["why"]
    assert dry(None, memory="stream")["mode"] == "stream"
    fp = api.quantize(model, tmp_path / "o", method="gptq", group_size=32, data=str(calib), samples=8, seqlen=32,
                      dry_run=True, fp_targets=True).memory_plan
    assert set(fp["alternatives"]) == {"keep"} and "fp_stream" in fp["estimate"]
    with pytest.raises(InvalidOption, match="memory mode 'stream' does not apply"):
        api.quantize(model, tmp_path / "o", method="gptq", group_size=32, data=str(calib), samples=8, seqlen=32,
                     dry_run=True, fp_targets=True, memory="stream")


def test_memory_limits_parse() -> None:
    assert parse_memory_limits("20GB") == (20 * 10**9, None)
    assert parse_memory_limits("cpu=20GB, cuda=70GB") == (20 * 10**9, 70 * 10**9)
    assert parse_memory_limits("gpu=2GiB") == (None, 2 * 2**30)
    for bad in ("tpu=3GB", "", "cuda=lots", ","):
        with pytest.raises(InvalidOption, match="--max-memory|invalid size"):
            parse_memory_limits(bad)


def test_activations_live_on_a_cuda_device_when_they_fit(model: Path) -> None:
    """On a CUDA device (its limit given, so no GPU is needed to plan) the activations go to the
    device in the first of keep / stream whose estimate less the host runtime fits; otherwise to
    pinned host memory with the mode chosen by the host limit (spill: a plain scratch file)."""
    config = open_model(model).config
    work = Workload(64, 256, sequential=True)
    cuda = torch.device("cuda", 0)
    roomy = plan(config, work, limit=10**12, device=cuda, device_limit=10**12)
    assert (roomy.mode, roomy.placement) == ("keep", "device")
    assert roomy.device_bytes == roomy.estimate["total"] - roomy.estimate["runtime"]
    keep = roomy.device_bytes
    stream = plan(config, work, "stream", 10**12, cuda, 10**12).device_bytes
    assert stream < keep
    mid = plan(config, work, limit=10**12, device=cuda, device_limit=(keep + stream) // 2)
    assert (mid.mode, mid.placement) == ("stream", "device")
    pinned = plan(config, work, limit=10**12, device=cuda, device_limit=1000)
    assert (pinned.mode, pinned.placement) == ("keep", "pinned") and "pinned" in pinned.why
    spilled = plan(config, work, limit=1000, device=cuda, device_limit=1000)
    assert (spilled.mode, spilled.placement) == ("spill", "host")
    assert plan(config, work, limit=10**12).placement == "host"  # a CPU run
    rtn = plan(config, Workload(0, 256), limit=10**12, device=cuda, device_limit=1000)
    assert rtn.placement == "host"  # nothing to place
    with pytest.raises(InvalidOption, match="only for a CUDA device"):
        with open_model(model) as src:
            LayerPipeline(src, torch.zeros((4, 8), dtype=torch.long), "cpu", placement="device")


def test_awq_estimate_counts_each_group_feature_in_its_dtype(model: Path, calib: Path, tmp_path: Path) -> None:
    """AWQ holds one search feature per Linear group (q/k/v share one) in the group dtype (counted
    twice: copies and heap slack), with the float32 references of the branch losses, beside the
    batch work of the forward that captures them."""
    def features(act_dtype: str) -> int:
        return api.quantize(model, tmp_path / "o", method="awq", group_size=32, data=str(calib), samples=8,
                            seqlen=64, dry_run=True, dtype="float32", act_dtype=act_dtype).memory_plan["estimate"]

    fp32, bf16 = features("float32"), features("bfloat16")
    config = open_model(model).config
    shapes = config.expected_shapes()
    widths = sum(shapes[f"model.layers.0.{g.linears[0]}.weight"][1] for g in config.spec.groups)
    refs = 8 * 64 * config.hidden_size * 4
    assert fp32["awq_features"] == 2 * 8 * 64 * widths * 4 + refs
    assert bf16["awq_features"] == 2 * 8 * 64 * widths * 2 + refs
    assert bf16["batch_work"] > 0


def test_cli_dry_run_prints_the_plan(model: Path, calib: Path, tmp_path: Path) -> None:
    res = subprocess.run([QCONV, "quantize", str(model), "-o", str(tmp_path / "o"), "--method", "gptq", "-g", "32",
                          "--data", str(calib), "--dry-run", "--max-memory", "64GB"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "memory mode: keep" in res.stdout and "peak host memory" in res.stdout
    bad = subprocess.run([QCONV, "quantize", str(model), "-o", str(tmp_path / "o"), "--method", "gptq",
                          "--data", str(calib), "--memory-mode", "lean"], capture_output=True, text=True)
    assert bad.returncode != 0 and "calibration.memory must be one of" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "qconv", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def sq_search_recipe(tmp_path: Path, scheme: str) -> Path:
    """A recipe of SmoothQuant with its α search (up→down too, 100 search tokens), then RTN."""
    recipe = tmp_path / "sq.yaml"
    recipe.write_text(f"name: sq\nscheme: {scheme}\n"
                      "stages: [{method: smoothquant, down_proj: true, search: true, search_tokens: 100}, "
                      "{method: rtn}]\n")
    return recipe


@pytest.mark.parametrize("method", ["gptq", "gptq-fp-targets", "awq-gptq-fp-targets", "smoothquant",
                                    "smoothquant-search", "awq", "rtn"])
def test_data_parallel_matches_one_process(model: Path, calib: Path, tmp_path: Path, method: str) -> None:
    """2 gloo ranks (one thread each) write the bytes one process with two threads writes (AWQ
    and SmoothQuant's α search: their losses are summed over both ranks' tokens; GPTQ's fp
    targets, alone and after AWQ's clip: the cross products are summed like the Hessians; RTN with static FP8 activation and
    KV-cache scales: their maxima are taken over both ranks' tokens)."""
    args = ["quantize", str(model), "--data", str(calib), "--samples", "10", "--seqlen", "32", "--quiet"]
    if method == "smoothquant-search":
        args += ["--recipe", str(sq_search_recipe(tmp_path, "fp8-static"))]
    elif method == "gptq-fp-targets":
        args += ["--method", "gptq", "--fp-targets"]
    elif method == "awq-gptq-fp-targets":  # the shipped W4 recipe's stages (AWQ's clip, then fp targets)
        recipe = tmp_path / "w4.yaml"
        recipe.write_text("name: w4\nscheme: {bits: 4, group_size: 32}\nstages: [{method: awq}, "
                          "{method: gptq, mse: true, fp_targets: true, refine: 1}]\n")
        args += ["--recipe", str(recipe)]
    else:
        args += ["--method", method]
    if method.startswith("gptq") or method == "awq":
        args += ["-g", "32"]
    if method == "rtn":
        args += ["--scheme", "fp8-static", "--kv-cache", "fp8"]
    single = subprocess.run([QCONV, *args, "-o", str(tmp_path / "one")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    res = _torchrun(2, *args, "-o", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_tensors(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["quantization_config"]


def test_data_parallel_refusals(model: Path, calib: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nscheme: {bits: 4, group_size: 32}\nstages: [{method: gptq, true_sequential: false}]\n")
    res = _torchrun(2, "quantize", str(model), "--recipe", str(recipe), "--data", str(calib),
                    "--samples", "10", "--seqlen", "32", "-o", str(tmp_path / "o"))
    assert res.returncode != 0 and "data-parallel calibration needs true_sequential" in res.stderr
    assert not (tmp_path / "o").exists()
    assert DataParallel(0, 2).writes and not DataParallel(1, 2).writes


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_builder) -> Path:
    """A tiny Qwen3-MoE (4 experts, top 2) with a tokenizer."""
    path = tmp_path_factory.mktemp("moe")
    tiny_hf_model_builder("qwen3_moe", vocab_size=384).save_pretrained(path)
    write_tokenizer(path, 384)
    return path


def test_expert_inputs_kept_per_bucket(moe_model: Path) -> None:
    """An expert's calibration inputs come per bucket of samples: bucket b's part is what the
    router sends it from bucket b's samples alone, which a data-parallel rank holding only those
    samples computes as well (the end-to-end test below cannot see this: GPTQ's codes rarely
    move with the last bits of a Hessian)."""
    source = open_model(moe_model)
    n = 2 * BUCKETS
    tokens = torch.randint(0, source.config.vocab_size, (n, 16), generator=torch.Generator().manual_seed(0))
    ctx = next(LayerPipeline(source, tokens, batch_size=3).layers())
    moe = ctx.layer.get_submodule(ctx.spec.experts.module)
    first = ctx.spec.experts.groups(0)[0]
    seen: dict[str, list[tuple[int, torch.Tensor]]] = {}
    mlp_inputs: list[torch.Tensor] = []
    ctx.forward(lambda inner, x: mlp_inputs.append(x.clone()) if inner == ctx.router else None)
    routed_in = torch.cat(mlp_inputs).reshape(n, 16, -1)

    def visit(group, inputs, fp_inputs) -> None:
        if group == first:
            seen["gate_up"] = [(b, x[0].clone()) for b, x in inputs.batches()]

    ctx.sequential(visit)
    sizes, at, want = bucket_sizes(n), 0, []
    for b in range(BUCKETS):
        flat = routed_in[at:at + sizes[b]].reshape(-1, routed_in.shape[-1])
        picks = moe.route(flat)[1]
        want.append((b, flat[(picks == 0).any(-1)]))
        at += sizes[b]
    want = [(b, t) for b, t in want if t.shape[0]]
    assert [b for b, _ in seen["gate_up"]] == [b for b, _ in want]
    for (_, got), (_, ref) in zip(seen["gate_up"], want):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("job", ["gptq", "awq", "smoothquant-search", "calibrate"])
def test_data_parallel_moe_matches_one_process(moe_model: Path, calib: Path, tmp_path: Path, job: str) -> None:
    """A mixture of experts under 2 gloo ranks: each expert's routed tokens are kept per bucket of
    samples (GPTQ's Hessians, the experts' hidden states, AWQ's and SmoothQuant's searches, the
    calibration statistics), so the ranks write the single process's bytes."""
    common = ["--data", str(calib), "--samples", "10", "--seqlen", "32", "--quiet"]
    if job == "calibrate":
        args, out = ["calibrate", str(moe_model), *common], "stats.safetensors"
    else:
        out = "q"
        args = ["quantize", str(moe_model), *common]
        if job == "smoothquant-search":
            args += ["--recipe", str(sq_search_recipe(tmp_path, "{bits: 8, group_size: -1, symmetric: true, "
                                                                 "activations: {bits: 8}}"))]
        else:
            args += ["--method", job, "-g", "32"]
    single = subprocess.run([QCONV, *args, "-o", str(tmp_path / "one" / out)], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    res = _torchrun(2, *args, "-o", str(tmp_path / "two" / out))
    assert res.returncode == 0, res.stderr[-3000:]
    if job == "calibrate":
        assert (tmp_path / "one" / out).read_bytes() == (tmp_path / "two" / out).read_bytes()
    else:
        assert_same_tensors(tmp_path / "one" / out, tmp_path / "two" / out)


@pytest.mark.parametrize("fmt", ["safetensors", "imatrix"])
def test_data_parallel_calibrate_matches_one_process(model: Path, calib: Path, tmp_path: Path, fmt: str) -> None:
    """``qconv calibrate`` under torchrun: the statistics (and so an imatrix) have the single
    process's bytes."""
    suffix = ".gguf" if fmt == "imatrix" else ".safetensors"
    args = ["calibrate", str(model), "--data", str(calib), "--samples", "10", "--seqlen", "32", "--format", fmt,
            "--quiet"]
    single = subprocess.run([QCONV, *args, "-o", str(tmp_path / f"one{suffix}")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    res = _torchrun(2, *args, "-o", str(tmp_path / f"two{suffix}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
