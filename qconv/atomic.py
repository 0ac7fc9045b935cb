"""Atomic outputs: write into a hidden temp path beside the target, rename when complete.

A failed or interrupted command (exception, Ctrl-C, SIGTERM turned into KeyboardInterrupt by
the CLI) removes the temp path, so users and CI never see a half-written model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qconv.errors import OutputExists


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless forced. Call before any long work starts."""
    if path.exists() and not force:
        raise OutputExists("output exists (pass --force to overwrite)", path)


@contextmanager
def atomic_output(path: Path | str, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temp path to write to; on success it replaces ``path``."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.qconv-tmp-{os.getpid()}"
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.qconv-old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
