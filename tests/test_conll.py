"""The CoNLL reader: formats it accepts, and errors with file:line for everything else."""

from __future__ import annotations

import pytest

from distrain.trainer.data.conll import read_conll
from distrain.trainer.errors import DataError
from distrain.trainer.tasks.labels import label_list


def write(tmp_path, text, name="data.txt", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_two_columns_tabs_and_whitespace_only_separators(tmp_path):
    # WNUT-16 as bundled: token<TAB>tag, sentences separated by a line holding only a tab.
    path = write(tmp_path, "@paul\tO\nEmpire\tB-facility\nState\tI-facility\n\t\nhi\tO\n")
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["@paul", "Empire", "State"], ["hi"]]
    assert [s.tags for s in sentences] == [["O", "B-facility", "I-facility"], ["O"]]
    assert sentences[1].lines == [5]


def test_four_columns_and_docstart_lines(tmp_path, conll_dir):
    sentences = read_conll(conll_dir / "train.txt")
    assert [s.tokens for s in sentences] == [
        ["EU", "rejects", "German", "call", "."],
        ["Peter", "Blackburn"],
        ["BRUSSELS", "1996-08-22"],
    ]
    assert sentences[0].tags == ["B-ORG", "O", "B-MISC", "O", "O"]


def test_docstart_ends_a_sentence_without_a_blank_line(tmp_path):
    path = write(tmp_path, "a O\n-DOCSTART- O\nb B-PER\n")
    assert [s.tokens for s in read_conll(path)] == [["a"], ["b"]]


def test_no_trailing_newline_and_windows_line_ends(tmp_path):
    path = write(tmp_path, "a O\r\nb B-LOC\r\n\r\nc O")
    assert [s.tokens for s in read_conll(path)] == [["a", "b"], ["c"]]


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("a O\nb B-PER extra\n", 2, "expected 2 columns (token tag) or 4 (token POS chunk tag), got 3"),
        ("a O\n\nb\n", 3, "got 1"),
        ("a NN B-NP O\nb B-PER\n", 2, "expected 4 columns like the lines before, got 2"),
        ("a O\nb PER\n", 2, "expected a BIO tag (O, B-TYPE, I-TYPE) in the last column, got 'PER'"),
        ("a O\nb b-per\n", 2, "got 'b-per'"),
    ],
)
def test_malformed_lines_are_errors_with_file_and_line(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as error:
        read_conll(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert expected in str(error.value)


def test_empty_file_is_an_error(tmp_path):
    path = write(tmp_path, "\n\n-DOCSTART- O\n\n")
    with pytest.raises(DataError, match="no sentences found"):
        read_conll(path)


def test_non_utf8_bytes_are_an_error_with_their_line(tmp_path):
    path = write(tmp_path, "a O\n\nZürich B-LOC\n", encoding="latin-1")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        read_conll(path)


def test_labels_are_ordered_o_first_then_by_type_b_before_i(tmp_path):
    path = write(tmp_path, "a I-PER\nb B-PER\nc O\nd B-LOC\ne I-LOC\n")
    assert label_list(t for s in read_conll(path) for t in s.tags) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
