"""What distrain knows of each model family (`config.model_type`), in one place: the tensor-parallel plan of a
transformer block and the modules LoRA adapts by default. A family not listed here uses the model's own
`base_model_tp_plan` for tensor parallelism and needs `adapter.target_modules`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    # Block-relative module name -> "colwise" | "rowwise". Q, K, V (and the MLP's first matrices) split by
    # columns, the attention output and the MLP's last matrix by rows: one all-reduce after attention, one after
    # the MLP. The per-rank head count follows from the split (attention reshapes to (..., -1, head_dim)).
    tp_layer_plan: dict[str, str] = field(default_factory=dict)
    lora_targets: list[str] = field(default_factory=list)  # suffixes of module names (peft's matching)


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
    ),
    "mistral": Family(lora_targets=_DECODER_LORA),
    "qwen2": Family(lora_targets=_DECODER_LORA),
}
