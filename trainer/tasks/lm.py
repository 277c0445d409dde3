"""Language modelling: masked (MLM, continued pre-training of encoders) and causal (CLM, decoders).

Documents are tokenized whole, then either
- packed (`data.packing=true`) into blocks of exactly `data.max_length` tokens: no padding at all. With
  `data.document_boundaries=true` (CLM) each document piece in a block gets position ids from 0, which makes the
  model's attention block-causal (transformers builds the mask from position ids when no attention mask is
  given), and no position is trained to predict the first token of the next document; or
- cut into pieces of at most `data.max_length` tokens, one document per sequence, padded per batch.
Evaluation reports perplexity = exp(mean loss per target token).
"""

from __future__ import annotations

import math
import zlib
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from distrain.trainer.config.schema import DataFormat, TaskName
from distrain.trainer.data.packing import pack
from distrain.trainer.data.sources import Record, column
from distrain.trainer.tasks.base import IGNORE, Task, mean_loss

if TYPE_CHECKING:
    from datasets import Dataset


class LanguageModelTask(Task):
    """What MLM and CLM share: documents -> token blocks, and perplexity."""

    metrics_reported = ("perplexity", "loss")
    lower_is_better = frozenset({"perplexity", "loss"})
    formats = (DataFormat.text, DataFormat.jsonl, DataFormat.csv)
    language_model = True

    def cache_settings(self) -> dict[str, Any]:
        data = self.cfg.data
        return {"max_length": data.max_length, "packing": data.packing, "boundaries": data.document_boundaries}

    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
        from datasets import Dataset, Features, Value

        key = self.cfg.data.text_column
        features = Features({"text": Value("string")})
        return {
            split: Dataset.from_dict({"text": [str(column(r, "text_column", key)) for r in recs]}, features=features)
            for split, recs in records.items()
        }

    def drop_columns(self, raw: Dataset) -> list[str]:
        return raw.column_names  # rows become blocks: nothing of the documents' rows survives

    def document_ids(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        size = self.cfg.data.max_length
        docs = [ids for ids in self.document_ids(batch["text"]) if ids]
        if not self.cfg.data.packing:
            pieces = [doc[i : i + size] for doc in docs for i in range(0, len(doc), size)]
            return {"input_ids": pieces, "length": [len(p) for p in pieces]}
        # Pack: one stream, cut into full blocks (the batch's last partial block is dropped, as in run_clm).
        stream = [token for doc in docs for token in doc]
        starts = [0] * len(stream)  # 1 where a document begins
        offset = 0
        for doc in docs:
            starts[offset] = 1
            offset += len(doc)
        blocks, positions = [], []
        for begin in range(0, len(stream) - size + 1, size):
            blocks.append(stream[begin : begin + size])
            if self.cfg.data.document_boundaries:
                row, position = [], 0
                for i in range(begin, begin + size):
                    position = 0 if (starts[i] or i == begin) else position + 1
                    row.append(position)
                positions.append(row)
            else:
                positions.append(list(range(size)))
        return {"input_ids": blocks, "position_ids": positions, "length": [size] * len(blocks)}

    def head(self, data: Any) -> dict[str, Any]:
        return {}

    def _pad(self, features: list[dict[str, Any]], key: str, value: int) -> torch.Tensor:
        width = max(len(f[key]) for f in features)
        return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
        """(sum of target losses, number of targets) per example."""
        return self.example_losses(logits, batch)

    def metrics(self, predictions: dict[int, tuple[float, int]], dataset: Dataset) -> dict[str, float]:
        loss = mean_loss(predictions)
        count = max(sum(n for _, n in predictions.values()), 1)
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "tokens": float(count)}


class CausalLMTask(LanguageModelTask):
    name = TaskName.clm
    pipeline_task = "text-generation"
    packs_examples = True
    # No KV cache in training: with one, transformers ignores the position ids when building the attention
    # mask, and packed documents would attend to each other.
    forward_kwargs = {"use_cache": False}

    @property
    def model_inputs(self) -> tuple[str, ...]:
        # Packed blocks have no padding: position ids alone tell the model where documents start.
        return ("input_ids", "position_ids") if self.cfg.data.packing else ("input_ids", "attention_mask")

    @property
    def loader_columns(self) -> tuple[str, ...]:
        return ("input_ids", "position_ids") if self.cfg.data.packing else ("input_ids",)

    def document_ids(self, texts: list[str]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [doc + [eos] for doc in ids]  # the model learns where a document ends

    def auto_model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def collator(self, train: bool) -> Any:
        return partial(self.collate, pack_examples=train and self.cfg.data.pack_examples)

    def collate(self, features: list[dict[str, Any]], pack_examples: bool = False) -> dict[str, torch.Tensor]:
        """Labels are shifted within each example (next_token_targets); with `pack_examples` the examples are laid
        end to end in rows (trainer/data/packing.py), else each is a row, padded to the longest."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        features = [{**f, "labels": next_token_targets(f)} for f in features]
        if pack_examples:
            return pack([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features],
                        self.cfg.data.max_length, pad)  # fmt: skip
        input_ids = self._pad(features, "input_ids", pad)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        real = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        batch = {"input_ids": input_ids, "attention_mask": real.long(), "labels": self._pad(features, "labels", IGNORE)}
        if "position_ids" in features[0]:
            batch["position_ids"] = self._pad(features, "position_ids", 0)
        return batch

    def generation_kwargs(self, options: Any) -> dict[str, Any]:
        return {
            "max_new_tokens": options.max_new_tokens,
            "do_sample": options.do_sample,
            "temperature": options.temperature if options.do_sample else None,
            "top_k": options.top_k if options.do_sample else None,
            "return_full_text": False,
        }

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        return {"continuation": output[0]["generated_text"]}


class MaskedLMTask(LanguageModelTask):
    name = TaskName.mlm
    pipeline_task = "fill-mask"
    loader_columns = ("input_ids", "special_tokens_mask")

    @classmethod
    def check(cls, cfg: DictConfig) -> list[str]:
        problems = super().check(cfg)
        if cfg.data.packing and cfg.data.document_boundaries:
            problems.append(
                "data.document_boundaries: packed mlm blocks attend across documents (BERT-style models take no "
                "block mask); expected false with data.packing=true, or data.packing=false"
            )
        return problems

    def document_ids(self, texts: list[str]) -> list[list[int]]:
        # [CLS] doc [SEP] per document, as BERT was pre-trained; packed blocks then hold several.
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        out = super().tokenize(batch)
        special = set(self.tokenizer.all_special_ids)
        out["special_tokens_mask"] = [[int(t in special) for t in ids] for ids in out["input_ids"]]
        out.pop("position_ids", None)  # BERT positions are absolute; packed MLM blocks attend across documents
        return out

    def auto_model_class(self) -> type:
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM

    def collator(self, train: bool) -> Any:
        return MaskingCollator(self.tokenizer, self.cfg.task.mask_probability, self.cfg.train.seed, train)

    @property
    def card_example(self) -> str:
        return f"Paris is the {self.tokenizer.mask_token} of France."

    def check_input(self, line: str) -> str | None:
        mask = self.tokenizer.mask_token
        return None if line.count(mask) == 1 else f"a fill-mask input needs one {mask}"

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        return {"fills": [{"token": o["token_str"], "score": round(float(o["score"]), 4)} for o in output]}


class MaskingCollator:
    """BERT masking (of `probability` of the tokens: 80% [MASK], 10% a random token, 10% unchanged).

    The draw of each example is seeded by (seed, epoch, the example's tokens), not by a shared random stream,
    so an example is masked the same way whichever rank or batch it lands in: runs with different numbers of
    processes, and resumed runs, see identical masks. Evaluation uses one fixed draw.
    """

    def __init__(self, tokenizer: Any, probability: float, seed: int, train: bool):
        self.tokenizer, self.probability, self.seed = tokenizer, probability, seed
        self.epoch = 0 if train else -1
        self.train = train

    def set_epoch(self, epoch: int) -> None:
        if self.train:
            self.epoch = epoch

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), pad)
        labels = torch.full((len(features), width), IGNORE)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.tensor(feature["input_ids"])
            n = len(ids)
            key = (zlib.crc32(ids.numpy().tobytes()) ^ (self.seed * 1_000_003 + self.epoch)) & 0xFFFFFFFF
            generator = torch.Generator().manual_seed(key)
            candidates = torch.tensor(feature["special_tokens_mask"]) == 0
            chosen = (torch.rand(n, generator=generator) < self.probability) & candidates
            action = torch.rand(n, generator=generator)
            random_tokens = torch.randint(len(self.tokenizer), (n,), generator=generator)
            masked = ids.clone()
            masked[chosen & (action < 0.8)] = self.tokenizer.mask_token_id
            swap = chosen & (action >= 0.8) & (action < 0.9)
            masked[swap] = random_tokens[swap]
            input_ids[row, :n] = masked
            labels[row, :n][chosen] = ids[chosen]
            attention[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def next_token_targets(feature: dict[str, Any]) -> list[int]:
    """The target of each position of one example: the next position's label (the example's own unshifted
    `labels`, IGNORE on what is not trained, e.g. a chat prompt; else its tokens). IGNORE at the example's last
    position, and before a document start inside a packed block (position id 0 next, data.document_boundaries),
    so no position is trained to predict another example's or document's first token."""
    following = list(feature["labels"] if "labels" in feature else feature["input_ids"])[1:]
    if "position_ids" in feature:
        following = [IGNORE if p == 0 else t for t, p in zip(following, feature["position_ids"][1:], strict=True)]
    return [*following, IGNORE]
