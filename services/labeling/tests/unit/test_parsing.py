"""Reading JSONL and CSV streams: chunk boundaries, dialects, and errors that name the line and field."""

from __future__ import annotations

import json

import pytest

from gristmill.core.errors import InvalidArgumentError
from gristmill.labeling.domain.model import CsvOptions, FieldMapping, ImportFormat, ImportOptions, RawRecord
from gristmill.labeling.domain.parsing import (
    MAX_LINE_BYTES,
    CsvReader,
    JsonlReader,
    LineSplitter,
    RecordBuilder,
    validate_options,
)
from gristmill.labeling.tasks import labeling_task


def _builder(fmt: ImportFormat = ImportFormat.JSONL, *, multi: bool = False, **options: object) -> RecordBuilder:
    opts = ImportOptions(project_id="p", format=fmt, **options)  # type: ignore[arg-type]
    task = labeling_task("text-multi-label-classification" if multi else "text-classification")
    return RecordBuilder(opts, import_id="imp", labels=("neg", "pos"), task=task)


def _jsonl(data: bytes, *, chunk: int = 0, multi: bool = False, **options: object) -> list[RawRecord]:
    splitter = LineSplitter()
    reader = JsonlReader(_builder(multi=multi, **options))
    out: list[RawRecord] = []
    size = chunk or len(data) or 1
    for start in range(0, len(data), size):
        out += reader.records(splitter.feed(data[start : start + size]))
    return out + reader.records(splitter.finish())


def _csv(data: bytes, csv: CsvOptions, *, chunk: int = 0, multi: bool = False) -> list[RawRecord]:
    splitter = LineSplitter()
    reader = CsvReader(_builder(ImportFormat.CSV, multi=multi, csv=csv), csv)
    out: list[RawRecord] = []
    size = chunk or len(data) or 1
    for start in range(0, len(data), size):
        out += reader.records(splitter.feed(data[start : start + size]))
    out += reader.records(splitter.finish())
    return out + reader.finish()


def test_jsonl_fields_defaults_and_metadata() -> None:
    data = b'{"id": 7, "text": "good", "label": "pos", "lang": "en", "score": 0.5}\n\n{"text": "meh"}\n'
    first, second = _jsonl(data)
    assert first == RawRecord(1, "7", "good", {"lang": "en", "score": "0.5"}, ("pos",))
    # A missing id is made from the import id and the line (blank line 2 still counts as a line).
    assert second == RawRecord(3, "imp-3", "meh", {}, ())


def test_lines_survive_any_chunk_boundary_including_inside_a_utf8_character() -> None:
    rows = [{"id": f"r{i}", "text": f"caf\u00e9 n\u00b0{i} \u2014 ok"} for i in range(50)]
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    whole = _jsonl(data)
    for chunk in (1, 3, 7, 64):
        assert _jsonl(data, chunk=chunk) == whole
    assert [r.text for r in whole] == [r["text"] for r in rows]


def test_crlf_and_a_leading_bom_are_accepted() -> None:
    (record,) = _jsonl('\ufeff{"text": "hi"}\r\n'.encode())
    assert record.text == "hi"


def test_field_mapping_and_metadata_selection() -> None:
    mapping = FieldMapping(external_id_field="uid", text_field="body", label_field="y", metadata_fields=("lang",))
    (record,) = _jsonl(b'{"uid": "a", "body": "x", "y": "neg", "lang": "de", "junk": 1}', field_mapping=mapping)
    assert record == RawRecord(1, "a", "x", {"lang": "de"}, ("neg",))


def test_multi_label_lists_are_accepted() -> None:
    (record,) = _jsonl(b'{"text": "x", "label": ["pos", "neg", "pos"]}', multi=True)
    assert record.labels == ("pos", "neg")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"text": "ok"}\n{"text": "broken"', r"line 2: malformed JSON"),
        (b'{"text": "ok"}\n[1, 2]', r"line 2: expected a JSON object, got an array"),
        (b'{"id": "a"}', r"line 1, field 'text': missing"),
        (b'{"text": 5}', r"line 1, field 'text': must be a string, got a number"),
        (b'{"text": "x", "id": {"a": 1}}', r"line 1, field 'id': must be a string or an integer"),
        (b'{"text": "x", "label": "maybe"}', r"line 1, field 'label': 'maybe' is not a label of the project's schema"),
        (b'{"text": "x", "label": ["neg", "pos"]}', r"line 1, field 'label': a single-label project takes one label"),
        (b'{"text": "x", "label": 3}', r"line 1, field 'label': must be a string or a list of strings"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}', r"line 2, field 'id': external id 'a' appears earlier"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}', r"line 2 is not valid UTF-8 \(byte 14 of the line\)"),
    ],
)
def test_bad_jsonl_names_the_line_and_field(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _jsonl(data)


def test_a_line_over_one_mebibyte_is_refused_before_it_ends() -> None:
    splitter = LineSplitter()
    splitter.feed(b'{"text": "ok"}\n')
    with pytest.raises(InvalidArgumentError, match=r"line 2 is longer than the 1 MiB limit"):
        splitter.feed(b"x" * (MAX_LINE_BYTES + 1))


def test_a_complete_line_over_the_limit_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"line 1 is 1048577 bytes long"):
        LineSplitter().feed(b"y" * (MAX_LINE_BYTES + 1) + b"\n")


def test_csv_with_header_quotes_and_multiline_fields() -> None:
    data = b'id,text,label,lang\n1,"hello, world",pos,en\n2,"two\nlines ""quoted""",neg,fr\n3,plain,,de\n'
    records = _csv(data, CsvOptions(has_header=True), chunk=5)
    assert [(r.line_number, r.external_id, r.text, r.labels, r.metadata) for r in records] == [
        (2, "1", "hello, world", ("pos",), {"lang": "en"}),
        (3, "2", 'two\nlines "quoted"', ("neg",), {"lang": "fr"}),
        (5, "3", "plain", (), {"lang": "de"}),
    ]


def test_tab_separated_sentence_label_files_without_quoting() -> None:
    # The format of ../shared/data/sentiment: a text may start with '"' and never closes it.
    data = b'" I love it.  \tpos\nGood case, Excellent value.\tpos\nBad "clip".\tneg\n'
    csv = CsvOptions(delimiter="\t", has_header=False, column_names=("text", "label"), disable_quoting=True)
    records = _csv(data, csv, chunk=4)
    assert [(r.line_number, r.text, r.labels) for r in records] == [
        (1, '" I love it.  ', ("pos",)),
        (2, "Good case, Excellent value.", ("pos",)),
        (3, 'Bad "clip".', ("neg",)),
    ]


def test_an_unclosed_quote_is_reported_with_a_hint() -> None:
    csv = CsvOptions(delimiter="\t", has_header=False, column_names=("text", "label"))
    with pytest.raises(InvalidArgumentError, match=r"line 2: a quoted field is never closed.*disable_quoting"):
        _csv(b'fine\tpos\n" I love it.\tpos\nmore\tneg\n', csv)


def test_multi_label_csv_cells_are_split() -> None:
    (record,) = _csv(b"text,label\nx,pos| neg\n", CsvOptions(has_header=True), multi=True)
    assert record.labels == ("pos", "neg")


@pytest.mark.parametrize(
    ("data", "csv", "message"),
    [
        (b"id,body\n1,x\n", CsvOptions(has_header=True), r"line 1: the CSV header has no text column 'text'"),
        (
            b"text,label\nx,pos,extra\n",
            CsvOptions(has_header=True),
            r"line 2: expected 2 columns \(text, label\), got 3",
        ),
        (b"text,label\nx,maybe\n", CsvOptions(has_header=True), r"line 2, field 'label': 'maybe' is not a label"),
        (b'text\n"a"b\n', CsvOptions(has_header=True), r"line 2: malformed CSV"),
        (b"x\n", CsvOptions(has_header=False), r"csv.column_names is empty"),
    ],
)
def test_bad_csv_names_the_line_and_field(data: bytes, csv: CsvOptions, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _csv(data, csv)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ImportOptions("p", ImportFormat.CSV, csv=CsvOptions(delimiter=";;")), r"csv.delimiter must be one character"),
        (ImportOptions("p", ImportFormat.JSONL, field_mapping=FieldMapping(text_field="id")), r"three different"),
    ],
)
def test_bad_options_are_refused_before_reading(options: ImportOptions, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        validate_options(options)
