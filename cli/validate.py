"""The launcher's checks of a composed config: what the schema's types cannot say.

Ranges, rules between fields, the task's own rules (`Task.check`), the parallel layout (`ParallelDims`) against the
world size and the model's head counts, and the files and folders the run will read. Every problem names its key
and what was expected; all of them are collected and raised as one ConfigError before any worker starts or any run
dir is written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import tempfile
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distrain.trainer.config.paths import is_local, resolve_path
from distrain.trainer.config.schema import OptimConfig
from distrain.trainer.data.sources import STREAM_FORMATS, matching_paths
from distrain.trainer.errors import ConfigError
from distrain.trainer.model import adapters
from distrain.trainer.model.adapters import no_default_targets, target_modules
from distrain.trainer.model.families import dropout_config, feed_forward_names
from distrain.trainer.optim.registry import COMMON_KEYS, unused_keys
from distrain.trainer.optim.registry import layout_problems as optimizer_layout_problems
from distrain.trainer.optim.registry import spec as optimizer_spec
from distrain.trainer.parallel.dims import ParallelDims
from distrain.trainer.tasks import task_class
from distrain.trainer.train.preemption import signal_number


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of `cfg`, each with its key."""
    problems: list[str] = []

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            problems.append(f"{key}: expected {expected}, got {OmegaConf.select(cfg, key)!r}")

    t, o, launcher, data = cfg.train, cfg.optim, cfg.launcher, cfg.data
    problems += task_class(cfg.task.name).check(cfg)
    need(0 < cfg.task.mask_probability < 1, "task.mask_probability", "a number in (0, 1)")
    for key in ("micro_batch_size", "grad_accum_steps", "epochs", "log_every"):
        need(t[key] >= 1, f"train.{key}", "an integer >= 1")
    for key in ("eval_every", "save_every", "early_stopping_patience"):
        need(t[key] >= 0, f"train.{key}", "an integer >= 0")
    need(t.keep_last >= 1, "train.keep_last", "an integer >= 1 (the latest checkpoint is what a rerun resumes)")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null or an integer >= 1")
    need(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size", "null or an integer >= 1")
    if t.stop_at_step is not None:
        need(t.stop_at_step >= 1, "train.stop_at_step", "null or an integer >= 1")
        if t.max_steps is not None:
            need(t.stop_at_step <= t.max_steps, "train.stop_at_step", f"<= train.max_steps ({t.max_steps})")
    if t.profile_steps is not None:
        steps = list(t.profile_steps)
        need(len(steps) == 2 and 1 <= steps[0] <= steps[-1], "train.profile_steps",
             "null or [first, last] with 1 <= first <= last")  # fmt: skip
    problems += _logger_problems(cfg.logger)
    problems += _non_finite(cfg)
    need(o.lr > 0, "optim.lr", "a number > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0")
    need(0 < o.eps < 1, "optim.eps", "a number in (0, 1)")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "a number in [0, 1)")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "an integer >= 1")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "null or a number > 0")

    need(launcher.nproc_per_node >= 1, "launcher.nproc_per_node", "an integer >= 1")
    need(launcher.nnodes >= 1, "launcher.nnodes", "an integer >= 1")
    need(launcher.max_restarts >= 0, "launcher.max_restarts", "an integer >= 0")
    need(launcher.monitor_interval > 0, "launcher.monitor_interval", "a number of seconds > 0")
    need(launcher.collective_timeout_s >= 5, "launcher.collective_timeout_s", "a number of seconds >= 5")
    need(launcher.join_timeout_s >= 5, "launcher.join_timeout_s", "a number of seconds >= 5")
    need(launcher.node_rank is None or 0 <= launcher.node_rank < max(launcher.nnodes, 1), "launcher.node_rank",
         f"null or an integer in [0, launcher.nnodes={launcher.nnodes})")  # fmt: skip
    need(launcher.threads_per_process is None or launcher.threads_per_process >= 1, "launcher.threads_per_process",
         "null or an integer >= 1")  # fmt: skip
    try:
        signal_number(launcher.preempt_signal)
    except (KeyError, ValueError):
        problems.append(
            f"launcher.preempt_signal: expected a signal name such as USR1, got {launcher.preempt_signal!r}"
        )
    if launcher.nnodes > 1:
        need(launcher.rdzv_endpoint is not None, "launcher.rdzv_endpoint",
             "host:port of the rendezvous (the same on every node) when launcher.nnodes > 1")  # fmt: skip
    if launcher.rdzv_endpoint is not None:
        # torchrun would wait on the rendezvous forever instead of saying the address is malformed.
        need(is_host_port(launcher.rdzv_endpoint), "launcher.rdzv_endpoint",
             "host:port with a port in 1..65535 (e.g. node1:29500 or [::1]:29500)")  # fmt: skip
    if cfg.checkpoint.new_head:
        need(cfg.checkpoint.init_from is not None, "checkpoint.new_head",
             "false without checkpoint.init_from (the weights whose body it keeps)")  # fmt: skip
        need(cfg.task.name in ("ner", "classify"), "checkpoint.new_head",
             f"false for task={cfg.task.name}: only ner and classify have a head of their own labels")  # fmt: skip
    need(0 <= t.seed < 2**32, "train.seed", "an integer in [0, 2**32)")  # the widest range every RNG accepts
    need(0 <= data.split_seed < 2**32, "data.split_seed", "an integer in [0, 2**32)")
    need(data.num_workers >= 0, "data.num_workers", "an integer >= 0")
    problems += _device_problems(cfg)
    problems += _path_problems(cfg)
    problems += _parallel_problems(cfg)
    problems += _optimizer_problems(cfg.optim)
    problems += _adapter_problems(cfg)
    problems += _model_problems(cfg.model)
    need(data.max_length >= 8, "data.max_length", "an integer >= 8")
    positions = getattr(model_config_if_local(cfg.model), "max_position_embeddings", None)
    if isinstance(positions, int) and data.max_length > positions:
        problems.append(f"data.max_length: expected at most {positions} (the model's max_position_embeddings), "
                        f"got {data.max_length}")  # fmt: skip
    for key in ("max_train_samples", "max_eval_samples"):
        need(data[key] is None or data[key] >= 1, f"data.{key}", "null or an integer >= 1")
    problems += _data_problems(data)
    problems += _stream_problems(cfg)
    problems += _mixture_problems(cfg)
    problems += _distill_problems(cfg)
    problems += _dpo_problems(cfg)
    if not cfg.sweep.params:  # no search: sweep.* would silently do nothing
        from distrain.trainer.config.schema import SweepConfig

        problems += _unread(cfg.sweep, SweepConfig, "sweep", "only read by a search (hparams_search=...)")
    problems += _student_problems(cfg.model)
    problems += _prune_problems(cfg)
    problems += _init_from_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _init_from_problems(cfg: DictConfig) -> list[str]:
    """checkpoint.init_from: weights that are there and whole (a damaged export is named here, not by a worker),
    unless the run dir has checkpoints of its own, which a rerun resumes instead."""
    from distrain.trainer.checkpoint.store import complete_checkpoints
    from distrain.trainer.config import run_files
    from distrain.trainer.inference.load import EvalError, locate

    if cfg.checkpoint.init_from is None or complete_checkpoints(resolve_path(cfg.run.dir) / run_files.CHECKPOINTS):
        return []
    try:
        locate(resolve_path(cfg.checkpoint.init_from).expanduser())
    except EvalError as error:
        return [f"checkpoint.init_from: {str(error).removeprefix('ckpt: ')}"]
    except (OSError, ValueError) as error:  # a path the filesystem refuses
        return [f"checkpoint.init_from: cannot read {cfg.checkpoint.init_from!r} ({error})"]
    return []


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _logger_problems(logger: DictConfig) -> list[str]:
    """A selected tracker whose library is missing would only be warned about in the worker: say it now."""
    return [
        f"logger.{name}: selected, but the {package} package is not installed (pip install {package}, or drop it: "
        f"logger=[...] without {name})"
        for name, package in LOGGER_PACKAGES.items()
        if logger[name] is not None and importlib.util.find_spec(package) is None
    ]


def _non_finite(cfg: DictConfig) -> list[str]:
    """inf and nan pass every comparison check above or fail it with a confusing message: name them."""
    floats = {
        "task.mask_probability": cfg.task.mask_probability,
        "launcher.monitor_interval": cfg.launcher.monitor_interval,
        "launcher.collective_timeout_s": cfg.launcher.collective_timeout_s,
        "launcher.join_timeout_s": cfg.launcher.join_timeout_s,
        **{
            f"optim.{k}": cfg.optim[k]
            for k in (
                "lr",
                "weight_decay",
                "eps",
                "warmup_ratio",
                "max_grad_norm",
                "momentum",
                "alpha",
                "beta2_decay",
                "clip_threshold",
            )
        },
        **{f"optim.betas[{i}]": b for i, b in enumerate(cfg.optim.betas)},
    }
    return [f"{key}: expected a finite number, got {value}" for key, value in floats.items()
            if isinstance(value, float) and not math.isfinite(value)]  # fmt: skip


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?):(\d{1,5})$")


def is_host_port(endpoint: str) -> bool:
    match = _HOST_PORT.match(str(endpoint))
    return match is not None and 1 <= int(match.group(3)) <= 65535


def _device_problems(cfg: DictConfig) -> list[str]:
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if cfg.launcher.nproc_per_node > count and cfg.train.device != "cpu":
            return [f"launcher.nproc_per_node: expected at most {count} (the CUDA devices here, one per process) "
                    f"with train.device={cfg.train.device}, got {cfg.launcher.nproc_per_node}"]  # fmt: skip
        if cfg.launcher.start_method == "fork" and cfg.train.device != "cpu":
            # This check has asked CUDA about its devices: a process forked from here could not use CUDA.
            return ["launcher.start_method: expected auto or exec for CUDA workers, got 'fork' (a worker forked "
                    "from the launcher cannot use CUDA)"]  # fmt: skip
        return []
    problems = []
    if cfg.train.device == "cuda":
        problems.append("train.device: expected cpu or auto, got 'cuda': no CUDA device on this machine")
    if cfg.parallel.backend == "nccl":
        problems.append("parallel.backend: expected gloo (or null), got 'nccl': NCCL needs CUDA devices")
    return problems


def writable_problem(key: str, value: str) -> str | None:
    """A message when the folder `value` cannot be made or written (its nearest existing ancestor decides)."""
    path = resolve_path(value).absolute()
    if path.exists() and not path.is_dir():
        return f"{key}: expected a folder, {path} is a file"
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:  # really make a folder there: os.access says yes to root also where none can be made (/proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".distrain-write-check-", dir=existing))
    except OSError as error:
        return (f"{key}: expected a folder this user can write, got {path}: making a folder in {existing} fails "
                f"({error.strerror or error})")  # fmt: skip
    return None


def writable_file_problem(key: str, value: str) -> str | None:
    """A message when the file `value` cannot be written (it is a folder, its folder is missing, or opening it
    fails: really opened, without truncating it, as os.access says yes to root where nothing can be written)."""
    path = resolve_path(value).absolute()
    if path.is_dir():
        return f"{key}: {path} is a folder; expected a file path"
    if not path.parent.is_dir():
        return f"{key}: the folder {path.parent} does not exist"
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        return f"{key}: {path} cannot be written by this user ({error.strerror or error})"
    if not existed:
        path.unlink()
    return None


def _path_problems(cfg: DictConfig) -> list[str]:
    problems = [
        writable_problem(key, OmegaConf.select(cfg, key)) for key in ("run.dir", "data.cache_dir", "model.cache_dir")
    ]
    if (
        cfg.data.dir is not None
        and resolve_path(cfg.data.dir).is_dir()
        and not os.access(resolve_path(cfg.data.dir), os.R_OK | os.X_OK)
    ):
        problems.append(f"data.dir: expected a folder this user can read, got {cfg.data.dir!r}")
    return [p for p in problems if p]


def _parallel_problems(cfg: DictConfig) -> list[str]:
    if cfg.launcher.nproc_per_node < 1 or cfg.launcher.nnodes < 1:
        return []  # reported with their keys already
    dims, problems = ParallelDims.resolve(cfg.parallel, cfg.launcher.nproc_per_node * cfg.launcher.nnodes)
    if dims is not None:
        problems += dims.model_problems(model_config_if_local(cfg.model)) + adapters.layout_problems(cfg, dims)
        problems += optimizer_layout_problems(cfg.optim, dims.fsdp_enabled or dims.tp_enabled)
    return problems + _comm_problems(cfg.parallel, dims)


def _comm_problems(parallel: DictConfig, dims: ParallelDims | None) -> list[str]:
    problems = []
    hook = str(parallel.comm_hook)
    if hook != "none" and dims is not None and not dims.ddp_enabled:  # no dims: its problem is reported already
        if not dims.fsdp_enabled:  # single, tp: no gradient reduction between data-parallel ranks
            problems.append(f"parallel.comm_hook: {hook} changes how gradients are reduced between data-parallel "
                            f"ranks; parallel={parallel.name} has no such reduction (use parallel=ddp, fsdp or "
                            "fsdp_tp, or parallel.comm_hook=none)")  # fmt: skip
        elif hook == "powersgd":
            # torch's PowerSGD compresses DDP's gradient buckets; FSDP reduce-scatters shards in a dtype (fsdp_dtypes).
            problems.append(f"parallel.comm_hook: powersgd is a DDP communication hook; parallel={parallel.name} "
                            "reduce-scatters gradient shards and takes only fp16 or bf16 (its reduce dtype): use "
                            "parallel=ddp for powersgd, or parallel.comm_hook=bf16")  # fmt: skip
    if parallel.sync != "every_step":
        if parallel.name != "ddp":
            problems.append(f"parallel.sync: {parallel.sync} needs parallel=ddp (each rank holds whole weights to "
                            f"step alone and average), got parallel={parallel.name}")  # fmt: skip
        # DiLoCo can send its outer gradients in half precision; local SGD averages the weights themselves
        if parallel.comm_hook != "none" and not (parallel.sync == "diloco" and hook in ("fp16", "bf16")):
            problems.append(f"parallel.comm_hook: {parallel.comm_hook} cannot combine with parallel.sync="
                            f"{parallel.sync} (no gradient all-reduce between syncs); set one of them, or fp16/bf16 "
                            "with diloco (its outer gradients in half precision)")  # fmt: skip
    if parallel.sync_every < 1:
        problems.append(
            f"parallel.sync_every: expected an integer >= 1 (steps between syncs), got {parallel.sync_every}"
        )
    if parallel.sync_warmup < 0:
        problems.append(f"parallel.sync_warmup: expected an integer >= 0, got {parallel.sync_warmup}")
    if not parallel.diloco.outer_lr > 0:
        problems.append(f"parallel.diloco.outer_lr: expected a number > 0, got {parallel.diloco.outer_lr}")
    if not 0 <= parallel.diloco.outer_momentum < 1:
        problems.append(f"parallel.diloco.outer_momentum: expected a number in [0, 1), "
                        f"got {parallel.diloco.outer_momentum}")  # fmt: skip
    if parallel.powersgd.rank < 1:
        problems.append(f"parallel.powersgd.rank: expected an integer >= 1, got {parallel.powersgd.rank}")
    if parallel.powersgd.start_step < 2:
        problems.append("parallel.powersgd.start_step: expected an integer >= 2 (steps of plain all-reduce before "
                        "PowerSGD; torch's needs 2 for its error feedback), "
                        f"got {parallel.powersgd.start_step}")  # fmt: skip
    return problems


def _optimizer_problems(optim: DictConfig) -> list[str]:
    """A key the chosen optimizer does not read would silently do nothing (optim=sgd optim.betas=[0.9,0.99]).

    "Set" means "differs from the schema's default": the optimizers share one flat optim node, so a user types
    optim.momentum=0.9 rather than optim.sgd.momentum=0.9, and an experiment's optim settings carry over to another
    optimizer when they are common ones (lr, weight_decay). A key set to exactly its default is missed, but then it
    changes nothing either."""
    defaults = OmegaConf.structured(OptimConfig)
    problems = [f"optim.{key}: optim={optim.name} does not use it (its keys: "
                f"{', '.join(COMMON_KEYS[1:] + optimizer_spec(optim.name).keys)}); drop it or choose an optimizer "
                "that has it" for key in unused_keys(optim, defaults)]  # fmt: skip
    if optim.nesterov and optim.momentum <= 0:
        problems.append(f"optim.nesterov: needs optim.momentum > 0, got {optim.momentum}")
    if not 0 <= optim.momentum < 1:
        problems.append(f"optim.momentum: expected a number in [0, 1), got {optim.momentum}")
    if not 0 < optim.alpha < 1:
        problems.append(f"optim.alpha: expected a number in (0, 1), got {optim.alpha}")
    if not optim.beta2_decay < 0:
        problems.append(f"optim.beta2_decay: expected a number < 0 (beta2 = 1 - step^beta2_decay), "
                        f"got {optim.beta2_decay}")  # fmt: skip
    if not optim.clip_threshold > 0:
        problems.append(f"optim.clip_threshold: expected a number > 0, got {optim.clip_threshold}")
    return problems


def _adapter_problems(cfg: DictConfig) -> list[str]:
    adapter = cfg.adapter
    if not adapters.enabled(cfg):
        return []
    problems = []
    if adapter.r < 1:
        problems.append(f"adapter.r: expected an integer >= 1 (the adapters' rank), got {adapter.r}")
    if not (math.isfinite(adapter.alpha) and adapter.alpha > 0):
        problems.append(f"adapter.alpha: expected a finite number > 0 (the update is scaled by alpha / r), "
                        f"got {adapter.alpha}")  # fmt: skip
    if not 0 <= adapter.dropout < 1:
        problems.append(f"adapter.dropout: expected a number in [0, 1), got {adapter.dropout}")
    targets = adapter.target_modules
    if targets is not None and (len(targets) == 0 or not all(isinstance(t, str) and t for t in targets)):
        problems.append(f"adapter.target_modules: expected null (per model family) or a non-empty list of module "
                        f"names such as [q_proj, v_proj], got {list(targets)}")  # fmt: skip
    architecture = model_config_if_local(cfg.model)
    model_type = getattr(architecture, "model_type", None)
    if targets is None and model_type is not None and target_modules(adapter, model_type) is None:
        problems.append(no_default_targets(model_type))
    return problems


def _model_problems(model: DictConfig) -> list[str]:
    problems = []
    if model.name_or_path is None and model.architecture is None:
        problems.append("model.name_or_path: expected a model path or Hub id, or model.architecture for a random-init "
                        "model, got None")  # fmt: skip
    if model.name_or_path is None and model.tokenizer is None and model.train_tokenizer_vocab is None:
        problems.append("model.tokenizer: expected a tokenizer path or Hub id (or model.train_tokenizer_vocab) for a "
                        "random-init model, got None")  # fmt: skip
    if model.name_or_path is not None and model.train_tokenizer_vocab is not None:
        problems.append("model.train_tokenizer_vocab: only for random-init models (model.name_or_path=null)")
    if model.train_tokenizer_vocab is not None and model.train_tokenizer_vocab < 300:
        problems.append("model.train_tokenizer_vocab: expected null or an integer >= 300 (256 bytes plus merges), "
                        f"got {model.train_tokenizer_vocab}")  # fmt: skip
    for key in ("name_or_path", "tokenizer"):
        value = model[key]
        if value is None:
            continue
        if is_local(value):
            if not resolve_path(value).is_dir():
                problems.append(f"model.{key}: expected an existing folder, got {value!r}")
        elif reason := hub_unreachable(value, "model"):  # else the workers retry the Hub, then fail
            problems.append(f"model.{key}: expected an existing folder or a Hub model id reachable from here, got "
                            f"{value!r}, which is not a folder and not loadable from the Hub ({reason})")  # fmt: skip
    if model.dropout is not None:
        if not 0 <= model.dropout < 1:
            problems.append(f"model.dropout: expected null or a number in [0, 1), got {model.dropout}")
        elif (config := model_config_if_local(model)) is not None:  # a Hub model's family: checked in the worker
            try:
                dropout_config(getattr(config, "model_type", ""), model.dropout)
            except ConfigError as error:
                problems += error.problems
    if model.gguf_file is not None and model.name_or_path is not None and is_local(model.name_or_path):
        gguf = resolve_path(model.name_or_path) / model.gguf_file
        if not gguf.is_file():
            problems.append(f"model.gguf_file: expected a file inside model.name_or_path ({gguf} does not exist), "
                            f"got {model.gguf_file!r}")  # fmt: skip
    return problems


def model_config_if_local(model: DictConfig) -> Any:
    """The model's architecture when it can be read without a network or a conversion, else None."""
    if model.name_or_path is None and model.architecture is not None:
        return SimpleNamespace(**OmegaConf.to_container(model.architecture))
    if model.name_or_path is not None and model.gguf_file is None and is_local(model.name_or_path):
        folder = resolve_path(model.name_or_path)
        if (folder / "config.json").is_file():
            return SimpleNamespace(**json.loads((folder / "config.json").read_text()))
    return None


def _distill_problems(cfg: DictConfig) -> list[str]:
    """distill.*: only with a teacher (else they would silently do nothing); the teacher's checks
    (trainer/train/distill.py), once the run's own model settings are sound."""
    if cfg.distill.teacher is None:
        from distrain.trainer.config.schema import DistillConfig

        return _unread(cfg.distill, DistillConfig, "distill", "distill.teacher is null: no distillation")
    from distrain.trainer.train.distill import check_teacher

    problems = []
    if cfg.parallel.name in ("tp", "fsdp_tp"):
        problems.append(
            f"distill.teacher: expected parallel=single, ddp or fsdp, got {cfg.parallel.name}: the "
            "teacher is replicated or sharded like the student; a tensor-parallel teacher is not built"
        )
    tokenizer, source = None, str(cfg.model.tokenizer or cfg.model.name_or_path)
    if not _model_problems(cfg.model) and cfg.model.train_tokenizer_vocab is None:
        from distrain.trainer.model.tokenizer import load_tokenizer
        from distrain.trainer.parallel.distributed import DistEnv

        try:
            tokenizer = load_tokenizer(cfg.model, DistEnv())
        except Exception as error:  # reported by the worker; the teacher's tokenizer is checked there too then
            problems.append(f"model.tokenizer: cannot be read to compare with the teacher's: {error}")
    return problems + check_teacher(cfg, tokenizer, f"model.tokenizer={source}")


def _unread(section: DictConfig, schema: type, name: str, why: str) -> list[str]:
    """The keys of a switched-off section set away from their defaults: they would silently do nothing."""
    default = OmegaConf.structured(schema)
    return [f"{name}.{key}: {why}; drop it" for key in section if key != "name" and section[key] != default[key]]


def _dpo_problems(cfg: DictConfig) -> list[str]:
    """dpo.*: only with task=dpo (else they would silently do nothing); its reference exists and is a causal LM;
    the first line of each local data file has the columns (the workers check every line, naming its file:line)."""
    from distrain.trainer.config.schema import DpoConfig

    if cfg.task.name != "dpo":
        return _unread(cfg.dpo, DpoConfig, "dpo", f"only read with task=dpo (task={cfg.task.name})")
    problems = []
    if cfg.dpo.reference is not None:
        from distrain.trainer.train.distill import find_teacher

        try:
            source = find_teacher(cfg.dpo.reference)
            if source.task not in (None, "clm", "dpo"):
                problems.append(f"dpo.reference: expected a causal LM (a clm or dpo run, or a Hugging Face folder), "
                                f"{source.path} was trained for task {source.task}")  # fmt: skip
        except ConfigError as error:
            problems += [p.replace("distill.teacher", "dpo.reference", 1) for p in error.problems]
    if cfg.data.dir is None or cfg.data.format != "jsonl" or not resolve_path(cfg.data.dir).is_dir():
        return problems  # reported with their keys already
    from distrain.trainer.data.sources import iter_records
    from distrain.trainer.errors import DataError
    from distrain.trainer.tasks.dpo import checked

    for split, pattern in cfg.data.files.items():
        for path in matching_paths(cfg.data, pattern):
            try:
                first = next(iter(iter_records(path, cfg.data)), None)
                if first is None:
                    problems.append(f"data.files.{split}: {path} holds no preference pairs (empty file?)")
                else:
                    checked(first[0])
            except DataError as error:
                problems.append(f"data.files.{split}: {error}")
    return problems


def _prune_problems(cfg: DictConfig) -> list[str]:
    """prune.*: a sparsity that leaves weights, a schedule inside the run (an epoch-based run's length is known to
    the workers only: they check prune.end_step against it)."""
    prune, max_steps = cfg.prune, cfg.train.max_steps
    if prune.name == "none":
        from distrain.trainer.config.schema import PruneConfig

        return _unread(prune, PruneConfig, "prune", "prune=none: no pruning; choose prune=magnitude or structured")
    problems = []
    if not 0 <= prune.sparsity < 1:
        problems.append(f"prune.sparsity: expected a number in [0, 1) (the fraction of pruned weights set to zero), "
                        f"got {prune.sparsity}")  # fmt: skip
    if prune.every < 1:
        problems.append(f"prune.every: expected an integer >= 1, got {prune.every}")
    if adapters.enabled(cfg):
        problems.append("prune.name: expected none with adapter=lora (the base weights are frozen; the adapters "
                        f"merged onto them would fill the zeros), got {prune.name}")  # fmt: skip
    if prune.start_step < 0:
        problems.append(f"prune.start_step: expected an integer >= 0, got {prune.start_step}")
    end = prune.end_step if prune.end_step is not None else max_steps
    if end is not None and prune.start_step >= end:
        problems.append(f"prune.start_step: expected less than prune.end_step ({end}), got {prune.start_step}")
    if prune.end_step is not None and max_steps is not None and prune.end_step > max_steps:
        problems.append(f"prune.end_step: expected at most train.max_steps ({max_steps}), got {prune.end_step}")
    if prune.name == "structured":
        if prune.scope != "layer":
            problems.append(f"prune.scope: expected layer with prune=structured (every layer loses the same number "
                            f"of feed-forward neurons: the exported config has one intermediate_size), got "
                            f"{prune.scope}")  # fmt: skip
        model_type = getattr(model_config_if_local(cfg.model), "model_type", None)  # a Hub model's: the workers'
        if model_type is not None:
            try:
                feed_forward_names(model_type)
            except ConfigError as error:
                problems += error.problems
    return problems


def _student_problems(model: DictConfig) -> list[str]:
    """model.init_from / keep_layers (trainer/model/student.py): a teacher that exists, and blocks it has."""
    if model.init_from is None:
        return ["model.keep_layers: expected null without model.init_from (the model whose blocks it keeps), got "
                f"{list(model.keep_layers)}"] if model.keep_layers is not None else []  # fmt: skip
    from distrain.trainer.train.distill import find_teacher

    try:
        source = find_teacher(model.init_from)
    except ConfigError as error:
        return [p.replace("distill.teacher", "model.init_from", 1) for p in error.problems]
    if model.keep_layers is None:
        return []
    plain = source.weights is None or source.weights.kind == "export"
    folder = (source.path if source.weights is None else source.weights.path) if plain else None
    config = json.loads((folder / "config.json").read_text()) if folder else None
    if config is None:  # a run dir or checkpoint: its run's model settings
        from distrain.trainer.config.schema import load_run_config

        config = vars(model_config_if_local(load_run_config(source.weights.config).model) or SimpleNamespace())
    layers = config.get("num_hidden_layers")
    keep = list(model.keep_layers)
    in_range = layers is None or all(0 <= i < layers for i in keep)
    if not keep or sorted(set(keep)) != keep or not in_range:
        within = f" in [0, {layers})" if layers is not None else ""
        return [f"model.keep_layers: expected increasing block indices{within} of the teacher {source.path}, "
                f"got {keep}"]  # fmt: skip
    return []


def _data_problems(data: DictConfig) -> list[str]:
    if data.dir is None:
        if data.hub_name is None:
            return ["data.dir: expected a folder with the data files (or data.hub_name for a Hub dataset), got None"]
        reason = hub_unreachable(data.hub_name, "dataset")
        if reason:
            return [
                f"data.dir: expected a folder with the {data.name} files ({', '.join(data.files.values())}), got None;"
                f" and the Hub dataset data.hub_name={data.hub_name!r} is not reachable ({reason})."
                " Set data.dir=<folder>, or train on the bundled data with +experiment=wnut_ner"
            ]
        return []
    folder = resolve_path(data.dir)
    if not folder.is_dir():
        return [f"data.dir: expected an existing folder, got {data.dir!r}"]
    problems = []
    splits = set(data.files)
    if data.split is not None:
        if splits != {"all"}:
            problems.append(
                f"data.files: with data.split set, expected exactly one file under 'all', got {sorted(splits)}"
            )
        if (
            set(data.split) != {"train", "dev", "test"}
            or abs(sum(data.split.values()) - 1) > 1e-6
            or not all(0 < value < 1 for value in data.split.values())
        ):
            problems.append(f"data.split: expected fractions in (0, 1) for train, dev and test that sum to 1 (change "
                            f"two: data.split.train=0.85 data.split.dev=0.05), got {dict(data.split)}")  # fmt: skip
    elif not ({"dev"} if data.mixture else {"train", "dev"}) <= splits or not splits <= {"train", "dev", "test"}:
        needed = "dev (data.mixture supplies train)" if data.mixture else "train and dev"
        problems.append(f"data.files: expected files for {needed} (and optionally test), got {sorted(splits)}")
    for split, name in data.files.items():
        if not matching_paths(data, name):
            kind = "a folder of class folders" if data.format == "folders" else "a file"
            problems.append(f"data.files.{split}: expected {kind}, '{folder / name}' does not exist")
    return problems


def hub_unreachable(name: str, repo_type: str) -> str | None:
    """Why the Hub repo (a model or a dataset) cannot be fetched, or None when it can, or when the cache holds the
    model (transformers falls back to it; offline, only the cache counts), or offline for a dataset (the datasets
    library looks in its own cache and says so)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)  # the cache lookup below raises on a name that cannot be a repo id ("-1")
    except HFValidationError as error:
        return f"not a folder, and not a Hub id either: {str(error).splitlines()[0][:200]}"
    if repo_type == "model":
        if any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json")):
            return None
        offline = [key for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(key) == "1"]
        if offline:  # else the workers start, and each fails on a missing cache entry
            return (f"{offline[0]}=1 and it is not in the local Hugging Face cache: download it once where the Hub "
                    f"is reachable, or set model.name_or_path=/path/to/a/local/copy")  # fmt: skip
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None  # offline datasets: the library looks in its own cache, and says so if it is not there
    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=10)
    except Exception as error:  # network errors, unknown repo, gated repo: all mean "not usable from here"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return None


def _stream_problems(cfg: DictConfig) -> list[str]:
    """data.streaming: what an unsized, sequential stream of training data needs."""
    data, problems = cfg.data, []
    if not data.streaming:
        return problems
    if cfg.train.max_steps is None:
        problems.append("train.max_steps: expected a number of steps with data.streaming=true (a stream has no "
                        "length, so train.epochs cannot set the schedule), got None")  # fmt: skip
    if data.split is not None:
        problems.append("data.split: expected null with data.streaming=true (cutting one file into splits needs the "
                        "whole file); give data.files.train, .dev (and .test)")  # fmt: skip
    if data.dir is not None and data.format not in STREAM_FORMATS:
        problems.append(f"data.format: expected one of {list(STREAM_FORMATS)} with data.streaming=true, "
                        f"got {data.format!r}")  # fmt: skip
    if data.group_by_length:
        problems.append("data.group_by_length: expected false with data.streaming=true (a stream is not sorted)")
    if data.max_train_samples is not None:
        problems.append("data.max_train_samples: expected null with data.streaming=true (train.max_steps bounds a "
                        f"stream), got {data.max_train_samples}")  # fmt: skip
    if data.num_workers > 1:
        problems.append(f"data.num_workers: expected 0 or 1 with data.streaming=true (one worker reads, tokenizes "
                        f"and packs the sequential stream), got {data.num_workers}")  # fmt: skip
    if data.shuffle_buffer < 1:
        problems.append(f"data.shuffle_buffer: expected an integer >= 1, got {data.shuffle_buffer}")
    if not task_class(cfg.task.name).language_model and data.labels is None:
        problems.append(f"data.labels: expected the label list with data.streaming=true for task {cfg.task.name} "
                        "(the label set cannot be read from an unbounded stream), got None")  # fmt: skip
    return problems


def _mixture_problems(cfg: DictConfig) -> list[str]:
    """data.mixture, streaming or map mode: each source's weight, files and format."""
    data, problems = cfg.data, []
    if not data.mixture:
        return problems
    task = task_class(cfg.task.name)
    formats = STREAM_FORMATS if data.streaming else tuple(str(f) for f in task.formats)
    if data.split is not None and not data.streaming:  # (streaming says it for itself)
        problems.append("data.split: expected null with data.mixture (its sources are the training data); give "
                        "data.files.dev (and .test)")  # fmt: skip
    if not data.streaming and not task.language_model and data.labels is None:
        problems.append(f"data.labels: expected the label list with data.mixture for task {cfg.task.name} (every "
                        "source must map labels to the same ids), got None")  # fmt: skip
    for i, source in enumerate(data.mixture):
        key = f"data.mixture[{i}]"
        if not (math.isfinite(source.weight) and source.weight > 0):
            problems.append(f"{key}.weight: expected a number > 0, got {source.weight!r}")
        if source.dir is None:
            if source.hub_name is None:
                problems.append(f"{key}.dir: expected a folder with files (or hub_name for a Hub dataset), got None")
            continue
        fmt = source.format or data.format
        if fmt not in formats:
            problems.append(f"{key}.format: expected one of {list(formats)}, got {str(fmt)!r}")
        elif source.files is None:
            problems.append(f"{key}.files: expected the source's training files (a glob inside its dir), got None")
        elif not matching_paths(OmegaConf.create({"dir": source.dir, "format": str(fmt)}), source.files):
            problems.append(f"{key}.files: expected a file, '{resolve_path(source.dir) / source.files}' does not exist")
    names = [source.name for source in data.mixture]
    if len(set(names)) != len(names):
        problems.append(f"data.mixture: expected distinct source names, got {names}")
    return problems
