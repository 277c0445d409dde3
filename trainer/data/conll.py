"""A strict reader for CoNLL-style NER files.

One token per line, whitespace-separated columns: 2 (`token tag`, e.g. WNUT-16, CoNLL-2003 as shipped by many
mirrors) or 4 (`token POS chunk tag`, the original CoNLL-2003); blank (or whitespace-only) lines end sentences;
`-DOCSTART-` lines end documents. Unlike `datasets`' packaged `conll` builder, which pads or cuts lines with the
wrong number of columns, a malformed line here is an error with its file:line, so that bad data never trains
silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from distrain.trainer.errors import DataError

TAG_PATTERN = re.compile(r"^(O|[BIES]-\S+)$")


@dataclass
class Sentence:
    tokens: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # 1-based line of each token, for error messages


def read_conll(path: str | Path) -> list[Sentence]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from None
    sentences: list[Sentence] = []
    current = Sentence()
    columns_seen: int | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts or parts[0] == "-DOCSTART-":
            if current.tokens:
                sentences.append(current)
                current = Sentence()
            continue
        if len(parts) not in (2, 4):
            raise DataError(
                f"{path}:{number}: expected 2 columns (token tag) or 4 (token POS chunk tag), "
                f"got {len(parts)}: {raw.strip()!r}"
            )
        if columns_seen is not None and len(parts) != columns_seen:
            raise DataError(f"{path}:{number}: expected {columns_seen} columns like the lines before, got {len(parts)}")
        columns_seen = len(parts)
        tag = parts[-1]
        if not TAG_PATTERN.match(tag):
            raise DataError(f"{path}:{number}: expected a BIO tag (O, B-TYPE, I-TYPE) in the last column, got {tag!r}")
        current.tokens.append(parts[0])
        current.tags.append(tag)
        current.lines.append(number)
    if current.tokens:
        sentences.append(current)
    if not sentences:
        raise DataError(f"{path}: no sentences found (expected lines of `token tag`, blank lines between sentences)")
    return sentences
