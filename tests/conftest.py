"""Shared helpers: compose real configs with Hydra's compose API, and run the real `distrain` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distrain.cli.compose import compose_config as compose_train  # noqa: F401 (the tests' one compose helper)

DISTRAIN = shutil.which("distrain") or str(Path(sys.executable).parent / "distrain")

# A tiny BERT on a slice of the bundled WNUT-16: a step takes milliseconds, a run a few seconds of startup.
TINY = ["+debug=tiny"]  # configs/debug/tiny.yaml: a tiny BERT on 256/64 samples of WNUT-16, a record per step

CONLL_SAMPLE = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One tokenized-data cache per test session, away from the user's ~/.cache."""
    return str(tmp_path_factory.mktemp("distrain-cache"))


@pytest.fixture(scope="session")
def conll_dir(tmp_path_factory) -> Path:
    """A small CoNLL-2003-shaped folder (4 columns, -DOCSTART-), written by the test itself."""
    folder = tmp_path_factory.mktemp("conll")
    for name in ("train.txt", "dev.txt", "test.txt"):
        (folder / name).write_text(CONLL_SAMPLE)
    return folder


# The tiny BERT under every strategy, 5 steps of global batches of 8 (`distrain parity`, once per session): the
# reference runs of the CLI, parallelism and checkpoint tests.
BERT_PARITY = [*TINY, "train.micro_batch_size=8"]
BERT_STRATEGIES = "[single,ddp,fsdp,tp,fsdp_tp:1x2]"
# A tiny random-init Llama causal LM on 256 blocks of the bundled Shakespeare (its own 512-token BPE tokenizer).
LLAMA_PARITY = ["+experiment=shakespeare_clm", "model=llama_tiny", "data.max_length=64", "data.max_train_samples=256",
                "data.max_eval_samples=16", "train.micro_batch_size=8", "train.log_every=1", "optim.lr=1e-3",
                "optim.warmup_ratio=0"]  # fmt: skip
PARITY_STEPS = 5


def run_parity(out: Path, cache_dir: str, strategies: str, *overrides: str, check: bool = True):
    """`distrain parity` over `strategies` for PARITY_STEPS steps into `out`; the CompletedProcess."""
    return run_distrain("parity", *overrides, f"data.cache_dir={cache_dir}", f"strategies={strategies}",
                        f"steps={PARITY_STEPS}", f"out={out}", check=check)  # fmt: skip


@pytest.fixture(scope="session")
def bert_parity(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("bert-parity")
    run_parity(out, cache_dir, BERT_STRATEGIES, *BERT_PARITY)
    return out


def run_distrain(*args: str, cwd: Path | None = None, timeout: int = 600, check: bool = True):
    """Run the installed `distrain` command as a user would; return the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([DISTRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        command = f"distrain {' '.join(args)}"
        raise AssertionError(f"{command} exited {result.returncode}\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def train_losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss from the run's metrics.jsonl (the last train record of a step wins, e.g. after a restart).

    Read here with json alone, not with distrain's own reader: the tests' oracle must not share the product's bugs.
    """
    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag, as TensorBoard shows it (its own reader, with its purge of orphaned steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]
