"""Errors a user can fix: their messages name the key or file:line and what was expected, so no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors reported as one clear message instead of a traceback."""


class ConfigError(UserError, ValueError):
    """One or more invalid settings; the message lists each with its key and what was expected."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (and line) or the data key, and what was expected."""


class Diverged(UserError):
    """Training produced non-finite losses, gradients or weights; the message names the step and the values."""


class DiskFull(UserError):
    """A write of the run (its records, logs or trackers) found the disk full; the message says where and how to
    resume."""
