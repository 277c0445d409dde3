"""The launcher's console output."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

# In logs and pipes (no terminal to measure), tables get room instead of rich's default 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
error_console = Console(stderr=True)


def print_error(title: str, message: str) -> None:
    """A red panel on a terminal; unwrapped plain lines in logs, so paths and messages stay greppable."""
    if error_console.is_terminal:
        error_console.print(
            Panel(escape(message), title=f"[bold red]{escape(title)}", title_align="left", border_style="red")
        )
    else:
        error_console.print(f"error: {title}\n{message}", markup=False, highlight=False, soft_wrap=True)
