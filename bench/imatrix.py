"""qconv's importance matrix, checked with llama.cpp's own tools on the example model.

    python bench/imatrix.py [--cache .cache] [--samples 128] [--seqlen 512] [--chunks 100]
                            [--types Q4_K_M,Q4_0] [--llama-src DIR] [--fresh]

1. ``qconv calibrate MODEL --data c4-sample.jsonl --samples N --seqlen 512 --format imatrix``;
2. ``llama-imatrix`` on the same text (the rows joined as qconv joins them; its first N chunks
   of 512 tokens), for comparison, and the cosine similarity of the two files' per-channel
   mean x² for every tensor they share;
3. ``llama-quantize --imatrix`` of the F16 GGUF to each type with no imatrix, with qconv's and
   with llama-imatrix's; exit 0 and "loaded <n> importance matrix entries" are required;
4. ``llama-perplexity -c 512 --chunks C -t 2`` on the WikiText-2 test text (never used for
   calibration) of every file; a markdown table of PPL and Δ vs F16 is printed, next to the
   numbers llama.cpp's peers measured with the same protocol.

llama-cpp-python's Python API cannot pass an imatrix to ``llama_model_quantize`` (a C++ map
pointer), so the ``llama-quantize``, ``llama-imatrix`` and ``llama-perplexity`` tools are built
once from the llama.cpp sources vendored in the llama-cpp-python 0.3.36 sdist (the version the
tests pin; ``pip download --no-binary``) and cached in ``CACHE/llama-tools``. Results are
cached in ``CACHE/imatrix-bench/<samples>x<seqlen>-c<chunks>/`` so a rerun only redoes what is
missing (``--fresh`` redoes everything).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import QCONV, example_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST_DIR = "llama_cpp_python-0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
#: llama.cpp's peers, same protocol (ctx 512, 100 chunks of wikitext-2-raw-test, imatrix from c4).
REFERENCE = {("F16", None): 23.005, ("Q4_K_M", None): 24.282, ("Q4_K_M", "llama-imatrix"): 23.683,
             ("Q4_0", None): 28.560, ("Q4_0", "llama-imatrix"): 25.346}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llama_source(cache: Path, given: Path | None) -> Path:
    """A llama.cpp source tree: ``given``, a copy already unpacked in /tmp/lcpp, or the sdist's."""
    candidates = [given] if given else [Path("/tmp/lcpp") / SDIST_DIR / "vendor/llama.cpp",
                                        cache / "llama-src" / SDIST_DIR / "vendor/llama.cpp"]
    for c in candidates:
        if c and (c / "CMakeLists.txt").is_file():
            return c
    if given:
        raise SystemExit(f"{given}: no llama.cpp CMakeLists.txt")
    dest = cache / "llama-src"
    dest.mkdir(parents=True, exist_ok=True)
    log(f"downloading the {LLAMA_CPP_PYTHON} sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                    "-d", str(dest), LLAMA_CPP_PYTHON], check=True)
    with tarfile.open(next(dest.glob(f"{SDIST_DIR}.tar.gz"))) as tf:
        tf.extractall(dest, filter="data")
    return dest / SDIST_DIR / "vendor/llama.cpp"


def llama_tools(cache: Path, src: Path | None, jobs: int) -> dict[str, Path]:
    """The three tools, built once (statically linked) and copied to ``cache/llama-tools``."""
    out = cache / "llama-tools"
    tools = {t: out / t for t in TOOLS}
    if all(p.is_file() for p in tools.values()):
        return tools
    root = llama_source(cache, src)
    build = root / "build"
    if not (build / "CMakeCache.txt").is_file():  # an existing build dir is reused as configured
        log(f"configuring llama.cpp in {build}")
        subprocess.run(["cmake", "-S", str(root), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
    log(f"building {', '.join(TOOLS)} (-j{jobs})")
    subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, f"-j{jobs}"], check=True,
                   stdout=subprocess.DEVNULL)
    out.mkdir(parents=True, exist_ok=True)
    for t, dst in tools.items():
        shutil.copy2(build / "bin" / t, dst)
    return tools


def run(cmd: list[str], log_file: Path) -> float:
    """Run a tool with its output in ``log_file``; wall seconds. Fails loudly with the log's tail."""
    t0 = time.perf_counter()
    with log_file.open("w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise SystemExit(f"{' '.join(cmd)}\nexit {res.returncode}; log {log_file}:\n{tail}")
    return time.perf_counter() - t0


class Cached:
    """JSON results in the work dir: each step runs once unless --fresh."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.data: dict = {} if fresh or not path.is_file() else json.loads(path.read_text())

    def get(self, key: str, fn):
        if key not in self.data:
            self.data[key] = fn()
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def imatrix_similarity(a: Path, b: Path) -> dict[str, float]:
    """Cosine similarity of the per-channel mean x² of two imatrix files, over the tensors both hold."""
    import gguf
    import numpy as np

    def load(p: Path) -> dict[str, np.ndarray]:
        t = {x.name: np.asarray(x.data, dtype=np.float64).reshape(-1) for x in gguf.GGUFReader(str(p)).tensors}
        return {n[:-len(".in_sum2")]: t[n] / t[n[:-len(".in_sum2")] + ".counts"][0]
                for n in t if n.endswith(".in_sum2")}

    ea, eb = load(a), load(b)
    shared = sorted(set(ea) & set(eb))
    cos = {n: float(ea[n] @ eb[n] / (np.linalg.norm(ea[n]) * np.linalg.norm(eb[n]))) for n in shared}
    worst = min(cos, key=cos.get)
    return {"shared": len(shared), "only_a": len(set(ea) - set(eb)), "only_b": len(set(eb) - set(ea)),
            "cos_min": cos[worst], "cos_min_tensor": worst, "cos_median": float(np.median(list(cos.values())))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--data", type=Path, default=SHARED / "c4-sample.jsonl")
    parser.add_argument("--text", type=Path, default=SHARED / "wikitext-2-raw-test.txt")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows (qconv) = chunks (llama-imatrix)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=100, help="llama-perplexity chunks of 512")
    parser.add_argument("--types", default="Q4_K_M,Q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-src", type=Path, default=None, help="llama.cpp source tree to build the tools from")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    args = parser.parse_args()
    t_start = time.perf_counter()
    cache = args.cache.resolve()
    tools = llama_tools(cache, args.llama_src, args.threads)
    model = example_model(cache)
    f16 = cache / "SmolLM2-135M-Instruct.F16.gguf"
    if not f16.is_file():
        subprocess.run([*QCONV, "convert", str(model), "-o", str(f16), "--type", "f16", "--quiet"], check=True)
    work = cache / "imatrix-bench" / f"{args.samples}x{args.seqlen}-c{args.chunks}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    results = Cached(work / "results.json", args.fresh)
    t = str(args.threads)

    # 1. the two importance matrices, from the same text
    imat = {"qconv": work / "qconv.imatrix.gguf", "llama-imatrix": work / "llama.imatrix.gguf"}

    def qconv_imatrix() -> dict:
        cmd = [*QCONV, "calibrate", str(model), "--data", str(args.data), "--samples", str(args.samples),
               "--seqlen", str(args.seqlen), "--format", "imatrix", "-o", str(imat["qconv"]), "--force",
               "--device", "cpu", "--json"]
        log("qconv calibrate: " + " ".join(cmd[2:]))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        (work / "qconv-calibrate.log").write_text(res.stderr)
        if res.returncode != 0:
            raise SystemExit(f"qconv calibrate failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return {"seconds": time.perf_counter() - t0, **json.loads(res.stdout)}

    def llama_imatrix() -> dict:
        from qconv.quant.calibration import load_calibration_rows

        text = work / "calibration.txt"
        text.write_text("\n\n".join(load_calibration_rows(str(args.data))), encoding="utf-8")
        cmd = [str(tools["llama-imatrix"]), "-m", str(f16), "-f", str(text), "-c", str(args.seqlen),
               "--chunks", str(args.samples), "-o", str(imat["llama-imatrix"]), "--no-ppl", "-t", t]
        log("llama-imatrix: " + " ".join(cmd[1:]))
        return {"seconds": run(cmd, work / "llama-imatrix.log")}

    calib = {"qconv": results.get("calibrate.qconv", qconv_imatrix),
             "llama-imatrix": results.get("calibrate.llama-imatrix", llama_imatrix)}
    sim = results.get("similarity", lambda: imatrix_similarity(imat["qconv"], imat["llama-imatrix"]))

    # 2. quantize with and without each, checking llama-quantize loaded the entries
    files: list[tuple[str, str | None, Path]] = [("F16", None, f16)]
    for qtype in args.types.split(","):
        for source in (None, "qconv", "llama-imatrix"):
            out = work / f"{qtype}{'' if source is None else '.' + source}.gguf"

            def quantize(qtype=qtype, source=source, out=out) -> dict:
                cmd = [str(tools["llama-quantize"])] + (["--imatrix", str(imat[source])] if source else [])
                cmd += [str(f16), str(out), qtype, t]
                log("llama-quantize: " + " ".join(cmd[1:]))
                log_file = work / f"{out.stem}.quantize.log"
                secs = run(cmd, log_file)
                m = re.search(r"loaded (\d+) importance matrix entries from .* computed on (\d+) chunks",
                              log_file.read_text(errors="replace"))
                if source and not m:
                    raise SystemExit(f"llama-quantize did not report loading {imat[source]} (see {log_file})")
                return {"seconds": secs, "entries": int(m.group(1)) if m else 0,
                        "chunks": int(m.group(2)) if m else 0, "bytes": out.stat().st_size}

            files.append((qtype, source, out))
            q = results.get(f"quantize.{out.stem}", quantize)
            if source == "qconv" and q["entries"] != calib["qconv"]["modules"]:
                raise SystemExit(f"llama-quantize loaded {q['entries']} entries, qconv wrote {calib['qconv']['modules']}")
            if not out.is_file():
                raise SystemExit(f"{out} is missing (rerun with --fresh)")

    # 3. perplexity of every file
    ppl: dict[str, dict] = {}
    for qtype, source, path in files:
        def perplexity(path=path) -> dict:
            cmd = [str(tools["llama-perplexity"]), "-m", str(path), "-f", str(args.text), "-c", "512",
                   "--chunks", str(args.chunks), "-t", t]
            log("llama-perplexity: " + " ".join(cmd[1:]))
            log_file = work / f"{path.stem}.ppl.log"
            secs = run(cmd, log_file)
            m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log_file.read_text(errors="replace"))
            if not m:
                raise SystemExit(f"no final PPL in {log_file}")
            return {"seconds": secs, "ppl": float(m.group(1)), "err": float(m.group(2))}

        ppl[path.stem] = results.get(f"ppl.{path.stem}", perplexity)

    base = ppl[f16.stem]["ppl"]
    print(f"llama.cpp perplexity, {args.text.name}, ctx 512, first {args.chunks} chunks; imatrix from "
          f"{args.data.name} ({args.samples} x {args.seqlen} tokens)\n")
    print("| model | imatrix | PPL | Δ vs F16 | llama.cpp peers (PPL) | size (MB) |")
    print("|---|---|---|---|---|---|")
    for qtype, source, path in files:
        r = ppl[path.stem]
        ref = REFERENCE.get((qtype, source))
        delta = "—" if qtype == "F16" else f"{r['ppl'] - base:+.3f}"
        print(f"| {qtype} | {source or 'none'} | {r['ppl']:.3f} ± {r['err']:.3f} | {delta} | "
              f"{'—' if ref is None else f'{ref:.3f}'} | {path.stat().st_size / 1e6:.1f} |")
    print(f"\nimatrix computation: qconv calibrate {calib['qconv']['seconds']:.0f}s "
          f"({calib['qconv']['modules']} entries, {calib['qconv']['tokens']:,} tokens), "
          f"llama-imatrix {calib['llama-imatrix']['seconds']:.0f}s")
    print(f"per-channel mean x², qconv vs llama-imatrix: {sim['shared']} shared tensors "
          f"(only qconv {sim['only_a']}, only llama-imatrix {sim['only_b']}), cosine median {sim['cos_median']:.4f}, "
          f"min {sim['cos_min']:.4f} ({sim['cos_min_tensor']})")
    steps = sum(v["seconds"] for k, v in results.data.items() if isinstance(v, dict) and "seconds" in v)
    print(f"tool time {steps:.0f}s in all (calibrate, quantize, perplexity); this run {time.perf_counter() - t_start:.0f}s "
          f"wall, cached steps not rerun ({work})")


if __name__ == "__main__":
    main()
