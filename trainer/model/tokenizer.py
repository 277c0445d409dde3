"""The run's tokenizer: the model's own (a folder, a bundled package, a Hub id, a GGUF file), a named one
(model.tokenizer), or a byte-level BPE trained once on the run's data into the run dir (model.train_tokenizer_vocab)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import AutoTokenizer

from distrain.trainer.config import run_files
from distrain.trainer.data.cache import build_once
from distrain.trainer.errors import ConfigError
from distrain.trainer.model.build import location, model_source
from distrain.trainer.parallel.distributed import DistEnv

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


def load_tokenizer(model: DictConfig, env: DistEnv, run_dir: Path | None = None) -> Any:
    """The run's tokenizer. With model.train_tokenizer_vocab set, it is the one trained into <run dir>/tokenizer
    (train_tokenizer must have run)."""
    if model.train_tokenizer_vocab is not None:
        if run_dir is None or not (run_dir / run_files.TOKENIZER).is_dir():
            raise ConfigError(
                [f"model.train_tokenizer_vocab: the run's tokenizer is missing ({run_dir / run_files.TOKENIZER})"]
            )
        source = str(run_dir / run_files.TOKENIZER)
    elif model.tokenizer is not None:
        source = location(model.tokenizer)
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


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path, special: list[str] | None = None) -> None:
    """A byte-level BPE tokenizer (GPT-2 style: any text, no unknown tokens) trained on `texts`, with `special`
    tokens besides its end of text (a chat template's turn markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *(special or [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines into the run's output and logs; it takes seconds
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                      extra_special_tokens=special or [])  # fmt: skip
    wrapped.save_pretrained(folder)


TOKENIZER_SAMPLE_RECORDS = 10_000  # streaming or a mixture: the tokenizer learns from this many records of each source


def ensure_run_tokenizer(cfg: DictConfig, run_dir: Path, env: DistEnv) -> None:
    """Train the run's tokenizer on its training split once (model.train_tokenizer_vocab), into the run dir."""
    if cfg.model.train_tokenizer_vocab is None:
        return
    from distrain.trainer.data import chat
    from distrain.trainer.data.sources import read_splits
    from distrain.trainer.tasks import task_class

    def train(partial: Path) -> None:
        if cfg.data.streaming or cfg.data.mixture:  # the first records of each source
            from distrain.trainer.data.streaming import first_records

            records = first_records(cfg.data, cfg.train.seed, TOKENIZER_SAMPLE_RECORDS)
        else:
            records = read_splits(cfg.data)["train"]
        text = task_class(cfg.task.name).tokenizer_text
        texts = [text(r, cfg.data) for r in records]
        # a named template's turn markers become tokens of their own
        special = chat.template_tokens(cfg.data.chat_template) if cfg.data.format == "chat" else []
        log.info("training a %d-token BPE tokenizer on %d training texts", cfg.model.train_tokenizer_vocab, len(texts))
        train_tokenizer(texts, cfg.model.train_tokenizer_vocab, partial, special)

    build_once(run_dir / run_files.TOKENIZER, train, env, "the run's tokenizer")
