"""Progress that shows both in a terminal and in a log.

rich's live bars redraw in place; when stdout is not a terminal (``aiflow family build > log``, CI,
``make demo | tee``) rich draws nothing until the end, so a 10-minute step looks hung. Everything
long in aiflow-fl therefore uses :func:`progress_bar` and :func:`stage`:

* in a terminal, :func:`progress_bar` is an ordinary ``rich.progress.Progress``;
* otherwise it prints one plain, timestamped line when a task starts, at most every ``log_every_s``
  seconds while it advances, and when it completes (``[08:41:02] training branches: 30/60 (50%), 45 s``);
* :func:`stage` prints one line when a stage starts and one with its duration when it ends, in both
  cases (the stage lines are what a person scrolling a log looks for).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.errors import MarkupError
from rich.progress import Progress, TaskID
from rich.text import Text

DEFAULT_LOG_EVERY_S = 20.0


def plain_line(description: str, completed: float, total: float | None, elapsed_s: float) -> str:
    """The text of one log line for a task (no timestamp): ``name: 30/60 (50%), 45 s``."""
    try:
        name = Text.from_markup(description).plain
    except MarkupError:  # a description with brackets that are not markup
        name = description
    if total:
        return f"{name}: {completed:g}/{total:g} ({100.0 * completed / total:.0f}%), {elapsed_s:.0f} s"
    return f"{name}: {completed:g} done, {elapsed_s:.0f} s"


class LoggedProgress(Progress):
    """A rich Progress that also logs plain lines when its console is not a terminal (module doc)."""

    def __init__(self, *columns: Any, log_every_s: float = DEFAULT_LOG_EVERY_S, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.log_every_s = log_every_s
        self._logged: dict[TaskID, float] = {}  # task -> perf_counter of its last log line
        self._finished: set[TaskID] = set()

    @property
    def logs_lines(self) -> bool:
        return not self.console.is_terminal and not self.disable

    def _log(self, task_id: TaskID, force: bool = False) -> None:
        if not self.logs_lines:
            return
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return
            now = time.perf_counter()
            done = task.total is not None and task.completed >= task.total
            if done and task_id in self._finished:
                return
            if not (force or done or now - self._logged.get(task_id, 0.0) >= self.log_every_s):
                return
            self._logged[task_id] = now
            if done:
                self._finished.add(task_id)
            text = plain_line(task.description, task.completed, task.total, task.elapsed or 0.0)
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stdout, flush=True)

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        with self._lock:
            self._logged[task_id] = time.perf_counter()
        if self.logs_lines:
            print(f"[{time.strftime('%H:%M:%S')}] {plain_line(description, 0, kwargs.get('total', args[1] if len(args) > 1 else 100.0), 0.0)}",
                  file=sys.stdout, flush=True)
        return task_id

    def update(self, task_id: TaskID, *args: Any, **kwargs: Any) -> None:
        super().update(task_id, *args, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)


def progress_bar(*columns: Any, **kwargs: Any) -> LoggedProgress:
    """``rich.progress.Progress(*columns, **kwargs)`` that also logs plain lines outside a terminal."""
    return LoggedProgress(*columns, **kwargs)


@contextmanager
def stage(name: str, console: Console | None = None) -> Iterator[None]:
    """One line when ``name`` starts and one with its wall time when it ends (or fails)."""
    console = console or Console()
    start = time.perf_counter()
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {name} ...", highlight=False)
    try:
        yield
    except BaseException:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {name}: failed after {time.perf_counter() - start:.1f} s", highlight=False)
        raise
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {name}: done in {time.perf_counter() - start:.1f} s", highlight=False)
