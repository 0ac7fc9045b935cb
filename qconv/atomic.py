"""Atomic outputs: write into a hidden temp path beside the target, rename when complete.

A failed or interrupted command (exception, Ctrl-C, SIGTERM turned into KeyboardInterrupt by
the CLI) removes the temp path, so users and CI never see a half-written model.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qconv.errors import DiskFull, OutputExists


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def disk_full(e: BaseException, path: Path, written: int, needed: int | None = None) -> BaseException:
    """``e`` as :class:`DiskFull` when it is the filesystem's ENOSPC (else ``e``); also a
    RuntimeError with less than 1 MiB left: torch.save reports a full disk as its zip writer's
    "unexpected pos" RuntimeError."""
    free = shutil.disk_usage(path.parent).free
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or \
            isinstance(e, RuntimeError) and free < 1 << 20:
        return DiskFull(path, written, free, needed)
    return e


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them to the handlers before it.
    For a write that must not be cut (torch.save turns an exception raised inside it into its
    zip writer's RuntimeError); only the main thread owns the handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless forced. Call before any long work starts."""
    if path.exists() and not force:
        raise OutputExists("output exists (pass --force to overwrite)", path)


@contextmanager
def atomic_output(path: Path | str, force: bool = False, directory: bool = False,
                  needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write to; on success it replaces ``path``. A full disk while
    writing becomes :class:`DiskFull` (the bytes written, the bytes free once the temp path is
    removed, and ``needed``: what the output takes, where the writer knows it)."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.qconv-tmp-{os.getpid()}"
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        written = _size(tmp)
        _remove(tmp)
        full = disk_full(e, path, written, needed)
        if full is not e:
            raise full from None
        raise
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.qconv-old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
