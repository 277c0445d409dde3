"""Conversations: reading them (data.format=chat), rendering them with a chat template, and finding the
assistant's tokens in the render. The one home of chat templates; trainer/tasks/chat.py trains and generates.

A record is one conversation: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`,
or a prompt/response pair (columns data.prompt_column, data.response_column) read as one user turn answered by
one assistant turn.

The template is the tokenizer's own (data.chat_template=null), or a named one for a tokenizer without one
(`chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n` per turn). Its end-of-turn token is the first special token
the template writes after an assistant's content: it is trained as part of every assistant turn, and generation
stops at it.

Which tokens are the assistant's: the conversation is rendered whole; for each assistant turn it is also rendered
up to that turn with the generation prompt (the assistant's header) and through that turn. The characters between
the two prefixes are the turn (its content and end-of-turn token; what the template writes after the end-of-turn
token, such as chatml's newline, is not); a token of the whole render is the assistant's when its character
offsets overlap a turn. This works for any template that renders a conversation as the concatenation of its
prefixes, which is checked for every conversation. (`apply_chat_template(return_assistant_tokens_mask=True)` is
not used: it needs `{% generation %}` markers that most templates, SmolLM2's among them, do not have.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from distrain.trainer.data.sources import Record
from distrain.trainer.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML}  # data.chat_template names
TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}  # the special tokens each named template writes


def conversation(fields: dict[str, Any], where: str, data: DictConfig) -> list[dict[str, str]]:
    """The messages of one record (`where`: its file:line), checked: roles known, contents strings, an assistant
    turn to learn from."""
    if "messages" in fields:
        messages = fields["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected \"messages\" to be a non-empty list of {{\"role\", \"content\"}} "
                            f"objects, got {json.dumps(messages)[:80]}")  # fmt: skip
    elif data.prompt_column in fields:
        if data.response_column not in fields:
            raise DataError(f"{where}: a {data.prompt_column!r} without a {data.response_column!r} to answer it "
                            f"(data.response_column); the record has {sorted(fields)}")  # fmt: skip
        messages = [{"role": "user", "content": fields[data.prompt_column]},
                    {"role": "assistant", "content": fields[data.response_column]}]  # fmt: skip
    else:
        raise DataError(f"{where}: expected a \"messages\" list, or {data.prompt_column!r} and "
                        f"{data.response_column!r} columns (data.prompt_column, data.response_column); the record "
                        f"has {sorted(fields)}")  # fmt: skip
    out = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise DataError(f"{where}: message {number} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {number} ({message['role']}) needs a string \"content\", got "
                            f"{json.dumps(message.get('content'))[:80]}")  # fmt: skip
        out.append({"role": message["role"], "content": message["content"]})
    return out


def training_conversation(record: Record, data: DictConfig) -> list[dict[str, str]]:
    """A record's conversation for training: it must have an assistant turn (else nothing is learned from it)."""
    messages = conversation(record.fields, record.where, data)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where}: a conversation without an assistant turn; expected at least one message "
                        "with role \"assistant\" (the turns that are trained)")  # fmt: skip
    return messages


def template_tokens(name: str | None) -> list[str]:
    """The special tokens a named template needs (a tokenizer trained for the run gets them)."""
    return list(TEMPLATE_TOKENS.get(name, ())) if name else []


def use_template(tokenizer: Any, name: str | None) -> None:
    """Give the tokenizer the run's template: the named one, or check that it has its own."""
    source = getattr(tokenizer, "name_or_path", "") or "the run's tokenizer"
    if name is None:
        if not tokenizer.chat_template:
            raise ConfigError([f"data.chat_template: the tokenizer ({source}) has no chat template of its own; "
                               f"expected a named one: data.chat_template={next(iter(TEMPLATES))}"])  # fmt: skip
        return
    for token in TEMPLATE_TOKENS[name]:
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
            raise ConfigError(
                [
                    f"data.chat_template: {name} marks turns with {token}, which the tokenizer ({source}) "
                    "does not have as one token; expected a tokenizer with its own template "
                    "(data.chat_template=null), or one trained for the run (model.train_tokenizer_vocab)"
                ]
            )
    tokenizer.chat_template = TEMPLATES[name]


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def end_of_turn(tokenizer: Any) -> tuple[int, str]:
    """The template's end-of-turn token (id, text): the first special token it writes after an assistant's content."""
    marker = "distrain-probe"
    text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}])
    tail = text[text.index(marker) + len(marker) :]
    special = set(tokenizer.all_special_ids)
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token in special:
            return token, tokenizer.convert_ids_to_tokens(token)
    raise ConfigError([f"data.chat_template: the template writes no special token after an assistant turn "
                       f"({tail!r}), so generation could not stop; expected a template with an end-of-turn token "
                       "(data.chat_template=chatml)"])  # fmt: skip


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], end_token: str, where: str) -> tuple[str, list]:
    """The whole render and the character span of each assistant turn in it: its content through the
    end-of-turn token."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this conversation as the concatenation "
                            f"of its turns (at message {i + 1}), so the assistant's tokens cannot be found; expected "
                            "a template that renders turn by turn (data.chat_template=chatml)")  # fmt: skip
        end = through.rfind(end_token)
        end = end + len(end_token) if end >= len(before) else len(through)
        spans.append((len(before), end))
    return text, spans


@dataclass
class Encoded:
    """One conversation's tokens, which of them are the assistant's, and the token span [answer_start,
    answer_end) of its last assistant turn (-1, -1 when data.max_length cut it)."""

    input_ids: list[int]
    assistant: list[bool]
    answer_start: int
    answer_end: int


def encode(tokenizer: Any, renders: list[tuple[str, list]], max_length: int) -> list[Encoded]:
    """Tokenize rendered conversations (cut at max_length tokens) and mark the assistant's tokens."""
    batch = tokenizer([text for text, _ in renders], add_special_tokens=False, return_offsets_mapping=True,
                      truncation=True, max_length=max_length)  # fmt: skip
    out = []
    for ids, offsets, (_, spans) in zip(batch["input_ids"], batch["offset_mapping"], renders, strict=True):
        assistant = [any(a < end and b > start for start, end in spans) for a, b in offsets]
        last_start, last_end = spans[-1]
        answer = [i for i, (a, b) in enumerate(offsets) if a < last_end and b > last_start]
        complete = answer and offsets[answer[-1]][1] >= last_end
        out.append(Encoded(ids, assistant, answer[0] if complete else -1, answer[-1] + 1 if complete else -1))
    return out


def read_input(line: str, data: DictConfig, where: str) -> list[dict[str, str]]:
    """A `distrain predict` input line: plain text is one user message; a line starting with `{` is a JSON
    conversation (messages, or a prompt) to answer."""
    if not line.lstrip().startswith("{"):
        return [{"role": "user", "content": line}]
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: a line starting with {{ is read as a JSON conversation; it is not JSON "
                        f"({error.msg})") from None  # fmt: skip
    if not isinstance(fields, dict):
        raise DataError(f'{where}: expected a JSON object with "messages", got {type(fields).__name__}')
    if "messages" not in fields and data.prompt_column in fields:
        return [{"role": "user", "content": fields[data.prompt_column]}]
    messages = conversation(fields, where, data)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the conversation ends with an assistant turn; expected it to end with the "
                        "user turn to answer")  # fmt: skip
    return messages


def normalise(answer: str) -> str:
    """What answer accuracy compares: lower case, whitespace collapsed, outer quotes and final punctuation off."""
    return " ".join(answer.lower().split()).strip(" \"'`").rstrip(".!?").strip()
