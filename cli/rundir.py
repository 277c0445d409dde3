"""The run directory: what the launcher writes before any worker starts.

    <run.dir>/config.yaml     the fully resolved config the workers read (no interpolations left)
    <run.dir>/overrides.yaml  the command-line overrides of this job
    <run.dir>/env.json        versions, git sha, host, devices, command line
    <run.dir>/LOCK            who runs in it now (host, pid, start time, rendezvous id); flock'ed while they do
A rerun in the same directory keeps the checkpoints; if its config differs, the old one is kept as
config.previous.yaml and the changed keys are printed.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from distrain.cli.console import console
from distrain.trainer import strict_json
from distrain.trainer.config import run_files
from distrain.trainer.config.paths import PKG_PREFIX, is_local
from distrain.trainer.errors import ConfigError, UserError

PACKAGES = ("distrain", "torch", "transformers", "datasets", "hydra-core", "omegaconf", "seqeval", "safetensors")


def absolutize(cfg: DictConfig) -> None:
    """Make local paths absolute, so config.yaml means the same thing from any working directory (workers, a
    rerun, `distrain eval` elsewhere). Hub ids and pkg:// paths stay as they are."""

    def absolute(value: str | None) -> str | None:
        if value is None or value.startswith(PKG_PREFIX):
            return value
        return str(Path(value).expanduser().resolve())

    cfg.run.dir = absolute(cfg.run.dir)
    cfg.data.dir = absolute(cfg.data.dir)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.model.cache_dir = absolute(cfg.model.cache_dir)
    for key in ("name_or_path", "tokenizer"):
        if cfg.model[key] is not None and is_local(cfg.model[key]):  # a folder here, not a Hub id
            cfg.model[key] = absolute(cfg.model[key])
    # other runs' weights (run dirs, checkpoints, exports, model folders: always local)
    for group, key in (("checkpoint", "init_from"), ("model", "init_from"), ("distill", "teacher"),
                       ("dpo", "reference")):  # fmt: skip
        cfg[group][key] = absolute(cfg[group][key])


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) and value else f"{prefix}{key}"))
    return out


def write_run_dir(cfg: DictConfig, overrides: list[str]) -> Path:
    run_dir = Path(cfg.run.dir)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    config_path = run_dir / run_files.CONFIG
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config_path.exists() and config_path.read_text() != resolved:
            before, after = flatten(yaml.safe_load(config_path.read_text())), flatten(yaml.safe_load(resolved))
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            console.print(f"[yellow]{run_dir} had another config; changed keys: {', '.join(changed)}")
            config_path.replace(run_dir / "config.previous.yaml")
        write_atomically(config_path, resolved)
        summary = run_dir / run_files.SUMMARY  # the last invocation's result; this one has none until it ends
        if summary.exists():
            summary.replace(run_dir / run_files.PREVIOUS_SUMMARY)
        write_atomically(run_dir / run_files.OVERRIDES, yaml.safe_dump(overrides, default_flow_style=False))
        write_atomically(run_dir / run_files.ENV, strict_json.dumps(environment(), indent=1))
    except OSError as error:
        raise unwritable(run_dir, error) from None
    return run_dir


def unwritable(run_dir: Path, error: OSError) -> ConfigError:
    """Validation made a folder there, but things change since (a full disk, permissions, a race) and some
    filesystems refuse only later: still a config problem naming run.dir (exit 2), not a traceback."""
    return ConfigError([f"run.dir: cannot make, write or lock the run dir {run_dir}: {error}"])


class RunDirBusy(UserError):
    """Another `distrain train` (not a node of this job) runs in the run dir; the message names it."""


LOCK_FILE = "LOCK"


@contextmanager
def run_dir_lock(run_dir: Path, rdzv_id: str | None) -> Iterator[None]:
    """Hold the run dir for this launcher, across torchrun restarts, until the block ends.

    An flock on <run.dir>/LOCK (released by the kernel when the holder dies, also on NFS, which maps it to a POSIX
    lock; Lustre needs `-o flock`), whose content names the holder. A second launch is refused at once, unless it
    is another node of the same multi-node job (same rendezvous id): those launchers are one run. A lock file
    that still names a holder although nobody holds the lock was left by a process that died: taken over.
    """
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise unwritable(run_dir, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            for _ in range(40):  # the holder may have locked it a moment ago and not yet written its name
                if holder:
                    break
                time.sleep(0.05)
                holder = _holder(path)
            if rdzv_id is not None and holder.get("rdzv_id") == rdzv_id:
                yield  # another node of this job holds it
                return
            raise RunDirBusy(
                f"{run_dir} is in use by another distrain train: host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, started {holder.get('started', '?')}. Wait for it to end, stop it, or "
                "choose another run.dir"
            ) from None
        except OSError as error:  # a filesystem without flock (Lustre without `-o flock`: ENOLCK, EOPNOTSUPP)
            raise unwritable(run_dir, error) from None
        stale = _holder(path)
        if stale:
            console.print(
                f"[yellow]{run_dir}: taking over the lock of a distrain train that ended without releasing it "
                f"(host {stale.get('host')}, pid {stale.get('pid')}, started {stale.get('started')})",
                highlight=False,
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "rdzv_id": rdzv_id}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, strict_json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nothing for the next launch to take over
    finally:
        os.close(fd)  # drops the flock


def holder_now(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the run dir's lock right now (host, pid, started), or None when no launcher runs in it."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    except OSError:
        return None  # a filesystem without flock: unknown, as without a lock file
    finally:
        os.close(fd)  # drops a shared lock taken just now
    return None


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except ValueError:
        return {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}


def write_atomically(path: Path, text: str) -> None:
    """Readers never see half a file: the launchers of a multi-node run write the same run dir at once."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{socket.gethostname()}")
    partial.write_text(text)
    os.replace(partial, path)


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "git_sha": _git_sha(),
        "cpu_count": os.cpu_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
