"""What distrain knows of each model family (`config.model_type`), in one place: the tensor-parallel plan of a
transformer block and the modules LoRA adapts by default. A family not listed here uses the model's own
`base_model_tp_plan` for tensor parallelism and needs `adapter.target_modules`."""

from __future__ import annotations

from dataclasses import dataclass, field

from distrain.trainer.errors import ConfigError


@dataclass(frozen=True)
class Family:
    # Block-relative module name -> "colwise" | "rowwise". Q, K, V (and the MLP's first matrices) split by
    # columns, the attention output and the MLP's last matrix by rows: one all-reduce after attention, one after
    # the MLP. The per-rank head count follows from the split (attention reshapes to (..., -1, head_dim)).
    tp_layer_plan: dict[str, str] = field(default_factory=dict)
    lora_targets: list[str] = field(default_factory=list)  # suffixes of module names (peft's matching)
    dropout_fields: tuple[str, ...] = ()  # the config fields model.dropout sets (hidden and attention dropout)
    # data.pack_examples: the model passes position ids to transformers' mask builders, which then keep attention
    # inside each packed example (trainer/data/packing.py; checked against padding in tests/test_packing.py)
    packs: bool = False
    # prune=structured: the block-relative names of the feed-forward's input Linears (one row per neuron) and of
    # its output Linear (one column per neuron); config.intermediate_size is the neuron count
    feed_forward: tuple[tuple[str, ...], str] | None = None


_GATED_FEED_FORWARD = (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
_DECODER_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FAMILIES: dict[str, Family] = {
    "bert": Family(
        tp_layer_plan={
            "attention.self.query": "colwise",
            "attention.self.key": "colwise",
            "attention.self.value": "colwise",
            "attention.output.dense": "rowwise",
            "intermediate.dense": "colwise",
            "output.dense": "rowwise",
        },
        lora_targets=["query", "key", "value", "dense"],
        dropout_fields=("hidden_dropout_prob", "attention_probs_dropout_prob"),
        packs=True,
        feed_forward=(("intermediate.dense",), "output.dense"),
    ),
    "llama": Family(
        tp_layer_plan={
            "self_attn.q_proj": "colwise",
            "self_attn.k_proj": "colwise",
            "self_attn.v_proj": "colwise",
            "self_attn.o_proj": "rowwise",
            "mlp.gate_proj": "colwise",
            "mlp.up_proj": "colwise",
            "mlp.down_proj": "rowwise",
        },
        lora_targets=_DECODER_LORA,
        dropout_fields=("attention_dropout",),  # Llama has no hidden-state dropout
        packs=True,
        feed_forward=_GATED_FEED_FORWARD,
    ),
    "mistral": Family(
        lora_targets=_DECODER_LORA, dropout_fields=("attention_dropout",), packs=True, feed_forward=_GATED_FEED_FORWARD
    ),
    "qwen2": Family(
        lora_targets=_DECODER_LORA, dropout_fields=("attention_dropout",), packs=True, feed_forward=_GATED_FEED_FORWARD
    ),
}


def dropout_config(model_type: str, dropout: float | None) -> dict[str, float]:
    """The config fields that give a `model_type` model the dropout `model.dropout` (none when it is null)."""
    if dropout is None:
        return {}
    family = FAMILIES.get(model_type)
    if family is None or not family.dropout_fields:
        known = sorted(name for name, f in FAMILIES.items() if f.dropout_fields)
        raise ConfigError([f"model.dropout: set for a {model_type!r} model, whose dropout settings distrain does not "
                           f"know (it knows {known}); expected null"])  # fmt: skip
    return dict.fromkeys(family.dropout_fields, float(dropout))


def packing_problems(model_type: str, pack_examples: bool) -> list[str]:
    """data.pack_examples on a family whose masks distrain has not checked to stay inside each example."""
    family = FAMILIES.get(model_type)
    if not pack_examples or (family is not None and family.packs):
        return []
    known = sorted(name for name, f in FAMILIES.items() if f.packs)
    return [f"data.pack_examples: a {model_type!r} model is not known to keep attention inside packed examples "
            f"(known: {known}); expected false"]  # fmt: skip


def feed_forward_names(model_type: str) -> tuple[tuple[str, ...], str]:
    """prune=structured's (input Linears, output Linear) of a block of a `model_type` model."""
    family = FAMILIES.get(model_type)
    if family is None or family.feed_forward is None:
        known = sorted(name for name, f in FAMILIES.items() if f.feed_forward)
        raise ConfigError([f"prune.name: structured pruning of a {model_type!r} model, whose feed-forward layers "
                           f"distrain does not know (it knows {known}); expected prune=magnitude or none"])  # fmt: skip
    return family.feed_forward
