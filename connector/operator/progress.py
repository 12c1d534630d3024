"""Progress bars for long commands: drawn on a terminal, silent in pipes and files."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click

T = TypeVar("T")


def is_terminal() -> bool:
    """Tell whether both output streams are a terminal, where a progress bar can be redrawn."""
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def progress(items: Iterable[T], label: str, *, length: int | None = None, enabled: bool = True) -> Iterator[Iterable[T]]:
    """Yield `items`, drawing a bar on standard error while they are consumed on a terminal.

    Elsewhere, or when `enabled` is false (for JSON output), the items come back unchanged and
    nothing is printed, so pipes and log files stay free of bar redraws.
    """
    if not enabled or not is_terminal():
        yield items
        return

    with click.progressbar(items, label=label, length=length, file=sys.stderr) as bar:
        yield bar
