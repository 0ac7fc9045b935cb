"""FP8 dynamic and NVFP4A16 side by side with llm-compressor on this machine (both data-free):
same fp32 checkpoint, same scheme, ``lm_head`` kept.

    python bench/peer_float.py --llmc-python /path/to/venv/bin/python [--cache .cache] [--windows 20]
                               [--schemes fp8 nvfp4a16]

llm-compressor is a peer, not a dependency: install it into its own virtual environment
(``python -m venv V && V/bin/pip install torch==2.13.0 llmcompressor==0.14.0``) and pass that
interpreter. Each tool runs in its own child process, timed from outside (wall, peak RSS):
llm-compressor's ``oneshot`` with a ``QuantizationModifier`` of the preset scheme, qconv's
``quantize --method rtn --scheme ...``. Then: how many stored tensors of the two checkpoints
are byte-identical (the same algorithm should give the same bytes), and both scored by
``qconv run --ppl`` on WikiText-2 and the held-out C4 text (``--windows`` windows of 2048; the
runner emulates each scheme's activation quantization). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, checkpoint_tensors, example_model, measure  # noqa: E402
from heldout import heldout_text, shared_data  # noqa: E402
from quality import ppl  # noqa: E402

#: run by the peer's interpreter: argv = model dir, preset scheme, output dir
LLMC_SCRIPT = """
import sys
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
model, scheme, out = sys.argv[1:]
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]),
        output_dir=out)
"""

#: qconv scheme -> llm-compressor preset
SCHEMES = {"fp8": "FP8_DYNAMIC", "nvfp4a16": "NVFP4A16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmc-python", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    args = parser.parse_args()
    model = example_model(args.cache)
    wiki, held = shared_data() / "wikitext-2-raw-test.txt", heldout_text(args.cache / "heldout")
    rows = [("fp32", "-", {"ppl": ppl(model, wiki, args.windows, "cpu"), "held": ppl(model, held, args.windows, "cpu")})]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "llmc.py"
        script.write_text(LLMC_SCRIPT)
        for scheme in args.schemes:
            preset = SCHEMES[scheme]
            outs = {"llm-compressor": Path(tmp) / f"llmc-{scheme}", "qconv": Path(tmp) / f"qconv-{scheme}"}
            runs = {"llm-compressor": [str(args.llmc_python), str(script), str(model), preset, str(outs["llm-compressor"])],
                    "qconv": [*QCONV, "quantize", str(model), "--method", "rtn", "--scheme", scheme,
                              "-o", str(outs["qconv"]), "--quiet"]}
            for tool, cmd in runs.items():
                m = measure(cmd)
                size = sum(p.stat().st_size for p in outs[tool].glob("*.safetensors"))
                rows.append((f"{tool} {preset}", scheme, {**m, "size": size, "ppl": ppl(outs[tool], wiki, args.windows, "cpu"),
                                                          "held": ppl(outs[tool], held, args.windows, "cpu")}))
            a, b = checkpoint_tensors(outs["qconv"]), checkpoint_tensors(outs["llm-compressor"])
            same = sum(1 for k in a if k in b and a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8)
                       if a[k].dtype.itemsize == 1 else a[k], b[k].view(torch.uint8) if b[k].dtype.itemsize == 1 else b[k]))
            quantized = [k for k in a if k.endswith(("weight_scale", "weight_packed", "weight_global_scale"))
                         or (k.endswith(".weight") and a[k].dtype == torch.float8_e4m3fn)]
            same_q = sum(1 for k in quantized if k in b and a[k].dtype == b[k].dtype
                         and torch.equal(a[k].view(torch.uint8).flatten(), b[k].view(torch.uint8).flatten()))
            print(f"{scheme}: {same}/{len(a)} tensors byte-identical (names only in one: "
                  f"{len(set(a) ^ set(b))}); quantization tensors {same_q}/{len(quantized)}", file=sys.stderr)
            rows[-1][2]["identical"] = f"{same_q}/{len(quantized)}"
    fp = rows[0][2]
    print("| tool / scheme | wall s | peak RSS GB | size MB | WikiText-2 PPL | Δ | held-out C4 PPL | Δ | quantization tensors identical to llm-compressor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, r in rows:
        d1 = f"{100 * (r['ppl'] / fp['ppl'] - 1):+.2f}%" if r is not fp else "—"
        d2 = f"{100 * (r['held'] / fp['held'] - 1):+.2f}%" if r is not fp else "—"
        wall = f"{r['wall']:.1f}" if "wall" in r else ""
        rss = f"{r['rss_mb'] / 1024:.2f}" if "rss_mb" in r else ""
        size = f"{r['size'] / 2**20:.0f}" if "size" in r else ""
        print(f"| {name} | {wall} | {rss} | {size} | {r['ppl']:.3f} | {d1} | {r['held']:.3f} | {d2} | {r.get('identical', '')} |")


if __name__ == "__main__":
    main()
