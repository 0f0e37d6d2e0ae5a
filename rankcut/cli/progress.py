"""Progress for logs: plain periodic lines on stderr when it is not a terminal (cluster jobs, nohup, CI).

A rich progress bar redraws itself in place, which a log file cannot show; ``LineProgress`` offers the
calls the commands make on a rich ``Progress`` (``add_task``, ``update``, ``advance``, ``remove_task``)
and prints one line per task at most every ``RANKCUT_PROGRESS_SECONDS`` (default 30 s), plus the task's
last step once it has printed anything, so a long job shows it is alive and a short one stays silent.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

INTERVAL_ENV = "RANKCUT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def interval() -> float:
    """Seconds between lines, from ``RANKCUT_PROGRESS_SECONDS`` (0: every step, for tests)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def clock(seconds: float) -> str:
    """``H:MM:SS``, as rich's progress columns show time."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class _Task:
    description: str
    total: int | None
    info: str
    start: float
    last: float  # when the last line was printed (or the task started)
    completed: int = 0
    printed: bool = False


class LineProgress:
    """Plain progress lines (``epoch 1/3: step 120/500 (24%), loss 0.41, 2,100 img/s, 0:00:31, ETA 0:01:40``)."""

    def __init__(self, every: float | None = None, stream=None):
        self.every = interval() if every is None else every
        self.stream = stream or sys.stderr
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.tasks.clear()

    def add_task(self, description: str, total: int | None = None, info: str = "", **_) -> int:
        task_id = max(self.tasks, default=-1) + 1
        now = time.monotonic()
        self.tasks[task_id] = _Task(description, total, info, start=now, last=now)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, advance: float = 0, info: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        task.completed += int(advance)
        if info is not None:
            task.info = info
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        if now - task.last >= self.every or (done and task.printed):
            task.last, task.printed = now, True
            print(self.line(task, now), file=self.stream, flush=True)

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    @staticmethod
    def line(task: _Task, now: float) -> str:
        elapsed = now - task.start
        parts = [f"{task.description}: step {task.completed:,}"]
        if task.total:
            parts[0] += f"/{task.total:,} ({100 * task.completed / task.total:.0f}%)"
        if task.info:  # finetune's: loss, accuracy, images per second
            parts.append(task.info.replace("  ", ", "))
        elif elapsed > 0:
            parts.append(f"{task.completed / elapsed:,.1f} batches/s")
        parts.append(f"elapsed {clock(elapsed)}")
        if task.total and 0 < task.completed < task.total:
            parts.append(f"ETA {clock(elapsed / task.completed * (task.total - task.completed))}")
        return ", ".join(parts)
