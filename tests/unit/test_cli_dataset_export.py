"""``gristmill datasets export`` without a platform: the export stream written to files as stored or with every row
converted (rows spanning chunks, checksums, a stream cut short), with a fake converter and with
``gristmill.core.chat_formats.export_row``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.cli.labeling_commands import ExportError, JsonlRows, write_export
from gristmill.core.chat import ChatMessage, Conversation, dpo_row, sft_row

SFT = [
    sft_row(
        "a",
        Conversation(
            (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"))
        ),
    ),
    sft_row("b", Conversation((ChatMessage("user", "2+2?"), ChatMessage("assistant", "4")))),
]
DPO = [
    {
        "id": "c",
        "pair": 0,
        **{k: v for k, v in dpo_row("c", (ChatMessage("user", "Colour?"),), "red", "blue").items() if k != "id"},
    }
]
MANIFEST = b'{"row_format": "sft-messages"}\n'


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def chunks(name: str, data: bytes, size: int = 7, sha256: str | None = None) -> list[lb.ExportDatasetChunk]:
    """A file as the service streams it: ``size``-byte chunks, the last carrying the checksum and size."""
    parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    out = [lb.ExportDatasetChunk(file_name=name, data=part) for part in parts]
    out[-1].last_chunk = True
    out[-1].sha256 = sha256 if sha256 is not None else hashlib.sha256(data).hexdigest()
    out[-1].size_bytes = len(data)
    return out


def fake_convert(row: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    if row["id"] == "bad":
        raise ValueError("cannot hold this row")
    return {"fmt": fmt, "id": row["id"]}


def test_rows_spanning_chunks_are_converted_one_per_line() -> None:
    rows = JsonlRows("train.jsonl", "openai", fake_convert)
    data = jsonl(SFT) + b"\n"  # a blank line is no row
    out = b"".join(rows.feed(data[i : i + 5]) for i in range(0, len(data), 5)) + rows.finish()
    assert out.decode().splitlines() == ['{"fmt": "openai", "id": "a"}', '{"fmt": "openai", "id": "b"}']
    no_newline = JsonlRows("test.jsonl", "x", fake_convert)
    assert no_newline.feed(b'{"id": "z"}') == b"" and no_newline.finish() == b'{"fmt": "x", "id": "z"}\n'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": "bad"}', "train.jsonl line 3: cannot hold this row"),
        (b"not json", "train.jsonl line 3: Expecting value"),
        (b"[1, 2]", "train.jsonl line 3: a row must be a JSON object"),
    ],
)
def test_a_row_that_does_not_convert_names_its_file_and_line(line: bytes, message: str) -> None:
    rows = JsonlRows("train.jsonl", "openai", fake_convert)
    with pytest.raises(ExportError, match=f"^{message}"):
        rows.feed(jsonl(SFT) + line + b"\n")


def test_write_export_as_stored_and_converted(tmp_path: Path) -> None:
    (tmp_path / "stored").mkdir()
    (tmp_path / "converted").mkdir()
    train = jsonl(SFT)
    stream = chunks("train.jsonl", train) + chunks("manifest.json", MANIFEST)
    stored = write_export(stream, tmp_path / "stored")
    assert (tmp_path / "stored" / "train.jsonl").read_bytes() == train
    assert [(Path(w["file"]).name, w["format"], w["stored bytes"]) for w in stored] == [
        ("train.jsonl", "stored", len(train)),
        ("manifest.json", "stored", len(MANIFEST)),
    ]
    written = write_export(stream, tmp_path / "converted", "sharegpt", fake_convert)
    assert [w["format"] for w in written] == ["sharegpt", "stored"]
    assert (tmp_path / "converted" / "manifest.json").read_bytes() == MANIFEST  # the manifest as published
    lines = (tmp_path / "converted" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"fmt": "sharegpt", "id": "a"}, {"fmt": "sharegpt", "id": "b"}]
    assert not list((tmp_path / "converted").glob("*.part"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_a_corrupt_or_cut_stream_leaves_no_file(out: Path) -> None:
    train = jsonl(SFT)
    with pytest.raises(ExportError, match="train.jsonl: the bytes received do not match the file's checksum"):
        write_export(chunks("train.jsonl", train, sha256="0" * 64), out)
    cut = chunks("train.jsonl", train)[:-1]
    with pytest.raises(ExportError, match="train.jsonl: the stream ended before the file's last chunk"):
        write_export(cut, out)
    with pytest.raises(ExportError, match="train.jsonl: the stream moved on before the file's last chunk"):
        write_export(cut + chunks("test.jsonl", train), out)
    with pytest.raises(ExportError, match="not a plain file name"):
        write_export(chunks("../escape.jsonl", train), out)
    assert list(out.iterdir()) == []


def test_with_chat_formats_export_row(out: Path) -> None:
    """The real converter: chat rows as OpenAI, ShareGPT and Alpaca records, preference rows as DPO ones."""
    stream = chunks("train.jsonl", jsonl(SFT))
    write_export(stream, out, "openai")
    assert json.loads((out / "train.jsonl").read_text().splitlines()[1]) == {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    }
    write_export(stream, out, "sharegpt")
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert first == {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        "system": "Be brief.",
    }
    write_export(stream, out, "alpaca")
    assert json.loads((out / "train.jsonl").read_text().splitlines()[1])["output"] == "4"
    write_export(chunks("train.jsonl", jsonl(DPO)), out, "dpo")
    assert json.loads((out / "train.jsonl").read_text()) == {
        "prompt": [{"role": "user", "content": "Colour?"}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
    }
    with pytest.raises(ExportError, match="^train.jsonl line 1: row 'a': a chat \\(SFT\\) row has no chosen"):
        write_export(stream, out, "dpo")
