"""The model: from a local folder, a bundled package (pkg://), a Hub id, a GGUF file (converted once to a
cached safetensors folder), or a config (random init)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer

from distrain.trainer.config.paths import is_local, resolve_path
from distrain.trainer.data.cache import build_once, file_digest
from distrain.trainer.model.families import dropout_config
from distrain.trainer.parallel.distributed import DistEnv

log = logging.getLogger(__name__)


def location(value: str) -> str:
    return str(resolve_path(value)) if is_local(value) else value


def model_source(model: DictConfig, env: DistEnv) -> str | None:
    """Where from_pretrained should read the weights: a folder or Hub id, or None for a random-init model.

    A GGUF file (quantized weights, e.g. the bundled SmolLM2) is dequantized once into a safetensors folder under
    model.cache_dir, keyed by the file's contents; later runs, and every other rank, load that folder (seconds,
    instead of a minute of dequantization per process)."""
    if model.name_or_path is None:
        return None
    if model.gguf_file is None:
        return location(model.name_or_path)
    gguf = resolve_path(model.name_or_path) / model.gguf_file
    folder = resolve_path(model.cache_dir) / "gguf" / file_digest(gguf)[:20]

    def convert(partial: Path) -> None:
        from transformers import AutoModelForCausalLM

        log.info("converting %s to %s (once)", gguf, folder)
        source = str(gguf.parent)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name)  # dequantized to fp32
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are plain
        # fp32 tensors by now, so a model built from the same config (minus the GGUF marker) takes them as is.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(partial)
        AutoTokenizer.from_pretrained(source, gguf_file=gguf.name).save_pretrained(partial)

    return str(build_once(folder, convert, env, "the converted GGUF model"))


def build_model(
    model: DictConfig,
    auto_class: type,
    seed: int,
    source: str | None,
    tokenizer: Any,
    pretrained: bool = True,
    **head: Any,
) -> torch.nn.Module:
    """The model with its task head (`head`: e.g. num_labels, id2label, label2id), in training mode.

    Seeded so that every rank, and every world size, starts from the same weights (random heads included).
    `pretrained=False` builds the architecture only, for loading a distrain checkpoint over it. A random-init
    model takes its vocabulary size and special token ids from the tokenizer unless model.architecture sets them.
    Training mode because `from_pretrained` returns eval mode, in which a fine-tune would silently run without
    its dropout; inference (trainer/inference/load.py) and frozen models switch to eval mode themselves.
    """
    return _built(model, auto_class, seed, source, tokenizer, pretrained, head).train()


def _built(
    model: DictConfig, auto_class: type, seed: int, source: str | None, tokenizer: Any, pretrained: bool, head: dict
) -> torch.nn.Module:
    torch.manual_seed(seed)
    if model.init_from is not None:  # a smaller copy of a trained model (trainer/model/student.py)
        from distrain.trainer.model.student import student_model

        return student_model(model, auto_class, pretrained, head)
    common = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    if source is None:
        fields = OmegaConf.to_container(model.architecture)
        for key, value in (
            ("vocab_size", len(tokenizer)),
            ("pad_token_id", tokenizer.pad_token_id),
            ("bos_token_id", tokenizer.bos_token_id),
            ("eos_token_id", tokenizer.eos_token_id),
        ):
            fields.setdefault(key, value)  # fmt: skip
        fields.update(dropout_config(fields.get("model_type", ""), model.dropout))
        config = AutoConfig.for_model(**fields, **head)
        return auto_class.from_config(config, trust_remote_code=model.trust_remote_code)
    config = AutoConfig.from_pretrained(source, **common, **head)
    # model.dropout goes into the config before the modules are built: they read their dropout rates from it
    for key, value in dropout_config(config.model_type, model.dropout).items():
        setattr(config, key, value)
    if pretrained:
        return auto_class.from_pretrained(source, config=config, **common)
    return auto_class.from_config(config, trust_remote_code=model.trust_remote_code)
