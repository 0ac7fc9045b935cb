"""``quantize --dry-run``'s memory estimate against the measured peak RSS, on the example model.

    python bench/memory_estimate.py [--cache .cache] [--samples 16 64] [--configs bf16-keep fp32-keep bf16-stream]
                                    [--method gptq]

For each configuration and sample count (x 2048 tokens of the shared C4 sample): the estimate
``qconv quantize --dry-run --json`` prints for the mode, then the same command run for real in a
child process (wall time and peak RSS measured from a small parent, as ``/usr/bin/time`` does),
and their ratio (goal: within 10%). GPTQ W4 g64 unless ``--method`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model, measure  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: name -> (activation storage dtype, memory mode)
CONFIGS = {"bf16-keep": ("bfloat16", "keep"), "fp32-keep": ("float32", "keep"),
           "bf16-stream": ("bfloat16", "stream"), "fp32-stream": ("float32", "stream"),
           "bf16-spill": ("bfloat16", "spill")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--configs", nargs="+", default=["bf16-keep", "fp32-keep", "bf16-stream"], choices=list(CONFIGS))
    parser.add_argument("--method", default="gptq")
    args = parser.parse_args()
    model = example_model(args.cache)
    print("| method | activations | mode | samples | estimate MiB | measured MiB | measured / estimate | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.samples:
            for name in args.configs:
                act, mode = CONFIGS[name]
                cmd = [*QCONV, "quantize", str(model), "-o", str(Path(tmp) / name), "--method", args.method,
                       "--bits", "4", "--group-size", "64", "--data", str(SHARED / "c4-sample.jsonl"),
                       "--samples", str(n), "--act-dtype", act, "--memory-mode", mode, "--force", "--quiet"]
                plan = json.loads(subprocess.run([*cmd, "--dry-run", "--json"], check=True, capture_output=True,
                                                 text=True).stdout)["memory_plan"]
                est = plan["estimate"]["total"] / 2**20
                m = measure(cmd)
                print(f"| {args.method} | {act} | {mode} | {n} | {est:,.0f} | {m['rss_mb']:,.0f} | "
                      f"{m['rss_mb'] / est:.3f} | {m['wall']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
