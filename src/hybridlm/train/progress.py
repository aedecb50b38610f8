"""The training progress bar: step count, loss, tokens/s and expert balance, on a terminal only.

It follows ``hybridlm.progress``: nothing is drawn unless stderr is a terminal, and
``HYBRIDLM_PROGRESS=0`` turns it off.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from hybridlm.progress import _is_enabled


class TrainProgress:
    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool = True) -> None:
        self.description, self.total, self.completed, self.enabled = description, total, completed, enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> TrainProgress:
        if not (self.enabled and _is_enabled()):
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, status="")
        return self

    def update(self, step: int, loss: float, tokens_per_second: float, expert_max_over_mean: float | None) -> None:
        if self._bar is None:
            return
        status = f"loss {loss:.4f}  {tokens_per_second:,.0f} tok/s"
        if expert_max_over_mean is not None:
            status += f"  experts max/mean {expert_max_over_mean:.2f}"
        self._bar.update(self._task, completed=step, status=status)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, traceback)
            self._bar = None
