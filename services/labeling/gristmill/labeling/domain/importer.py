"""The import pipeline: read → validate → normalise → mask → spool, then deduplicate and store at once.

Two phases, so that the import is atomic without holding anything big in memory or a database lock
while a client streams:

1. While records arrive (``feed_*``), each is parsed and validated (a bad record fails the whole
   import, nothing stored), normalised, length-checked and PII-masked, and the survivors are spooled
   to a temporary file. A chat or preference record is a conversation: every turn and candidate reply is
   cleaned, and the item's stored text is the conversation's canonical JSON. When the project limits
   tokens, conversations are then counted in batches and cut or dropped (``domain/tokens.py``).
2. ``finish`` takes the project's import lock, brings the project's near-duplicate index up to date
   with the database, and, in one transaction, drops records whose external id or text the project
   already has (or this import had earlier), detects near duplicates, and stores the rest.

Memory is bounded by the spool batch, the per-import sets of text hashes and external-id digests, and
the project's LSH index; texts live only in the spool and the database.
"""

from __future__ import annotations

import gc
import hashlib
import pickle
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import IO, NamedTuple

import numpy as np
import numpy.typing as npt

from gristmill.core.chat import USER, Conversation
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.labeling.domain import neardup
from gristmill.labeling.domain.cleaning import TextMasker, normalize_conversation, normalize_text
from gristmill.labeling.domain.model import (
    DroppedRecord,
    DropReason,
    ImportFormat,
    ImportOptions,
    ImportReport,
    ItemSource,
    NearDuplicatePolicy,
    Prediction,
    Project,
    RawRecord,
    Response,
    TaskType,
)
from gristmill.labeling.domain.ordering import new_shuffle_key
from gristmill.labeling.domain.parsing import CsvReader, JsonlReader, LineSplitter, RecordBuilder
from gristmill.labeling.domain.ports import ItemWriter, NewItem
from gristmill.labeling.domain.tokens import TokenLimit, remove_turns
from gristmill.labeling.tasks import labeling_task

MAX_REPORTED_DROPS = 1_000
# Records per spool batch and per database round trip in phase 2.
_BATCH = 2_000
# Conversations counted per call to a project's tokenizer (its batch encoder runs them in parallel).
_TOKEN_BATCH = 512

IdFactory = Callable[[], str]


class _Cleaned(NamedTuple):
    """A record after phase 1: normalised and masked text, ready for deduplication.

    A named tuple rather than a dataclass: it is pickled to the spool and back, and tuples are the
    cheapest thing to pickle.
    """

    line: int
    external_id: str
    text: str
    metadata: dict[str, str]
    labels: tuple[str, ...]
    normalized: bool
    masked: tuple[tuple[str, int], ...]
    prediction: Prediction | None = None
    # A conversation's response from its source (a DPO record's ranking), stored beside ``labels``.
    response: Response | None = None
    # What near-duplicate detection compares when it is not ``text``: a conversation's contents, not its
    # JSON (whose keys every conversation shares).
    dedupe_text: str = ""


class _Counting(NamedTuple):
    """A cleaned conversation waiting for its batch to be counted in tokens."""

    record: RawRecord
    prediction: Prediction | None
    # Normalised (``cleaned``), then masked (``masked``, with its matches ``found``).
    cleaned: Conversation
    masked: Conversation
    found: Counter[str]
    normalized: bool
    response: Response | None
    labels: tuple[str, ...]


_gc_guard = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Pause Python's cycle collector while an import builds many long-lived objects.

    Each full collection walks every tracked object, and an import adds hundreds of thousands (the LSH
    index's buckets), so collections triggered by the import's own allocations cost about a third of its
    time. Reference counting still frees everything as usual; only the search for garbage cycles waits,
    and the import creates none. Nested and concurrent pauses are counted: the collector comes back when
    the last one ends (and only if it was on before the first).
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_guard:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_guard:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


class IndexCache:
    """The near-duplicate index of the most recently used projects, and one lock per project.

    The lock serialises phase 2 of imports (and active-learning inserts) per project, so that the
    in-memory index and the database move together.
    """

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._indexes: OrderedDict[tuple[str, str, float], neardup.NearDuplicateIndex] = OrderedDict()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, organization_id: str, project_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((organization_id, project_id), threading.Lock())

    def index(self, organization_id: str, project_id: str, threshold: float) -> neardup.NearDuplicateIndex:
        key = (organization_id, project_id, threshold)
        with self._guard:
            index = self._indexes.get(key)
            if index is None:
                index = neardup.NearDuplicateIndex(threshold)
                self._indexes[key] = index
                while len(self._indexes) > self.capacity:
                    self._indexes.popitem(last=False)
            self._indexes.move_to_end(key)
            return index

    def forget(self, organization_id: str, project_id: str) -> None:
        with self._guard:
            for key in [k for k in self._indexes if k[:2] == (organization_id, project_id)]:
                del self._indexes[key]


SignatureFeed = Callable[[int], Iterator[tuple[int, str, bytes]]]


class ImportSession:
    """One import in progress. Feed it chunks or records, then ``finish``; ``close`` always."""

    def __init__(
        self,
        project: Project,
        options: ImportOptions,
        *,
        import_id: str,
        new_id: IdFactory,
        report: ImportReport,
        token_limit: TokenLimit | None = None,
    ) -> None:
        """``token_limit``: the project's ``max_tokens`` with its tokenizer's counter (None: no token limit)."""
        self.project = project
        self.options = options
        self.import_id = import_id
        self.report = report
        self._new_id = new_id
        self._started = time.perf_counter()
        cleaning = project.settings.cleaning
        self._max_chars = cleaning.max_text_chars
        self._masker = TextMasker(cleaning.pii)
        self._policy = cleaning.near_duplicate_policy
        self._task = labeling_task(project.task_type, error=FailedPreconditionError)
        task_type = TaskType(project.task_type)
        if task_type.generative and options.format is ImportFormat.CSV:
            raise InvalidArgumentError(
                "options.format: conversations are imported from JSONL (or structured items), not CSV"
            )
        self._builder = RecordBuilder(
            options,
            import_id=import_id,
            labels=project.label_schema.names,
            task=self._task,
            task_type=task_type,
        )
        self._lines = LineSplitter()
        self._jsonl = JsonlReader(self._builder) if options.format is ImportFormat.JSONL else None
        self._csv = CsvReader(self._builder, options.csv) if options.format is ImportFormat.CSV else None
        # Lives across feed calls and is closed by close(), so no `with` block can own it.
        self._spool: IO[bytes] = tempfile.TemporaryFile(prefix="gristmill-import-")  # noqa: SIM115
        self._spooled = 0
        self._batch: list[_Cleaned] = []
        self._token_limit = token_limit
        self._counting: list[_Counting] = []

    # -- phase 1 ----------------------------------------------------------------------------------------

    @property
    def builder(self) -> RecordBuilder:
        return self._builder

    def feed_chunk(self, data: bytes) -> None:
        """Raw JSONL/CSV bytes; a line may span chunks."""
        with cycle_collection_paused():
            self._read(self._lines.feed(data))

    def feed_records(self, records: Sequence[RawRecord], predictions: Sequence[Prediction | None] = ()) -> None:
        """Structured records, already validated by ``builder``."""
        self.report.received_count += len(records)
        with cycle_collection_paused():
            for index, record in enumerate(records):
                self._clean(record, predictions[index] if predictions else None)
            self._spool_batch(force=False)

    def _read(self, lines: list[tuple[int, str]]) -> None:
        if self._jsonl is not None:
            records = self._jsonl.records(lines)
        elif self._csv is not None:
            records = self._csv.records(lines)
        else:
            raise AssertionError("feed_chunk is for JSONL and CSV imports")
        self.feed_records(records)

    def _clean(self, record: RawRecord, prediction: Prediction | None) -> None:
        if record.conversation is not None:
            self._clean_conversation(record, record.conversation, prediction)
            return
        text = normalize_text(record.text)
        if not text:
            self._drop(record.line_number, record.external_id, DropReason.EMPTY)
            self.report.dropped_empty_count += 1
            return
        if len(text) > self._max_chars:
            self._drop(record.line_number, record.external_id, DropReason.TOO_LONG)
            self.report.dropped_too_long_count += 1
            return
        normalized = text != record.text
        masked, found = self._masker.mask(text)
        self._batch.append(
            _Cleaned(
                record.line_number,
                record.external_id,
                masked,
                record.metadata,
                record.labels,
                normalized,
                tuple(found.items()),
                prediction,
            )
        )

    def _clean_conversation(self, record: RawRecord, conversation: Conversation, prediction: Prediction | None) -> None:
        """A conversation's turns and candidates normalised and masked; dropped as EMPTY when no user turn or
        (preference) fewer than two distinct replies are left, as TOO_LONG when all its text is too long."""
        line, external_id = record.line_number, record.external_id
        cleaned = normalize_conversation(conversation)
        normalized = cleaned is not conversation
        if not any(message.content for message in cleaned.messages if message.role == USER):
            self._drop(line, external_id, DropReason.EMPTY)
            self.report.dropped_empty_count += 1
            return
        response, labels = record.response, record.labels
        if not all(cleaned.candidates):
            # Replies that were only whitespace go; the source's ranking follows the others to their new places.
            kept = [index for index, candidate in enumerate(cleaned.candidates) if candidate]
            cleaned = Conversation(cleaned.messages, tuple(cleaned.candidates[index] for index in kept))
            if response is not None and response.ranking:
                ranking = tuple(kept.index(index) for index in response.ranking if index in kept)
                response = replace(response, ranking=ranking)
                response, labels = (None, ()) if response.empty else (response, self._task.labels_of(response))
        size = sum(len(message.content) for message in cleaned.messages) + sum(map(len, cleaned.candidates))
        if size > self._max_chars:
            self._drop(line, external_id, DropReason.TOO_LONG)
            self.report.dropped_too_long_count += 1
            return
        masked, found = self._masker.mask_conversation(cleaned)
        if self._builder.preference and len(set(masked.candidates)) < 2:
            self._drop(line, external_id, DropReason.EMPTY)
            self.report.dropped_empty_count += 1
            return
        if self._token_limit is not None:
            self._counting.append(_Counting(record, prediction, cleaned, masked, found, normalized, response, labels))
            if len(self._counting) >= _TOKEN_BATCH:
                self._limit_tokens()
            return
        self._keep_conversation(record, prediction, masked, found, normalized, response, labels)

    def _keep_conversation(
        self,
        record: RawRecord,
        prediction: Prediction | None,
        masked: Conversation,
        found: Counter[str],
        normalized: bool,
        response: Response | None,
        labels: tuple[str, ...],
    ) -> None:
        self._batch.append(
            _Cleaned(
                record.line_number,
                record.external_id,
                masked.to_json(),
                record.metadata,
                labels,
                normalized,
                tuple(found.items()),
                prediction,
                response,
                masked.contents(),
            )
        )

    def _limit_tokens(self) -> None:
        """Count the waiting conversations in one batch; keep, cut or drop each (in arrival order).

        The limit counts the masked text (what is stored). A cut conversation is masked again without the
        removed turns, so that the report counts only the masks of what is kept, and is normalised-or-not by
        what is kept too.
        """
        counting, self._counting = self._counting, []
        if not counting or self._token_limit is None:
            return
        report = self.report
        cuts = self._token_limit.apply([entry.masked for entry in counting])
        for entry, cut in zip(counting, cuts, strict=True):
            record = entry.record
            if cut.conversation is None:
                report.dropped_too_many_tokens_count += 1
                self._drop(record.line_number, record.external_id, DropReason.TOO_MANY_TOKENS, token_count=cut.tokens)
                continue
            masked, found, normalized = entry.masked, entry.found, entry.normalized
            if cut.removed_turns:
                kept = remove_turns(entry.cleaned, cut.removed_turns)
                masked, found = self._masker.mask_conversation(kept)
                if record.conversation is not None:
                    source = remove_turns(record.conversation, cut.removed_turns)
                    normalized = normalize_conversation(source) is not source
                report.truncated_count += 1
                report.truncated_turn_count += cut.removed_turns
                self._drop(
                    record.line_number,
                    record.external_id,
                    DropReason.TRUNCATED,
                    removed_turn_count=cut.removed_turns,
                    token_count=cut.tokens,
                )
            self._keep_conversation(record, entry.prediction, masked, found, normalized, entry.response, entry.labels)

    def _spool_batch(self, *, force: bool) -> None:
        if self._batch and (force or len(self._batch) >= _BATCH):
            pickle.dump(self._batch, self._spool, protocol=pickle.HIGHEST_PROTOCOL)
            self._spooled += len(self._batch)
            self._batch = []

    def _spooled_batches(self) -> Iterator[list[_Cleaned]]:
        self._spool.flush()
        self._spool.seek(0)
        while True:
            try:
                yield pickle.load(self._spool)
            except EOFError:
                return

    def end_of_input(self) -> None:
        """The stream ended: read the last partial line and check the file ended cleanly."""
        if self._jsonl is not None or self._csv is not None:
            self._read(self._lines.finish())
        if self._csv is not None:
            self._csv.finish()
        self._limit_tokens()
        self._spool_batch(force=True)
        if self._builder.records_by_format:
            self.report.records_by_format = dict(self._builder.records_by_format)

    # -- phase 2 ----------------------------------------------------------------------------------------

    def store(
        self,
        writer_context: AbstractContextManager[ItemWriter],
        cache: IndexCache,
        signatures: SignatureFeed,
        *,
        source: ItemSource = ItemSource.IMPORT,
        record_report: bool = True,
    ) -> ImportReport:
        """Deduplicate and store everything spooled, in one transaction, under the project's import lock."""
        project = self.project
        org, project_id = project.organization_id, project.project_id
        cleaning = project.settings.cleaning
        policy = cleaning.near_duplicate_policy
        with cache.lock(org, project_id), cycle_collection_paused():
            index = None
            if policy is not NearDuplicatePolicy.OFF:
                index = cache.index(org, project_id, cleaning.near_duplicate_threshold)
                _catch_up(index, signatures)
            inserted: list[str] = []
            try:
                with writer_context as writer:
                    stored = self._dedupe_and_store(writer, index, inserted, source)
                    stored_range = writer.finish(self.report if record_report else None, self.options.request_id)
            except BaseException:
                if index is not None:
                    for key in inserted:
                        index.remove(key)
                raise
            if index is not None and stored and stored_range.first_seq == index.high_water + 1:
                # Nothing else was stored in between, so the index now covers everything up to here.
                index.high_water = stored_range.last_seq
        return self.report

    def _dedupe_and_store(
        self,
        writer: ItemWriter,
        index: neardup.NearDuplicateIndex | None,
        inserted: list[str],
        source: ItemSource,
    ) -> int:
        """Per spooled batch: exact duplicates, near duplicates, then stage the survivors.

        Earlier batches of this import are already staged in the writer's transaction, so the database
        lookups see them too: nothing here is kept from batch to batch except the LSH index.
        """
        report = self.report
        masked_by_kind: Counter[str] = Counter()
        annotator = self.options.existing_label_annotator_id
        stored = 0
        for batch in self._spooled_batches():
            survivors = self._drop_exact_duplicates(writer, batch)
            if not survivors:
                continue
            sigs = neardup.signatures([record.dedupe_text or record.text for record, _, _ in survivors])
            near = self._near_duplicates(writer, index, survivors, sigs, inserted)
            accepted: list[NewItem] = []
            for position, (record, digest, item_id) in enumerate(survivors):
                match = near.get(position)
                if match is not None and self._policy is NearDuplicatePolicy.DROP:
                    report.dropped_near_duplicate_count += 1
                    self._drop(record.line, record.external_id, DropReason.NEAR_DUPLICATE, match.key, match.similarity)
                    continue
                if match is not None:
                    report.flagged_near_duplicate_count += 1
                    self._drop(
                        record.line, record.external_id, DropReason.NEAR_DUPLICATE_FLAGGED, match.key, match.similarity
                    )
                accepted.append(
                    NewItem(
                        item_id=item_id,
                        external_id=record.external_id,
                        text=record.text,
                        text_hash=digest.hex(),
                        signature=neardup.to_bytes(sigs[position]),
                        metadata=record.metadata,
                        near_duplicate_of_item_id=match.key if match is not None else "",
                        shuffle_key=new_shuffle_key(),
                        labels=record.labels,
                        prediction=record.prediction,
                        response=record.response,
                    )
                )
                report.accepted_count += 1
                report.normalized_count += record.normalized
                report.imported_label_count += bool(record.labels)
                if record.masked:
                    report.pii_masked_item_count += 1
                    masked_by_kind.update(dict(record.masked))
            if accepted:
                writer.add_items(accepted, source=source, import_id=self.import_id, annotator_id=annotator)
                stored += len(accepted)
        for kind, count in masked_by_kind.items():
            report.pii_masked_by_kind[kind] = report.pii_masked_by_kind.get(kind, 0) + count
        report.duration_ms = int((time.perf_counter() - self._started) * 1000)
        return stored

    def _drop_exact_duplicates(self, writer: ItemWriter, batch: list[_Cleaned]) -> list[tuple[_Cleaned, bytes, str]]:
        """Records whose external id and text are new to the project and to this batch, with a new item id."""
        report = self.report
        existing_ids = writer.existing_external_ids([record.external_id for record in batch])
        digests = [hashlib.sha256(record.text.encode()).digest() for record in batch]
        in_db = writer.existing_hashes(sorted({digest.hex() for digest in digests}))
        in_batch: dict[bytes, str] = {}
        survivors = []
        for record, digest in zip(batch, digests, strict=True):
            if record.external_id in existing_ids:
                report.dropped_existing_external_id_count += 1
                self._drop(record.line, record.external_id, DropReason.EXISTING_EXTERNAL_ID)
                continue
            earlier = in_batch.get(digest) or in_db.get(digest.hex())
            if earlier is not None:
                report.dropped_exact_duplicate_count += 1
                self._drop(record.line, record.external_id, DropReason.EXACT_DUPLICATE, earlier)
                continue
            item_id = self._new_id()
            in_batch[digest] = item_id
            survivors.append((record, digest, item_id))
        return survivors

    def _near_duplicates(
        self,
        writer: ItemWriter,
        index: neardup.NearDuplicateIndex | None,
        survivors: list[tuple[_Cleaned, bytes, str]],
        sigs: npt.NDArray[np.uint32],
        inserted: list[str],
    ) -> dict[int, neardup.Match]:
        """Position in ``survivors`` → the item it nearly duplicates; the kept ones join the index.

        Two passes: first every record's candidates among items indexed before this batch, whose
        signatures come in one query; then, in order, candidates among this batch's own kept records
        (found through their band keys), so a record can match one a few lines above it.
        """
        if index is None:
            return {}
        bands = index.band_keys(sigs)
        older = [index.candidates(band) for band in bands]
        wanted = sorted({key for keys in older for key in keys})
        older_sigs = {
            key: sig
            for key, data in writer.signatures_of(wanted).items()
            if (sig := neardup.from_bytes(data)) is not None
        }
        buckets: dict[tuple[int, int], list[int]] = {}
        matches: dict[int, neardup.Match] = {}
        drop = self._policy is NearDuplicatePolicy.DROP
        for position, band in enumerate(bands):
            signature = sigs[position]
            candidates = [(key, older_sigs[key]) for key in sorted(older[position]) if key in older_sigs]
            seen: set[int] = set()
            for number, key in enumerate(band.keys):
                for other in buckets.get((number, key), ()):
                    if other not in seen:
                        seen.add(other)
                        candidates.append((survivors[other][2], sigs[other]))
            match = neardup.best_of(signature, candidates, index.threshold)
            if match is not None:
                matches[position] = match
                if drop:
                    continue
            for number, key in enumerate(band.keys):
                buckets.setdefault((number, key), []).append(position)
        for position, band in enumerate(bands):
            if position in matches and drop:
                continue
            item_id = survivors[position][2]
            index.insert(item_id, band)
            inserted.append(item_id)
        return matches

    def _drop(
        self,
        line: int,
        external_id: str,
        reason: DropReason,
        duplicate_of: str = "",
        similarity: float = 0.0,
        *,
        removed_turn_count: int = 0,
        token_count: int = 0,
    ) -> None:
        if len(self.report.drops) < MAX_REPORTED_DROPS:
            self.report.drops.append(
                DroppedRecord(line, external_id, reason, duplicate_of, similarity, removed_turn_count, token_count)
            )
        else:
            self.report.drops_truncated = True

    def close(self) -> None:
        self._spool.close()


def _catch_up(index: neardup.NearDuplicateIndex, signatures: SignatureFeed) -> None:
    """Add the items stored since the index's high-water mark (all of them for a new index), in batches."""
    keys: list[str] = []
    rows: list[neardup.Signature] = []
    last = index.high_water
    for seq, item_id, data in signatures(index.high_water):
        signature = neardup.from_bytes(data)
        if signature is not None:
            keys.append(item_id)
            rows.append(signature)
        last = seq
        if len(keys) >= _BATCH:
            index.insert_many(keys, np.stack(rows))
            keys, rows = [], []
    if keys:
        index.insert_many(keys, np.stack(rows))
    index.high_water = last
