"""How long work shows itself, for the command line and the Python API: a rich progress display on a terminal or in
a notebook, plain lines where output is piped (logs, CI, Slurm), and consoles that never wrap a piped line.

Work reports progress through a callback `(description, done, total)`; `shown(unit, console)` makes one. With rich,
this module and cli.py are the only ones that import it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Update = Callable[[str, int, int], None]  # (description, steps done, steps total)
PIPED_WIDTH = 10_000  # a piped console's width: no store path broken over lines, no run name cut to "..."


def console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr): the terminal's width on a terminal (or COLUMNS where set), else wide
    enough that nothing is wrapped or truncated."""
    stream = sys.stderr if stderr else sys.stdout
    interactive = stream.isatty() or "COLUMNS" in os.environ
    return Console(stderr=stderr) if interactive else Console(stderr=stderr, width=PIPED_WIDTH)


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} {self.unit}/s")


def _plain(out: Console) -> Update:
    """Each task as a line when it starts, at each tenth of its way and when it ends: a long command is never silent."""
    reported: dict[str, int] = {}
    started: dict[str, float] = {}

    def update(name: str, done: int, total: int) -> None:
        step = max(total // 10, 1)
        last = reported.get(name)
        if last is not None and done // step == last // step and not (done >= total > last):
            return
        reported[name] = done
        now = time.monotonic()
        elapsed = now - started.setdefault(name, now)
        out.print(f"{name}: {done}/{total} ({elapsed:.0f} s)", highlight=False, soft_wrap=True)

    return update


def _silent(name: str, done: int, total: int) -> None:
    return None


@contextmanager
def shown(unit: str, out: Console, plain: bool = True) -> Iterator[Update]:
    """A progress callback for the work inside the block: bars on a terminal or in a notebook; elsewhere plain
    lines, or nothing when not `plain` (the API's default outside a terminal or notebook: tests stay quiet)."""
    if not (out.is_terminal or out.is_jupyter):
        yield _plain(out) if plain else _silent
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=out, transient=False) as progress:
        tasks: dict[str, object] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done, total=total)

        yield update
