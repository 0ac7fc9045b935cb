"""Calibrated GGUF on the example model, measured by llama.cpp itself: qconv's methods against
``llama-quantize`` with and without ``llama-imatrix``, at llama.cpp's own file types.

    python bench/gguf_quality.py [--types q4_k_m,q4_k_s,q4_0,q3_k_m,q2_k,iq4_xs]
                                 [--rows plain,imatrix,qconv-imatrix,awq,gptq,awq-gptq,awq-gptq-fp,recipe]
                                 [--samples 128] [--seqlen 512] [--chunks 100] [--cache .cache] [--fresh]
                                 [--tensor-errors]

Protocol (llama.cpp's, as ``../shared/reference/peer-results.md``): every file is evaluated by
``llama-perplexity -c 512 --chunks C`` (first C chunks) on the WikiText-2 test text and on a
held-out text (C4 documents no calibration reads, :mod:`heldout`). One calibration text, the
other C4 documents, serves both sides: ``llama-imatrix -c SEQLEN --chunks SAMPLES`` on it (rows
joined with blank lines) and qconv's ``--data`` with ``--samples SAMPLES --seqlen SEQLEN``.

Rows per file type:

- ``plain``: ``llama-quantize F16 T``; ``imatrix``: ``llama-quantize --imatrix`` with
  llama-imatrix's file;
- ``qconv-imatrix``: ``qconv convert F16.gguf --type T --imatrix`` (llama-imatrix's file, from
  llama-quantize's F16 input): the table says how many tensors are byte-identical to the
  ``imatrix`` row (all, or the bench fails);
- ``awq`` (AWQ + llama.cpp's importance-weighted rounding), ``gptq``, ``awq-gptq``,
  ``awq-gptq-fp`` (AWQ, then GPTQ with fp targets):
  ``qconv quantize --format gguf --type T``; ``recipe``: the shipped ``recipes/gguf-<type>.yaml``
  (``gguf-q4_k_m.yaml``'s stages with ``--type T`` for types without their own). The
  ``qconv-imatrix`` row's PPL is the ``imatrix`` row's when every tensor is identical.

Columns: file size, bits per weight (over all tensors), PPL and Δ vs F16 on both texts, and the
quantize wall time (qconv rows include their calibration). The qconv method rows read the f32 HF
checkpoint (the dequantized Q4_1 weights), llama.cpp's rows its F16 GGUF of it. ``--tensor-errors`` adds, for the
``ffn_down`` tensors (SmolLM2's only rows that fit 256-element super-blocks: the K-quant grids
themselves), each row's output error ``Σ_j imp_j (w - ŵ)²`` relative to ``Σ_j imp_j w²``,
``imp`` the mean squared activation on the held-out text (qconv calibrate), per tensor.

Tools are built once from the llama-cpp-python sdist (:mod:`imatrix`); results are cached in
``CACHE/gguf-quality/<samples>x<seqlen>-c<chunks>/`` (``--fresh`` redoes them).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model  # noqa: E402
from heldout import calibration_file, heldout_text, shared_data  # noqa: E402
from imatrix import Cached, llama_tools, log, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k", "iq4_xs")
ROWS = ("plain", "imatrix", "qconv-imatrix", "awq", "gptq", "awq-gptq", "awq-gptq-fp", "recipe")
LABELS = {"plain": "llama.cpp", "imatrix": "llama.cpp + imatrix", "qconv-imatrix": "qconv convert --imatrix",
          "awq": "qconv AWQ", "gptq": "qconv GPTQ", "awq-gptq": "qconv AWQ + GPTQ",
          "awq-gptq-fp": "qconv AWQ + GPTQ + fp targets", "recipe": "qconv recipe"}
#: the stages of the awq-gptq rows (the shipped recipes' stages are their own)
AWQ_GPTQ = {"awq-gptq": [{"method": "awq"}, {"method": "gptq", "damp": 0.1, "act_order": True}],
            "awq-gptq-fp": [{"method": "awq"}, {"method": "gptq", "damp": 0.1, "act_order": True, "fp_targets": True}]}


def shipped_recipe(qtype: str) -> Path:
    """The type's own shipped recipe, else Q4_K_M's stages (the recipe row passes ``--type``)."""
    own = ROOT / "recipes" / f"gguf-{qtype}.yaml"
    return own if own.is_file() else ROOT / "recipes" / "gguf-q4_k_m.yaml"


def perplexity(tool: Path, model: Path, text: Path, chunks: int, threads: int, log_file: Path) -> float:
    run([str(tool), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks), "-t", str(threads)],
        log_file)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log_file.read_text(errors="replace"))
    if not m:
        raise SystemExit(f"no final PPL in {log_file}")
    return float(m.group(1))


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(identical tensors, tensors) of two GGUF files with the same tensor table."""
    import gguf
    import numpy as np

    ta = {t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in gguf.GGUFReader(str(b)).tensors}
    return sum(ta[n] == tb.get(n) for n in ta), len(ta)


def bits_per_weight(path: Path) -> float:
    import gguf
    import numpy as np

    tensors = gguf.GGUFReader(str(path)).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(np.prod(t.shape)) for t in tensors)


def tensor_errors(files: dict[str, Path], importance: Path) -> dict[str, dict[str, float]]:
    """Per ffn_down tensor and row: ``Σ imp (w - ŵ)² / Σ imp w²`` against the F16 file's weights."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from qconv.checkpoint.imatrix_file import read_imatrix

    imp = read_imatrix(importance).entries

    def weights(path: Path) -> dict[str, np.ndarray]:
        return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1, int(t.shape[0]))
                for t in gguf.GGUFReader(str(path)).tensors if "ffn_down" in t.name}

    ref = weights(files["F16"])
    out: dict[str, dict[str, float]] = {}
    for row, path in files.items():
        if row == "F16":
            continue
        got = weights(path)
        for name, w in ref.items():
            v = imp[name][None, :]
            out.setdefault(name, {})[row] = float((v * (got[name] - w) ** 2).sum() / (v * w ** 2).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--samples", type=int, default=128, help="calibration windows = llama-imatrix chunks")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=100, help="llama-perplexity chunks of 512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tensor-errors", action="store_true", help="per-tensor error tables of ffn_down")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    types, rows = args.types.split(","), args.rows.split(",")
    cache = args.cache.resolve()
    tools = llama_tools(cache, None, args.threads)
    model = example_model(cache)
    f16 = cache / "SmolLM2-135M-Instruct.F16.gguf"
    if not f16.is_file():
        subprocess.run([*QCONV, "convert", str(model), "-o", str(f16), "--type", "f16", "--quiet"], check=True)
    work = cache / "gguf-quality" / f"{args.samples}x{args.seqlen}-c{args.chunks}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    results = Cached(work / "results.json", args.fresh)
    calib = calibration_file(cache / "heldout")
    texts = {"wiki": shared_data() / "wikitext-2-raw-test.txt", "heldout": heldout_text(cache / "heldout")}
    t = str(args.threads)

    imatrix = work / "llama.imatrix.gguf"

    def llama_imatrix() -> dict:
        from qconv.quant.calibration import load_calibration_rows

        text = work / "calibration.txt"
        text.write_text("\n\n".join(load_calibration_rows(str(calib))), encoding="utf-8")
        log("llama-imatrix")
        return {"seconds": run([str(tools["llama-imatrix"]), "-m", str(f16), "-f", str(text), "-c", str(args.seqlen),
                                "--chunks", str(args.samples), "-o", str(imatrix), "--no-ppl", "-t", t],
                               work / "llama-imatrix.log")}

    results.get("llama-imatrix", llama_imatrix)

    def qconv(row: str, qtype: str, out: Path) -> list[str]:
        data = ["--data", str(calib), "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
        if row == "qconv-imatrix":  # from llama-quantize's own input, so the bytes can be compared
            return [*QCONV, "convert", str(f16), "-o", str(out), "--type", qtype, "--imatrix", str(imatrix)]
        if row in ("awq", "gptq"):
            return [*QCONV, "quantize", str(model), "--method", row, "--format", "gguf", "--type", qtype, *data,
                    "-o", str(out)]
        recipe = shipped_recipe(qtype)
        if row in AWQ_GPTQ:
            recipe = work / f"{row}.yaml"
            recipe.write_text(json.dumps({"name": row, "stages": AWQ_GPTQ[row],
                                          "output": {"format": "gguf", "type": qtype}}))
        return [*QCONV, "quantize", str(model), "--recipe", str(recipe), "--type", qtype, *data, "-o", str(out)]

    files: dict[str, dict[str, Path]] = {}
    for qtype in types:
        for row in rows:
            out = work / f"{qtype}.{row}.gguf"

            def make(qtype: str = qtype, row: str = row, out: Path = out) -> dict:
                out.unlink(missing_ok=True)
                if row in ("plain", "imatrix"):
                    cmd = [str(tools["llama-quantize"]), *(["--imatrix", str(imatrix)] if row == "imatrix" else []),
                           str(f16), str(out), qtype.upper(), t]
                else:
                    cmd = qconv(row, qtype, out)
                log(f"{qtype} {row}: {' '.join(cmd[-12:])}")
                return {"seconds": run(cmd, work / f"{qtype}.{row}.log"), "bytes": out.stat().st_size,
                        "bpw": bits_per_weight(out)}

            results.get(f"{qtype}.{row}.make", make)
            files.setdefault(qtype, {})[row] = out
    identical = {q: results.get(f"{q}.identical", lambda q=q: list(same_tensors(d["qconv-imatrix"], d["imatrix"])))
                 for q, d in files.items() if "qconv-imatrix" in d and "imatrix" in d}
    evaluated = {"F16": f16, **{f"{q}.{r}": p for q, d in files.items() for r, p in d.items()}}
    ppl = {}
    for key, path in evaluated.items():
        qtype, _, row = key.partition(".")
        same = identical.get(qtype)
        for name, text in texts.items():
            if row == "qconv-imatrix" and same and same[0] == same[1]:  # the same tensors: the same PPL
                ppl[key, name] = ppl[f"{qtype}.imatrix", name]
                continue
            ppl[key, name] = results.get(f"{key}.ppl.{name}", lambda path=path, text=text, key=key, name=name: perplexity(
                tools["llama-perplexity"], path, text, args.chunks, args.threads, work / f"{key}.ppl.{name}.log"))

    print(f"\nSmolLM2-135M-Instruct, llama-perplexity -c 512 --chunks {args.chunks}; calibration "
          f"{args.samples} x {args.seqlen} tokens of C4 documents; F16: WikiText-2 {ppl['F16', 'wiki']:.3f}, "
          f"held-out C4 {ppl['F16', 'heldout']:.3f}\n")
    print("| type | row | size (bytes) | bpw | WikiText-2 PPL | Δ | held-out PPL | Δ | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for qtype, d in files.items():
        for row in d:
            m = results.data[f"{qtype}.{row}.make"]
            cells = []
            for name in texts:
                p = ppl[f"{qtype}.{row}", name]
                cells += [f"{p:.3f}", f"{100 * (p / ppl['F16', name] - 1):+.2f}%"]
            label = LABELS[row]
            if row == "recipe":
                label += f" ({shipped_recipe(qtype).name})"
            if m.get("note"):
                label += f" [time: {m['note']}]"
            if row == "qconv-imatrix" and qtype in identical:
                label += f" ({identical[qtype][0]}/{identical[qtype][1]} tensors identical to the row above)"
            print(f"| {qtype} | {label} | {m['bytes']:,} | {m['bpw']:.3f} | {' | '.join(cells)} | {m['seconds']:.0f} |")
    for qtype, (same, total) in identical.items():
        if same != total:
            raise SystemExit(f"{qtype}: qconv convert --imatrix differs from llama-quantize --imatrix in "
                             f"{total - same} of {total} tensors")
    if args.tensor_errors:
        imp = work / "heldout.imatrix.gguf"
        if not imp.is_file():
            subprocess.run([*QCONV, "calibrate", str(model), "--data", str(texts["heldout"]), "--samples", "64",
                            "--seqlen", "512", "--format", "imatrix", "-o", str(imp), "--quiet"], check=True)
        for qtype, d in files.items():
            errs = tensor_errors({"F16": f16, **d}, imp)
            print(f"\n{qtype}: ffn_down output error Σ imp·(w - ŵ)² / Σ imp·w² (imp: held-out mean x²), x1e-3\n")
            print("| tensor | " + " | ".join(LABELS[r] for r in d) + " |")
            print("|---|" + "---|" * len(d))
            for name, per in errs.items():
                print(f"| {name} | " + " | ".join(f"{1e3 * per[r]:.3f}" for r in d) + " |")


if __name__ == "__main__":
    main()
