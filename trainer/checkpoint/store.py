"""Checkpoints with torch.distributed.checkpoint (DCP), and the final Hugging Face export.

Layout: `<run.dir>/checkpoints/step_<N>/` holds DCP shards of the model and optimizer (keyed by parameter name,
so they load into any world size or wrapping), each rank's RNG state, `trainer_state.json` (step, best metric,
scheduler) and a `COMPLETE` marker. A checkpoint is written as `step_<N>.partial/` and renamed only after every
rank finished and the marker is in, so a crash mid-save leaves nothing that looks loadable.

Integrity: the marker records the size and SHA-256 of every other file of the checkpoint. Resume verifies the newest
checkpoint against it and falls back to the newest good one; a damaged checkpoint is renamed `step_<N>.damaged`
(kept for inspection, never deleted). `distrain eval`/`predict` refuse a damaged checkpoint, naming the file. A
write that fails (a full disk, no permission) removes its partial folder and stops the run, naming the path.

Loading is restricted to data: tensors come through DCP's weights-only path, other values (optimizer
hyper-parameters) through `torch.load(weights_only=True)`, and DCP's pickled `.metadata` through an unpickler that
only admits DCP's own metadata types, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from distrain.trainer import strict_json
from distrain.trainer.config import run_files
from distrain.trainer.errors import UserError
from distrain.trainer.parallel.distributed import DistEnv

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


def rank_state_file(rank: int) -> str:
    return f"rank{rank}_state.safetensors"


def read_rank_tensors(path: Path, rank: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """This rank's own tensors of checkpoint `path`, or None when it has none."""
    from safetensors.torch import load_file

    file = path / rank_state_file(rank)
    return load_file(file, device=str(device)) if file.is_file() else None


# --- safe loading ----------------------------------------------------------------------------------------------
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    _builtins = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool"}

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module == "builtins" and name in self._builtins)
            or (module == "collections" and name == "OrderedDict")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
            or (module == "torch.serialization" and name == "_get_layout")  # maps a layout's name to the layout
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), _TORCH_VALUES)))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: not a DCP type, refused")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling admits only DCP's own types (mirrors the parent method)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP loads non-tensor values with full pickle; ours are plain numbers and names, so weights_only fits."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _load(state: dict[str, Any], path: Path) -> None:
    # no_dist: `distrain eval` loads in a single process without a process group.
    no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():  # DCP warns that it "assumes" the single process that no_dist asks for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=WeightsOnlyLoadPlanner(), no_dist=no_dist)


# --- integrity -------------------------------------------------------------------------------------------------
class CheckpointDamaged(UserError):
    """A checkpoint's files do not match the digests its COMPLETE marker recorded; the message names the file."""


class CheckpointWriteFailed(UserError):
    """Writing a checkpoint failed (disk full, permission); the message names the path and the size needed."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "sha256"}} of every file in `folder` but the marker, read back from disk."""
    files = [path for path in sorted(folder.iterdir()) if path.is_file() and path.name != MARKER]
    return {path.name: {"size": path.stat().st_size, "sha256": _sha256(path)} for path in files}


def damage(folder: Path) -> str | None:
    """Why `folder` cannot be trusted (a missing, unreadable or digest-less marker, a missing file, a size or digest
    that differs), or None when every file matches its recorded digest."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"{folder} is incomplete: no {MARKER} marker (its save was interrupted)"
    # A marker without digests proves nothing about the files (a garbled write, or an older distrain's "step N"):
    # trusting it would resume from, or evaluate, whatever bytes are there.
    try:
        content = json.loads(marker.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        return f"{marker} cannot be parsed ({error}), so nothing shows the checkpoint's files are whole"
    recorded = content.get("files") if isinstance(content, dict) else None
    wants = list(recorded.values()) if isinstance(recorded, dict) else []
    if not wants or not all(isinstance(w, dict) and type(w.get("size")) is int and type(w.get("sha256")) is str
                            for w in wants):  # fmt: skip
        return f"{marker} records no size and SHA-256 for the checkpoint's files, so nothing shows they are whole"
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written (truncated or overwritten)"
        if _sha256(path) != want["sha256"]:
            return f"{path} does not match the SHA-256 recorded when it was written (its bytes changed)"
    return None


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection): step_<N>.damaged[-<time>]."""
    target = folder.with_name(f"{folder.name}.damaged")
    if target.exists():
        target = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(target)
    return target


def _root_cause(error: BaseException) -> BaseException:
    """The first OSError (ENOSPC, EACCES, ...) behind a failed write, without DCP's per-rank tracebacks."""
    causes = [exc for exc, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    return next((exc for exc in causes if isinstance(exc, OSError)), causes[0])


def _bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what writing it needs on disk, about."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_bytes(v) for v in state)
    return 0


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    """Adapter runs (a frozen base): checkpoints hold the trainable parameters only; the base is rebuilt from its
    source. Loading then leaves the frozen parameters as built (strict=False), while DCP still requires every
    trainable one to be in the checkpoint."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _without_frozen(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`ignore_frozen_params` drops a frozen parameter under one name only: a tied one (lm_head = the input
    embeddings) stays under its second name. Drop every name of a frozen parameter."""
    frozen = {name.removeprefix("module.") for name, p in model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}  # fmt: skip
    return {key: value for key, value in state.items() if key not in frozen}


# --- discovery -------------------------------------------------------------------------------------------------
def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = STEP_DIR.match(folder.name)
        if match and (folder / MARKER).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def no_checkpoint_at(root: Path, step: int) -> str:
    """Why checkpoint.step=`step` cannot start: the message, with the steps that can."""
    steps = ", ".join(str(s) for s, _ in complete_checkpoints(root)) or "none"
    return (f"checkpoint.step={step}: no complete checkpoint step_{step} in {root} (complete: {steps}); pick one of "
            "those, or leave checkpoint.step unset to resume the newest")  # fmt: skip


def starting_checkpoint(root: Path, latest: Path | None, wanted: int | None) -> Path | None:
    """The checkpoint a run starts from: the newest, `latest` (None: none, a fresh start); with checkpoint.step=
    `wanted`, that step's, unless `latest` already continues from it (this command went back to `wanted` before
    and was stopped: resume where that left off). UserError when step `wanted` has no complete checkpoint."""
    if wanted is None:
        return latest
    if latest is not None and (readable_trainer_state(latest) or {}).get("restarted_from") == wanted:
        return latest
    folder = root / f"step_{wanted}"
    if not (folder / MARKER).is_file():
        raise UserError(no_checkpoint_at(root, wanted))
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / ".metadata").is_file()


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def readable_trainer_state(path: Path) -> dict[str, Any] | None:
    """The launcher's look at a checkpoint before the workers verify it: None when its state cannot be read (the
    workers then find the damage and set the checkpoint aside)."""
    try:
        state = read_trainer_state(path)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def newest_readable_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint whose trainer state reads: where the workers will most likely resume."""
    return next((f for _, f in reversed(complete_checkpoints(root)) if readable_trainer_state(f) is not None), None)


# --- save / load -----------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    # The loop draws randomness only from torch (dropout); data order comes from seeded generators.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class Checkpointer:
    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int):
        self.root = run_dir / run_files.CHECKPOINTS
        self.env = env
        self.keep_last = keep_last
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        env.barrier()

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def latest_good(self, report: Any) -> Path | None:
        """The newest checkpoint whose files match their digests (rank 0 verifies, every rank gets the answer).
        Damaged or incomplete ones newer than it are renamed `*.damaged` and reported with the reason."""
        chosen = None
        if self.env.is_main:
            folders = [f for f in self.root.iterdir() if STEP_DIR.match(f.name)] if self.root.is_dir() else []
            for folder in sorted(folders, key=lambda f: int(STEP_DIR.match(f.name).group(1)), reverse=True):
                problem = damage(folder)
                if problem is None:
                    chosen = folder
                    break
                kept = set_aside(folder)
                report(f"checkpoint {folder.name} skipped: {problem}; renamed to {kept.name} for inspection")
        return self.env.broadcast_object(chosen)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             rank_tensors: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
        """`rank_tensors`: this rank's own state (e.g. PowerSGD's error feedback), one safetensors file per rank."""
        started = time.perf_counter()
        final = self.root / f"step_{step}"
        partial = self.root / f"step_{step}.partial"
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        self.env.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options(model))
        rng = {f"rank{self.env.rank}": _rng_state(self.env.device)}
        payload = {"model": _without_frozen(model, model_sd), "optim": optim_sd, "rng": rng}
        failure = None
        try:
            if rank_tensors:  # written before dcp.save, whose closing gather orders it before the digests below
                from safetensors.torch import save_file

                partial.mkdir(parents=True, exist_ok=True)
                save_file({k: t.detach().cpu().contiguous() for k, t in rank_tensors.items()},
                          partial / rank_state_file(self.env.rank))  # fmt: skip
            # DCP gathers every rank's write result, so a failure on one rank raises on all.
            dcp.save(payload, storage_writer=FileSystemWriter(partial))
            if self.env.is_main:
                (partial / STATE_FILE).write_text(strict_json.dumps(state, indent=1))
                hashing = time.perf_counter()
                files = file_digests(partial)
                hashing = time.perf_counter() - hashing
                (partial / MARKER).write_text(strict_json.dumps({"step": step, "files": files}, indent=1))
        except (OSError, CheckpointException) as error:  # DCP wraps each rank's OSError in a CheckpointException
            failure = error
        if self.env.any(failure is not None):
            self._fail(partial, step, failure, _bytes(payload))
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self._prune(keep=state.get("best_step"))
            size = sum(f["size"] for f in files.values())
            log.info("checkpoint step_%d: %.1f MB written in %.3f s, of which %.3f s for the SHA-256 of its %d files",
                     step, size / 1e6, time.perf_counter() - started, hashing, len(files))  # fmt: skip
        self.env.barrier()
        return final

    def _fail(self, partial: Path, step: int, error: Exception | None, needed: int) -> None:
        """Remove the partial folder (the previous checkpoints stay) and stop every rank with the cause."""
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        self.env.barrier()
        needed = sum(self.env.all_gather_ints(needed))  # tensor bytes; DCP writes a replica once, this counts each
        previous = self.latest()
        if previous is not None:  # what a checkpoint of this run takes on disk, exactly
            needed = sum(f.stat().st_size for f in previous.iterdir() if f.is_file())
        size = f"about {needed / 1e6:.1f} MB" if previous else f"at most {needed / 1e6:.1f} MB"
        kept = "the previous checkpoints kept" if previous else "no checkpoint of this run was written yet"
        free = shutil.disk_usage(self.root).free
        root = _root_cause(error) if error else None
        cause = f"{type(root).__name__}: {root}" if root else "another rank's write failed (see its log)"
        if free < needed and root is not None and not isinstance(root, OSError):
            # torch.save's zip writer reports a full disk as "unexpected pos ..." (a RuntimeError), not ENOSPC
            cause = f"No space left on the device ({cause})"
        raise CheckpointWriteFailed(
            f"writing checkpoint {partial} failed: {cause}. It needs {size} ({free / 1e6:.1f} MB free in "
            f"{self.root}); the partial folder was removed, {kept}. Free space (or fix the permissions), then rerun "
            "the same command to resume"
        )

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and (when the world size matches) this rank's RNG; return the trainer state."""
        options = _state_options(model)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        payload: dict[str, Any] = {"model": _without_frozen(model, model_sd), "optim": optim_sd}
        saved_keys = SafeFileSystemReader(path).read_metadata().state_dict_metadata.keys()
        rng_key = f"rank{self.env.rank}"
        state = read_trainer_state(path)
        same_world = state.get("world_size") == self.env.world_size
        if same_world and f"rng.{rng_key}.cpu" in saved_keys:
            payload["rng"] = {rng_key: _rng_state(self.env.device)}
        _load(payload, path)
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                       options=options)  # fmt: skip
        if "rng" in payload:
            rng = payload["rng"][rng_key]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        elif self.env.is_main:
            log.warning(
                "%s was written by %s processes, this run has %s: weights, optimizer and data position are "
                "restored; random streams (dropout) start afresh",
                path,
                state.get("world_size"),
                self.env.world_size,
            )
        return state

    def _prune(self, keep: int | None) -> None:
        found = complete_checkpoints(self.root)
        newest = {step for step, _ in found[-self.keep_last :]}
        if len(newest) == len(found):
            return
        # Deleting older checkpoints is safe only once the newest is known good: verify it first.
        verifying = time.perf_counter()
        problem = damage(found[-1][1])
        log.info("verified %s before pruning in %.3f s", found[-1][1].name, time.perf_counter() - verifying)
        if problem:
            log.warning("checkpoint %s does not verify (%s): older checkpoints are kept", found[-1][1].name, problem)
            return
        for step, folder in found:
            if step not in newest and step != keep:
                shutil.rmtree(folder, ignore_errors=True)


def load_model_weights(path: Path, model: torch.nn.Module, skip: set[str] = frozenset()) -> None:
    """Load only the model weights of a checkpoint (from any world size or strategy) into `model`; the tensors
    named in `skip` keep their values."""
    options = _state_options(model)
    if skip:
        options = dataclasses.replace(options, strict=False)
    state = _without_frozen(model, get_model_state_dict(model, options=options))
    payload = {"model": {key: value for key, value in state.items() if key not in skip}}
    _load(payload, path)
    set_model_state_dict(model, payload["model"], options=options)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded model state on rank 0 (empty elsewhere): what save_pretrained needs."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
