"""`distrain export ckpt=<run dir | checkpoint | export> format=onnx [quantize=none|int8|int8_static]`: the model as
an ONNX graph for ONNX Runtime, checked against torch before it is written (trainer/export/onnx.py).

Exit 2: nothing usable to export or a setting is wrong (nothing written); exit 1: the int8 export lost more than
max_metric_drop on dev (the folder is written, marked failed in onnx_export.json).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distrain.cli.compose import check_tool_command_line
from distrain.cli.console import console, print_error
from distrain.trainer.errors import UserError


def check(cfg: DictConfig) -> list[str]:
    from distrain.trainer.export.onnx import QUANTIZE

    problems = []
    if cfg.format != "onnx":
        problems.append(f"format: expected onnx, got {cfg.format!r}")
    if cfg.quantize not in QUANTIZE:
        problems.append(f"quantize: expected one of {list(QUANTIZE)}, got {cfg.quantize!r}")
    if not isinstance(cfg.max_metric_drop, int | float) or isinstance(cfg.max_metric_drop, bool):
        problems.append(f"max_metric_drop: expected a number, got {cfg.max_metric_drop!r}")
    tolerance = cfg.fp32_tolerance
    if not isinstance(tolerance, int | float) or isinstance(tolerance, bool) or not tolerance > 0:
        problems.append(f"fp32_tolerance: expected a number > 0, got {tolerance!r}")
    if not isinstance(cfg.calibration_samples, int) or cfg.calibration_samples < 1:
        problems.append(f"calibration_samples: expected an integer >= 1, got {cfg.calibration_samples!r}")
    return problems


@contextmanager
def ctrl_c_removes(partial: Path, target: Path):
    """Ctrl-C while the export runs removes `partial` and exits 130 from the signal handler itself: a
    KeyboardInterrupt raised inside torch.onnx's tracer comes back as its own error, or, raised in a Python callback
    of its C++ code, as a segfault. A shell that ignores SIGINT (a background job) keeps it ignored."""

    def stop(signum: int, frame: object) -> None:
        shutil.rmtree(partial, ignore_errors=True)
        print_error("export interrupted", f"nothing was written to {target}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@hydra.main(config_path="pkg://distrain.configs", config_name="export", version_base=None)
def export_job(cfg: DictConfig) -> None:
    from distrain.trainer.export.onnx import METADATA, default_output, export_onnx, partial_of, replace
    from distrain.trainer.inference.load import locate

    try:
        problems = check(cfg)
        if problems:
            raise UserError("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))
        weights = locate(Path(cfg.ckpt).expanduser().resolve())
        if weights.kind == "onnx":
            raise UserError(f"ckpt: {weights.path} is already an ONNX export; give the run dir, checkpoint or export/")
        target = Path(cfg.output).expanduser().resolve() if cfg.output else default_output(weights, cfg.quantize)
        if target.exists() and not cfg.overwrite:
            raise UserError(f"output: {target} exists; pass overwrite=true to replace it, or another output=DIR")
        console.print(f"[bold]distrain export[/] {weights.kind} {weights.path} -> {target} (onnx, {cfg.quantize})")
        say = lambda text: console.print(text, highlight=False)  # noqa: E731
        with ctrl_c_removes(partial_of(target), target):
            meta = export_onnx(weights, target, cfg.quantize, float(cfg.max_metric_drop), cfg.calibration_samples,
                               cfg.batch_size, float(cfg.fp32_tolerance), say, cfg.max_samples)  # fmt: skip
        replace(partial_of(target), target)
    except UserError as error:
        print_error("cannot export", str(error))
        raise SystemExit(2) from None
    if meta["status"] == "failed":
        print_error("export failed its check", f"{meta['failure']}: {target} is written but marked failed in "
                    f"{METADATA}; raise max_metric_drop to accept it, or ship quantize=none")  # fmt: skip
        raise SystemExit(1)
    metric = meta["metric"]
    scores = ", ".join(f"{name} {values[metric]:.4f}" for name, values in meta["dev_metrics"].items())
    console.print(f"dev {metric}: {scores}", highlight=False)
    console.print(f"wrote {target} ({meta['precision']}, {meta['status']})", highlight=False)


def main() -> None:
    check_tool_command_line("export", sys.argv[1:])
    export_job()


if __name__ == "__main__":
    main()
