"""Terminal output for the client commands: progress on stderr, results on stdout.

Progress bars only draw when stderr is a terminal, so piping or capturing a command's
output yields just its results.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["progress", "stderr_console", "stdout_console"]

stderr_console = Console(stderr=True)
stdout_console = Console()
if not stdout_console.is_terminal:
    # Piped or captured: no terminal width to fit, so do not truncate tables to 80 columns.
    stdout_console = Console(width=200)


def progress(*, in_bytes: bool = False) -> Progress:
    """A progress display on stderr (drawn only on a terminal); ``in_bytes`` for input
    measured in bytes (file size), records otherwise."""
    amount = TransferSpeedColumn() if in_bytes else MofNCompleteColumn()
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        amount,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        disable=not stderr_console.is_terminal,
        transient=True,
    )
