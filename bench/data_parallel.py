"""Data-parallel GPTQ (torchrun, gloo on CPU) against one process, on the example model.

    python bench/data_parallel.py [--cache .cache] [--samples 32] [--ranks 1 2]

GPTQ W4 g64 at ``--samples`` x 2048 tokens of the shared C4 sample, once as a plain process
(all cores) and once per rank count under ``torchrun --nproc-per-node N`` (one thread per rank,
as torchrun sets it), each timed in its own child; then whether every output tensor is
byte-identical to the plain process's.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, checkpoint_tensors, example_model, measure  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    model = example_model(args.cache)
    quantize = ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "64", "--data",
                str(SHARED / "c4-sample.jsonl"), "--samples", str(args.samples), "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"one process": (Path(tmp) / "plain", [*QCONV, *quantize, "-o", str(Path(tmp) / "plain")])}
        for n in args.ranks:
            out = Path(tmp) / f"ranks{n}"
            runs[f"torchrun, {n} rank(s) (gloo)"] = (out, [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "-m", "qconv", *quantize, "-o", str(out)])
        print(f"GPTQ W4 g64, {args.samples} x 2048 tokens, SmolLM2-135M-Instruct ({os.cpu_count()} CPUs)\n")
        print("| run | wall s | output |\n|---|---|---|")
        ref = None
        for label, (out, cmd) in runs.items():
            m = measure(cmd)  # torchrun gives each rank OMP_NUM_THREADS=1
            t = checkpoint_tensors(out)
            if ref is None:
                ref, verdict = t, "reference"
            else:
                same = sum(1 for k in ref if k in t and ref[k].dtype == t[k].dtype and torch.equal(ref[k], t[k]))
                verdict = f"{same}/{len(ref)} tensors byte-identical" + (" ✓" if same == len(ref) == len(t) else " ✗")
            print(f"| {label} | {m['wall']:.0f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
