"""Where a shipped recipe's time goes, stage by stage, against this machine's GEMM limit.

    python bench/recipe_speed.py [--recipes gguf-q4_k_m,w4a16-awq-gptq] [--samples 32] [--seqlen 512]
                                 [--dtypes float32,bfloat16] [--cache .cache]

Each recipe runs once per calibration dtype (``--calib-dtype``; bfloat16 only where this CPU has
native bf16 GEMMs) on the example model (SmolLM2-135M, Llama family) under ``cProfile``, and its
time is attributed to stages by the functions that implement them (cumulative time, so a row
includes what it calls; "forward passes" is the sequential pass minus its group visits, i.e.
the layer forwards of the quantized and, with ``fp_targets``, the fp stream).

FLOPs are counted from the model's shapes (a GEMM ``[m,k]@[k,n]`` as ``2mkn``, causal attention
as half of its two ``T x T`` products, a Hessian as the lower block triangle the accumulator
computes, a cross product in full), and the "limit" column divides them by the GEMM rate this
machine measured at the start (the best of a few GEMMs at the model's shapes, in the stage's dtype): the fraction
of the machine each stage reaches. Stages without a FLOP count (the column solves, the grid
searches) are sequential or elementwise work whose limit is not a GEMM.

Int recipes run at group 64 (SmolLM2's rows are not a multiple of 128). Quality is not measured here (``bench/gguf_quality.py`` and ``bench/quality.py`` do); the output
files are written to a scratch directory and removed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qconv.quant.gptq import HessianAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import example_model  # noqa: E402
from gptq_speed import hessian_flops  # noqa: E402
from heldout import calibration_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: stage -> (file suffix, function name) whose cumulative time it is
STAGES = {
    "awq: capture search inputs": ("methods/awq.py", "_features"),
    "awq: scale search": ("methods/awq.py", "_search"),
    "  of which branch losses": ("methods/awq.py", "_branch_losses"),
    "awq: clip search": ("methods/awq.py", "_clip"),
    "gptq: Hessians": ("methods/gptq.py", "_hessian"),
    "gptq: fp-target cross products": ("methods/gptq.py", "_cross"),
    "gptq: fp-target solve (retarget)": ("quant/gptq.py", "retarget"),
    "gptq: column solve (int grid)": ("quant/gptq.py", "gptq_quantize"),
    "  of which MSE grid": ("core/grid.py", "mse_clip_params"),
    "  of which refit scales": ("quant/gptq.py", "refit_scales"),
    "  of which descend codes": ("quant/gptq.py", "descend_codes"),
    "gptq: column solve (ggml grid)": ("quant/gptq.py", "gptq_quantize_ggml"),
}


#: GEMM shapes ``(m, k, n)`` the limit is the best of: a Linear over a batch of tokens, and the
#: Hessian products (deep ``k``: the tokens) at both widths
GEMM_SHAPES = ((4096, 576, 1536), (576, 16384, 576), (1536, 16384, 1536))


def gemm_rate(dtype: torch.dtype, reps: int = 5) -> float:
    """This machine's GEMM limit in ``dtype``: the best GFLOP/s over :data:`GEMM_SHAPES`."""
    best = 0.0
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def flops(config: dict, recipe: dict, samples: int, seqlen: int) -> dict[str, float]:
    """FLOPs of the counted stages for a Llama-family model and the recipe's stages."""
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * (h // heads)
    linear_params = h * h + 2 * h * kv + h * h + 3 * h * f
    tokens = samples * seqlen

    def attention(n: int, length: int) -> float:  # QKᵀ and PV, causal half
        return 2 * 2 * n * length * length * h / 2

    def hessians(n: int) -> float:  # the lower block triangle the accumulator computes
        return 3 * hessian_flops(HessianAccumulator(h), n) + hessian_flops(HessianAccumulator(f), n)

    out: dict[str, float] = {}
    stages = {s["method"]: s for s in recipe["stages"]}
    if "gptq" in stages:
        streams = 2 if stages["gptq"].get("fp_targets") else 1
        out["forward passes"] = layers * streams * (2 * linear_params * tokens + attention(samples, seqlen))
        out["gptq: Hessians"] = layers * hessians(tokens)
        if stages["gptq"].get("fp_targets"):
            out["gptq: fp-target cross products"] = layers * 2 * tokens * (3 * h * h + f * f)
    if "awq" in stages:
        s = stages["awq"]
        n = min(int(s.get("search_samples", 32)), samples)
        length = max(1, -(-int(s.get("search_tokens", 16384)) // n))
        grid = int(s.get("grid", 20))
        out["awq: capture search inputs"] = layers * (2 * linear_params * n * seqlen + attention(n, seqlen))
        attn_branch = 2 * (h * h + 2 * h * kv + h * h) * n * length + attention(n, length)
        mlp_branch = 2 * 3 * h * f * n * length
        out["  of which branch losses"] = layers * (grid + 1) * (attn_branch + mlp_branch)
    return out


def profile(recipe: Path, model: Path, calib: Path, samples: int, seqlen: int, dtype: str) -> tuple[float, dict]:
    """Wall seconds and the per-stage cumulative seconds of one quantize run."""
    from qconv import api

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ("out.gguf" if "gguf" in recipe.name else "out")
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        # group 64: SmolLM2's 576-wide rows are not a multiple of the int recipes' 128
        groups = {} if "gguf" in recipe.name else {"group_size": 64}
        api.quantize(model, out, recipe=recipe, force=True, data=str(calib), samples=samples, seqlen=seqlen,
                     dtype=dtype, **groups)
        prof.disable()
        wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    cum: dict[str, float] = {}
    for (path, _, name), (_, _, _, ct, _) in stats.items():
        for stage, (suffix, fn) in STAGES.items():
            if name == fn and path.endswith(suffix):
                cum[stage] = cum.get(stage, 0.0) + ct
        if name in ("sequential", "visit") and path.endswith(("quant/pipeline.py", "methods/gptq.py")):
            cum[name] = cum.get(name, 0.0) + ct
    if "sequential" in cum:
        cum["forward passes"] = cum.pop("sequential") - cum.pop("visit", 0.0)
    return wall, cum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--recipes", default="gguf-q4_k_m,w4a16-awq-gptq")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    import yaml

    from qconv.core.device import native_bf16

    cache = args.cache.resolve()
    model = example_model(cache)
    calib = calibration_file(cache / "heldout")
    config = json.loads((model / "config.json").read_text())
    dtypes = [d for d in args.dtypes.split(",") if d != "bfloat16" or native_bf16(torch.device("cpu"))]
    rate = {d: gemm_rate(getattr(torch, d)) for d in dtypes}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), platform.processor())
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in cpu]
    print(f"{name} ({', '.join(flags)}), {torch.get_num_threads()} threads; GEMM limit: "
          + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rate.items()))
    print(f"calibration {args.samples} x {args.seqlen} tokens\n")
    for rname in args.recipes.split(","):
        path = ROOT / "recipes" / f"{rname}.yaml"
        recipe = yaml.safe_load(path.read_text())
        counted = flops(config, recipe, args.samples, args.seqlen)
        runs = {d: profile(path, model, calib, args.samples, args.seqlen, d) for d in dtypes}
        print(f"{rname}: " + ", ".join(f"{d} {w:.1f} s" for d, (w, _) in runs.items()))
        print("| stage | GFLOP | " + " | ".join(f"{d} s | {d} of limit" for d in dtypes) + " |")
        print("|---|---|" + "---|---|" * len(dtypes))
        order = ["forward passes", *STAGES]
        for stage in order:
            if not any(stage in c for _, c in runs.values()):
                continue
            gf = counted.get(stage)
            cells = []
            for d, (_, c) in runs.items():
                s = c.get(stage, 0.0)
                cells += [f"{s:.1f}", f"{100 * gf / 1e9 / s / rate[d]:.0f}%" if gf and s else ""]
            print(f"| {stage} | {gf / 1e9:,.0f} | " if gf else f"| {stage} | | ", end="")
            print(" | ".join(cells) + " |")
        print("| total wall | | " + " | ".join(f"{w:.1f} | " for w, _ in runs.values()) + "\n")


if __name__ == "__main__":
    main()
