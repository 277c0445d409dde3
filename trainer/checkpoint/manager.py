"""The checkpoint manager: which checkpoint a run starts from, packing and restoring every stateful part, and the
checks that make a resume continue the run it claims to continue.

The parts are the model and optimizer (DCP shards, any layout) and small objects with `state_dict()` /
`load_state_dict()` whose entries go into `trainer_state.json` side by side (each owns its keys): the train state,
the evaluator, the batch source, the schedule and the loss scaler. A part added later registers here and is saved
and restored with the rest.

Where a run starts:
- its own newest good checkpoint (a rerun of the same command resumes);
- `checkpoint.step=N`: its own step N instead; newer checkpoints are renamed `step_<M>.superseded` (kept), and
  the checkpoints written after that restart record it, so a rerun of the same command resumes them;
- `checkpoint.init_from=PATH` (another run dir, checkpoint or export): a fresh run warm-started with its weights
  only (new optimizer, schedule and data position). A run dir with checkpoints of its own resumes those instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from distrain.trainer.checkpoint.store import (
    Checkpointer,
    complete_checkpoints,
    load_model_weights,
    read_rank_tensors,
    read_trainer_state,
    starting_checkpoint,
)
from distrain.trainer.errors import UserError
from distrain.trainer.model import adapters
from distrain.trainer.observe.reporting import console
from distrain.trainer.observe.watchdog import mark
from distrain.trainer.optim.registry import group_settings, restore_group_settings
from distrain.trainer.parallel.apply import check_weights_finite, unwrap
from distrain.trainer.parallel.distributed import DistEnv

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Wrapped:
    """A torch object whose whole state_dict is one entry of trainer_state.json (the grad scaler)."""

    def __init__(self, key: str, obj: Any):
        self.key, self.obj = key, obj

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.obj.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get(self.key):
            self.obj.load_state_dict(state[self.key])


class Recorded:
    """Entries written for whoever reads trainer_state.json (epoch, total steps), derived, never restored."""

    def __init__(self, entries: Callable[[], dict[str, Any]]):
        self.entries = entries

    def state_dict(self) -> dict[str, Any]:
        return self.entries()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CheckpointManager:
    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, parts: dict[str, Stateful],
                 adapter: adapters.AdapterRun | None = None):  # fmt: skip
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.model, self.optimizer, self.parts, self.adapter = model, optimizer, parts, adapter
        self.store = Checkpointer(run_dir, env, cfg.train.keep_last)
        self.restarted_from: int | None = None  # checkpoint.step, once this run went back to it

    # --- saving ----------------------------------------------------------------------------------------------
    def trainer_state(self, step: int) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name, part in self.parts.items():
            entries = part.state_dict()
            if overlap := state.keys() & entries.keys():
                raise RuntimeError(f"checkpoint part {name} writes keys another part owns: {sorted(overlap)}")
            state |= entries
        dims = self.env.dims
        state |= {"world_size": self.env.world_size, "strategy": dims.strategy.value, "dp": dims.dp, "tp": dims.tp,
                  "restarted_from": self.restarted_from}  # fmt: skip
        if self.adapter:
            state["base_model"] = self.adapter.base
        return state

    def save(self, step: int) -> Path:
        mark("checkpoint")
        check_weights_finite(self.model, self.env, step, "checkpoint")
        rank_tensors = {key: t for name, part in self.parts.items() if hasattr(part, "tensors")
                        for key, t in _prefixed(name, part.tensors()).items()}  # fmt: skip
        return self.store.save(step, self.model, self.optimizer, self.trainer_state(step), rank_tensors)

    def latest(self) -> Path | None:
        return self.store.latest()

    def step_folder(self, step: int) -> Path:
        return self.store.root / f"step_{step}"

    # --- where the run starts --------------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the run's own checkpoint (or warm-start from checkpoint.init_from); return the step to go on
        from (0: a fresh start)."""
        path = self._starting_checkpoint()
        if path is None:
            if self.cfg.checkpoint.init_from:
                self._warm_start(self.cfg.checkpoint.init_from)
            return 0
        state = read_trainer_state(path)
        where = f"checkpoint {path}"
        if self.adapter:  # the adapters are only right on the base they were trained on
            adapters.check_base(state.get("base_model"), self.adapter.base, where)
        for part in self.parts.values():  # a part may refuse this checkpoint before anything is loaded
            if hasattr(part, "check_resume"):
                part.check_resume(state, where, self.run_dir)
        settings = group_settings(self.optimizer)  # this config's hyper-parameters, this layout's kernels
        state = self.store.load(path, self.model, self.optimizer)
        changed = restore_group_settings(self.optimizer, settings)
        for part in self.parts.values():
            part.load_state_dict(state)
        self._restore_rank_tensors(path, state)
        self.restarted_from = state.get("restarted_from")
        if self.cfg.checkpoint.step is not None and self.restarted_from is None:
            self.restarted_from = self.cfg.checkpoint.step
        self._say(f"resumed from {path} at step {state['step']}")
        if changed:
            self._say(f"the optimizer's settings are this run's config from step {state['step']} on, not the "
                      f"checkpoint's: {', '.join(changed)}")  # fmt: skip
        for part in self.parts.values():  # what a part had to change on this resume (the schedule's length)
            if notice := getattr(part, "notice", None):
                self._say(notice)
        return state["step"]

    def _restore_rank_tensors(self, path: Path, state: dict[str, Any]) -> None:
        """Parts with per-rank tensors (`tensors()` / `load_tensors()`) get theirs back when the world size is the
        saver's: one rank's state (PowerSGD's compression error) means nothing to another layout's rank."""
        holders = {name: part for name, part in self.parts.items() if hasattr(part, "load_tensors")}
        tensors = read_rank_tensors(path, self.env.rank, self.env.device) if holders else None
        if not tensors:
            return
        if state.get("world_size") != self.env.world_size:
            self._warn(f"{path}: per-rank state of {state.get('world_size')} processes not restored in "
                       f"{self.env.world_size}: {', '.join(holders)} start afresh")  # fmt: skip
            return
        for name, part in holders.items():
            part.load_tensors({key.removeprefix(f"{name}/"): t for key, t in tensors.items()
                               if key.startswith(f"{name}/")})  # fmt: skip

    def _starting_checkpoint(self) -> Path | None:
        latest = self.store.latest_good(report=self._warn)
        wanted = self.cfg.checkpoint.step
        # The launcher checked step `wanted` exists; a damaged one may have been set aside since: UserError
        folder = starting_checkpoint(self.store.root, latest, wanted)
        if folder == latest:
            return latest
        self.env.barrier()  # every rank has read the newest one's state above before rank 0 renames it
        if self.env.is_main:  # the newer ones belong to the abandoned continuation: kept, out of the way
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, newer in complete_checkpoints(self.store.root):
                if step > wanted:
                    target = newer.with_name(f"{newer.name}.superseded-{stamp}")
                    newer.rename(target)
                    self._warn(f"checkpoint.step={wanted}: {newer.name} is newer; renamed to {target.name}")
        self.env.barrier()
        return folder

    def _warm_start(self, init_from: str) -> None:
        """Weights only, from another run's checkpoint or export; names and shapes must match this model."""
        from distrain.trainer.inference.load import locate

        weights = locate(Path(init_from).expanduser(), verify=False)  # the launcher's validation verified it
        if weights.kind == "adapter":
            raise UserError(f"checkpoint.init_from: {weights.path} is an adapter folder; use the run's merged "
                            "export (adapter.merge_on_export=true) or one of its checkpoints")  # fmt: skip
        head = head_names(unwrap(self.model)) if self.cfg.checkpoint.new_head else set()
        problems = shape_problems(weights.kind, weights.path, unwrap(self.model), skip=head)
        if problems:
            raise UserError(f"checkpoint.init_from: {weights.path} does not fit this model:\n"
                            + "\n".join(f"  - {p}" for p in problems[:10])
                            + "\nThe same model (model.*) and label set (the task's labels) are needed; "
                            "checkpoint.new_head=true takes only the body of a source with other labels")  # fmt: skip
        if weights.kind == "checkpoint":
            load_model_weights(weights.path, self.model, skip=head)
        else:
            load_export_weights(weights.path, self.model, skip=head)
        fresh = f"; the task head ({', '.join(sorted(head))}) starts afresh" if head else ""
        self._say(f"warm start: weights from {weights.path} ({weights.kind}){fresh}; new optimizer, schedule and "
                  "data order")  # fmt: skip

    def _say(self, message: str) -> None:
        if self.env.is_main:
            log.info(message)
            console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _warn(self, message: str) -> None:
        """Rank 0: something the user must know (console and log)."""
        log.warning(message, extra={"file_only": True})
        console.print(f"[yellow]{message}", highlight=False, soft_wrap=True)


def _prefixed(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": tensor for key, tensor in tensors.items()}


def _model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    # A DTensor's shape is the global one, so this holds under every layout. Tied parameters count once (an
    # export saves them once).
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _source_shapes(kind: str, path: Path) -> dict[str, tuple[int, ...]]:
    if kind == "checkpoint":
        from distrain.trainer.checkpoint.store import SafeFileSystemReader

        metadata = SafeFileSystemReader(path).read_metadata().state_dict_metadata
        return {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.items()
                if key.startswith("model.") and hasattr(meta, "size")}  # fmt: skip
    from safetensors import safe_open

    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    return shapes


def head_names(model: torch.nn.Module) -> set[str]:
    """The task head's tensors: every name outside the body (transformers' `base_model_prefix`: bert.*, ...)."""
    body = model.base_model_prefix + "."
    return {name for name in model.state_dict() if not name.startswith(body)}


def shape_problems(kind: str, path: Path, model: torch.nn.Module, skip: set[str] = frozenset()) -> list[str]:
    """What differs between the weights at `path` and this model, apart from the tensors in `skip`: missing
    tensors and other shapes."""
    source = _source_shapes(kind, path)
    mine = {name: shape for name, shape in _model_shapes(model).items() if name not in skip}
    problems = [f"{name}: {source[name]} there, {shape} here" for name, shape in mine.items()
                if name in source and source[name] != shape]  # fmt: skip
    missing = [name for name in mine if name not in source]
    if missing:
        problems.append(f"{len(missing)} tensors of this model are not there, e.g. {', '.join(missing[:3])}")
    return problems


def load_export_weights(folder: Path, model: torch.nn.Module, skip: set[str] = frozenset()) -> None:
    """An export's safetensors, but for the tensors in `skip`, into the (possibly sharded) model: every rank reads
    the whole state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= {key: value for key, value in load_file(file).items() if key not in skip}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
