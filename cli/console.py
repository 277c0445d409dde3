"""The launcher's console output."""

from __future__ import annotations

from rich.markup import escape
from rich.panel import Panel

from distrain.trainer.observe.reporting import make_console

console = make_console()
error_console = make_console(stderr=True)


def print_error(title: str, message: str) -> None:
    """A red panel on a terminal; unwrapped plain lines in logs, so paths and messages stay greppable."""
    if error_console.is_terminal:
        error_console.print(
            Panel(escape(message), title=f"[bold red]{escape(title)}", title_align="left", border_style="red")
        )
    else:
        error_console.print(f"error: {title}\n{message}", markup=False, highlight=False, soft_wrap=True)
