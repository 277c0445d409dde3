"""Real data: MiniLM on a CoNLL-2003 subset, 2-process DDP, through the CLI (second CI stage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_distrain

CONLL = os.environ.get("DISTRAIN_CONLL2003_DIR")
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif(not CONLL, reason="set DISTRAIN_CONLL2003_DIR to a folder with CoNLL-2003 train/dev/test.txt"),
]


def test_minilm_learns_entities_on_a_conll2003_subset(tmp_path, cache_dir):
    run = tmp_path / "conll"
    run_distrain(
        "train", "+experiment=conll_ner", f"data.dir={CONLL}", f"data.cache_dir={cache_dir}",
        "data.max_train_samples=3000", "data.max_eval_samples=500", "train.epochs=1", "train.log_every=20",
        "optim.lr=1e-4", "train.micro_batch_size=16", f"run.dir={run}",
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    # The first 1,000 of the 3,453 test sentences: the whole split would add two minutes to CI, and eval taking
    # the whole split is tested on bundled data (test_onnx_export.py)
    run_distrain("eval", f"ckpt={run}", "split=test", "max_samples=1000")
    report = json.loads((Path(run) / "export_eval" / "eval_test.json").read_text())
    assert report["examples"] == 1000
    assert set(report["classes"]) >= {"PER", "ORG", "LOC", "MISC"}
    assert report["f1"] > 0.5, report
