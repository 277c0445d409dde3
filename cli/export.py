"""`distrain export ckpt=<run dir | checkpoint | export> format=onnx [quantize=none|int8|int8_static]`: the model as
an ONNX graph for ONNX Runtime, checked against torch before it is written (trainer/export/onnx.py).

Exit 2: nothing usable to export or a setting is wrong (nothing written); exit 1: the int8 export lost more than
max_metric_drop on dev (the folder is written, marked failed in onnx_export.json).
"""

from __future__ import annotations

import sys
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


@hydra.main(config_path="pkg://distrain.configs", config_name="export", version_base=None)
def export_job(cfg: DictConfig) -> None:
    from distrain.trainer.export.onnx import QuantizationLoss, default_output, export_onnx
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
        try:
            meta = export_onnx(weights, target, cfg.quantize, float(cfg.max_metric_drop), cfg.calibration_samples,
                               cfg.batch_size, float(cfg.fp32_tolerance), say, cfg.max_samples)  # fmt: skip
        except QuantizationLoss as error:
            print_error("export failed its check", str(error))
            raise SystemExit(1) from None
        except KeyboardInterrupt:  # the half-written folder is already removed
            print_error("export interrupted", f"nothing was written to {target}")
            raise SystemExit(130) from None
    except UserError as error:
        print_error("cannot export", str(error))
        raise SystemExit(2) from None
    metric = meta["metric"]
    scores = ", ".join(f"{name} {values[metric]:.4f}" for name, values in meta["dev_metrics"].items())
    console.print(f"dev {metric}: {scores}", highlight=False)
    console.print(f"wrote {target} ({meta['precision']}, {meta['status']})", highlight=False)


def main() -> None:
    check_tool_command_line("export", sys.argv[1:])
    export_job()


if __name__ == "__main__":
    main()
