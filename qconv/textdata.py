"""Load text for perplexity and calibration from local files.

Plain text is read verbatim (WikiText evaluation files are pre-joined); structured files
(json/jsonl/parquet/csv) go through ``datasets`` and their ``text_field`` rows are joined with
blank lines, as the GPTQ/AWQ evaluation scripts join dataset rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qconv.errors import CorruptFile, InputNotFound, InvalidOption

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(path: Path | str, text_field: str = "text") -> list[str]:
    """The text rows of a local file (one row for a plain-text file)."""
    return [str(t) for t in load_records(path, text_field)]


def load_records(path: Path | str, field: str = "text") -> list[Any]:
    """The values of ``field`` in a local file's rows, as stored (a chat's ``messages`` stay lists
    of dicts); a plain-text file is one row of text."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound("text file not found", path)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise CorruptFile(f"not UTF-8 text ({e})", path) from None
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in many types
        raise CorruptFile(f"cannot load as {builder}: {str(e).splitlines()[0]}", path) from None
    if field not in ds.column_names:
        raise InvalidOption(f"no field {field!r} (fields: {', '.join(ds.column_names)}); use --text-field", path)
    return list(ds[field])


def load_text(path: Path | str, text_field: str = "text") -> str:
    """All rows of ``path`` as one string, rows joined by a blank line."""
    return "\n\n".join(load_rows(path, text_field))
