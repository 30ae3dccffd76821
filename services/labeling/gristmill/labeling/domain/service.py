"""The labeling service's use cases, over a ``LabelingStore`` and an ``ObjectStore``.

Transport-free: the gRPC servicer converts requests into these calls and the results back, and the
event handlers call them too. Every method validates its input first, so bad input is refused with an
``InvalidArgumentError`` (or ``NotFoundError`` / ``FailedPreconditionError``) before anything is written.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from gristmill.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
)
from gristmill.core.ids import new_id, validate_id
from gristmill.core.manifests import (
    DatasetManifest,
    DatasetRow,
    FileEntry,
    SplitFile,
    dataset_manifest_key,
    dataset_split_key,
)
from gristmill.core.storage import ObjectInfo, ObjectStore, validate_key
from gristmill.labeling.domain import agreement as agreement_math
from gristmill.labeling.domain.ids import random_id
from gristmill.labeling.domain.importer import ImportSession, IndexCache
from gristmill.labeling.domain.model import (
    DEFAULT_ORGANIZATION,
    AgreementReport,
    Annotation,
    DatasetVersion,
    ImportFormat,
    ImportOptions,
    ImportReport,
    Item,
    ItemSource,
    ItemStatus,
    LabelDefinition,
    LabelSchema,
    ObjectRef,
    Prediction,
    Project,
    ProjectSettings,
    SpanLabel,
    Split,
    SplitRatios,
    SplitStrategy,
    SplitSummary,
    Task,
    TaskType,
)
from gristmill.labeling.domain.parsing import validate_options
from gristmill.labeling.domain.schema import (
    MAX_DESCRIPTION_CHARS,
    slug_from,
    validate_labels,
    validate_lease_seconds,
    validate_settings,
)
from gristmill.labeling.domain.splits import SPLITS, DatasetItem, fingerprint, split_items, validate_ratios
from gristmill.labeling.store.base import ItemWriter, LabelingStore, PredictionTarget

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

MAX_PREDICTIONS_PER_CALL = 10_000
MAX_COMMENT_CHARS = 10_000
MAX_DISPLAY_NAME_CHARS = 512
EXPORT_CHUNK_BYTES = 1 << 20
_SLUG_ATTEMPTS = 20


def utc_now() -> datetime:
    return datetime.now(UTC)


def organization(organization_id: str) -> str:
    """Empty means the default organisation (auth and organisations come later)."""
    return organization_id or DEFAULT_ORGANIZATION


@dataclass(frozen=True)
class ExportChunk:
    file_name: str
    data: bytes
    last_chunk: bool
    sha256: str = ""
    size_bytes: int = 0


class LabelingService:
    def __init__(
        self,
        store: LabelingStore,
        objects: ObjectStore,
        *,
        clock: Clock = utc_now,
        index_cache: IndexCache | None = None,
    ) -> None:
        self.store = store
        self.objects = objects
        self.clock = clock
        self.indexes = index_cache or IndexCache()
        self._publish_locks: dict[tuple[str, str], threading.Lock] = {}
        self._publish_guard = threading.Lock()

    # ------------------------------------------------------------------------- projects and schemas

    def create_project(
        self,
        organization_id: str,
        *,
        project_id: str,
        display_name: str,
        description: str,
        task_type: TaskType,
        labels: Sequence[LabelDefinition],
        settings: ProjectSettings,
    ) -> Project:
        org = organization(organization_id)
        _check_text("display_name", display_name, MAX_DISPLAY_NAME_CHARS)
        _check_text("description", description, MAX_DESCRIPTION_CHARS)
        checked_labels = validate_labels(task_type, labels)
        validate_settings(settings)
        derived = not project_id
        base = slug_from(display_name) if derived else validate_id(project_id, what="project_id")
        now = self.clock()
        for attempt in range(_SLUG_ATTEMPTS if derived else 1):
            candidate = base if attempt == 0 else f"{base[:120]}-{attempt + 1}"
            project = Project(
                organization_id=org,
                project_id=candidate,
                display_name=display_name or candidate,
                description=description,
                task_type=task_type,
                label_schema=LabelSchema(candidate, 1, checked_labels, now),
                settings=settings,
                create_time=now,
                update_time=now,
            )
            try:
                return self.store.create_project(project)
            except AlreadyExistsError:
                if not derived or attempt == _SLUG_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def get_project(self, organization_id: str, project_id: str) -> Project:
        return self.store.get_project(organization(organization_id), _project_id(project_id))

    def list_projects(self, organization_id: str, *, offset: int, limit: int) -> list[Project]:
        return self.store.list_projects(organization(organization_id), offset=offset, limit=limit)

    def update_project(
        self,
        organization_id: str,
        project_id: str,
        *,
        display_name: str | None,
        description: str | None,
        settings: ProjectSettings | None,
    ) -> Project:
        if display_name is not None:
            _check_text("project.display_name", display_name, MAX_DISPLAY_NAME_CHARS)
        if description is not None:
            _check_text("project.description", description, MAX_DESCRIPTION_CHARS)
        if settings is not None:
            validate_settings(settings)
        return self.store.update_project(
            organization(organization_id),
            _project_id(project_id),
            display_name=display_name,
            description=description,
            settings=settings,
            now=self.clock(),
        )

    def update_label_schema(
        self, organization_id: str, project_id: str, labels: Sequence[LabelDefinition]
    ) -> LabelSchema:
        project = self.get_project(organization_id, project_id)
        checked = validate_labels(project.task_type, labels)
        return self.store.update_label_schema(project.organization_id, project.project_id, checked, self.clock())

    def get_label_schema(self, organization_id: str, project_id: str, version: int | None) -> LabelSchema:
        if version is not None and version < 1:
            raise InvalidArgumentError(f"version must be 1 or more, got {version}")
        return self.store.get_label_schema(organization(organization_id), _project_id(project_id), version)

    def list_label_schemas(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[LabelSchema]:
        return self.store.list_label_schemas(
            organization(organization_id), _project_id(project_id), offset=offset, limit=limit
        )

    # ------------------------------------------------------------------------- imports

    def begin_import(self, organization_id: str, options: ImportOptions) -> ImportSession | ImportReport:
        """A session to feed, or the earlier report when ``options.request_id`` was already used."""
        org = organization(organization_id)
        project = self.store.get_project(org, _project_id(options.project_id))
        if options.request_id:
            validate_id(options.request_id, what="options.request_id")
            earlier = self.store.find_import(org, project.project_id, options.request_id)
            if earlier is not None:
                return earlier
        validate_options(options)
        if options.existing_label_annotator_id:
            validate_id(options.existing_label_annotator_id, what="options.existing_label_annotator_id")
        _check_text("options.source_name", options.source_name, 512)
        import_id = new_id()
        report = ImportReport(
            import_id=import_id,
            project_id=project.project_id,
            source_name=options.source_name,
            create_time=self.clock(),
        )
        return ImportSession(project, options, import_id=import_id, new_id=random_id, report=report)

    def finish_import(self, session: ImportSession) -> ImportReport:
        """Store what the session read (it must have seen the end of its input). Closes the session."""
        project = session.project
        org, project_id = project.organization_id, project.project_id
        try:
            session.end_of_input()
            return session.store(
                self.store.open_import(org, project_id, self.clock()),
                self.indexes,
                lambda after: self.store.iter_signatures(org, project_id, after_seq=after),
            )
        except GristmillError:
            if session.options.request_id:
                # A concurrent retry with the same key may have won: answer with its report.
                earlier = self.store.find_import(org, project_id, session.options.request_id)
                if earlier is not None:
                    return earlier
            raise
        finally:
            session.close()

    def import_from_object(self, organization_id: str, options: ImportOptions, key: str) -> ImportReport:
        if options.format is ImportFormat.ITEMS:
            raise InvalidArgumentError("options.format must be JSONL or CSV to import from an object")
        validate_key(key)
        started = self.begin_import(organization_id, options)
        if isinstance(started, ImportReport):
            return started
        try:
            data = self.objects.get_bytes(key)
            for start in range(0, len(data), EXPORT_CHUNK_BYTES):
                started.feed_chunk(data[start : start + EXPORT_CHUNK_BYTES])
        except BaseException:
            started.close()
            raise
        return self.finish_import(started)

    def get_import(self, organization_id: str, project_id: str, import_id: str) -> ImportReport:
        validate_id(import_id, what="import_id")
        return self.store.get_import(organization(organization_id), _project_id(project_id), import_id)

    def list_imports(self, organization_id: str, project_id: str, *, offset: int, limit: int) -> list[ImportReport]:
        return self.store.list_imports(
            organization(organization_id), _project_id(project_id), offset=offset, limit=limit
        )

    def ingest_prediction(
        self,
        writer: ItemWriter,
        project: Project,
        *,
        external_id: str,
        text: str,
        prediction: Prediction | None,
    ) -> ImportReport:
        """Turn one uncertain production input into an item (cleaned and deduplicated like an import),
        written through ``writer`` (an event handler's transaction)."""
        options = ImportOptions(project_id=project.project_id, format=ImportFormat.ITEMS, source_name="prediction-log")
        import_id = new_id()
        report = ImportReport(import_id, project.project_id, options.source_name, self.clock())
        session = ImportSession(project, options, import_id=import_id, new_id=random_id, report=report)
        try:
            record = session.builder.build(1, external_id, text, (), {})
            session.feed_records([record], [prediction])
            session.end_of_input()
            return session.store(
                _Borrowed(writer),
                self.indexes,
                lambda after: self.store.iter_signatures(project.organization_id, project.project_id, after_seq=after),
                source=ItemSource.PREDICTION_LOG,
                record_report=False,
            )
        finally:
            session.close()

    # ------------------------------------------------------------------------- items, tasks, annotations

    def get_item(self, organization_id: str, project_id: str, item_id: str) -> Item:
        return self.store.get_item(organization(organization_id), _project_id(project_id), _item_id(item_id))

    def list_items(
        self,
        organization_id: str,
        project_id: str,
        *,
        statuses: Sequence[ItemStatus],
        source: ItemSource | None,
        include_annotations: bool,
        offset: int,
        limit: int,
    ) -> list[Item]:
        return self.store.list_items(
            organization(organization_id),
            _project_id(project_id),
            statuses=statuses,
            source=source,
            include_annotations=include_annotations,
            offset=offset,
            limit=limit,
        )

    def next_task(
        self, organization_id: str, project_id: str, annotator_id: str, lease_seconds: int | None
    ) -> tuple[Task | None, int]:
        validate_id(annotator_id, what="annotator_id")
        project = self.get_project(organization_id, project_id)
        seconds = project.settings.lease_seconds
        if lease_seconds is not None:
            seconds = validate_lease_seconds(lease_seconds, "lease_seconds")
        return self.store.next_task(
            project.organization_id, project.project_id, annotator_id, lease_seconds=seconds, now=self.clock()
        )

    def submit_annotation(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        annotator_id: str,
        *,
        task_id: str,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
    ) -> Annotation:
        validate_id(annotator_id, what="annotator_id")
        if task_id:
            validate_id(task_id, what="task_id")
        project = self.get_project(organization_id, project_id)
        checked = _check_annotation_labels(project, labels, spans, comment)
        return self.store.submit_annotation(
            project.organization_id,
            project.project_id,
            _item_id(item_id),
            annotator_id,
            task_id=task_id,
            labels=checked,
            spans=(),
            comment=comment,
            now=self.clock(),
        )

    def update_annotation(
        self,
        organization_id: str,
        project_id: str,
        annotation_id: str,
        annotator_id: str,
        *,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
    ) -> Annotation:
        validate_id(annotator_id, what="annotator_id")
        validate_id(annotation_id, what="annotation_id")
        project = self.get_project(organization_id, project_id)
        checked = _check_annotation_labels(project, labels, spans, comment)
        return self.store.update_annotation(
            project.organization_id,
            project.project_id,
            annotation_id,
            annotator_id,
            labels=checked,
            spans=(),
            comment=comment,
            now=self.clock(),
        )

    def skip_task(self, organization_id: str, project_id: str, task_id: str, annotator_id: str, reason: str) -> None:
        validate_id(task_id, what="task_id")
        validate_id(annotator_id, what="annotator_id")
        _check_text("reason", reason, MAX_COMMENT_CHARS)
        self.store.skip_task(
            organization(organization_id), _project_id(project_id), task_id, annotator_id, reason, self.clock()
        )

    def attach_predictions(
        self, organization_id: str, project_id: str, predictions: Sequence[tuple[PredictionTarget, Prediction]]
    ) -> int:
        if len(predictions) > MAX_PREDICTIONS_PER_CALL:
            raise InvalidArgumentError(
                f"predictions: at most {MAX_PREDICTIONS_PER_CALL:,} per call, got {len(predictions):,}; send batches"
            )
        project = self.get_project(organization_id, project_id)
        now = self.clock()
        checked = []
        for index, (target, prediction) in enumerate(predictions):
            where = f"predictions[{index}]"
            if bool(target.item_id) == bool(target.external_id):
                raise InvalidArgumentError(f"{where}: set exactly one of item_id and external_id")
            if target.item_id:
                validate_id(target.item_id, what=f"{where}.item_id")
            checked.append((target, validate_prediction(project, prediction, where, now)))
        return self.store.attach_predictions(project.organization_id, project.project_id, checked)

    def resolve_item(
        self, organization_id: str, project_id: str, item_id: str, reviewer_id: str, labels: Sequence[str], comment: str
    ) -> Item:
        validate_id(reviewer_id, what="reviewer_id")
        project = self.get_project(organization_id, project_id)
        checked = _check_annotation_labels(project, labels, (), comment)
        return self.store.resolve_item(
            project.organization_id, project.project_id, _item_id(item_id), reviewer_id, checked, comment, self.clock()
        )

    def get_agreement(self, organization_id: str, project_id: str, annotator_ids: Sequence[str]) -> AgreementReport:
        for index, annotator in enumerate(annotator_ids):
            validate_id(annotator, what=f"annotator_ids[{index}]")
        project = self.get_project(organization_id, project_id)
        rated, counts, by_status = self.store.rated_items(project.organization_id, project.project_id, annotator_ids)
        return agreement_math.agreement_report(
            project.project_id,
            rated,
            labels=project.label_schema.names,
            multi_label=project.task_type.multi_label,
            annotation_counts=counts,
            agreed=by_status.get(ItemStatus.LABELED, 0),
            conflicts=by_status.get(ItemStatus.CONFLICT, 0),
            resolved=by_status.get(ItemStatus.RESOLVED, 0),
            now=self.clock(),
        )

    # ------------------------------------------------------------------------- dataset versions

    def publish_dataset_version(
        self,
        organization_id: str,
        project_id: str,
        *,
        ratios: SplitRatios,
        seed: int,
        strategy: SplitStrategy,
        description: str,
    ) -> tuple[DatasetVersion, bool]:
        """The new version and True, or the identical existing one and False."""
        _check_text("description", description, MAX_DESCRIPTION_CHARS)
        ratios = validate_ratios(ratios)
        project = self.get_project(organization_id, project_id)
        org, pid = project.organization_id, project.project_id
        items = self.store.consensus_items(org, pid)
        if not items:
            raise FailedPreconditionError(
                f"project {pid!r} has no item with a consensus label yet; annotate (or resolve) items first"
            )
        schema = project.label_schema
        content = fingerprint(
            items, ratios=ratios, seed=seed, strategy=strategy, schema_version=schema.version, label_map=schema.names
        )
        with self._publish_lock(org, pid):
            existing = self.store.find_dataset_version(org, pid, content)
            if existing is not None:
                return existing, False
            assignment = split_items(items, ratios=ratios, seed=seed, strategy=strategy)
            number = self.store.next_version_number(org, pid)
            written: list[str] = []
            try:
                version = self._write_version(
                    project, number, assignment, ratios, seed, strategy, content, description, written
                )
                return self.store.add_dataset_version(version), True
            except BaseException:
                self._remove(written)
                raise

    def _write_version(
        self,
        project: Project,
        number: int,
        assignment: dict[Split, list[DatasetItem]],
        ratios: SplitRatios,
        seed: int,
        strategy: SplitStrategy,
        content: str,
        description: str,
        written: list[str],
    ) -> DatasetVersion:
        pid = project.project_id
        multi = project.task_type.multi_label
        summaries: list[SplitSummary] = []
        version_id = new_id()
        # Under the version's id (what training is given), the layout gristmill.core.manifests defines.
        manifest_splits: dict[str, SplitFile] = {}
        for split in SPLITS:
            members = assignment[split]
            lines = [
                DatasetRow(item.item_id, item.text, None, item.labels).to_json()
                if multi
                else DatasetRow(item.item_id, item.text, item.labels[0]).to_json()
                for item in members
            ]
            data = "".join(line + "\n" for line in lines).encode()
            info = self._put_new(dataset_split_key(pid, version_id, split.value), data, "application/x-ndjson", written)
            counts = Counter(label for item in members for label in item.labels)
            by_label = {label: counts.get(label, 0) for label in project.label_schema.names}
            ref = ObjectRef(info.key, info.sha256, info.size)
            summaries.append(SplitSummary(split, len(members), by_label, ref))
            manifest_splits[split.value] = SplitFile(
                FileEntry(ref.key, ref.sha256, ref.size_bytes), len(members), by_label
            )
        now = self.clock()
        manifest = DatasetManifest(
            project_id=pid,
            dataset_version_id=version_id,
            version_number=number,
            task_type=project.task_type.value,
            label_map=list(project.label_schema.names),
            schema_version=project.label_schema.version,
            splits=manifest_splits,
            seed=seed,
            ratios={"train": ratios.train, "validation": ratios.validation, "test": ratios.test},
            created_at=now.isoformat(),
            organization_id=project.organization_id,
        )
        manifest_info = self._put_new(
            dataset_manifest_key(pid, version_id), manifest.to_json(), "application/json", written
        )
        return DatasetVersion(
            dataset_version_id=version_id,
            organization_id=project.organization_id,
            project_id=pid,
            version_number=number,
            task_type=project.task_type,
            schema_version=project.label_schema.version,
            label_map=project.label_schema.names,
            ratios=ratios,
            seed=seed,
            split_strategy=strategy,
            splits=tuple(summaries),
            manifest=ObjectRef(manifest_info.key, manifest_info.sha256, manifest_info.size),
            content_sha256=content,
            description=description,
            create_time=now,
        )

    def _put_new(self, key: str, data: bytes, content_type: str, written: list[str]) -> ObjectInfo:
        # The version number is not recorded yet, so an object already under this key is debris of a publish
        # that failed after writing; versions are immutable once recorded, and this one is not.
        info = self.objects.put_bytes(key, data, content_type=content_type, overwrite=True)
        written.append(key)
        return info

    def _remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                self.objects.delete(key)
            except Exception as exc:  # cleanup is best effort; the next publish overwrites debris
                log.warning("could not remove %s after a failed publish: %s", key, exc)

    def _publish_lock(self, organization_id: str, project_id: str) -> threading.Lock:
        with self._publish_guard:
            return self._publish_locks.setdefault((organization_id, project_id), threading.Lock())

    def get_dataset_version(
        self, organization_id: str, project_id: str, *, dataset_version_id: str = "", version_number: int = 0
    ) -> DatasetVersion:
        if dataset_version_id:
            validate_id(dataset_version_id, what="dataset_version_id")
        elif version_number < 1:
            raise InvalidArgumentError("set dataset_version_id or a version_number of 1 or more")
        return self.store.get_dataset_version(
            organization(organization_id),
            _project_id(project_id),
            dataset_version_id=dataset_version_id,
            version_number=version_number,
        )

    def list_dataset_versions(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[DatasetVersion]:
        return self.store.list_dataset_versions(
            organization(organization_id), _project_id(project_id), offset=offset, limit=limit
        )

    def export_dataset(
        self, organization_id: str, project_id: str, dataset_version_id: str, splits: Sequence[Split]
    ) -> Iterator[ExportChunk]:
        """manifest.json, then the chosen splits' files, each verified against its recorded sha256."""
        version = self.get_dataset_version(organization_id, project_id, dataset_version_id=dataset_version_id)
        wanted = set(splits) or set(SPLITS)
        files = [("manifest.json", version.manifest)]
        files += [(f"{s.split.value}.jsonl", s.file) for s in version.splits if s.split in wanted]
        return self._export(files)

    def _export(self, files: Sequence[tuple[str, ObjectRef]]) -> Iterator[ExportChunk]:
        for name, ref in files:
            data = self.objects.get_bytes(ref.key, expected_sha256=ref.sha256)
            for start in range(0, max(len(data), 1), EXPORT_CHUNK_BYTES):
                chunk = data[start : start + EXPORT_CHUNK_BYTES]
                last = start + EXPORT_CHUNK_BYTES >= len(data)
                yield ExportChunk(name, chunk, last, ref.sha256 if last else "", len(data) if last else 0)


class _Borrowed(AbstractContextManager[ItemWriter]):
    """A writer on someone else's transaction: entering and leaving it neither begins nor commits."""

    def __init__(self, writer: ItemWriter) -> None:
        self.writer = writer

    def __enter__(self) -> ItemWriter:
        return self.writer

    def __exit__(self, *exc: object) -> None:
        return None


def validate_prediction(project: Project, prediction: Prediction, where: str, now: datetime) -> Prediction:
    if not prediction.model_name:
        raise InvalidArgumentError(f"{where}.prediction.model_name must not be empty")
    if prediction.model_version < 0:
        raise InvalidArgumentError(f"{where}.prediction.model_version must not be negative")
    names = set(project.label_schema.names)
    for label in prediction.labels:
        if label not in names:
            raise InvalidArgumentError(f"{where}.prediction.labels: {label!r} is not a label of the project's schema")
    for label, probability in prediction.probabilities.items():
        if label not in names:
            raise InvalidArgumentError(
                f"{where}.prediction.probabilities: {label!r} is not a label of the project's schema"
            )
        if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
            raise InvalidArgumentError(f"{where}.prediction.probabilities[{label!r}] = {probability} is outside [0, 1]")
    return replace(prediction, create_time=prediction.create_time or now)


def _check_annotation_labels(
    project: Project, labels: Sequence[str], spans: Sequence[SpanLabel], comment: str
) -> tuple[str, ...]:
    if spans:
        raise InvalidArgumentError("spans: span labels are for token classification projects, which come later")
    _check_text("comment", comment, MAX_COMMENT_CHARS)
    names = project.label_schema.names
    for label in labels:
        if label not in names:
            raise InvalidArgumentError(
                f"labels: {label[:80]!r} is not a label of the project's current schema "
                f"(v{project.label_schema.version}: {', '.join(names)})"
            )
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError("labels: a label appears twice")
    if project.task_type.multi_label:
        if not labels:
            raise InvalidArgumentError("labels: choose at least one label")
    elif len(labels) != 1:
        raise InvalidArgumentError(f"labels: a single-label project takes exactly one label, got {len(labels)}")
    return tuple(labels)


def _check_text(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgumentError(f"{field} is longer than {limit:,} characters")


def _project_id(project_id: str) -> str:
    return validate_id(project_id, what="project_id")


def _item_id(item_id: str) -> str:
    return validate_id(item_id, what="item_id")
