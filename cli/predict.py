"""`distrain predict ckpt=... input=FILE|-`: batch inference, one JSON line out per input line.

The weights (a checkpoint, an export or a run dir's) are wrapped in the transformers pipeline of the run's task:
entities for NER, label + score for classification, the continuation for causal LMs, the fills of the mask token
for masked LMs. Empty input lines give `{"input": "", "skipped": "empty line"}`, so output line N is input line N.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from transformers import pipeline

from distrain.cli.compose import check_tool_command_line
from distrain.cli.console import error_console, print_error
from distrain.cli.validate import writable_file_problem
from distrain.trainer import strict_json
from distrain.trainer.errors import UserError
from distrain.trainer.inference.load import failed_export, load_for_inference, locate


def read_lines(source: str) -> list[str]:
    """The input's lines, decoded as UTF-8 (a leading BOM dropped); UserError naming the line that is not."""
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"input: {path} is not a file")
        data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(f"{source}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}); convert the input first, "
                        "e.g. iconv -f latin1 -t utf-8") from None  # fmt: skip


@hydra.main(config_path="pkg://distrain.configs", config_name="predict", version_base=None)
def predict_job(cfg: DictConfig) -> None:
    try:
        weights = locate(Path(cfg.ckpt).expanduser().resolve())
        if warning := failed_export(weights):
            error_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if cfg.output != "-" and (problem := writable_file_problem("output", cfg.output)):
            raise UserError(f"{problem} (or - for standard output)")
        lines = read_lines(cfg.input)
        _, env, tokenizer, task, model = load_for_inference(weights)
        for number, line in enumerate(lines, start=1):
            problem = task.check_input(line) if line.strip() else None
            if problem:
                raise UserError(f"{cfg.input}:{number}: {problem}")
    except UserError as error:
        print_error("cannot predict", str(error))
        raise SystemExit(2) from None
    torch.manual_seed(cfg.seed)
    predict_batch = task.text_tagger(model, env, cfg)  # NER: eval's own words and labels (see NerTask.text_tagger)
    if predict_batch is None:
        runner = pipeline(
            task.pipeline_task, model=model, tokenizer=tokenizer, device=env.device, **task.pipeline_kwargs(cfg)
        )
        generation = task.generation_kwargs(cfg)

        def predict_batch(chunk: list[str], batch_size: int) -> list:
            # A pipeline given a list of one returns that one result unwrapped (fill-mask: its list of fills), so a
            # lone text goes in as a string, whose result has the same shape as each item of a longer list's.
            if len(chunk) == 1:
                return [runner(chunk[0], **generation)]
            return runner(chunk, batch_size=batch_size, **generation)

    texts = [line for line in lines if line.strip()]
    outputs = []
    with Progress(console=error_console, transient=True, disable=not error_console.is_terminal) as progress:
        job = progress.add_task("predicting", total=len(texts))
        for start in range(0, len(texts), cfg.batch_size):
            chunk = texts[start : start + cfg.batch_size]
            outputs += predict_batch(chunk, cfg.batch_size)
            progress.advance(job, len(chunk))
    results = iter(outputs)
    out = sys.stdout if cfg.output == "-" else open(Path(cfg.output).expanduser(), "w", encoding="utf-8")  # noqa: SIM115
    truncated = []
    try:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                record = {"input": line, **task.format_prediction(line, next(results))}
            else:
                record = {"input": line, "skipped": "empty line"}
            if "truncated" in record:
                truncated.append(number)
            out.write(strict_json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if truncated:  # NER: as in evaluation, the words beyond data.max_length tokens are tagged O
        shown = ", ".join(map(str, truncated[:10])) + (", ..." if len(truncated) > 10 else "")
        error_console.print(
            f"[yellow]warning:[/] {len(truncated)} line(s) longer than the model's data.max_length "
            f"tokens (line {shown}): the words beyond it are not tagged; each such record's "
            '"truncated" says how many were. Split long lines into sentences',
            highlight=False,
        )


def main() -> None:
    check_tool_command_line("predict", sys.argv[1:])
    predict_job()


if __name__ == "__main__":
    main()
