"""GGUF import on the example model, checked against transformers' own GGUF loader.

    python bench/gguf_import.py [--cache .cache]

Prints a table: wall time and peak RSS of ``qconv convert model.gguf -o hf`` and of
transformers' ``from_pretrained(gguf_file=...)`` (both in child processes, side by side), and
the verdict of a tensor-by-tensor comparison of the two results. Tokenizer agreement on the
whole evaluation text is checked by ``bench/check_gguf_tokenizer.py``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_gguf  # noqa: E402

TRANSFORMERS_LOAD = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from safetensors.torch import save_file
path = sys.argv[1]; d, name = path.rsplit('/', 1)
cfg = AutoConfig.from_pretrained(d, gguf_file=name)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, config=cfg, dtype=torch.float32)
save_file({k: v.clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}, sys.argv[2])
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    gguf_path = example_gguf(args.cache).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out, ref_file = Path(tmp) / "hf", Path(tmp) / "ref.safetensors"
        q_wall, q_rss = timed([*QCONV, "convert", str(gguf_path), "-o", str(out), "--quiet"])
        t_wall, t_rss = timed([sys.executable, "-c", TRANSFORMERS_LOAD, str(gguf_path), str(ref_file)])
        import torch
        from safetensors.torch import load_file

        from qconv.checkpoint import open_model

        ref = load_file(ref_file)
        with open_model(out) as src:
            names = src.tensor_names()
            diff = [n for n in names if not torch.equal(src.get_tensor(n), ref[n])]
    print(f"| step | wall s | peak RSS MB |\n|---|---|---|\n| qconv convert (GGUF -> HF f32) | {q_wall:.1f} | {q_rss:.0f} |")
    print(f"| transformers GGUF load (+ save) | {t_wall:.1f} | {t_rss:.0f} |")
    print(f"\ntensors compared: {len(names)}; identical: {len(names) - len(diff)}; differing: {diff[:5]}")
    print("note: RSS of the second row is the max over both children (getrusage keeps the maximum)")


if __name__ == "__main__":
    main()
