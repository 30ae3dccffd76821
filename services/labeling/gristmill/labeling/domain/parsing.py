"""Reading import files: JSONL and CSV bytes (in arbitrary chunks) into validated ``RawRecord``s.

Every problem is an ``InvalidArgumentError`` whose message starts with the 1-based line number (header
counted) and names the field, e.g. ``line 7, field 'label': 'maybe' is not a label of schema v1``.

What a record's labels may be is the project's task type's business (``gristmill.labeling.tasks``); this
module knows the file formats and the fields every record has (external id, text, metadata). In a chat or
preference project a JSONL record is a conversation in one of the shapes ``gristmill.core.chat_formats``
reads (OpenAI, Alpaca, ShareGPT, DPO), detected per record.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gristmill.core.chat import Conversation
from gristmill.core.chat_formats import check_conversation, parse_conversation_record
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.values import json_type
from gristmill.labeling.domain.model import (
    CsvOptions,
    FieldMapping,
    ImportFormat,
    ImportOptions,
    RawRecord,
    Response,
    TaskType,
)

if TYPE_CHECKING:
    from gristmill.labeling.tasks import LabelingTask

MAX_LINE_BYTES = 1 << 20
MAX_IMPORT_RECORDS = 1_000_000
MAX_EXTERNAL_ID_CHARS = 256
_BOM = "\ufeff"

# csv's default field limit (128 KiB) is below the 1 MiB line limit; a long text must reach the cleaning
# step (where it is dropped as too long), not fail as malformed CSV. This raises a process-wide limit.
if csv.field_size_limit() < MAX_LINE_BYTES:
    csv.field_size_limit(MAX_LINE_BYTES)


class LineSplitter:
    """Cuts a byte stream into UTF-8 lines, whatever the chunk boundaries, enforcing the line size limit."""

    def __init__(self) -> None:
        self._rest = b""
        self._line = 0

    @property
    def lines_read(self) -> int:
        return self._line

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        if not data:
            return []
        parts = (self._rest + data).split(b"\n") if self._rest else data.split(b"\n")
        self._rest = parts.pop()
        if len(self._rest) > MAX_LINE_BYTES:
            raise InvalidArgumentError(
                f"line {self._line + len(parts) + 1} is longer than the 1 MiB limit for one line; split it or "
                "shorten the text"
            )
        return [self._decode(part) for part in parts]

    def finish(self) -> list[tuple[int, str]]:
        rest, self._rest = self._rest, b""
        return [self._decode(rest)] if rest else []

    def _decode(self, raw: bytes) -> tuple[int, str]:
        self._line += 1
        if len(raw) > MAX_LINE_BYTES:
            raise InvalidArgumentError(
                f"line {self._line} is {len(raw)} bytes long, over the 1 MiB limit for one line; "
                "split it or shorten the text"
            )
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(
                f"line {self._line} is not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8"
            ) from None
        if self._line == 1 and text.startswith(_BOM):
            text = text[1:]
        return self._line, text


LabelCheck = Callable[[int, str, tuple[str, ...]], tuple[str, ...]]


class RecordBuilder:
    """Turns mapped field values into a ``RawRecord``: checks the text (or the conversation), the external
    id and (as the project's ``task`` says) the labels against the schema's label names ``labels``.

    ``task_type`` says what a record is: a text to classify, or (chat, preference) a conversation.
    """

    def __init__(
        self,
        options: ImportOptions,
        *,
        import_id: str,
        labels: Sequence[str],
        task: LabelingTask,
        task_type: TaskType = TaskType.TEXT_CLASSIFICATION,
    ) -> None:
        self.mapping = options.field_mapping
        self.import_id = import_id
        self.task = task
        self.record_labels = task.record_labels(labels)
        self.where_field = "item" if options.format is ImportFormat.ITEMS else "line"
        self.generative = task_type.generative
        self.preference = task_type is TaskType.PREFERENCE
        # Conversations read per source format ("openai", "alpaca", "sharegpt", "dpo"), for the report.
        self.records_by_format: Counter[str] = Counter()
        self._ids: set[bytes] = set()
        self.count = 0

    def build(
        self, line: int, external_id: str, text: Any, labels: tuple[str, ...], metadata: dict[str, str]
    ) -> RawRecord:
        where = self.where_field
        self._count(line)
        if self.generative:
            raise InvalidArgumentError(
                f"{where} {line}: a {self.task.name} project's items are conversations, not texts; give the "
                "item's conversation"
            )
        if text is None:
            raise InvalidArgumentError(
                f"{where} {line}, field {self.mapping.text_field!r}: missing; every record needs a text"
            )
        if not isinstance(text, str):
            raise InvalidArgumentError(
                f"{where} {line}, field {self.mapping.text_field!r}: must be a string, got {json_type(text)}"
            )
        return RawRecord(line, self._external_id(line, external_id), text, metadata, self.check_labels(line, labels))

    def build_conversation(
        self,
        line: int,
        external_id: str,
        conversation: Conversation,
        ranking: tuple[int, ...],
        metadata: dict[str, str],
        source_format: str,
        *,
        checked: bool = False,
    ) -> RawRecord:
        """A chat or preference record: ``conversation`` (checked here unless ``checked``, i.e. it comes from
        ``parse_conversation_record``), with the source's ``ranking`` of its candidates (best first; ``()``
        when the source states none), recorded as the import annotator's response."""
        where = f"{self.where_field} {line}"
        self._count(line)
        if not self.generative:
            raise InvalidArgumentError(f"{where}: a {self.task.name} project's items are texts, not conversations")
        if not checked:
            check_conversation(conversation, where, preference=self.preference)
        response = None
        if ranking:
            count = len(conversation.candidates)
            if not self.preference:
                raise InvalidArgumentError(f"{where}: a ranking of candidate replies is for preference projects")
            if len(set(ranking)) != len(ranking) or not all(0 <= index < count for index in ranking):
                raise InvalidArgumentError(
                    f"{where}, ranking: candidate indices 0-{count - 1}, each at most once; got {list(ranking)}"
                )
            response = Response(ranking=ranking)
        external_id = self._external_id(line, external_id)
        self.records_by_format[source_format] += 1
        labels = self.task.labels_of(response) if response is not None else ()
        return RawRecord(line, external_id, "", metadata, labels, conversation, response)

    def _count(self, line: int) -> None:
        self.count += 1
        if self.count > MAX_IMPORT_RECORDS:
            raise InvalidArgumentError(
                f"{self.where_field} {line}: more than {MAX_IMPORT_RECORDS:,} records in one import; split the file"
            )

    def _external_id(self, line: int, external_id: str) -> str:
        """The record's external id (made up from the import and the line when it has none), checked to be
        short enough and new in this import."""
        where = self.where_field
        if not external_id:
            external_id = f"{self.import_id}-{line}"
        elif len(external_id) > MAX_EXTERNAL_ID_CHARS:
            raise InvalidArgumentError(
                f"{where} {line}, field {self.mapping.external_id_field!r}: longer than {MAX_EXTERNAL_ID_CHARS} "
                "characters"
            )
        # A 16-byte digest per id instead of the id itself keeps this set small on million-line imports.
        digest = hashlib.blake2b(external_id.encode(), digest_size=16).digest()
        if digest in self._ids:
            raise InvalidArgumentError(
                f"{where} {line}, field {self.mapping.external_id_field!r}: external id {external_id[:80]!r} "
                "appears earlier in this import; external ids must be unique"
            )
        self._ids.add(digest)
        return external_id

    def check_labels(self, line: int, labels: tuple[str, ...]) -> tuple[str, ...]:
        if not labels:
            return ()
        return self.record_labels.check(labels, f"{self.where_field} {line}, field {self.mapping.label_field!r}")


class JsonlReader:
    def __init__(self, builder: RecordBuilder) -> None:
        self.builder = builder
        mapping = builder.mapping
        self._mapped = {mapping.external_id_field, mapping.text_field, mapping.label_field}
        self._meta_fields = frozenset(mapping.metadata_fields)
        self._conversations = builder.generative

    def records(self, lines: Sequence[tuple[int, str]]) -> list[RawRecord]:
        out = []
        mapping = self.builder.mapping
        for line, text in lines:
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"line {line}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise InvalidArgumentError(f"line {line}: expected a JSON object, got {json_type(obj)}")
            external_id = _external_id(obj.get(mapping.external_id_field), line, mapping.external_id_field)
            if self._conversations:
                out.append(self._conversation(line, external_id, obj))
                continue
            labels = self.builder.record_labels.from_json(
                obj.get(mapping.label_field), f"line {line}, field {mapping.label_field!r}"
            )
            metadata = {
                key: _metadata_value(value)
                for key, value in obj.items()
                if (key in self._meta_fields if self._meta_fields else key not in self._mapped)
            }
            out.append(self.builder.build(line, external_id, obj.get(mapping.text_field), labels, metadata))
        return out

    def _conversation(self, line: int, external_id: str, obj: dict[str, Any]) -> RawRecord:
        """A chat or preference record: of the field mapping only the external id field applies; the
        fields its shape does not read are metadata (or those of ``metadata_fields``)."""
        parsed = parse_conversation_record(obj, f"line {line}", preference=self.builder.preference)
        id_field = self.builder.mapping.external_id_field
        metadata = {
            key: _metadata_value(value)
            for key, value in obj.items()
            if (key in self._meta_fields if self._meta_fields else key != id_field and key not in parsed.fields)
        }
        return self.builder.build_conversation(
            line, external_id, parsed.conversation, parsed.ranking, metadata, parsed.source_format, checked=True
        )


class CsvReader:
    """CSV (or tab-separated) records. Quoted fields may span lines unless quoting is disabled."""

    def __init__(self, builder: RecordBuilder, options: CsvOptions) -> None:
        self.builder = builder
        self.options = options
        self._dialect: dict[str, Any] = {"delimiter": options.delimiter, "strict": True}
        if options.disable_quoting:
            self._dialect["quoting"] = csv.QUOTE_NONE
        self._columns: tuple[str, ...] | None = None
        self._pending: tuple[int, str] | None = None
        if not options.has_header:
            self._set_columns(tuple(options.column_names), line=0)

    def records(self, lines: Sequence[tuple[int, str]]) -> list[RawRecord]:
        rows = self._rows(lines)
        return self._build(rows)

    def finish(self) -> list[RawRecord]:
        if self._pending is not None:
            start, _ = self._pending
            raise InvalidArgumentError(
                f"line {start}: a quoted field is never closed; if the file is plain tab- or comma-separated "
                "text whose texts may start with '\"', set csv.disable_quoting"
            )
        return []

    def _rows(self, lines: Sequence[tuple[int, str]]) -> list[tuple[int, list[str]]]:
        if self.options.disable_quoting:
            numbers = [line for line, text in lines if text]
            texts = [text for _, text in lines if text]
            return list(zip(numbers, self._parse(texts, numbers[0] if numbers else 0), strict=True))
        rows: list[tuple[int, list[str]]] = []
        plain: list[tuple[int, str]] = []
        for line, text in lines:
            if self._pending is None and '"' not in text:
                if text:
                    plain.append((line, text))
                continue
            if plain:
                rows.extend(self._plain(plain))
                plain = []
            start, record = (self._pending[0], self._pending[1] + "\n" + text) if self._pending else (line, text)
            if len(record) > MAX_LINE_BYTES:
                raise InvalidArgumentError(f"line {start}: a quoted record is longer than the 1 MiB limit")
            try:
                parsed = next(csv.reader([record], **self._dialect), [])
            except csv.Error as exc:
                if "unexpected end of data" in str(exc):
                    self._pending = (start, record)
                    continue
                raise InvalidArgumentError(f"line {start}: malformed CSV: {exc}") from None
            self._pending = None
            if parsed:
                rows.append((start, parsed))
        if plain:
            rows.extend(self._plain(plain))
        return rows

    def _plain(self, plain: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
        numbers = [line for line, _ in plain]
        return list(zip(numbers, self._parse([text for _, text in plain], numbers[0]), strict=True))

    def _parse(self, texts: list[str], first_line: int) -> list[list[str]]:
        try:
            return list(csv.reader(texts, **self._dialect))
        except csv.Error as exc:
            # The reader counts the lines it was given; point at the file's line.
            raise InvalidArgumentError(f"line {first_line}: malformed CSV: {exc}") from None

    def _set_columns(self, columns: tuple[str, ...], *, line: int) -> None:
        mapping = self.builder.mapping
        where = f"line {line}: the CSV header" if line else "csv.column_names"
        if not columns:
            raise InvalidArgumentError(
                "csv.column_names is empty: a CSV file without a header needs the column names (e.g. "
                '["text", "label"]), or set csv.has_header'
            )
        if len(set(columns)) != len(columns):
            raise InvalidArgumentError(f"{where} names a column twice: {', '.join(columns)}")
        if mapping.text_field not in columns:
            raise InvalidArgumentError(
                f"{where} has no text column {mapping.text_field!r} (columns: {', '.join(columns)}); "
                "set field_mapping.text_field"
            )
        self._columns = columns
        self._text = columns.index(mapping.text_field)
        self._id = columns.index(mapping.external_id_field) if mapping.external_id_field in columns else None
        self._label = columns.index(mapping.label_field) if mapping.label_field in columns else None
        mapped = {self._text, self._id, self._label}
        wanted = set(mapping.metadata_fields)
        self._meta = [(i, name) for i, name in enumerate(columns) if (name in wanted if wanted else i not in mapped)]

    def _build(self, rows: list[tuple[int, list[str]]]) -> list[RawRecord]:
        out = []
        separator = self.builder.mapping.multi_label_separator
        record_labels = self.builder.record_labels
        for line, row in rows:
            if self._columns is None:
                self._set_columns(tuple(name.strip() for name in row), line=line)
                continue
            if len(row) != len(self._columns):
                raise InvalidArgumentError(
                    f"line {line}: expected {len(self._columns)} columns ({', '.join(self._columns)}), got {len(row)}"
                )
            label_cell = row[self._label].strip() if self._label is not None else ""
            labels = record_labels.from_cell(label_cell, separator)
            external_id = row[self._id].strip() if self._id is not None else ""
            metadata = {name: row[i] for i, name in self._meta}
            out.append(self.builder.build(line, external_id, row[self._text], labels, metadata))
        return out


def _external_id(value: Any, line: int, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InvalidArgumentError(f"line {line}, field {field!r}: must be a string or an integer, got {json_type(value)}")


def _metadata_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def validate_options(options: ImportOptions) -> None:
    """Check what can be checked before reading a byte: format, CSV dialect, field mapping."""
    if options.format is ImportFormat.CSV:
        delimiter = options.csv.delimiter
        if len(delimiter) != 1 or delimiter in ('"', "\n", "\r"):
            raise InvalidArgumentError(
                f"csv.delimiter must be one character other than a quote or a newline, got {delimiter!r}"
            )
    mapping: FieldMapping = options.field_mapping
    names = {
        "field_mapping.external_id_field": mapping.external_id_field,
        "field_mapping.text_field": mapping.text_field,
        "field_mapping.label_field": mapping.label_field,
    }
    for where, value in names.items():
        if not value:
            raise InvalidArgumentError(f"{where} must not be empty")
    if len(set(names.values())) != len(names):
        raise InvalidArgumentError("field_mapping: the id, text and label fields must be three different names")
    if not mapping.multi_label_separator:
        raise InvalidArgumentError("field_mapping.multi_label_separator must not be empty")
