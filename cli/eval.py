"""`distrain eval ckpt=<checkpoint | export | run dir> split=test`: the task's report as a table, and files.

Evaluation runs in this process (one device); weights from a run of any world size load, since checkpoints
are keyed by parameter name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.table import Table

from distrain.cli.compose import check_tool_command_line
from distrain.cli.console import console, error_console, print_error
from distrain.cli.validate import writable_problem
from distrain.trainer.errors import UserError
from distrain.trainer.inference.load import default_eval_output, eval_report, failed_export, locate
from distrain.trainer.tasks import task_class


def report_table(report: dict[str, Any], key: str = "classes", what: str = "") -> Table:
    """The per-class rows of report[key] (scikit-learn's classification_report layout), averages last."""
    table = Table(title=f"{report['split']} split: {report['examples']} examples{what}")
    for column in ("", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if not column else "right")
    classes = report[key]
    averages = [name for name in classes if name.endswith("avg")]
    for name in [n for n in classes if n not in averages] + averages:
        row = classes[name]
        table.add_row(
            name,
            *(f"{row[k]:.4f}" for k in ("precision", "recall", "f1-score")),
            str(int(row["support"])),
            end_section=name == ([n for n in classes if n not in averages] or [None])[-1],
        )
    return table


def shown(value: float) -> str:
    """A score to 4 decimals; a count (clm's tokens) as the whole number it is."""
    return f"{value:,.0f}" if value > 1 and value.is_integer() else f"{value:.4f}"


@hydra.main(config_path="pkg://distrain.configs", config_name="eval", version_base=None)
def eval_job(cfg: DictConfig) -> float:
    try:
        weights = locate(Path(cfg.ckpt).expanduser().resolve())
        if warning := failed_export(weights):
            error_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        console.print(f"[bold]distrain eval[/] {weights.kind} {weights.path} on {cfg.split}")
        output = Path(cfg.output).expanduser().resolve() if cfg.output else default_eval_output(weights)
        # before the predictions, which take minutes on a large split
        if problem := writable_problem("output", str(output)):
            raise UserError(problem)
        report = eval_report(weights, cfg.split, cfg.batch_size, cfg.data_dir, output, cfg,
                             say=lambda message: console.print(message, highlight=False))  # fmt: skip
    except UserError as error:
        print_error("cannot evaluate", str(error))
        raise SystemExit(2) from None
    if "classes" in report:
        console.print(report_table(report, what=", entities (seqeval)" if "token_classes" in report else ""))
    if "token_classes" in report:  # ner: the seeds' token-level table, every gold word counted (O included)
        console.print(report_table(report, "token_classes", ", word-level tokens (O included)"))
    task = task_class(report["task"])
    metrics = [(k, v) for k, v in report.items() if isinstance(v, float)]
    console.print("  ".join(f"{task.metric_titles.get(k, k.replace('_', ' '))} {shown(v)}" for k, v in metrics))
    metric = report["metric"]  # the run's task.metric: the headline, and the value a Hydra sweeper reads
    console.print(f"{report['split']} {metric} {report[metric]:.4f} (task.metric)", highlight=False)
    console.print(f"wrote {', '.join(report['files'])}", highlight=False)
    return report[metric]


def main() -> None:
    check_tool_command_line("eval", sys.argv[1:])
    eval_job()


if __name__ == "__main__":
    main()
