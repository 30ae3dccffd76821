"""Use cases of imports: files and objects into items, and production inputs and feedback (events) into items."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from gristmill.core.errors import GristmillError, InvalidArgumentError
from gristmill.core.ids import new_id, validate_id
from gristmill.core.storage import validate_key
from gristmill.labeling.domain.common import UseCases, check_text, checked_project_id, organization
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.ids import random_id
from gristmill.labeling.domain.importer import ImportSession
from gristmill.labeling.domain.model import (
    ImportFormat,
    ImportOptions,
    ImportReport,
    ItemSource,
    Prediction,
    Project,
    RawRecord,
)
from gristmill.labeling.domain.parsing import RecordBuilder, validate_options
from gristmill.labeling.domain.ports import ItemWriter

# Objects are fed to an import in pieces of this size.
IMPORT_CHUNK_BYTES = 1 << 20


class ImportUseCases(UseCases):
    def begin_import(self, organization_id: str, options: ImportOptions) -> ImportSession | ImportReport:
        """A session to feed, or the earlier report when ``options.request_id`` was already used."""
        org = organization(organization_id)
        project = self.store.get_project(org, checked_project_id(options.project_id))
        if options.request_id:
            validate_id(options.request_id, what="options.request_id")
            earlier = self.store.find_import(org, project.project_id, options.request_id)
            if earlier is not None:
                return earlier
        validate_options(options)
        if options.existing_label_annotator_id:
            validate_id(options.existing_label_annotator_id, what="options.existing_label_annotator_id")
        check_text("options.source_name", options.source_name, 512)
        import_id = new_id()
        report = ImportReport(
            import_id=import_id,
            project_id=project.project_id,
            source_name=options.source_name,
            create_time=self.clock(),
        )
        return ImportSession(
            project,
            options,
            import_id=import_id,
            new_id=random_id,
            report=report,
            token_limit=self.token_limit(project),
        )

    def finish_import(self, session: ImportSession) -> ImportReport:
        """Store what the session read (it must have seen the end of its input). Closes the session."""
        project = session.project
        org, project_id = project.organization_id, project.project_id
        try:
            session.end_of_input()
            return session.store(
                self.store.open_import(org, project_id, self.clock(), consensus=ConsensusRule.of(project)),
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
            for start in range(0, len(data), IMPORT_CHUNK_BYTES):
                started.feed_chunk(data[start : start + IMPORT_CHUNK_BYTES])
        except BaseException:
            started.close()
            raise
        return self.finish_import(started)

    def get_import(self, organization_id: str, project_id: str, import_id: str) -> ImportReport:
        validate_id(import_id, what="import_id")
        return self.store.get_import(organization(organization_id), checked_project_id(project_id), import_id)

    def list_imports(self, organization_id: str, project_id: str, *, offset: int, limit: int) -> list[ImportReport]:
        return self.store.list_imports(
            organization(organization_id), checked_project_id(project_id), offset=offset, limit=limit
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
        return self.ingest_records(
            writer,
            project,
            lambda builder: [builder.build(1, external_id, text, (), {})],
            predictions=[prediction],
            source=ItemSource.PREDICTION_LOG,
            source_name="prediction-log",
        )

    def ingest_records(
        self,
        writer: ItemWriter,
        project: Project,
        build: Callable[[RecordBuilder], Sequence[RawRecord]],
        *,
        source: ItemSource,
        source_name: str,
        predictions: Sequence[Prediction | None] = (),
        annotator_id: str = "import",
    ) -> ImportReport:
        """Import the records ``build`` makes with the import's ``RecordBuilder`` (cleaned, masked and
        deduplicated like a file's) through ``writer``, an event handler's transaction: nothing is committed
        here and no import is recorded. Their labels and responses are stored as ``annotator_id``'s."""
        options = ImportOptions(
            project_id=project.project_id,
            format=ImportFormat.ITEMS,
            source_name=source_name,
            existing_label_annotator_id=annotator_id,
        )
        import_id = new_id()
        report = ImportReport(import_id, project.project_id, options.source_name, self.clock())
        session = ImportSession(
            project,
            options,
            import_id=import_id,
            new_id=random_id,
            report=report,
            token_limit=self.token_limit(project),
        )
        try:
            session.feed_records(build(session.builder), predictions)
            session.end_of_input()
            return session.store(
                _Borrowed(writer),
                self.indexes,
                lambda after: self.store.iter_signatures(project.organization_id, project.project_id, after_seq=after),
                source=source,
                record_report=False,
            )
        finally:
            session.close()


class _Borrowed(AbstractContextManager[ItemWriter]):
    """A writer on someone else's transaction: entering and leaving it neither begins nor commits."""

    def __init__(self, writer: ItemWriter) -> None:
        self.writer = writer

    def __enter__(self) -> ItemWriter:
        return self.writer

    def __exit__(self, *exc: object) -> None:
        return None
