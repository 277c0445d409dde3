"""A worker process, started by torchrun through `distrain train`: forked from the launcher, which imported this
module (and so torch, transformers and datasets) once for all its workers (launcher.start_method fork, or auto
for CPU workers; torchrun's `--run-path`), or a fresh `python -m distrain.trainer.worker <run dir>` (exec).

It reads the resolved `config.yaml` of the run dir (no Hydra here: every rank sees exactly the same values),
joins the process group, and runs: data -> model -> parallelize -> optimizer -> resume -> train -> export.
Rank 0 talks to the console; every rank logs to `<run dir>/logs/rank_<r>.log`.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports below (forked: already done): start-up phases count from here

import errno
import faulthandler
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path

import datasets
import torch
import transformers
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from distrain.trainer import strict_json
from distrain.trainer.config import run_files
from distrain.trainer.config.schema import Precision, load_run_config
from distrain.trainer.errors import ConfigError, DiskFull, Diverged, UserError
from distrain.trainer.exit import exit_now
from distrain.trainer.model import adapters
from distrain.trainer.model.build import build_model, model_source
from distrain.trainer.model.families import packing_problems
from distrain.trainer.model.head import save_head
from distrain.trainer.model.tokenizer import ensure_run_tokenizer, load_tokenizer
from distrain.trainer.observe.accounting import measure_peak_flops
from distrain.trainer.observe.reporting import make_console
from distrain.trainer.observe.watchdog import fail_if_collective_failed, start_watchdog
from distrain.trainer.optim.registry import build_optimizer
from distrain.trainer.parallel.apply import parallelize, unwrap
from distrain.trainer.parallel.dims import ParallelDims
from distrain.trainer.parallel.distributed import DistEnv, process_group
from distrain.trainer.parallel.precision import DTYPES
from distrain.trainer.tasks import build_task
from distrain.trainer.train.distill import build_distiller
from distrain.trainer.train.loop import Trainer
from distrain.trainer.train.preemption import StopRequest
from distrain.trainer.train.reference import build_reference


def setup_logging(run_dir: Path, rank: int) -> None:
    log_file = run_files.rank_log(run_dir, rank)
    log_file.parent.mkdir(exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_file)]
    if rank == 0:
        # The console shows progress and records itself; logging adds only warnings and errors there.
        from rich.logging import RichHandler

        console_handler = RichHandler(
            console=make_console(stderr=True), show_path=False, show_time=False, level=logging.WARNING
        )
        console_handler.setFormatter(logging.Formatter("%(message)s"))
        # Library chatter (e.g. transformers' load report: "classifier.weight newly initialized") is kept in
        # the log file; the console gets it only when it is an error.
        console_handler.addFilter(lambda r: r.levelno >= logging.ERROR or not r.name.startswith("transformers"))
        console_handler.addFilter(lambda r: not getattr(r, "file_only", False))
        handlers.append(console_handler)
    else:
        # Everything else this rank prints (library warnings, tracebacks) goes to its file, not the console.
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    handlers[0].setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    how = "forked from the launcher" if forked() else "a fresh interpreter"
    logging.getLogger("distrain").info("rank %d: pid %d on %s, attempt %s, %s, %d threads", rank, os.getpid(),
                                       os.uname().nodename, attempt, how, torch.get_num_threads())  # fmt: skip
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threading.excepthook = log_thread_failure
    logging.raiseExceptions = False  # a log file on a full disk: no "Logging error" traceback for each record
    transformers.utils.logging.disable_default_handler()  # its records reach our handlers instead
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" for a single file
    if rank != 0 or not sys.stderr.isatty():
        datasets.disable_progress_bars()  # tqdm bars are for terminals, not log files


def phase(name: str) -> None:
    """Log the end of a start-up phase: its own seconds and those since the process started (rank logs)."""
    global _last
    now = time.perf_counter()
    logging.getLogger("distrain").info("start-up: %s %.3f s (%.3f s since start)", name, now - _last, now - STARTED)
    _last = now


_last = STARTED


def build_trainer(cfg: DictConfig, run_dir: Path, env: DistEnv) -> Trainer:
    """Everything the loop needs, in order: data -> model -> layout and parallelism -> optimizer."""
    ensure_run_tokenizer(cfg, run_dir, env)
    tokenizer = load_tokenizer(cfg.model, env, run_dir)
    phase("tokenizer")
    task = build_task(cfg, tokenizer)
    data = task.prepare(env)
    head = task.head(data)
    phase("data")
    weights = task.use_class_weights(data, env.device)
    if env.is_main:
        save_head(run_dir, head)  # weights load later without the data
        if weights is not None:
            (run_dir / run_files.CLASS_WEIGHTS).write_text(strict_json.dumps(weights, indent=1))
    source = model_source(cfg.model, env)
    model = build_model(cfg.model, task.auto_model_class(), cfg.train.seed, source, tokenizer, **head)
    adapter = None
    if adapters.enabled(cfg):  # before parallelism: DDP and FSDP see the frozen base and the trainable adapters
        base = adapters.base_record(cfg, source, model)

        def rebuild() -> torch.nn.Module:
            plain = build_model(cfg.model, task.auto_model_class(), cfg.train.seed, source, tokenizer,
                                pretrained=False, **head)  # fmt: skip
            return adapters.apply_lora(plain, cfg.adapter)

        adapter = adapters.AdapterRun(base, rebuild)
        model = adapters.apply_lora(model, cfg.adapter)
    model.to(env.device)
    phase("model")
    # The launcher validated the layout; here it becomes the mesh, and the model's real config (a Hub model's,
    # which the launcher could not read) is checked against it.
    dims, problems = ParallelDims.resolve(cfg.parallel, env.world_size)
    problems += dims.model_problems(model.config) if dims else []
    problems += packing_problems(model.config.model_type, cfg.data.pack_examples)
    if problems:
        raise ConfigError(problems)
    mesh = dims.build_mesh(env.device.type)
    env.use_layout(dims, mesh)
    model = parallelize(model, dims, mesh, cfg, env.device)
    distiller = build_distiller(
        cfg, env, task, data.labels, mesh, unwrap(model).config
    )  # the frozen teacher, laid out like the student
    if task.needs_reference:  # dpo: the frozen reference (the base under LoRA), laid out like the model
        task.reference = build_reference(cfg, env, task, tokenizer, model, mesh)
    # Same initial weights on every rank (seeded above); from here on each data shard has its own random
    # stream (tensor-parallel peers share theirs: they must drop the same activations).
    torch.manual_seed(cfg.train.seed + env.dp_rank)
    optimizer = build_optimizer(model, cfg.optim)
    phase("parallelize and optimizer")
    peak = record_peak_flops(run_dir, env, cfg.precision.name)
    phase("peak FLOP/s")
    stop = StopRequest(run_dir, ["TERM", cfg.launcher.preempt_signal])
    return Trainer(cfg, run_dir, env, task, data, model, optimizer, peak, stop, adapter, distiller)


def record_peak_flops(run_dir: Path, env: DistEnv, precision: Precision) -> float:
    """A GEMM's FLOP/s at the precision the matmuls run at (fp32, or bf16/fp16: autocast's or FSDP's cast), with
    this process's threads (the CPU's stand-in for a device's peak, for MFU): rank 0 measures it at every start,
    under the machine's present load (a value cached from a loaded moment once made MFU read 1.9), tells the
    others and adds it to env.json with its dtype."""
    dtype = DTYPES.get(precision, torch.float32)
    peak = env.broadcast_object(measure_peak_flops(env.device, dtype=dtype) if env.is_main else None)
    if env.is_main:
        path = run_dir / run_files.ENV
        info = json.loads(path.read_text()) if path.exists() else {}
        info["peak_flops_per_process"] = peak
        info["peak_flops_dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(strict_json.dumps(info, indent=1))
    return peak


# FSDP2 warns that HF models return views of their outputs; the loop does no in-place op on them.
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


@record
def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m distrain.trainer.worker <run dir>  (started by `distrain train`)")
    # A rank killed by a fatal signal (SIGABRT, SIGSEGV: e.g. inside a C++ library at exit) prints its Python
    # stacks on stderr instead of dying silently.
    faulthandler.enable(all_threads=True)
    if forked():
        become_a_fresh_process()
    # The launcher sets OMP_NUM_THREADS for its workers; a forked one's OpenMP read it before it was set.
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run_dir = Path(sys.argv[1])
    cfg = load_run_config(run_dir / run_files.CONFIG)
    imported = time.perf_counter()
    with process_group(cfg.train.device, cfg.parallel.backend, cfg.launcher.collective_timeout_s) as env:
        joined = time.perf_counter()
        setup_logging(run_dir, env.rank)
        logging.getLogger("distrain").info(
            "start-up: imports and config %.3f s, process group %.3f s", imported - STARTED, joined - imported
        )
        phase("logging")
        log_file = run_files.rank_log(run_dir, env.rank)
        watchdog = start_watchdog(env.rank, env.world_size, cfg.launcher.collective_timeout_s, log_file)
        try:
            result = build_trainer(cfg, run_dir, env).fit()
            phase("training, evaluation, checkpoint and export")
            if env.is_main:
                (run_dir / run_files.SUMMARY).write_text(strict_json.dumps(result, indent=1))
            if result["status"] == run_files.DIVERGED:
                raise Diverged(result["error"])
            # Leave the group together: a rank that tears down its connections while a peer is still at work
            # can make the peer's communication threads fail (seen once as a SIGABRT at the end of a tp run).
            env.barrier()
            phase("final barrier")
        except RuntimeError as error:
            fail_if_collective_failed(error)  # exits with the diagnosis when it is one
            raise
        except (UserError, OSError) as error:
            if isinstance(error, OSError):
                if error.errno != errno.ENOSPC:
                    raise
                error = disk_full(run_dir, error)
            # Bad data or settings: the message names the file:line or key; a traceback would bury it.
            # The launcher reports it on the console (from the error file); the rank's log keeps it too.
            logging.getLogger("distrain").error("%s: %s", type(error).__name__, error, extra={"file_only": True})
            get_error_handler().record_exception(error)
            raise SystemExit(1) from None
        finally:
            watchdog.stop()


def log_thread_failure(args: threading.ExceptHookArgs) -> None:
    """A library's background thread that dies (tensorboard's event writer on a full disk): one line on the console,
    the traceback in the rank's log; the loop's own writes then report the cause."""
    log = logging.getLogger("distrain")
    name = getattr(args.thread, "name", "?")
    log.warning("background thread %s stopped: %s: %s", name, args.exc_type.__name__, args.exc_value)
    # the traceback in the log file only: below the console handler's level
    log.info("its traceback:", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def disk_full(run_dir: Path, error: OSError) -> DiskFull:
    """A full disk outside a checkpoint's write (which reports its own): where, and how to go on."""
    from distrain.trainer.checkpoint.store import latest_checkpoint

    latest = latest_checkpoint(run_dir / run_files.CHECKPOINTS)
    writing = f" writing {error.filename}" if error.filename else ""
    return DiskFull(
        f"the disk holding {run_dir} is full ({shutil.disk_usage(run_dir).free / 1e6:.1f} MB free): "
        f"{error.strerror}{writing}. Free space, then rerun the same command to resume from "
        f"{latest or 'the start (no checkpoint was written yet)'}"
    )


def forked() -> bool:
    """Forked by torchrun from the launcher (launcher.start_method fork, or auto for CPU workers), not a fresh
    interpreter."""
    return multiprocessing.parent_process() is not None


def become_a_fresh_process() -> None:
    """What an exec'd worker starts with: its own session, as torchrun gives its subprocesses (a Ctrl-C in the
    terminal reaches the launcher only, which asks the workers to checkpoint), and the default signal handlers
    instead of every Python handler inherited from the launcher (its preempt_signal, Ctrl-C) and torchrun's agent."""
    os.setsid()
    for number in signal.valid_signals():
        if callable(signal.getsignal(number)):
            signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets it up in a new interpreter


if __name__ == "__main__":
    main()
    if not forked():  # a forked worker returns to torchrun's wrapper, which reports back and exits without teardown
        exit_now()
