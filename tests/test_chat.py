"""Chat fine-tuning (task=chat): rendering with a chat template, loss on the assistant's turns only, bad data named
by file:line, and a tiny train -> eval -> predict run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_train, run_distrain
from transformers import AutoTokenizer, GenerationConfig

from distrain.cli.validate import validate
from distrain.trainer.data.sources import read_splits
from distrain.trainer.errors import ConfigError, DataError
from distrain.trainer.model.tokenizer import train_tokenizer
from distrain.trainer.tasks import IGNORE, build_task

CHATML = ["task=chat", "data=bbc_topics", "model=llama_tiny", "data.chat_template=chatml"]
CONVERSATION = [
    {"role": "system", "content": "You answer in few words."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And how many people live there?"},
    {"role": "assistant", "content": "About two million."},
]
# A template of another shape than chatml (Zephyr's), as a tokenizer's own: role tags, and </s> ends a turn.
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")  # fmt: skip
TEXTS = [m["content"] for m in CONVERSATION] * 20 + ["Which topic is this news text about? Shares rose."] * 20


def tokenizer_with(folder: Path, special: list[str], template: str | None = None):
    """A 400-token BPE tokenizer trained as a run's (model.train_tokenizer_vocab), with these special tokens."""
    train_tokenizer(TEXTS, 400, folder, special)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def trained_runs(example: dict) -> list[str]:
    """The decoded runs of consecutive trained tokens (labels not IGNORE) of a tokenized example."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            assert label == token  # unshifted: the collate shifts them
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def tokenized(task, messages: list[dict]) -> dict:
    out = task.tokenize({"messages": [messages], "where": ["test:1"]})
    return {key: values[0] for key, values in out.items()}


@pytest.mark.parametrize("template", ["chatml", "own"])
def test_only_the_assistant_turns_and_their_end_of_turn_token_are_trained(tmp_path, template):
    if template == "chatml":  # a named template on a tokenizer without one (the tiny models')
        tokenizer = tokenizer_with(tmp_path, ["<|im_start|>", "<|im_end|>"])
        task = build_task(compose_train(CHATML), tokenizer)
        end = "<|im_end|>"
    else:  # the tokenizer's own template, of another shape
        tokenizer = tokenizer_with(tmp_path, ["<|system|>", "<|user|>", "<|assistant|>", "</s>"], ZEPHYR)
        task = build_task(compose_train([*CHATML, "data.chat_template=null"]), tokenizer)
        end = "</s>"
    assert task.end_token == end and task.end_id == tokenizer.convert_tokens_to_ids(end)
    example = tokenized(task, CONVERSATION)
    text = tokenizer.decode(example["input_ids"])
    assert text == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)  # nothing lost or added
    runs = [tokenizer.decode(run) for run in trained_runs(example)]
    assert runs == [f"Paris.{end}", f"About two million.{end}"]  # every assistant turn, nothing else
    masked = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                               if label == IGNORE])  # fmt: skip
    for message in CONVERSATION[:2] + CONVERSATION[3:4]:
        assert message["content"] in masked
    print(f"\n{template}: trained {runs}\nmasked: {masked!r}")  # the decoded sample, for the record
    # Eval's answer accuracy generates the last turn from what comes before it.
    start, stop = example["answer_start"], example["answer_end"]
    assert tokenizer.decode(example["input_ids"][stop - (stop - start) : stop]) == f"About two million.{end}"
    assert tokenizer.decode(example["input_ids"][:start]) == tokenizer.apply_chat_template(
        CONVERSATION[:-1], tokenize=False, add_generation_prompt=True
    )


def test_train_on_prompt_trains_every_token_and_the_collate_shifts_the_labels(tmp_path):
    tokenizer = tokenizer_with(tmp_path, ["<|im_start|>", "<|im_end|>"])
    both = [build_task(compose_train([*CHATML, f"task.train_on_prompt={on}"]), tokenizer) for on in (False, True)]
    pair = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    answer_only, everything = (tokenized(task, pair) for task in both)
    assert everything["labels"] == everything["input_ids"]
    assert trained_runs(answer_only) != [answer_only["input_ids"]]
    short = tokenized(both[0], [pair[0], {"role": "assistant", "content": "Paris, I think."}])
    batch = both[0].collate([{k: answer_only[k] for k in ("input_ids", "labels")},
                             {k: short[k] for k in ("input_ids", "labels")}])  # fmt: skip
    width = max(len(answer_only["input_ids"]), len(short["input_ids"]))
    for row, example in enumerate((answer_only, short)):
        n = len(example["input_ids"])
        expected = example["labels"][1:] + [IGNORE] * (width - n + 1)  # position t predicts token t + 1
        assert batch["labels"][row].tolist() == expected
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert both[0].num_targets(batch) == sum(label != IGNORE for e in (answer_only, short) for label in e["labels"])


BAD_LINES = {
    "no messages": ('{"text": "hello"}', "expected a \"messages\" list, or 'prompt' and 'response' columns"),
    "empty messages": ('{"messages": []}', "expected \"messages\" to be a non-empty list"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "hi"}]}',
                     "message 1 has role 'bot'; expected one of ['system', 'user', 'assistant']"),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "a conversation without an assistant turn"),
    "content not text": ('{"messages": [{"role": "user", "content": 3}]}', "needs a string \"content\""),
    "prompt only": ('{"prompt": "hi"}', "a 'prompt' without a 'response' to answer it"),
}  # fmt: skip


@pytest.mark.parametrize("fault", list(BAD_LINES))
def test_bad_conversations_are_named_by_file_and_line(tmp_path, fault):
    line, expected = BAD_LINES[fault]
    good = json.dumps({"prompt": "Which topic?", "response": "tech"})
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text(f"{good}\n{line}\n" if split == "train" else f"{good}\n")
    cfg = compose_train([*CHATML, f"data.dir={tmp_path}"])
    tokenizer = tokenizer_with(tmp_path / "tokenizer", ["<|im_start|>", "<|im_end|>"])
    task = build_task(cfg, tokenizer)
    with pytest.raises(DataError) as error:
        task.to_datasets(read_splits(cfg.data))
    assert str(error.value).startswith(f"{tmp_path / 'train.jsonl'}:2: ")
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.chat_template=null"], "data.chat_template: a tokenizer trained for the run"),
        (["data.chat_template=llama9"], "data.chat_template: expected null (the tokenizer's own) or one of"),
        (["data.packing=true"], "data.packing: task=chat trains one conversation per sequence"),
        (["data.response_column=prompt"], "data.response_column: expected another column"),
        (["task=clm"], "data.format: expected one of ['text', 'jsonl', 'csv'] for task clm, got 'chat'"),
    ],
)
def test_chat_config_mistakes_are_refused_with_their_key(overrides, expected, tmp_path):
    with pytest.raises(ConfigError) as error:
        validate(compose_train([*CHATML, *overrides, f"run.dir={tmp_path}"]))
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "the conversation ends with an assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 1 has role 'robot'; expected one of"),
        ("{not json", "a line starting with { is read as a JSON conversation; it is not JSON"),
    ],
)
def test_predict_inputs_that_are_not_a_conversation_to_answer_are_named(tmp_path, line, expected):
    """What `distrain predict` prints as `<input>:<line>: <problem>` before it exits 2."""
    task = build_task(compose_train(CHATML), tokenizer_with(tmp_path, ["<|im_start|>", "<|im_end|>"]))
    assert task.check_input("What is the capital of France?") is None
    assert task.check_input('{"prompt": "What is the capital of France?"}') is None
    assert expected in task.check_input(line)


def test_a_tokenizer_without_the_named_templates_tokens_is_refused(tmp_path):
    tokenizer = tokenizer_with(tmp_path, [])  # no <|im_start|>: chatml would split it into pieces
    with pytest.raises(ConfigError, match=r"data.chat_template: chatml marks turns with <\|im_start\|>"):
        build_task(compose_train(CHATML), tokenizer)


STEPS = 4


def test_train_eval_predict_a_tiny_chat_model(tmp_path, cache_dir):
    """The user's path on a tiny model: train on the bundled topic questions, evaluate (assistant-token loss,
    answer accuracy), answer questions with predict."""
    run = tmp_path / "run"
    run_distrain("train", "+experiment=smollm2_chat", "+debug=tiny", "model=llama_tiny", "data.chat_template=chatml",
                 "parallel=single", "launcher.nproc_per_node=1", "data.max_eval_samples=16", f"train.max_steps={STEPS}",
                 "train.eval_at_start=false", "train.micro_batch_size=8", f"data.cache_dir={cache_dir}",
                 f"run.dir={run}")  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (dev,) = [r for r in records if r["kind"] == "eval"]
    assert dev["step"] == STEPS and {"loss", "perplexity", "tokens"} <= set(dev)
    # The template travels with the model, and generation from the export stops at its end-of-turn token.
    assert (run / "export" / "chat_template.jinja").is_file()
    end = AutoTokenizer.from_pretrained(run / "export").convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(run / "export").eos_token_id == end

    checkpoint = run / "checkpoints" / f"step_{STEPS}"
    run_distrain("eval", f"ckpt={checkpoint}", "split=dev", "max_new_tokens=8", "max_samples=16")  # the run's 16
    report = json.loads((checkpoint.with_name(f"step_{STEPS}_eval") / "eval_dev.json").read_text())
    # The loss is the one training measured on the same assistant tokens of the same dev conversations.
    assert report["loss"] == pytest.approx(dev["loss"], rel=1e-5) and report["tokens"] == dev["tokens"]
    assert report["answers"] == 16 and report["max_new_tokens"] == 8
    assert 0 <= report["answer_accuracy"] <= 1 and 0 <= report["answers_stopped"] <= 1
    first = report["answer_examples"][0]

    dev_prompt = json.loads((Path(__file__).parents[1] / "trainer/data/assets/bbc_topics/dev.jsonl").open().readline())
    lines = [json.dumps({"messages": [{"role": "user", "content": dev_prompt["prompt"]}]}), "",
             "Which topic is this news text about? Shares rose."]  # fmt: skip
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    out = run_distrain("predict", f"ckpt={run}", f"input={tmp_path / 'in.txt'}", "max_new_tokens=8")
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["input"] for a in answers] == lines
    assert set(answers[0]) == {"input", "answer", "stopped"} and answers[1]["skipped"] == "empty line"
    # The export answers the first dev question as eval's checkpoint did (greedy, same weights: the last step).
    assert (answers[0]["answer"], answers[0]["stopped"]) == (first["answer"], first["stopped"])


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_chat_losses_agree_across_strategies(tmp_path, cache_dir, packed):
    """Masked assistant-token losses: the same global batches give the same losses under single, ddp and fsdp
    (the loss is summed over each rank's assistant tokens and divided by the global count); packed, whole
    conversations laid end to end (data.pack_examples) give the padded ddp run's losses under ddp and fsdp."""
    strategies, variant = (
        (["ddp", "fsdp"], ["variant=data.pack_examples=true"]) if packed else (["single", "ddp", "fsdp"], [])
    )
    run_distrain("parity", "+experiment=smollm2_chat", "+debug=tiny", "model=llama_tiny", "data.chat_template=chatml",
                 "train.micro_batch_size=4", f"data.cache_dir={cache_dir}", f"strategies=[{','.join(strategies)}]",
                 "steps=5", *variant, f"out={tmp_path}")  # fmt: skip
    report = json.loads((tmp_path / "parity.json").read_text())
    names = ({"ddp (reference)", "ddp data.pack_examples=true", "fsdp data.pack_examples=true"} if packed
             else {"single", "ddp", "fsdp"})  # fmt: skip
    assert set(report["strategies"]) == names, report
    for name, result in report["strategies"].items():
        assert len(result["per_step"]) == 5 and result["max_abs_diff"] <= 1e-5, (name, result)
    first = tmp_path / ("ddp_reference" if packed else "single")
    losses = [json.loads(line)["loss"] for line in (first / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]  # fmt: skip
    assert losses[-1] < losses[0]  # it learns
