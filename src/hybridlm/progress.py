"""Progress on stderr for work that takes more than a couple of seconds (loading, converting, profiling).

One helper for every long job, so they all look alike and all stay quiet where nobody watches:
nothing is drawn unless stderr is a terminal, and ``HYBRIDLM_PROGRESS=0`` turns it off.

    with progress("loading weights", total=len(names)) as advance:
        for name in names:
            ...
            advance()
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _is_enabled() -> bool:
    if os.environ.get("HYBRIDLM_PROGRESS", "").strip() in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (or spinner when ``total`` is None); yields ``advance(steps=1)``."""
    if not _is_enabled():
        yield lambda steps=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda steps=1: bar.advance(task, steps)
