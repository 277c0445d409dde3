"""Checkpoints with torch.distributed.checkpoint (DCP), and the final Hugging Face export.

Layout: `<run.dir>/checkpoints/step_<N>/` holds DCP shards of the model and optimizer (keyed by parameter name,
so they load into any world size or wrapping), each rank's RNG state, `trainer_state.json` (step, best metric,
scheduler) and a `COMPLETE` marker. A checkpoint is written as `step_<N>.partial/` and renamed only after every
rank finished and the marker is in, so a crash mid-save leaves nothing that looks loadable.

Loading is restricted to data: tensors come through DCP's weights-only path, other values (optimizer
hyper-parameters) through `torch.load(weights_only=True)`, and DCP's pickled `.metadata` through an unpickler that
only admits DCP's own metadata types, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
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
from distrain.trainer.distributed import DistEnv

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


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
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=WeightsOnlyLoadPlanner(), no_dist=no_dist)


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


def is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / ".metadata").is_file()


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


# --- save / load -----------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    # The loop draws randomness only from torch (dropout); data order comes from seeded generators.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class Checkpointer:
    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int):
        self.root = run_dir / "checkpoints"
        self.env = env
        self.keep_last = keep_last
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        env.barrier()

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        final = self.root / f"step_{step}"
        partial = self.root / f"step_{step}.partial"
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        self.env.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        payload = {"model": model_sd, "optim": optim_sd, "rng": {f"rank{self.env.rank}": _rng_state(self.env.device)}}
        dcp.save(payload, storage_writer=FileSystemWriter(partial))
        if self.env.is_main:
            (partial / STATE_FILE).write_text(strict_json.dumps(state, indent=1))
            (partial / MARKER).write_text(f"step {step}\n")
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self._prune(keep=state.get("best_step"))
        self.env.barrier()
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and (when the world size matches) this rank's RNG; return the trainer state."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        saved_keys = SafeFileSystemReader(path).read_metadata().state_dict_metadata.keys()
        rng_key = f"rank{self.env.rank}"
        state = read_trainer_state(path)
        same_world = state.get("world_size") == self.env.world_size
        if same_world and f"rng.{rng_key}.cpu" in saved_keys:
            payload["rng"] = {rng_key: _rng_state(self.env.device)}
        _load(payload, path)
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
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
        for step, folder in found:
            if step not in newest and step != keep:
                shutil.rmtree(folder, ignore_errors=True)


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load only the model weights of a checkpoint (from any world size or strategy) into `model`."""
    payload = {"model": get_model_state_dict(model)}
    _load(payload, path)
    set_model_state_dict(model, payload["model"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded model state on rank 0 (empty elsewhere): what save_pretrained needs."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
