"""Preference tuning of a causal LM with DPO (`task=dpo`; Rafailov et al. 2023, the sigmoid loss as TRL's
DPOTrainer defines it).

Data: jsonl lines {"prompt", "chosen", "rejected"}: plain strings, or chat-formatted (the prompt a list of
{role, content} messages; chosen/rejected the assistant's answer as a string or a list of messages). A pair becomes
two sequences, prompt + chosen and prompt + rejected; the log-probability of a sequence is summed over its response
tokens only. With pi the policy's and ref the frozen reference's (trainer/train/reference.py) log-probabilities:

    reward(response) = beta * (pi(response) - ref(response))
    loss(pair) = -log sigmoid(reward(chosen) - reward(rejected))

The loss is summed over this rank's pairs (a pair is one target), so the step's normalisation by the global number
of targets (train/step.py) makes 1 and N processes agree. Dev metrics: reward accuracy (the share of pairs whose
chosen reward is above the rejected one; a tie counts half, so the start, where policy = reference and every pair
ties, reads 0.5: chance), the mean reward margin, the mean chosen and rejected rewards, and the mean loss.
"""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distrain.trainer.config.schema import DataFormat, TaskName
from distrain.trainer.data import chat
from distrain.trainer.data.sources import Record
from distrain.trainer.errors import DataError
from distrain.trainer.tasks.base import IGNORE, Task
from distrain.trainer.tasks.lm import CausalLMTask

if TYPE_CHECKING:
    from datasets import Dataset

COLUMNS = ("prompt", "chosen", "rejected")


def render(
    tokenizer: Any, prompt: str | list[dict], response: str | list[dict], end_token: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example. Plain text: both tokenized without special tokens, the response
    ending with EOS (as clm's documents do). Chat: the conversation rendered with the tokenizer's chat template
    (trainer/data/chat.py, as task=chat renders it); the response is everything from the answer's first assistant
    turn on (its end-of-turn token included; `end_token`, the template's, found here when not given)."""
    if isinstance(prompt, str):
        ids = tokenizer([prompt, response], add_special_tokens=False)["input_ids"]
        return ids[0], ids[1] + [tokenizer.eos_token_id]
    answer = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    end_token = end_token or chat.end_of_turn(tokenizer)[1]
    text, spans = chat.assistant_spans(tokenizer, [*prompt, *answer], end_token, "a preference pair")
    start = spans[-len(answer)][0]  # the answer's turns are the conversation's last assistant turns
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first = next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > start)
    return encoded["input_ids"][:first], encoded["input_ids"][first:]


def truncated(prompt: list[int], response: list[int], size: int) -> tuple[list[int], int]:
    """prompt + response in at most `size` tokens, and where the response starts: the response keeps at least half
    (cut at its end), the prompt loses its beginning (the part farthest from the answer)."""
    keep = min(len(response), max(size - len(prompt), size // 2))
    prompt = prompt[len(prompt) - (size - keep) :] if len(prompt) > size - keep else prompt
    return prompt + response[:keep], len(prompt)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the log-probabilities of its targets (labels not IGNORE: the response tokens)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -losses.view(labels.shape).sum(-1)


def pair_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) from the log-probabilities of 2B rows: B chosen, then B rejected."""
    rewards = beta * (policy - reference)
    half = len(rewards) // 2
    return rewards[:half], rewards[half:]


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen - rejected)


def reward_metrics(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """The dev metrics from (chosen reward, rejected reward) per pair."""
    n = max(len(pairs), 1)
    margins = [c - r for c, r in pairs]
    accuracy = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / n
    loss = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / n  # -log sigmoid(m)
    return {
        "reward_accuracy": accuracy,
        "reward_margin": sum(margins) / n,
        "chosen_reward": sum(c for c, _ in pairs) / n,
        "rejected_reward": sum(r for _, r in pairs) / n,
        "loss": loss,
        "pairs": float(len(pairs)),
    }


class DpoTask(Task):
    name = TaskName.dpo
    metrics_reported = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "loss")
    lower_is_better = frozenset({"loss"})
    metric_titles = {"reward_accuracy": "reward accuracy"}
    formats = (DataFormat.jsonl,)
    pipeline_task = "text-generation"
    needs_reference = True
    rows_per_sample = 2
    forward_kwargs = {"use_cache": False}
    loader_columns = ("chosen_ids", "rejected_ids", "chosen_start", "rejected_start")
    # The export is a causal LM: `distrain predict` continues prompts as clm's does.
    generation_kwargs = CausalLMTask.generation_kwargs
    format_prediction = CausalLMTask.format_prediction

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        super().__init__(cfg, tokenizer)
        self.beta = float(cfg.dpo.beta)
        self.reference: Any = None  # trainer/train/reference.py's Reference, set by whoever runs the model

    @functools.cached_property
    def end_token(self) -> str:
        """The chat template's end-of-turn token: asked of the template once, for the first chat example."""
        return chat.end_of_turn(self.tokenizer)[1]

    @classmethod
    def check(cls, cfg: DictConfig) -> list[str]:
        problems = super().check(cfg)
        if cfg.data.labels is not None:
            problems.append("data.labels: dpo has no labels; expected null")
        if not (cfg.dpo.beta > 0 and math.isfinite(cfg.dpo.beta)):
            problems.append(f"dpo.beta: expected a finite number > 0, got {cfg.dpo.beta}")
        for key, why in (("data.streaming", "preference pairs are read whole"), ("data.mixture", "one source"),
                         ("distill.teacher", "the reference model is dpo's frozen model")):  # fmt: skip
            value = cfg
            for part in key.split("."):
                value = value[part]
            if value:
                problems.append(f"{key}: not supported with task=dpo ({why}); expected it unset")
        if cfg.parallel.name in ("tp", "fsdp_tp"):
            problems.append(f"parallel.name: expected single, ddp or fsdp with task=dpo, got {cfg.parallel.name}: the "
                            "reference is replicated or sharded like the model, never tensor-parallel")  # fmt: skip
        if cfg.adapter.name == "lora" and cfg.dpo.reference is not None:
            problems.append("dpo.reference: with adapter=lora the reference is the frozen base itself (the adapters "
                            "disabled); expected null, or adapter=none to compare with another model")  # fmt: skip
        if cfg.checkpoint.init_from is not None and cfg.dpo.reference is None:
            problems.append("dpo.reference: the run starts from checkpoint.init_from; name the reference too "
                            f"(dpo.reference={cfg.checkpoint.init_from} for its starting weights)")  # fmt: skip
        return problems

    @classmethod
    def tokenizer_text(cls, record: Record, data: DictConfig) -> str:
        return "\n".join(_text(record.fields.get(key, "")) for key in COLUMNS)

    # --- data ----------------------------------------------------------------------------------------------
    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
        from datasets import Dataset, Features, Value

        features = Features({key: Value("string") for key in COLUMNS})
        out = {}
        for split, recs in records.items():
            rows = [checked(r) for r in recs]
            out[split] = Dataset.from_dict(
                {key: [json.dumps(row[key]) for row in rows] for key in COLUMNS}, features=features
            )
        return out

    def drop_columns(self, raw: Dataset) -> list[str]:
        return raw.column_names

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        size = self.cfg.data.max_length
        out: dict[str, list] = {"chosen_ids": [], "chosen_start": [], "rejected_ids": [], "rejected_start": []}
        for prompt, chosen, rejected in zip(*(batch[key] for key in COLUMNS), strict=True):
            prompt = json.loads(prompt)
            end_token = None if isinstance(prompt, str) else self.end_token
            for key, response in (("chosen", chosen), ("rejected", rejected)):
                ids, start = truncated(*render(self.tokenizer, prompt, json.loads(response), end_token), size)
                out[f"{key}_ids"].append(ids)
                out[f"{key}_start"].append(start)
        out["length"] = [max(len(c), len(r)) for c, r in zip(out["chosen_ids"], out["rejected_ids"], strict=True)]
        return out

    def head(self, data: Any) -> dict[str, Any]:
        return {}

    # --- model ---------------------------------------------------------------------------------------------
    def auto_model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def collator(self, train: bool) -> Any:
        return self.collate

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One batch of 2B rows: the B chosen sequences, then the B rejected ones, padded on the right. Labels are
        shifted as clm's (labels[t] is the target of position t); only positions whose next token belongs to the
        response have one."""
        rows = [list(f["chosen_ids"]) for f in features] + [list(f["rejected_ids"]) for f in features]
        starts = [int(f["chosen_start"]) for f in features] + [int(f["rejected_start"]) for f in features]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            start = max(start, 1)  # the first token has no position before it to predict it from
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            labels[i, start - 1 : len(row) - 1] = input_ids[i, start : len(row)]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    # --- loss and metrics ----------------------------------------------------------------------------------
    def rewards(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            raise RuntimeError("task=dpo: no reference model was attached (trainer/train/reference.py)")
        return pair_rewards(sequence_logps(logits, batch["labels"]), self.reference.logps(batch), self.beta)

    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return dpo_losses(*self.rewards(logits, batch)).sum()

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["input_ids"]) // 2  # a pair is one target

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
        chosen, rejected = self.rewards(logits, batch)
        return list(zip(chosen.cpu().tolist(), rejected.cpu().tolist(), strict=True))

    def metrics(self, predictions: dict[int, tuple[float, float]], dataset: Dataset) -> dict[str, float]:
        return reward_metrics([predictions[i] for i in sorted(predictions)])


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value)


def _messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))  # fmt: skip


def checked(record: Record) -> dict[str, Any]:
    """The record's prompt, chosen and rejected, or a DataError naming its file:line and what was expected."""
    fields = record.fields
    missing = [key for key in COLUMNS if key not in fields]
    if missing:
        raise DataError(f"{record.where}: no column {missing[0]!r} (task=dpo reads {list(COLUMNS)}); the record "
                        f"has {sorted(fields)}")  # fmt: skip
    prompt = fields["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{record.where}: empty prompt")
        for key in ("chosen", "rejected"):
            if not isinstance(fields[key], str) or not fields[key].strip():
                raise DataError(f"{record.where}: {key}: expected a non-empty string (the prompt is text), "
                                f"got {fields[key]!r:.80}")  # fmt: skip
    elif _messages(prompt):
        for key in ("chosen", "rejected"):
            value = fields[key]
            if not ((isinstance(value, str) and value.strip()) or _messages(value)):
                raise DataError(f"{record.where}: {key}: expected the assistant's answer, a string or a list of "
                                f"{{role, content}} messages, got {value!r:.80}")  # fmt: skip
    else:
        raise DataError(f"{record.where}: prompt: expected a string or a list of {{role, content}} messages, "
                        f"got {prompt!r:.80}")  # fmt: skip
    return {key: fields[key] for key in COLUMNS}
