"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow, W&B (the `logger` config group, several at once).

metrics.jsonl stays the source of truth; these are views of it. Rank 0 only. The loop calls `Loggers.log(record)`
once per record and `Loggers.close(summary)` at the end; each tracker is a small adapter with `log(step, scalars)`
and `close(summary)` that imports its library only when selected. A tracker that fails (server down, disk full)
is warned about once and switched off; training goes on.

Resume-safe: a resumed or requeued run continues the same tracker run, and each step appears once.
- TensorBoard: the new event file starts with `purge_step` = the checkpoint's step + 1, so readers drop what a
  crashed invocation wrote after its last checkpoint; the steps are then written again, by the resumed run.
- MLflow and W&B: the run id is kept in `<run.dir>/trackers.json`, with the last step logged per series (train,
  eval/<split>, ...); records of a step already logged are skipped (training is deterministic, so they would
  carry the same values).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distrain.trainer import strict_json
from distrain.trainer.config import run_files
from distrain.trainer.observe.reporting import read_metrics

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"  # tracker run ids and the last step each logged, per series


def series(record: dict[str, Any]) -> str:
    """The name under which a record's scalars appear: train, eval/dev, memory, ..."""
    return f"eval/{record['split']}" if record["kind"] == "eval" else record["kind"]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers as tracker scalars: `train/loss`, `eval/dev/f1`, `train/max_memory_bytes/rank_1`.
    Lists are per rank; None (a non-finite value), booleans and text are left out."""
    prefix = series(record)
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step", "split"):
            continue
        values = enumerate(value) if isinstance(value, list) else [(None, value)]
        for rank, v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{prefix}/{key}" + ("" if rank is None else f"/rank_{rank}")] = float(v)
    return out


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as `section.key: value` (lists and null as text): tracker params and HParams."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else json.dumps(node)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return out


def finished(summary: dict[str, Any] | None) -> bool:
    """Did the run end (not stopped to be resumed, not failed)?"""
    return summary is not None and run_files.is_complete(summary["status"])


class TensorBoardLogger:
    name = "tensorboard"
    skips_logged_steps = False  # purge_step does it, robustly: buffered events lost in a crash are rewritten

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int, state: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tensorboard"
        fresh = not any(folder.glob("events.out.tfevents.*"))
        flush_secs = cfg.logger.tensorboard.flush_secs
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1, flush_secs=flush_secs)
        self.cfg = cfg
        if fresh:
            text = OmegaConf.to_yaml(cfg, resolve=True)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=0)  # markdown code

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, summary: dict[str, Any] | None) -> None:
        if finished(summary) and summary.get("best_metric") is not None:
            # HParams tab: this run's config against its best dev metric, to compare the runs of a sweep.
            from torch.utils.tensorboard.summary import hparams

            metric = f"hparams/best_dev_{self.cfg.task.metric}"
            for event in hparams(flat_config(self.cfg), {metric: summary["best_metric"]}):
                self.writer.file_writer.add_summary(event)
            self.writer.add_scalar(metric, summary["best_metric"], global_step=summary["step"])
        self.writer.close()


def default_mlflow_uri(run_dir: Path) -> str:
    """sqlite:///<runs root>/mlflow.db: the nearest ancestor called `runs` (the default layout), else the run
    dir's parent, so that one `mlflow ui` shows every run."""
    root = next((p for p in run_dir.parents if p.name == "runs"), run_dir.parent)
    return f"sqlite:///{root / 'mlflow.db'}"


class MLflowLogger:
    name = "mlflow"
    skips_logged_steps = True

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int, state: dict[str, Any]):
        # An unreachable server fails in seconds instead of retrying for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up chatter, on the console
        logging.getLogger("alembic").setLevel(logging.WARNING)

        settings = cfg.logger.mlflow
        uri = settings.tracking_uri or default_mlflow_uri(run_dir)
        self.client = MlflowClient(uri)
        self.run_dir = run_dir
        self.pending: Any = None  # the last asynchronous write
        self.run_id = state.get("run_id")
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = settings.experiment or cfg.run.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # A database file keeps its artifacts beside it (MLflow's default is ./mlruns in the current folder);
            # a server decides for itself.
            database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
            artifacts = (Path(database).resolve().parent / "mlartifacts").as_uri() if database else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags={"distrain.run_dir": str(run_dir)})
        self.run_id = state["run_id"] = run.info.run_id
        params = [Param(key, str(value)) for key, value in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_artifact(self.run_id, str(run_dir / run_files.CONFIG))

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        if self.pending is not None:
            self.pending.wait()  # the previous record's write: raises here if it failed
        # Written by MLflow's background thread: a database commit or an HTTP request is not on the step's path.
        self.pending = self.client.log_batch(self.run_id, metrics=metrics, synchronous=False)

    def close(self, summary: dict[str, Any] | None) -> None:
        if self.pending is not None:
            self.pending.wait()
        if summary is not None:
            self.client.log_dict(self.run_id, summary, run_files.SUMMARY)
            metrics = self.run_dir / run_files.METRICS
            evals = [r for r in read_metrics(metrics) if r["kind"] == "eval"] if metrics.exists() else []
            if evals:
                self.client.log_dict(self.run_id, evals, "eval_reports.json")
        # KILLED: stopped or preempted, to be resumed (the resumed run sets it back to RUNNING); FAILED: an error.
        status = "FINISHED" if finished(summary) else "KILLED" if summary is not None else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


class WandbLogger:
    name = "wandb"
    skips_logged_steps = True

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int, state: dict[str, Any]):
        import wandb

        settings = cfg.logger.wandb
        run_id = state.setdefault("run_id", secrets.token_hex(4))
        self.run = wandb.init(
            project=settings.project or cfg.run.name,
            entity=settings.entity,
            id=run_id,
            name=run_dir.name,
            resume="allow",
            mode=str(settings.mode),
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        self.run.finish(exit_code=0 if summary is not None else 1)


ADAPTERS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}


class Loggers:
    """The trackers selected in `cfg.logger`, on rank 0; nothing elsewhere or when none is selected."""

    def __init__(self, cfg: DictConfig, run_dir: Path, enabled: bool, start_step: int):
        self.state_path = run_dir / STATE_FILE
        self.state: dict[str, Any] = {}
        self.active: list[Any] = []
        if not enabled:
            return
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        for name, adapter in ADAPTERS.items():
            if cfg.logger[name] is None:
                continue
            try:
                self.active.append(adapter(cfg, run_dir, start_step, self.state.setdefault(name, {})))
            except Exception as error:  # noqa: BLE001 (any tracker failure: training goes on)
                self._warn(name, "could not start", error)
        self._save_state()

    def log(self, record: dict[str, Any]) -> None:
        key, step = series(record), record["step"]
        values = scalars(record)
        for logger in list(self.active) if values else []:
            logged = self.state[logger.name].setdefault("logged_through", {})
            if logger.skips_logged_steps and step <= logged.get(key, -1):
                continue  # written before a crash or stop by an earlier invocation of this run
            try:
                logger.log(step, values)
            except Exception as error:  # noqa: BLE001
                self._warn(logger.name, f"failed at step {step}", error)
                self.active.remove(logger)
                continue
            logged[key] = step
        if self.active:
            self._save_state()

    def close(self, summary: dict[str, Any] | None) -> None:
        """summary: the run's result (status, step, best_metric, ...); None when the run failed."""
        for logger in self.active:
            try:
                logger.close(summary)
            except Exception as error:  # noqa: BLE001
                self._warn(logger.name, "failed to close", error)
        self.active = []

    def _save_state(self) -> None:
        partial = self.state_path.with_suffix(".partial")
        partial.write_text(strict_json.dumps(self.state, indent=1))
        partial.replace(self.state_path)

    def _warn(self, name: str, what: str, error: Exception) -> None:
        log.warning(
            "logger %s %s (%s: %s); it is off for the rest of this run, training goes on and metrics.jsonl has "
            "every record. Check logger.%s in config.yaml.",
            name, what, type(error).__name__, str(error).splitlines()[0] if str(error) else "", name,
        )  # fmt: skip
