"""Progress display for long stages (rich), silent with ``quiet``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

T = TypeVar("T")


class Progress:
    """``stage(name)`` wraps a step with a spinner and its time; ``track`` shows a bar."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"{name}..."):
            yield
        self.console.print(f"[green]done[/green] {name} ({time.perf_counter() - start:.1f} s)")

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if self.quiet:
            yield from items
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
