"""The Hugging Face Trainer side of `distrain bench` (cli/bench.py runs it under torchrun, 2 processes, gloo):

    torchrun --nproc-per-node=2 -m distrain.cli.bench_hf --data-dir=DIR --out=DIR [--model=minilm] [--steps=N]
        [--warmup=W] [--bf16] [--profile-steps FIRST LAST]

NER fine-tuning with the same model (a distrain model config: the same weights, or the same random init), data
files, per-rank batch, learning rate, weight decay, schedule, max length and length grouping as
`distrain train +experiment=conll_ner`. Throughput is measured as distrain measures it: real (non-padding) tokens
of the training batches of every rank, over the time of the optimizer steps with data loading, without logging,
evaluation and saving, after the first --warmup steps (the whole run's figure is beside it). With --test, the
test split's seqeval entity F1 over each word's first sub-word (as in transformers' run_ner example). --bf16:
the Trainer's bf16=True (autocast through accelerate, fp32 weights).
--profile-steps: torch.profiler from the end of step FIRST-1 to the end of step LAST (data loading included, as
distrain's train.profile_steps); each rank writes <out>/profile/rank_<r>.pt.trace.json and rank 0 adds the
per-step breakdown (trainer/observe/profiling.py) to the result. Rank 0 writes <out>/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset
from seqeval.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from distrain.cli.compose import compose_config
from distrain.trainer.data.conll import read_conll
from distrain.trainer.model.build import build_model, model_source
from distrain.trainer.model.tokenizer import load_tokenizer
from distrain.trainer.observe.profiling import FORWARD, breakdown
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks.labels import label_head, label_list


class StepClock(TrainerCallback):
    """Seconds of the training steps (data loading included): from the end of the previous step, or of the
    logging, evaluation or save that followed it, to the end of this step."""

    def __init__(self) -> None:
        self.per_step: list[float] = []
        self.mark: float | None = None

    def _restart(self, *args, **kwargs) -> None:
        self.mark = time.perf_counter()

    on_train_begin = on_log = on_evaluate = on_save = on_predict = _restart

    def on_step_end(self, *args, **kwargs) -> None:
        now = time.perf_counter()
        self.per_step.append(now - self.mark)
        self.mark = now


class StepProfiler(TrainerCallback):
    """torch.profiler over optimizer steps first..last, their data loading included."""

    def __init__(self, steps: list[int] | None, out: Path) -> None:
        self.first, self.last = steps or (None, None)
        self.trace = out / "profile" / f"rank_{int(os.environ.get('RANK', '0'))}.pt.trace.json"
        self.profiler: torch.profiler.profile | None = None

    def _start(self, state) -> None:
        if state.global_step + 1 == self.first:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._start(state)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.profiler is not None and state.global_step == self.last:
            self.profiler.stop()
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.trace))
            self.profiler = None
        self._start(state)


class CountingTrainer(Trainer):
    """Counts the real tokens and the positions (padding included) of the batches it trains on (this rank's, one
    batch per step: no accumulation); labels the forward for the profiler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_per_step: list[int] = []
        self.positions_per_step: list[int] = []

    def training_step(self, model, inputs, *args, **kwargs):
        self.tokens_per_step.append(int(inputs["attention_mask"].sum()))
        self.positions_per_step.append(inputs["attention_mask"].numel())
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, *args, **kwargs):
        with torch.profiler.record_function(FORWARD):
            return super().compute_loss(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="minilm", help="a distrain model config (configs/model/)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--warmup", type=int, default=0, help="first steps not counted in real_tokens_per_s")
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", action="store_true", help="evaluate on dev each epoch and on test at the end")
    parser.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True)")
    parser.add_argument("--profile-steps", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"))
    args = parser.parse_args()

    model_cfg = compose_config([f"model={args.model}"]).model
    env = DistEnv()  # no collectives needed to find the model: it is a folder or a config
    tokenizer = load_tokenizer(model_cfg, env)
    splits = {s: read_conll(Path(args.data_dir) / f"{s}.txt") for s in ("train", "dev", "test")}
    if args.max_train_samples:
        splits["train"] = splits["train"][: args.max_train_samples]
    labels = label_list(tag for sentence in splits["train"] for tag in sentence.tags)
    head = label_head(labels)

    def encode(sentences):
        enc = tokenizer(
            [s.tokens for s in sentences], is_split_into_words=True, truncation=True, max_length=args.max_length
        )
        rows = []
        for i, sentence in enumerate(sentences):
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else head["label2id"][sentence.tags[word]])
                previous = word
            rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": row})
        return Dataset.from_list(rows)

    data = {split: encode(sentences) for split, sentences in splits.items()}

    def metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        gold, pred = [], []
        for p_row, l_row in zip(predicted, prediction.label_ids, strict=True):
            keep = l_row != -100
            gold.append([labels[x] for x in l_row[keep]])
            pred.append([labels[x] for x in p_row[keep]])
        return {"f1": f1_score(gold, pred), "accuracy": accuracy_score(gold, pred)}

    source = model_source(model_cfg, env)
    model = build_model(model_cfg, AutoModelForTokenClassification, args.seed, source, tokenizer, **head)
    training_args = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=2 * args.batch,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=args.steps,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
        eval_strategy="epoch" if args.test else "no",
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        bf16=args.bf16,
    )
    clock = StepClock()
    profiler = StepProfiler(args.profile_steps, Path(args.out))
    trainer = CountingTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["dev"],
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=metrics,
        callbacks=[clock, profiler],
    )
    started = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - started
    counted = slice(args.warmup, None)
    tokens = torch.tensor([float(sum(trainer.tokens_per_step)), float(sum(trainer.tokens_per_step[counted])),
                           float(sum(trainer.positions_per_step[counted]))])  # fmt: skip
    dist.all_reduce(tokens)  # every rank's batches
    seconds = sum(clock.per_step[counted])
    result = {
        "real_tokens": tokens[1].item(),
        "step_seconds": seconds,
        "real_tokens_per_s": tokens[1].item() / seconds,
        "padding": 1.0 - tokens[1].item() / tokens[2].item(),  # of the counted steps' positions
        "counted_steps": len(clock.per_step[counted]),
        "all_steps_real_tokens_per_s": tokens[0].item() / sum(clock.per_step),
        "train_wall_seconds": train_wall,
        "steps": trainer.state.global_step,
        "optim": str(training_args.optim),
        "bf16": args.bf16,
    }
    if args.profile_steps:
        first, last = args.profile_steps
        result["profile_seconds_per_step"] = breakdown(profiler.trace, last - first + 1)
    if args.test:
        test = trainer.predict(data["test"])
        result["test_f1"], result["test_accuracy"] = test.metrics["test_f1"], test.metrics["test_accuracy"]
        result["dev_f1"] = [r["eval_f1"] for r in trainer.state.log_history if "eval_f1" in r]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
