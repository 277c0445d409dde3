"""Tokenizer and model from a local folder, a bundled package (pkg://), a Hub id, or a config (random init)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer

from distrain.trainer.paths import is_local, resolve_path


def _location(value: str) -> str:
    return str(resolve_path(value)) if is_local(value) else value


def load_tokenizer(model: DictConfig) -> Any:
    source = model.tokenizer or model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        _location(source), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if not tokenizer.is_fast:
        raise ValueError(f"model.tokenizer: expected a fast tokenizer (word alignment needs it), {source} has none")
    return tokenizer


def build_model(
    model: DictConfig, auto_class: type, seed: int, pretrained: bool = True, **head: Any
) -> torch.nn.Module:
    """The model with its task head (`head`: e.g. num_labels, id2label, label2id).

    Seeded so that every rank, and every world size, starts from the same weights (random heads included).
    `pretrained=False` builds the architecture only, for loading a distrain checkpoint over it.
    """
    torch.manual_seed(seed)
    common = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    if model.name_or_path is None:
        config = AutoConfig.for_model(**OmegaConf.to_container(model.architecture), **head)
        return auto_class.from_config(config, trust_remote_code=model.trust_remote_code)
    location = _location(model.name_or_path)
    if pretrained:
        return auto_class.from_pretrained(location, **common, **head)
    config = AutoConfig.from_pretrained(location, **common, **head)
    return auto_class.from_config(config, trust_remote_code=model.trust_remote_code)


def label_head(labels: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
