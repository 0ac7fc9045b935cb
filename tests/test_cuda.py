"""The CUDA paths, checked against the CPU paths and transformers. Skipped without a GPU (CI
has none); run on a lent GPU machine with ``pytest tests/test_cuda.py``.

Thresholds: float32 on the GPU differs from the CPU only by summation order (~1e-6 relative),
so the runner is held to the CPU tests' 1e-4 logit tolerance. Quantizers make discrete choices
that such a difference can flip at a rounding boundary, so for them the test asks for nearly
identical codes and equal quality, not identical bytes across devices; on one device the bytes
must repeat exactly (determinism is a product promise).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qconv import api
from qconv.checkpoint import open_model
from qconv.model.decoder import Transformer, load_model
from qconv.model.generate import generate
from qconv.model.kv_cache import FpKVCache
from qconv.model.kv_spec import KVCacheSpec
from qconv.model.perplexity import perplexity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")

QCONV = [sys.executable, "-m", "qconv"]
VOCAB = 300


def random_ids(n: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def load(path: Path, device: str) -> Transformer:
    with open_model(path) as source:
        return load_model(source, device)


@torch.no_grad()
def test_runner_on_cuda_matches_transformers(tiny_model_dir: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gpu = load(tiny_model_dir, "cuda")
    tokens = random_ids(2 * 40).view(2, 40)
    expected = hf(tokens).logits
    assert (gpu(tokens.cuda()).cpu() - expected).abs().max().item() <= 1e-4
    cache = FpKVCache(gpu.config, 1, 40, "cuda")
    pieces = [(0, 30), (30, 33)] + [(p, p + 1) for p in range(33, 40)]
    got = torch.cat([gpu(tokens[:1, a:b].cuda(), cache, a).cpu() for a, b in pieces], dim=1)
    assert (got - expected[:1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("spec", [KVCacheSpec.from_options("int8"), KVCacheSpec.from_options("kivi", 4, 16, 32),
                                  KVCacheSpec.from_options("kivi", 2, 16, 32, sink=1)],
                         ids=["int8", "kivi4", "kivi2-sink"])
def test_quantized_kv_caches_on_cuda_match_cpu(tiny_model_dir: Path, spec: KVCacheSpec) -> None:
    ids = random_ids(3 * 96, seed=5).tolist()
    cpu = perplexity(load(tiny_model_dir, "cpu"), ids, ctx=96, kv_cache=spec)
    gpu = perplexity(load(tiny_model_dir, "cuda"), ids, ctx=96, kv_cache=spec)
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=1e-3)
    assert gpu.kv_cache == cpu.kv_cache  # same bytes held: the packed layout is device-independent


def test_kivi8_greedy_generation_on_cuda_matches_cpu(tiny_model_dir: Path) -> None:
    prompt = random_ids(20, seed=7).tolist()
    spec = KVCacheSpec.from_options("kivi", 8, 16, 32)
    runs = []
    for device in ("cpu", "cuda"):
        model = load(tiny_model_dir, device)
        runs.append(generate(model, prompt, 40, eos_ids=(VOCAB,),
                             cache=spec.make(model.config, 1, 60, device, torch.float32)))
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain text, not conftest's jsonl: GPU images may lack ``datasets`` (a jsonl needs it)."""
    path = tmp_path_factory.mktemp("calib-txt") / "c.txt"
    path.write_text("\n\n".join(f"Once upon a time there were {i} tiny models. " * 8 for i in range(40)))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _kl_vs(ref: torch.Tensor, path: Path) -> float:
    with open_model(path) as src:
        logits = load_model(src)(torch.arange(64)[None] % 384)[0]
    return torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


@pytest.mark.parametrize("method,flags,min_same", [
    ("rtn", {"bits": 4, "group_size": 32, "mse": True}, 0.99),
    ("rtn", {"bits": 3, "group_size": 32}, 0.99),  # 3-bit codes straddle bytes: the other packer
    ("gptq", {"bits": 4, "group_size": 32, "samples": 8, "seqlen": 64, "act_order": True}, 0.95),
    # AWQ picks one grid point per group from nearly tied losses on a random model: a 1e-6
    # difference may pick another scale and move most codes, so only quality is compared
    ("awq", {"bits": 4, "group_size": 32, "samples": 8, "seqlen": 64}, 0.0),
    ("smoothquant", {"samples": 8, "seqlen": 64}, 0.95),
])
def test_quantize_on_cuda(model: Path, calib: Path, tmp_path: Path, method: str, flags: dict,
                          min_same: float) -> None:
    data = None if method == "rtn" else str(calib)
    for name, device in (("cpu", "cpu"), ("gpu", "cuda"), ("gpu2", "cuda")):
        api.quantize(model, tmp_path / name, method=method, data=data, device=device, **flags)
    for f in sorted(p.name for p in (tmp_path / "gpu").iterdir()):  # deterministic on one device
        assert (tmp_path / "gpu" / f).read_bytes() == (tmp_path / "gpu2" / f).read_bytes(), f
    cpu, gpu = _weights(tmp_path / "cpu"), _weights(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    codes = [k for k in cpu if k.endswith(("weight_packed", ".weight")) and cpu[k].dtype in (torch.int32, torch.int8)]
    assert codes
    same = sum(int((cpu[k] == gpu[k]).sum()) for k in codes) / sum(cpu[k].numel() for k in codes)
    assert same >= min_same, same
    with open_model(model) as src:
        ref = load_model(src)(torch.arange(64)[None] % 384)[0]
    kl_cpu, kl_gpu = _kl_vs(ref, tmp_path / "cpu"), _kl_vs(ref, tmp_path / "gpu")
    assert kl_gpu <= 1.2 * kl_cpu + 1e-4, (kl_cpu, kl_gpu)


@pytest.mark.parametrize("memory", ["keep", "stream"])
def test_activation_placement_does_not_change_bytes(model: Path, calib: Path, tmp_path: Path, memory: str) -> None:
    """GPTQ on the GPU with the calibration activations on the device and in pinned host memory
    (a device limit too small for them): the same kernels on the same device, so the same bytes."""
    flags = dict(method="gptq", bits=4, group_size=32, data=str(calib), samples=8, seqlen=64, device="cuda",
                 memory=memory)
    placements = {}
    for name, limit in (("device", "cuda=100GB"), ("pinned", "cuda=1000")):
        r = api.quantize(model, tmp_path / name, max_memory=limit, **flags)
        placements[name] = r.memory_plan["placement"]
    assert placements == {"device": "device", "pinned": "pinned"}
    for f in sorted(p.name for p in (tmp_path / "device").iterdir()):
        if f.endswith(".safetensors"):
            assert (tmp_path / "device" / f).read_bytes() == (tmp_path / "pinned" / f).read_bytes(), f


def test_cli_run_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" ".join(str(i) for i in range(400)))
    from tests_support import write_tokenizer

    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    write_tokenizer(model, VOCAB)
    results = {}
    for device, dtype in (("cpu", "f32"), ("cuda", "f32"), ("cuda", "bf16")):
        out = subprocess.run([*QCONV, "run", str(model), "--ppl", str(text), "--ctx", "32", "--device", device,
                              "--dtype", dtype, "--kv-cache", "kivi", "--kv-bits", "4", "--kv-group", "16",
                              "--kv-residual", "16", "--json"], capture_output=True, text=True, check=True)
        results[device, dtype] = json.loads(out.stdout)["ppl"]
    assert results["cuda", "f32"] == pytest.approx(results["cpu", "f32"], rel=1e-3)
    assert math.isfinite(results["cuda", "bf16"])
    assert results["cuda", "bf16"] == pytest.approx(results["cpu", "f32"], rel=0.05)
