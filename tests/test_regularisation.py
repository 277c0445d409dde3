"""Class imbalance and regularisation: task.class_weights in the loss (from the training labels, recorded, the same
on 1 and 2 processes), data augmentation in a real run (1 and 2 processes, resumed), and model.dropout in the built
model's modules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train, run_distrain, train_losses
from datasets import Dataset
from sklearn.utils.class_weight import compute_class_weight

from distrain.trainer.errors import ConfigError
from distrain.trainer.model.build import build_model, location
from distrain.trainer.model.families import dropout_config
from distrain.trainer.tasks import IGNORE, TaskData, build_task

TAGS = ["O", "B-PER", "I-PER", "B-LOC"]


class Vocabulary:
    """What a random-init model takes from its tokenizer (model.train_tokenizer_vocab would train one)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 512


def ner_data(rows: list[list[int]]) -> TaskData:
    return TaskData(splits={"train": Dataset.from_dict({"labels": rows})}, labels=TAGS)


def test_balanced_weights_are_scikit_learns_over_the_training_targets():
    task = build_task(compose_train(["task.class_weights=balanced"]), tokenizer=None)
    rows = [[IGNORE, 0, 0, 1, 2, IGNORE], [0, 0, 0, 1], [IGNORE, 0]]  # B-LOC never occurs
    record = task.use_class_weights(ner_data(rows), torch.device("cpu"))
    targets = [label for row in rows for label in row if label != IGNORE]
    present = sorted(set(targets))
    expected = dict(zip(present, compute_class_weight("balanced", classes=torch.tensor(present).numpy(), y=targets),
                        strict=True))  # fmt: skip
    assert record["train_counts"] == [6, 2, 1, 0]
    assert record["weights"] == pytest.approx([expected[0], expected[1], expected[2], 0.0], abs=1e-12)
    assert task.class_weights.tolist() == pytest.approx(record["weights"])
    # The mean weight over the training targets is 1: the loss keeps its scale.
    assert sum(record["weights"][t] for t in targets) / len(targets) == pytest.approx(1.0)
    # classify: one label per sample
    task = build_task(compose_train(["task=classify", "data=bbc_news", "task.class_weights=balanced"]), None)
    data = TaskData(splits={"train": Dataset.from_dict({"labels": [0, 0, 0, 1]})}, labels=["a", "b"])
    assert task.use_class_weights(data, torch.device("cpu"))["weights"] == pytest.approx([4 / 6, 4 / 2])


def test_a_weight_list_of_the_wrong_length_names_the_label_count():
    task = build_task(compose_train(["task.class_weights=[1,2]"]), tokenizer=None)
    with pytest.raises(ConfigError) as error:
        task.use_class_weights(ner_data([[0, 1]]), torch.device("cpu"))
    assert "task.class_weights: expected 4 weights, one per label in id order ['O', 'B-PER', 'I-PER', 'B-LOC'], " \
        "got 2" in str(error.value)  # fmt: skip


def test_weighted_loss_is_the_sum_of_each_targets_weight_times_its_loss():
    task = build_task(compose_train(["task.class_weights=[1,2,0.5,3]"]), tokenizer=None)
    task.use_class_weights(ner_data([[0, 1, 2, 3]]), torch.device("cpu"))
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1, IGNORE], [2, 3, 3]])
    nll = -logits.log_softmax(-1)
    expected = sum(
        [1, 2, 0.5, 3][y] * nll[b, i, y] for b in range(2) for i in range(3) if (y := int(labels[b, i])) >= 0
    )
    assert float(task.loss_sum(logits, {"labels": labels})) == pytest.approx(float(expected), rel=1e-6)
    assert task.num_targets({"labels": labels}) == 5  # the divisor stays the count of targets


AUGMENT = "data.augment=[label_replace,synonym_replace,mention_replace,segment_shuffle]"


@pytest.mark.slow  # four runs: about 80 s on the loaded 2-core machine
def test_weights_and_augmentation_train_alike_on_one_and_two_processes_and_across_a_resume(
    conll_dir, cache_dir, tmp_path
):
    """Balanced weights and every NER augmentation on the 3-sentence CoNLL sample (an epoch per step, so each step
    draws other augmentations): the counts written to class_weights.json are those of its train.txt; 1 process
    stopped at step 2 and resumed equals 2 processes uninterrupted, step by step; both differ from a plain run."""
    common = ["model=bert_tiny", "data=conll2003", f"data.dir={conll_dir}", f"data.cache_dir={cache_dir}",
              "train.max_steps=3", "train.log_every=1", "train.eval_every=0", "task.class_weights=balanced",
              AUGMENT, "data.augment_p=0.5"]  # fmt: skip
    single = [*common, "train.micro_batch_size=2", f"run.dir={tmp_path / 'single'}"]
    first = run_distrain("train", *single, "train.stop_at_step=2")
    assert "stopped at step 2" in first.stdout
    second = run_distrain("train", *single)
    assert "resumed from" in second.stdout
    run_distrain("train", *common, "parallel=ddp", "launcher.nproc_per_node=2", "train.micro_batch_size=1",
                 f"run.dir={tmp_path / 'ddp'}")  # fmt: skip
    plain = [
        "model=bert_tiny",
        "data=conll2003",
        f"data.dir={conll_dir}",
        f"data.cache_dir={cache_dir}",
        "train.max_steps=1",
        "train.micro_batch_size=2",
        "train.eval_every=0",
        f"run.dir={tmp_path / 'plain'}",
    ]
    run_distrain("train", *plain)  # fmt: skip
    # A list of the wrong length: only the data's labels tell, in the workers; refused as the launcher's own checks
    refused = run_distrain("train", *plain[:-1], "task.class_weights=[1,2]", f"run.dir={tmp_path / 'refused'}",
                           check=False)  # fmt: skip
    assert refused.returncode == 2 and "invalid configuration" in refused.stderr, refused.stderr
    assert "task.class_weights: expected 6 weights, one per label in id order" in refused.stderr
    assert json.loads((tmp_path / "refused" / "summary.json").read_text())["status"] == "invalid configuration"
    losses = {name: train_losses(tmp_path / name) for name in ("single", "ddp", "plain")}
    assert sorted(losses["single"]) == sorted(losses["ddp"]) == [1, 2, 3]
    for step, loss in losses["single"].items():
        assert losses["ddp"][step] == pytest.approx(loss, abs=1e-5), step
    assert abs(losses["single"][1] - losses["plain"][1]) > 1e-3
    record = json.loads((tmp_path / "single" / "class_weights.json").read_text())
    # conftest.CONLL_SAMPLE's train.txt: EU/B-ORG rejects/O German/B-MISC call/O ./O Peter/B-PER Blackburn/I-PER
    # BRUSSELS/B-LOC 1996-08-22/O. The counts are of training targets, before augmentation: with
    # data.label_subwords=all every sub-word of 1996-08-22 (1996 - 08 - 22) is an O target: 13 targets, 6 tags.
    counts = dict(zip(record["labels"], record["train_counts"], strict=True))
    assert counts == {"O": 3 + 5, "B-LOC": 1, "B-MISC": 1, "B-ORG": 1, "B-PER": 1, "I-PER": 1}
    assert record["weights"] == [pytest.approx(13 / (6 * counts[label])) for label in record["labels"]]
    assert record == json.loads((tmp_path / "ddp" / "class_weights.json").read_text())
    assert not (tmp_path / "plain" / "class_weights.json").exists()


def test_model_dropout_sets_the_dropout_of_a_pretrained_and_a_random_init_model():
    cfg = compose_train(["model=minilm", "model.dropout=0.3"])  # the bundled MiniLM: a pretrained BERT
    task = build_task(cfg, tokenizer=None)
    model = build_model(cfg.model, task.auto_model_class(), 0, location(cfg.model.name_or_path), None, num_labels=2)
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.3
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) > 6 and set(dropouts) == {0.3}  # the modules read the rates when they are built
    # ... and they are on: the model is built for training (from_pretrained alone returns eval mode)
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert model.training and all(m.training for m in model.modules())
    assert not torch.equal(model(**batch).logits, model(**batch).logits)
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)

    cfg = compose_train(["model=llama_tiny", "task=clm", "data=shakespeare", "model.dropout=0.2"])
    task = build_task(cfg, tokenizer=None)
    model = build_model(cfg.model, task.auto_model_class(), 0, None, Vocabulary())
    assert model.config.attention_dropout == 0.2
    assert {layer.self_attn.attention_dropout for layer in model.model.layers} == {0.2}


def test_model_dropout_for_a_family_it_does_not_know_is_refused():
    with pytest.raises(ConfigError) as error:
        dropout_config("gpt2", 0.1)
    assert "model.dropout: set for a 'gpt2' model, whose dropout settings distrain does not know" in str(error.value)
    assert dropout_config("gpt2", None) == {}
