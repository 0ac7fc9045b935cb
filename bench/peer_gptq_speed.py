"""GPTQ side by side with llm-compressor on this machine: same model, tokens and settings.

    python bench/peer_gptq_speed.py --llmc-python /path/to/venv/bin/python [--cache .cache]
                                    [--samples 128] [--windows 4] [--calib-dtype float32]

llm-compressor is a peer, not a dependency: install it into its own virtual environment
(``python -m venv V && V/bin/pip install torch==2.13.0 llmcompressor==0.14.0``) and pass that
interpreter. Both tools get the same calibration windows (``--samples`` x 2048 tokens of the
shared C4 sample, drawn once by qconv's seeded sampler and handed to llm-compressor as token
ids) and the same settings: W4 g64 asymmetric, act order with static groups, damp 0.01, blocks
of 128, ``lm_head`` kept. llm-compressor loads the fp32 checkpoint as it is (``dtype="auto"``)
and runs its default sequential pipeline. Each run is its own child process, timed from
outside (wall time, peak RSS), one after the other; then both outputs are scored by
``qconv run --ppl`` on the first ``--windows`` windows (a sanity check that both did the job,
not the quality protocol). Prints a markdown table with the speed ratio.

``--tools`` runs only some of them (``--tools qconv`` to time a change to qconv against an
llm-compressor run already made on the same machine: the calibration windows are the same
for the same ``--samples``); the ratio column then needs llm-compressor in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model, measure  # noqa: E402

from qconv.checkpoint import open_model  # noqa: E402
from qconv.quant.calibration import calibration_windows, load_calibration_rows  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: run by the peer's interpreter: argv = model dir, token file (.pt), output dir
LLMC_SCRIPT = """
import sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

model_dir, token_file, out_dir = sys.argv[1:4]
ids = torch.load(token_file)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64,
           "actorder": "static"}
recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                      dampening_frac=0.01, block_size=128)
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids),
        shuffle_calibration_samples=False, output_dir=out_dir)
"""


def ppl(model: Path, windows: int) -> float:
    out = subprocess.run([*QCONV, "run", str(model), "--ppl", str(SHARED / "wikitext-2-raw-test.txt"), "--ctx", "2048",
                          "--max-windows", str(windows), "--json"], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout)["ppl"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmc-python", type=Path, required=True, help="interpreter with llmcompressor installed")
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="qconv's calibration arithmetic (llm-compressor computes in the checkpoint's fp32)")
    parser.add_argument("--tools", nargs="+", choices=["llm-compressor", "qconv"], default=["llm-compressor", "qconv"])
    args = parser.parse_args()
    model = example_model(args.cache)
    calib = SHARED / "c4-sample.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with open_model(model) as source:
            tokens = calibration_windows(source.tokenizer(), load_calibration_rows(str(calib)), args.samples, 2048, 0)
        torch.save(tokens, work / "tokens.pt")
        (work / "llmc.py").write_text(LLMC_SCRIPT, encoding="utf-8")
        outputs = {"llm-compressor": work / "llmc", "qconv": work / "qconv"}
        runs = {
            "llm-compressor": [str(args.llmc_python), str(work / "llmc.py"), str(model), str(work / "tokens.pt"),
                               str(outputs["llm-compressor"])],
            "qconv": [*QCONV, "quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "64",
                      "--asym", "--act-order", "--damp", "0.01", "--data", str(calib), "--samples", str(args.samples),
                      "--seqlen", "2048", "--seed", "0", "--calib-dtype", args.calib_dtype, "-o", str(outputs["qconv"]),
                      "--quiet"],
        }
        results = {}
        for name in args.tools:
            results[name] = {**measure(runs[name]), "ppl": ppl(outputs[name], args.windows)}
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    base = results["llm-compressor"]["wall"] if "llm-compressor" in results else None
    print(f"\nGPTQ W4 g64 asym, act order (static), damp 0.01; {args.samples} x 2048 calibration tokens; "
          f"qconv calibration {args.calib_dtype}; PPL on the first {args.windows} windows")
    print("| tool | wall | peak RSS | PPL | speed vs llm-compressor |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{base / r['wall']:.2f}x" if base else "—"
        print(f"| {name} | {r['wall']:.0f} s | {r['rss_mb'] / 1024:.2f} GB | {r['ppl']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
