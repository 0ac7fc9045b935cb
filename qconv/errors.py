"""User-facing failures.

Every problem a user can cause (bad path, corrupt file, unsupported model, bad option) is
raised as a :class:`QconvError` subclass. The CLI prints ``error: <message>`` on one line
and exits with the class's ``exit_code``; anything else is an internal failure (exit 1).
CI pipelines rely on that split: 2 means "fix your input", 1 means "file a bug".
"""

from __future__ import annotations

from pathlib import Path


class QconvError(Exception):
    """Base class: a failure the user can fix. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputNotFound(QconvError):
    """A path given on the command line does not exist or is empty."""


class CorruptFile(QconvError):
    """A file exists but cannot be parsed: truncated, bad magic, bad header."""


class UnsupportedModel(QconvError):
    """The checkpoint is readable but describes an architecture qconv does not handle."""


class CheckpointMismatch(QconvError):
    """Tensors do not agree with the config (missing, unexpected, wrong shape)."""


class MissingTokenizer(QconvError):
    """A command needs a tokenizer and the model has none."""


class OutputExists(QconvError):
    """The output path exists and --force was not given."""


class InvalidOption(QconvError):
    """An option value is impossible (unknown dtype, bad context length, ...)."""


class DiskFull(QconvError):
    """The output's filesystem filled up while writing. Exit code 4: nothing is wrong with the
    input; free space (or write elsewhere) and run again, with ``--resume`` for a layer run."""

    exit_code = 4

    def __init__(self, path: str | Path, written: int, free: int, needed: int | None = None) -> None:
        need = f"; the output needs about {needed:,} bytes" if needed else ""
        super().__init__(f"no space left on the device ({written:,} bytes written, {free:,} bytes free{need})", path)
