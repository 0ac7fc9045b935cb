"""A held-out evaluation text: C4 documents that no calibration in bench/ reads.

The shared C4 sample is split by document: the first :data:`CALIBRATION_DOCS` documents are
the calibration file the quality bench calibrates on (:func:`calibration_file`), the rest are
the held-out text (:func:`heldout_text`), joined with blank lines like WikiText. Perplexity on
it measures what a method does on text it never saw, beside WikiText-2.
"""

from __future__ import annotations

import json
from pathlib import Path

#: documents of the 1,480 in the shared C4 sample used for calibration; the last 296 are held out
CALIBRATION_DOCS = 1184


def shared_data() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _split(out_dir: Path) -> tuple[Path, Path]:
    lines = (shared_data() / "c4-sample.jsonl").read_text().splitlines()
    out_dir.mkdir(parents=True, exist_ok=True)
    calib, held = out_dir / "c4-calibration.jsonl", out_dir / "c4-heldout.txt"
    if not calib.exists():
        calib.write_text("\n".join(lines[:CALIBRATION_DOCS]) + "\n")
    if not held.exists():
        held.write_text("\n\n".join(json.loads(line)["text"] for line in lines[CALIBRATION_DOCS:]) + "\n")
    return calib, held


def calibration_file(out_dir: Path = Path(".cache/heldout")) -> Path:
    return _split(out_dir)[0]


def heldout_text(out_dir: Path = Path(".cache/heldout")) -> Path:
    return _split(out_dir)[1]
