"""Chat fine-tuning (`task=chat`): a causal LM trained on conversations, by default on the assistant's turns only.

Each conversation is one example `{input_ids, labels}`: the tokens of its render with the chat template
(trainer/data/chat.py), and unshifted labels that equal the tokens of every assistant turn (its content and the
template's end-of-turn token, so the model learns to stop) and IGNORE elsewhere; task.train_on_prompt=true trains
every token. The causal-LM collate shifts them (trainer/tasks/lm.py). Dev loss and perplexity are per assistant
token. `distrain eval` also generates the last assistant turn of each example, from the conversation before it, and
scores it against the reference (answer_accuracy: normalised exact match) and counts the answers that ended with
the end-of-turn token (answers_stopped). `distrain predict` answers each input line the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from distrain.trainer.config.schema import DataFormat, TaskName
from distrain.trainer.data import chat
from distrain.trainer.data.sources import Record
from distrain.trainer.errors import DataError
from distrain.trainer.tasks.base import IGNORE
from distrain.trainer.tasks.lm import CausalLMTask

if TYPE_CHECKING:
    from datasets import Dataset

EXAMPLES_IN_REPORT = 5  # generated answers shown in eval_<split>.json beside their references


class ChatTask(CausalLMTask):
    name = TaskName.chat
    metrics_reported = ("loss", "perplexity")
    formats = (DataFormat.chat,)
    model_inputs = ("input_ids", "attention_mask")
    loader_columns = ("input_ids", "labels")

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        super().__init__(cfg, tokenizer)
        chat.use_template(tokenizer, cfg.data.chat_template)  # saved with the tokenizer into the export
        self.end_id, self.end_token = chat.end_of_turn(tokenizer)

    @classmethod
    def tokenizer_text(cls, record: Record, data: DictConfig) -> str:
        return "\n".join(message["content"] for message in chat.training_conversation(record, data))

    @classmethod
    def check(cls, cfg: DictConfig) -> list[str]:
        problems = super().check(cfg)
        data = cfg.data
        if data.chat_template is not None and data.chat_template not in chat.TEMPLATES:
            problems.append(f"data.chat_template: expected null (the tokenizer's own) or one of "
                            f"{list(chat.TEMPLATES)}, got {data.chat_template!r}")  # fmt: skip
        if data.chat_template is None and cfg.model.train_tokenizer_vocab is not None:
            problems.append(
                "data.chat_template: a tokenizer trained for the run (model.train_tokenizer_vocab) has "
                f"no chat template; expected a named one: data.chat_template={next(iter(chat.TEMPLATES))}"
            )
        if data.packing:
            problems.append("data.packing: task=chat trains one conversation per sequence; expected false")
        if data.prompt_column == data.response_column:
            problems.append(f"data.response_column: expected another column than data.prompt_column "
                            f"({data.prompt_column!r})")  # fmt: skip
        return problems

    # --- data ----------------------------------------------------------------------------------------------
    def cache_settings(self) -> dict[str, Any]:
        data = self.cfg.data
        return {"max_length": data.max_length, "template": self.tokenizer.chat_template,
                "train_on_prompt": self.cfg.task.train_on_prompt,
                "columns": [data.prompt_column, data.response_column]}  # fmt: skip

    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
        from datasets import Dataset, Features, List, Value

        features = Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                             "where": Value("string")})  # fmt: skip
        return {
            split: Dataset.from_dict(
                {
                    "messages": [chat.training_conversation(r, self.cfg.data) for r in recs],
                    "where": [r.where for r in recs],
                },
                features=features,
            )  # fmt: skip
            for split, recs in records.items()
        }

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        renders = [chat.assistant_spans(self.tokenizer, messages, self.end_token, where)
                   for messages, where in zip(batch["messages"], batch["where"], strict=True)]  # fmt: skip
        encoded = chat.encode(self.tokenizer, renders, self.cfg.data.max_length)
        every = self.cfg.task.train_on_prompt
        return {
            "input_ids": [e.input_ids for e in encoded],
            "labels": [
                [t if every or mine else IGNORE for t, mine in zip(e.input_ids, e.assistant, strict=True)]
                for e in encoded
            ],  # fmt: skip
            "length": [len(e.input_ids) for e in encoded],
            # eval's answer accuracy: the last assistant turn's tokens (the loader passes only loader_columns)
            "answer_start": [e.answer_start for e in encoded],
            "answer_end": [e.answer_end for e in encoded],
        }

    # --- generation (eval's answer accuracy, predict) -------------------------------------------------------
    def generate(self, model: torch.nn.Module, prompts: list[list[int]], options: DictConfig, batch_size: int,
                 device: torch.device) -> list[tuple[str, bool]]:  # fmt: skip
        """Greedy (or options.do_sample) answers to tokenized prompts, each cut at the end-of-turn token:
        (answer text, whether it ended with the end-of-turn token within options.max_new_tokens)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        sample = bool(options.get("do_sample", False))  # eval: greedy
        sampling = (
            {"temperature": options.temperature, "top_k": options.top_k}
            if sample
            else {"temperature": None, "top_k": None, "top_p": None}
        )  # not the model's own sampling defaults
        settings = {"max_new_tokens": options.max_new_tokens, "do_sample": sample, "eos_token_id": self.end_id,
                    "pad_token_id": pad, **sampling}  # fmt: skip
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)  # left padding: every prompt ends where generation begins
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, width:].tolist()
            for tokens in generated:
                stopped = self.end_id in tokens
                tokens = tokens[: tokens.index(self.end_id)] if stopped else tokens
                out.append((self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), stopped))
        return out

    def raw_text_report(self, model: torch.nn.Module, dataset: Dataset, batch_size: int, env: Any,
                        options: DictConfig) -> dict[str, Any]:  # fmt: skip
        """Each example's last assistant turn generated from the conversation before it: answer_accuracy
        (normalised exact match with the reference), answers_stopped (ended with the end-of-turn token within
        options.max_new_tokens); examples whose last turn was cut by data.max_length are left out."""
        spans = zip(dataset["input_ids"], dataset["answer_start"], dataset["answer_end"], strict=True)
        rows = [(ids[:start], ids[start:end]) for ids, start, end in spans if start >= 0]
        answers = self.generate(model, [prompt for prompt, _ in rows], options, batch_size, env.device)
        references = [self.tokenizer.decode(ref, skip_special_tokens=True).strip() for _, ref in rows]
        right = [chat.normalise(a) == chat.normalise(r) for (a, _), r in zip(answers, references, strict=True)]
        count = max(len(rows), 1)
        return {
            "answer_accuracy": sum(right) / count,
            "answers_stopped": sum(stopped for _, stopped in answers) / count,
            "answers": len(rows),
            "max_new_tokens": options.max_new_tokens,
            "answer_examples": [{"reference": r, "answer": a, "stopped": s}
                                for r, (a, s) in list(zip(references, answers, strict=True))[:EXAMPLES_IN_REPORT]],
        }  # fmt: skip

    def check_input(self, line: str) -> str | None:
        try:
            chat.read_input(line, self.cfg.data, "input")
        except DataError as error:
            return str(error).removeprefix("input: ")
        return None

    def text_tagger(self, model: torch.nn.Module, env: Any, options: DictConfig) -> Callable[..., list[Any]]:
        """`distrain predict`: each line (a user message, or a JSON conversation) rendered with the generation
        prompt, answered until the end-of-turn token."""

        def answer(texts: list[str], batch_size: int) -> list[tuple[str, bool]]:
            prompts = [chat.render(self.tokenizer, chat.read_input(t, self.cfg.data, "input"), generation_prompt=True)
                       for t in texts]  # fmt: skip
            ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
            return self.generate(model, ids, options, batch_size, env.device)

        return answer

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        answer, stopped = output
        return {"answer": answer, "stopped": stopped}

    def finish_export(self, folder: Path) -> None:
        """Generation from the export (transformers.pipeline, model.generate) stops at the end-of-turn token."""
        from transformers import GenerationConfig

        if not (folder / "generation_config.json").is_file():  # an adapter folder alone: the base model's settings
            return
        config = GenerationConfig.from_pretrained(folder)
        config.eos_token_id = self.end_id
        config.save_pretrained(folder)

    card_example = "Which topic is this text about? Shares in the bank rose after profits beat forecasts."

    def card_usage(self) -> str:
        return ("```python\nfrom transformers import pipeline\n\nchat = pipeline(\"text-generation\", model=\"<this "
                f"folder>\")\nchat([{{\"role\": \"user\", \"content\": {self.card_example!r}}}])\n```\n\nThe "
                f"chat template is in the tokenizer; generation stops at its end-of-turn token {self.end_token} "
                "(generation_config.json). Or `distrain predict ckpt=<this folder> input=FILE`: one answer per line "
                "(a user message, or a JSON line with \"messages\").")  # fmt: skip
