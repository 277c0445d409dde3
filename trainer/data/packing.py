"""Example packing (`data.pack_examples`): a training micro-batch's examples laid end to end in rows of at most
`data.max_length` tokens, so few positions are padding and the GEMMs see fewer, longer rows. The one home of
the mechanism for every task that packs (ner, clm and the chat examples that flow through clm's collation).

Each example keeps its own positions (its position ids restart at 0) and its own attention: the model gets no
attention mask, and transformers (5.x masking_utils, `find_packed_sequence_indices`) starts a new sequence wherever
a position id does not follow the previous one by 1, then builds the mask from those sequences: block-causal for
decoders (`create_causal_mask`), block-diagonal for encoders (`create_bidirectional_mask`, to which BERT passes its
position ids). That holds for the eager and sdpa attention on CPU (tests/test_packing.py compares packed and padded
logits for each model family that `families.py` marks `packs`). On GPU, `flash_attention_2` reads the same position
ids for its varlen kernels; distrain does not test that path (no GPU here).

Targets are per example: the caller gives each example's `labels` aligned with its positions (clm shifts within
the example first), so no target crosses into the next example and the number of targets, which the loss is
divided by, is the same as with padding. Evaluation batches are not packed (predictions are per example).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100  # label of positions that carry no target (special tokens, padding, non-first sub-words)
TRIES = 16  # row widths rows_of tries besides the longest example's
EXAMPLES = "packed_examples"  # the batch key holding how many examples a packed batch carries (for samples/s)


def pack(features: list[dict[str, Any]], budget: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole examples (`input_ids`, `labels`: lists of the same length), at most `budget` tokens each (or
    the longest example's length, when longer), laid out with the fewest padding positions (see rows_of).

    The shorter rows end in padding with label IGNORE and position id 0: each pad token is a one-token sequence of
    its own, so no real token attends to it and no attention row is empty (an all-masked softmax row is NaN)."""
    rows = rows_of([len(f["input_ids"]) for f in features], budget)
    width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, targets = features[i]["input_ids"], features[i]["labels"]
            if len(targets) != len(ids):
                raise ValueError(f"example {i}: {len(ids)} input_ids but {len(targets)} labels")
            end = start + len(ids)
            input_ids[r, start:end] = torch.as_tensor(ids)
            labels[r, start:end] = torch.as_tensor(targets)
            positions[r, start:end] = torch.arange(len(ids))
            real[r, start:end] = 1
            start = end
    # attention_mask marks the real tokens for the step's accounting (tokens/s, padding); the model never gets it
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": real,
            EXAMPLES: torch.tensor(len(features))}  # fmt: skip


def rows_of(lengths: list[int], budget: int) -> list[list[int]]:
    """The examples (indices) of each row. Every row is padded to the longest, so the layout tries row widths
    from the longest example up to `budget` that some number of rows would fill (total / rows), fills rows of it
    first-fit from the longest example down, and keeps the one with the fewest positions (rows x widest row; a tie:
    fewer rows). Never more positions than padding each example to the longest (the width of the longest example
    is one of the tries), and no FLOP on padding when the examples fill the rows exactly."""
    longest, total = max(lengths), sum(lengths)
    widths = sorted({-(-total // k) for k in range(1, len(lengths) + 1) if longest < -(-total // k) <= budget})
    widths = [longest, *widths[:: max(1, -(-len(widths) // TRIES))]]  # at most TRIES + 1 layouts: quick
    best: list[list[int]] = []
    best_cost = None
    for width in sorted(widths, reverse=True):
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if row is None:
                rows.append([])
                room.append(max(width, lengths[i]))
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= lengths[i]
        cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_cost is None or cost < best_cost:
            best, best_cost = rows, cost
    return best


def is_packed(batch: dict[str, Any]) -> bool:
    return EXAMPLES in batch


def packed_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward inputs of a packed batch: tokens and position ids, no attention mask (see the module doc)."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """How many examples a collated batch carries: rows, unless it is packed."""
    return int(batch[EXAMPLES]) if is_packed(batch) else len(batch["attention_mask"])
