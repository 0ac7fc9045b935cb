"""Progress reporting that is visible to people and silent for pipelines.

A rich progress bar on stderr when stderr is a terminal and the user did not ask for quiet;
a no-op otherwise, so CI logs and ``--json`` stdout stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int | None, quiet: bool = False) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``; call it once per unit of work."""
    if quiet or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
