"""Progress reporting for long steps: Rich bars on a terminal, silence when asked.

Library functions take ``progress=True|False|Reporter``; the CLI and notebooks get the same
bars (images/s and ETA) without the library knowing who is watching.
"""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


class _Task:
    def __init__(self, progress, task_id, unit):
        self._p, self._id, self.unit = progress, task_id, unit

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._id, n)

    def update(self, **kw) -> None:
        if self._p is not None:
            self._p.update(self._id, **kw)


class Reporter:
    """``with reporter.task("Grad-CAM", total=N, unit="img") as t: t.advance(k)``; plus ``note``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "img"):
        if not self.enabled:
            yield _Task(None, None, unit)
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        with _RateProgress(*columns, console=console, transient=False, unit=unit) as p:
            tid = p.add_task(description, total=total, rate="")
            yield _Task(p, tid, unit)
            if p.tasks[0].total is None:  # an open-ended step shows as done when it is
                p.update(tid, total=1, completed=1)

    def note(self, message: str) -> None:
        if self.enabled:
            console.print(message, highlight=False)


class _RateProgress(Progress):
    """A Progress whose ``rate`` field shows items per second."""

    def __init__(self, *columns, unit="img", **kw):
        super().__init__(*columns, **kw)
        self._unit = unit

    def advance(self, task_id, advance=1):
        super().advance(task_id, advance)
        task = self._tasks[task_id]
        speed = task.speed
        if speed:
            self.update(task_id, rate=f"{speed:,.1f} {self._unit}/s")


def as_reporter(progress) -> Reporter:
    if isinstance(progress, Reporter):
        return progress
    return Reporter(enabled=bool(progress))
