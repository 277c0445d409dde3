"""Preprocessed datasets shared by all ranks of a node.

Tokenization runs once per node: local rank 0 builds the `datasets` cache (an Arrow file per split, written by
`Dataset.map(cache_file_name=...)`) in a folder named by a hash of the input files' contents and every setting
that changes the result; the other ranks wait at a barrier and memory-map the same files. A rerun with the same
data and settings skips tokenization entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrain.trainer.config.paths import resolve_path
from distrain.trainer.parallel.distributed import DistEnv

if TYPE_CHECKING:
    from datasets import Dataset

CACHE_FORMAT_VERSION = 1  # bump when the cached columns change
log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what the tokenizer does; its truncation/padding state, which calls mutate, is left out."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["truncation"] = spec["padding"] = None
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def build_once(folder: Path, build: Callable[[Path], None], env: DistEnv, what: str) -> Path:
    """Make `folder` with `build(partial_folder)` on local rank 0 of each node unless it exists; every rank
    waits for it (polling the folder, see wait_for_folder). The folder only takes its final name once complete,
    so an interrupted build is never used."""
    builder = env.local_rank == 0 and not folder.is_dir()
    log.info("%s %s: %s", "building" if builder else "reading", what, folder)
    if builder:
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        build(partial)
        try:
            partial.rename(folder)
        except OSError:  # another node or job finished the same folder first: theirs is identical
            shutil.rmtree(partial, ignore_errors=True)
    else:
        wait_for_folder(folder, what)
    return folder


BUILD_WAIT_LIMIT_S = 6 * 3600  # tokenizing a large corpus on one rank can take hours; a dead builder ends the job


def wait_for_folder(folder: Path, what: str, poll_s: float = 0.5, report_every_s: float = 60.0) -> None:
    """Wait for local rank 0 to finish `folder` by watching the file system, not in a collective: a build longer
    than the process group's timeout (launcher.collective_timeout_s) must not fail the run."""
    started = reported = time.monotonic()
    while not folder.is_dir():
        waited = time.monotonic() - started
        if waited > BUILD_WAIT_LIMIT_S:
            raise TimeoutError(f"{what} ({folder}) was not built by local rank 0 within {BUILD_WAIT_LIMIT_S} s")
        if time.monotonic() - reported >= report_every_s:
            log.info("waiting for local rank 0 to build %s: %.0f s so far", what, waited)
            reported = time.monotonic()
        time.sleep(poll_s)


def cached_splits(
    cache_dir: str, namespace: str, key: dict[str, Any], build: Callable[[Path], None], env: DistEnv
) -> dict[str, Dataset]:
    """Load the splits cached under `key`, calling `build(folder)` on local rank 0 first if they are missing.
    `build` writes `<split>.arrow` files (Dataset.map with cache_file_name) into the folder it is given."""
    key = {"version": CACHE_FORMAT_VERSION, **key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def build_and_describe(partial: Path) -> None:
        build(partial)
        (partial / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))

    from datasets import Dataset

    folder = build_once(resolve_path(cache_dir) / namespace / digest, build_and_describe, env, "the tokenized cache")
    return {path.stem: Dataset.from_file(str(path)) for path in sorted(folder.glob("*.arrow"))}
