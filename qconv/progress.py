"""Progress reporting that is visible to people and to CI logs, and silent for pipelines.

A rich progress bar on stderr when stderr is a terminal; off a terminal (a CI log) a plain line
per unit of work on stderr, so a 40-minute run shows that it is alive and how fast it goes;
nothing with ``quiet``. stdout (``--json``) is never touched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int | None, quiet: bool = False) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``; call it once per unit of work."""
    if quiet:
        yield lambda: None
        return
    if not sys.stderr.isatty():
        yield _plain_lines(description, total)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _plain_lines(description: str, total: int | None) -> Callable[[], None]:
    """``advance()`` printing ``description: 3/30 (41 s)`` to stderr, flushed at once: every
    unit up to 100 of them (a model's layers), else every 5% (a GGUF's tensors)."""
    start, done = time.perf_counter(), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if total and total > 100 and done != total and done * 20 // total == (done - 1) * 20 // total:
            return
        of = f"/{total}" if total else ""
        # one write per line: processes sharing the stream (torchrun's ranks) do not split it
        sys.stderr.write(f"{description}: {done}{of} ({time.perf_counter() - start:.0f} s)\n")
        sys.stderr.flush()

    return advance
