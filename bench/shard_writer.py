"""Peak memory of writing one large safetensors shard: qconv's streaming writer vs
``safetensors.torch.save_file`` (which needs the whole shard in memory), side by side.

Each side runs in its own child process that produces ``--gb`` of float32 tensors of
``--tensor-mb`` each (as a checkpoint reader hands them over, one at a time) and writes them
into one file; the table gives each child's wall time and peak RSS (``ru_maxrss``).

    python bench/shard_writer.py --gb 4 --tensor-mb 256 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
from pathlib import Path
side, out, gb, mb = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
n, rows = int(gb * 1024 / mb), int(mb * 2**20 / 4 / 1024)
t0 = time.perf_counter()
if side == "qconv":
    from qconv.checkpoint.safetensors_file import SafetensorsFileWriter
    w = SafetensorsFileWriter(out, {"format": "pt"})
    for i in range(n):
        w.add(f"t{i:04d}", torch.full((rows, 1024), float(i)))
    w.close()
else:
    from safetensors.torch import save_file
    save_file({f"t{i:04d}": torch.full((rows, 1024), float(i)) for i in range(n)}, str(out), metadata={"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="shard size in GiB")
    parser.add_argument("--tensor-mb", type=float, default=256.0)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (needs 2x --gb free)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for side in ("safetensors.save_file", "qconv"):
            out = Path(tmp) / f"{side}.safetensors"
            res = subprocess.run([sys.executable, "-c", CHILD, "qconv" if side == "qconv" else "st", str(out),
                                  str(args.gb), str(args.tensor_mb)], capture_output=True, text=True, check=True)
            rows.append((side, json.loads(res.stdout.strip().splitlines()[-1])))
            out.unlink()
    base = rows[0][1]["peak_gb"]
    print(f"one {args.gb:g} GiB shard of {args.tensor_mb:g} MiB float32 tensors")
    print("| writer | wall | peak RSS | RSS vs save_file |")
    print("|---|---|---|---|")
    for side, r in rows:
        print(f"| {side} | {r['seconds']:.1f} s | {r['peak_gb']:.2f} GiB | {r['peak_gb'] / base:.2f}x |")


if __name__ == "__main__":
    main()
