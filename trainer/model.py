"""Tokenizer and model: from a local folder, a bundled package (pkg://), a Hub id, a GGUF file (converted once to a
cached safetensors folder), or a config (random init, optionally with a tokenizer trained on the run's data)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer

from distrain.trainer.data.cache import build_once, file_digest
from distrain.trainer.distributed import DistEnv
from distrain.trainer.errors import ConfigError
from distrain.trainer.paths import is_local, resolve_path

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"  # inside the run dir, when the run trains its own tokenizer
EOS = "<|endoftext|>"


def _location(value: str) -> str:
    return str(resolve_path(value)) if is_local(value) else value


def model_source(model: DictConfig, env: DistEnv) -> str | None:
    """Where from_pretrained should read the weights: a folder or Hub id, or None for a random-init model.

    A GGUF file (quantized weights, e.g. the bundled SmolLM2) is dequantized once into a safetensors folder under
    model.cache_dir, keyed by the file's contents; later runs, and every other rank, load that folder (seconds,
    instead of a minute of dequantization per process)."""
    if model.name_or_path is None:
        return None
    if model.gguf_file is None:
        return _location(model.name_or_path)
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


def load_tokenizer(model: DictConfig, env: DistEnv, run_dir: Path | None = None) -> Any:
    """The run's tokenizer. With model.train_tokenizer_vocab set, it is the one trained into <run dir>/tokenizer
    (train_tokenizer must have run)."""
    if model.train_tokenizer_vocab is not None:
        if run_dir is None or not (run_dir / TOKENIZER_DIR).is_dir():
            raise ConfigError(
                [f"model.train_tokenizer_vocab: the run's tokenizer is missing ({run_dir}/{TOKENIZER_DIR})"]
            )
        source = str(run_dir / TOKENIZER_DIR)
    elif model.tokenizer is not None:
        source = _location(model.tokenizer)
    else:
        source = model_source(model, env)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if not tokenizer.is_fast:
        raise ConfigError([f"model.tokenizer: expected a fast tokenizer (word alignment needs it), {source} has none"])
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without one; padding positions are masked anyway
    return tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2 style: any text, no unknown tokens) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    wrapped.save_pretrained(folder)


TOKENIZER_SAMPLE_RECORDS = 10_000  # streaming or a mixture: the tokenizer learns from this many records of each source


def ensure_run_tokenizer(cfg: DictConfig, run_dir: Path, env: DistEnv) -> None:
    """Train the run's tokenizer on its training split once (model.train_tokenizer_vocab), into the run dir."""
    if cfg.model.train_tokenizer_vocab is None:
        return
    from distrain.trainer.data.sources import column, read_splits

    def train(partial: Path) -> None:
        if cfg.data.streaming or cfg.data.mixture:  # the first records of each source
            from distrain.trainer.data.streaming import first_records

            records = first_records(cfg.data, cfg.train.seed, TOKENIZER_SAMPLE_RECORDS)
        else:
            records = read_splits(cfg.data)["train"]
        texts = [str(column(r, "text_column", cfg.data.text_column)) for r in records]
        log.info("training a %d-token BPE tokenizer on %d training texts", cfg.model.train_tokenizer_vocab, len(texts))
        train_tokenizer(texts, cfg.model.train_tokenizer_vocab, partial)

    build_once(run_dir / TOKENIZER_DIR, train, env, "the run's tokenizer")


def build_model(
    model: DictConfig,
    auto_class: type,
    seed: int,
    source: str | None,
    tokenizer: Any,
    pretrained: bool = True,
    **head: Any,
) -> torch.nn.Module:
    """The model with its task head (`head`: e.g. num_labels, id2label, label2id).

    Seeded so that every rank, and every world size, starts from the same weights (random heads included).
    `pretrained=False` builds the architecture only, for loading a distrain checkpoint over it. A random-init
    model takes its vocabulary size and special token ids from the tokenizer unless model.architecture sets them.
    """
    torch.manual_seed(seed)
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
        config = AutoConfig.for_model(**fields, **head)
        return auto_class.from_config(config, trust_remote_code=model.trust_remote_code)
    if pretrained:
        return auto_class.from_pretrained(source, **common, **head)
    config = AutoConfig.from_pretrained(source, **common, **head)
    return auto_class.from_config(config, trust_remote_code=model.trust_remote_code)
