"""Paths in configs: ordinary paths, `~`, and `pkg://<package>/<sub/path>` for data and weights installed as
Python packages (the bundled MiniLM and WNUT-16), which keeps config.yaml valid on any machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PKG_PREFIX = "pkg://"


def resolve_path(value: str) -> Path:
    if value.startswith(PKG_PREFIX):
        package, _, sub = value[len(PKG_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            # A path that does not exist; validation reports it with its key.
            return Path(f"<package {package!r} is not installed>") / sub
        return Path(next(iter(spec.submodule_search_locations))) / sub
    return Path(value).expanduser()


def is_local(value: str) -> bool:
    """True for values that name a folder on disk rather than a Hugging Face Hub id."""
    return value.startswith((PKG_PREFIX, "/", "./", "../", "~")) or Path(value).expanduser().exists()
