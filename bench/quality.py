"""Quality of every method on the example model: perplexity, quantize time and peak RSS.

    python bench/quality.py [--cache .cache] [--rows fp rtn-w4 gptq-w4 ...] [--samples 128]
                            [--calib-dtype float32|bfloat16] [--results bench/results/quality.jsonl]
                            [--device cpu|cuda]

Protocol (the issue's, comparable with ``../shared/reference/peer-results.md``): SmolLM2-135M
fp32, WikiText-2 test, ctx 2048, the first 20 windows (GPTQ protocol, ``qconv run --ppl``), and
the same on a held-out text: C4 documents that calibration never reads (``bench/heldout.py``:
the shared C4 sample's last 296 documents; calibration ``--samples`` x 2048 tokens of the first
1,184, seed 0). Each row is a recipe
(YAML written to a temp file) run by ``qconv quantize`` in a child process, which reports that
child's wall time and peak RSS; the result is then evaluated by ``qconv run --ppl`` in another
child. Rows finished earlier are read back from ``--results`` (JSON lines) instead of rerun, so
an interrupted run resumes; ``--fresh`` ignores them, ``--rerun ROW ...`` ignores those rows. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model, measure  # noqa: E402
from heldout import calibration_file, heldout_text, shared_data  # noqa: E402


W4 = {"bits": 4, "group_size": 64, "symmetric": False}
W3 = {"bits": 3, "group_size": 64, "symmetric": False}
GPTQ = {"method": "gptq", "damp": 0.01, "act_order": True}
#: AWQ with its defaults (32 search windows = AutoAWQ's 64k tokens)
AWQ = {"method": "awq"}

#: QuaRot-style residual-stream rotation folded into the weights (exact in fp)
ROT = {"method": "rotate"}

W8A8 = {"bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8}}
SQ = {"method": "smoothquant", "alpha": 0.8}
SQ_DOWN = {**SQ, "down_proj": True, "down_proj_alpha": 0.65}
#: after a rotation the norm outputs are flat: smooth only down_proj's input, α searched per layer
SQ_SEARCH_DOWN = {"method": "smoothquant", "norms": False, "down_proj": True, "search": True}
W8_GPTQ = {"method": "gptq", "damp": 0.01, "act_order": False}
RTN = {"method": "rtn"}
#: GPTQ on float grids: static groups, activation order, the default damp 0.1
FP_GPTQ = {"method": "gptq", "damp": 0.1, "act_order": True}

#: row name -> (label, scheme, stages); None = the unquantized model
ROWS: dict[str, tuple[str, dict[str, Any] | str, list[dict[str, Any]]] | None] = {
    "fp": None,
    **{f"{m}-w{b}": (label, scheme, stages)
       for b, scheme in ((4, W4), (3, W3))
       for m, label, stages in (
           ("rtn", f"RTN W{b} g64 asym", [{"method": "rtn"}]),
           ("rtn-mse", f"RTN W{b} g64 asym + MSE clip", [{"method": "rtn", "mse": True}]),
           ("gptq", f"GPTQ W{b} g64 asym (act-order static, damp 0.01)", [GPTQ]),
           ("awq", f"AWQ W{b} g64 asym (scale + clip search, RTN)", [AWQ, {"method": "rtn"}]),
           # the AWQ speed-up's search in bf16 where native: this row searches in float32
           ("awq-f32search", f"AWQ W{b} g64 asym, float32 search (RTN)",
            [{**AWQ, "search_dtype": "float32"}, {"method": "rtn"}]),
           # ... and on every token of its 32 search windows (the speed-up's subsample: 16,384)
           ("awq-search64k", f"AWQ W{b} g64 asym, 65,536 search tokens (RTN)",
            [{**AWQ, "search_tokens": 65536}, {"method": "rtn"}]),
           ("awq-gptq", f"AWQ + GPTQ W{b} g64 asym", [AWQ, GPTQ]),
           # bf16 calibration computes GPTQ's Hessian products in bf16 by default; this row keeps them fp32
           ("awq-gptq-fp32h", f"AWQ + GPTQ W{b} g64 asym, fp32 Hessians", [AWQ, {**GPTQ, "bf16_hessian": False}]),
           ("gptq-mse", f"GPTQ W{b} g64 asym + MSE grid", [{**GPTQ, "mse": True}]),
           ("gptq-damp10", f"GPTQ W{b} g64 asym, damp 0.1", [{**GPTQ, "damp": 0.1}]),
           ("awq-gptq-mse-damp10", f"AWQ + GPTQ W{b} g64 asym + MSE grid, damp 0.1",
            [AWQ, {**GPTQ, "mse": True, "damp": 0.1}]),
           ("awq-gptq-mse", f"AWQ + GPTQ W{b} g64 asym + MSE grid", [AWQ, {**GPTQ, "mse": True}]),
           ("rot-gptq-mse", f"Hadamard rotation + GPTQ W{b} g64 asym + MSE grid", [ROT, {**GPTQ, "mse": True}]),
           ("rot-awq-gptq-mse", f"Hadamard rotation + AWQ + GPTQ W{b} g64 asym + MSE grid",
            [ROT, AWQ, {**GPTQ, "mse": True}]),
           ("rot-awq-gptq-mse-damp10", f"Hadamard rotation + AWQ + GPTQ W{b} g64 asym + MSE grid, damp 0.1",
            [ROT, AWQ, {**GPTQ, "mse": True, "damp": 0.1}]),
           ("rot-gptq-mse-damp10", f"Hadamard rotation + GPTQ W{b} g64 asym + MSE grid, damp 0.1",
            [ROT, {**GPTQ, "mse": True, "damp": 0.1}]),
           ("rot-gptq-mse-fpt-refine", f"Hadamard rotation + GPTQ W{b} g64 asym + MSE grid, fp targets, 2 refine rounds",
            [ROT, {**GPTQ, "mse": True, "fp_targets": True, "refine": 2}]),
           ("awq-gptq-mse-fpt-refine-damp10",
            f"AWQ + GPTQ W{b} g64 asym + MSE grid, damp 0.1, fp targets, 2 refine rounds",
            [AWQ, {**GPTQ, "mse": True, "damp": 0.1, "fp_targets": True, "refine": 2}]),
       )},
    "sq-w8a8": ("SmoothQuant α0.8 + GPTQ W8A8 (int8 per-channel W, dynamic per-token int8 A)",
                W8A8, [SQ, W8_GPTQ]),
    "sq-w8a8-down065": ("SmoothQuant α0.8, up→down α0.65 + GPTQ W8A8", W8A8, [SQ_DOWN, W8_GPTQ]),
    "sq-rtn-w8a8": ("SmoothQuant α0.8 + RTN W8A8", W8A8, [SQ, {"method": "rtn"}]),
    "sq-rtn-w8a8-down065": ("SmoothQuant α0.8, up→down α0.65 + RTN W8A8", W8A8, [SQ_DOWN, {"method": "rtn"}]),
    "rot-sq-search-w8a8": ("Hadamard rotation + SmoothQuant up→down only, per-layer α search + RTN W8A8",
                           W8A8, [ROT, SQ_SEARCH_DOWN, {"method": "rtn"}]),
    "rot-sq-search-gptq-w8a8": ("Hadamard rotation + SmoothQuant up→down only, per-layer α search + GPTQ W8A8",
                                W8A8, [ROT, SQ_SEARCH_DOWN, W8_GPTQ]),
    "rot-rtn-w8a8": ("Hadamard rotation + RTN W8A8 (no calibration)", W8A8, [ROT, {"method": "rtn"}]),
    "rtn-w8": ("RTN W8 g64", {"bits": 8, "group_size": 64, "symmetric": True}, [{"method": "rtn"}]),
    # the float formats vLLM serves (named schemes; SmolLM2's hidden size 576 is not a multiple
    # of 128, so FP8_BLOCK's 128-wide blocks and activation groups do not apply to it)
    "fp8-rtn": ("FP8 dynamic: E4M3 per channel, per-token E4M3 activations, RTN", "fp8", [RTN]),
    "fp8-static-rtn": ("FP8 static: E4M3 per tensor, static per-tensor E4M3 activations, RTN", "fp8-static", [RTN]),
    "fp8-gptq": ("FP8 dynamic, GPTQ damp 0.1 (act order)", "fp8", [FP_GPTQ]),
    # the weights' share of FP8's loss: the same E4M3 per-channel weights, activations unquantized
    "fp8a16-rtn": ("FP8 weight-only: E4M3 per channel, 16-bit activations, RTN", "fp8a16", [RTN]),
    "fp8a16-gptq": ("FP8 weight-only, GPTQ damp 0.1 (act order)", "fp8a16", [FP_GPTQ]),
    "fp8-sq-gptq": ("FP8 dynamic, SmoothQuant α0.5 + GPTQ damp 0.1", "fp8", [{"method": "smoothquant"}, FP_GPTQ]),
    "fp8-static-gptq": ("FP8 static, GPTQ damp 0.1 (act order)", "fp8-static", [FP_GPTQ]),
    **{f"{s}-{m}": (f"{label}, {how}", s, stages)
       for s, label in (("nvfp4a16", "NVFP4A16 (E2M1, FP8 scale / 16, global scale)"),
                        ("nvfp4", "NVFP4 W4A4 (+ NVFP4 activations, calibrated global scale)"),
                        ("mxfp4a16", "MXFP4A16 (E2M1, E8M0 scale / 32)"),
                        ("mxfp4", "MXFP4 W4A4 (+ dynamic MXFP4 activations)"))
       for m, how, stages in (("rtn", "RTN", [RTN]), ("gptq", "GPTQ damp 0.1", [FP_GPTQ]),
                              ("awq", "AWQ + RTN", [AWQ, RTN]), ("awq-gptq", "AWQ + GPTQ damp 0.1", [AWQ, FP_GPTQ]),
                              # W4A4: the rotation flattens the activations' outliers before they are rounded
                              ("rot-rtn", "Hadamard rotation + RTN", [ROT, RTN]),
                              ("rot-gptq", "Hadamard rotation + GPTQ damp 0.1", [ROT, FP_GPTQ]),
                              ("rtn-mse", "RTN + MSE scale search", [{**RTN, "mse": True}]),
                              ("gptq-mse", "GPTQ damp 0.1 + MSE scale search", [{**FP_GPTQ, "mse": True}]),
                              ("awq-gptq-mse", "AWQ + GPTQ damp 0.1 + MSE scale search",
                               [AWQ, {**FP_GPTQ, "mse": True}]))},
    # FP8 dynamic plus an FP8 KV cache (calibrated per-layer k/v scales, evaluated with
    # --kv-cache fp8): against the fp8-rtn row, what the cache adds
    "fp8-kv-fp8-rtn": ("FP8 dynamic + FP8 KV cache (static per-layer k/v scales), RTN", "fp8", [RTN]),
}
#: rows whose recipe calibrates FP8 KV-cache scales and whose evaluation runs the FP8 cache
KV_ROWS = {"fp8-kv-fp8-rtn"}


def ppl(model: Path, eval_text: Path, windows: int, device: str, kv: bool = False) -> float:
    out = subprocess.run([*QCONV, "run", str(model), "--ppl", str(eval_text), "--ctx", "2048",
                          "--max-windows", str(windows), "--device", device, "--json",
                          *(["--kv-cache", "fp8"] if kv else [])],
                         check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout)["ppl"])


def ppls(model: Path, args: argparse.Namespace, kv: bool = False) -> dict[str, float]:
    """Perplexity on WikiText-2 and on the held-out C4 documents."""
    return {"ppl": ppl(model, args.eval_text, args.windows, args.device, kv),
            "ppl_heldout": ppl(model, args.heldout, args.windows, args.device, kv)}


def run_row(name: str, model: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = ROWS[name]
    if spec is None:
        return {"row": name, "label": "fp32", **ppls(model, args), "device": args.device}
    label, scheme, stages = spec
    recipe = {"name": name, "scheme": scheme, "ignore": ["lm_head"], "stages": stages,
              "calibration": {"data": str(args.calib), "samples": args.samples, "seqlen": 2048, "seed": 0,
                              "dtype": args.calib_dtype}}
    if name in KV_ROWS:
        recipe["kv_cache"] = "fp8"
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    out = work / name
    m = measure([*QCONV, "quantize", str(model), "--recipe", str(recipe_path), "-o", str(out), "--force",
                  "--device", args.device, "--quiet"])
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"row": name, "label": label, **ppls(out, args, name in KV_ROWS), "seconds": m["wall"], "rss_mb": m["rss_mb"],
            "size_mb": size / 2**20,
            "samples": args.samples, "calib_dtype": args.calib_dtype, "calib": args.calib.name, "device": args.device}


def print_table(results: list[dict[str, Any]]) -> None:
    fp = next((r for r in results if r["row"] == "fp"), None)
    print("| config | WikiText-2 PPL | Δ vs fp | held-out C4 PPL | Δ vs fp | quantize wall | peak RSS | size | calibration |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        deltas = [f"{100 * (r[k] / fp[k] - 1):+.1f}%" if fp and r["row"] != "fp" else "—"
                  for k in ("ppl", "ppl_heldout")]
        wall = f"{r['seconds']:.0f} s" if "seconds" in r else ""
        rss = f"{r['rss_mb'] / 1024:.2f} GB" if "rss_mb" in r else ""
        calib = f"{r['samples']}×2048 {r['calib_dtype']}" if "samples" in r else ""
        size = f"{r['size_mb']:.0f} MB" if "size_mb" in r else ""
        print(f"| {r['label']} | {r['ppl']:.2f} | {deltas[0]} | {r['ppl_heldout']:.2f} | {deltas[1]} | {wall} | {rss} "
              f"| {size} | {calib} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--eval-text", type=Path, default=shared_data() / "wikitext-2-raw-test.txt")
    parser.add_argument("--heldout", type=Path, default=None,
                        help="held-out text (default: the C4 documents bench/heldout.py keeps out of calibration)")
    parser.add_argument("--calib", type=Path, default=None,
                        help="calibration file (default: the other C4 documents, bench/heldout.py)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "quality.jsonl",
                        help="JSON lines, one per finished row (rows found here are not rerun)")
    parser.add_argument("--fresh", action="store_true", help="rerun rows already in --results")
    parser.add_argument("--rerun", nargs="+", default=[], choices=list(ROWS), metavar="ROW",
                        help="rerun these rows even if --results has them (the newest line of a row wins)")
    parser.add_argument("--keep", type=Path, default=None, help="keep quantized checkpoints in this folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where quantize and the evaluation run (rows record it; rows of another device are not reused)")
    args = parser.parse_args()
    args.calib = args.calib or calibration_file(args.cache / "heldout")
    args.heldout = args.heldout or heldout_text(args.cache / "heldout")

    done: dict[str, dict[str, Any]] = {}
    if args.results.exists() and not args.fresh:
        for line in args.results.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r["row"] in args.rerun or r.get("device", "cpu") != args.device or "ppl_heldout" not in r:
                continue  # rows from before the held-out text are rerun
            if r["row"] == "fp" or (r.get("samples"), r.get("calib_dtype"), r.get("calib")) == \
                    (args.samples, args.calib_dtype, args.calib.name):
                done[r["row"]] = r
    model = example_model(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.rows:
            if name in done:
                continue
            print(f"  {name} ...", file=sys.stderr, flush=True)
            r = run_row(name, model, work, args)
            print(f"  {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            with args.results.open("a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")
            done[name] = r
    print_table([done[n] for n in args.rows if n in done])


if __name__ == "__main__":
    main()
