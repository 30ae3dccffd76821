"""Use cases of dataset versions: publish (split, write, record, announce), read and export."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.ids import new_id, validate_id
from gristmill.core.manifests import (
    DatasetManifest,
    FileEntry,
    SplitFile,
    dataset_manifest_key,
    dataset_split_key,
)
from gristmill.core.storage import ObjectInfo
from gristmill.labeling.domain.common import UseCases, check_text, checked_project_id, organization
from gristmill.labeling.domain.model import (
    DatasetVersion,
    ObjectRef,
    Project,
    Split,
    SplitRatios,
    SplitStrategy,
    SplitSummary,
)
from gristmill.labeling.domain.schema import MAX_DESCRIPTION_CHARS
from gristmill.labeling.domain.splits import SPLITS, DatasetItem, fingerprint, split_items, validate_ratios
from gristmill.labeling.tasks import labeling_task

log = logging.getLogger(__name__)

EXPORT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ExportChunk:
    file_name: str
    data: bytes
    last_chunk: bool
    sha256: str = ""
    size_bytes: int = 0


class DatasetUseCases(UseCases):
    # One publish at a time per project (``LabelingService`` sets these).
    _publish_locks: dict[tuple[str, str], threading.Lock]
    _publish_guard: threading.Lock

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
        check_text("description", description, MAX_DESCRIPTION_CHARS)
        ratios = validate_ratios(ratios)
        project = self.get_project(organization_id, project_id)
        org, pid = project.organization_id, project.project_id
        task = labeling_task(project.task_type, error=FailedPreconditionError)
        # What goes into the split is the task's business (a rejected chat reply makes no row).
        items = [ready for item in self.store.consensus_items(org, pid) if (ready := task.publishable(item))]
        if not items:
            what = "an accepted reply or a decided preference" if task.generative else "a consensus label"
            raise FailedPreconditionError(
                f"project {pid!r} has no item with {what} yet; annotate (or resolve) items first"
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
        # What a row is depends on the project's task type.
        task = labeling_task(project.task_type, error=FailedPreconditionError)
        summaries: list[SplitSummary] = []
        version_id = new_id()
        # Under the version's id (what training is given), the layout gristmill.core.manifests defines.
        manifest_splits: dict[str, SplitFile] = {}
        for split in SPLITS:
            members = assignment[split]
            lines = [line for item in members for line in task.dataset_lines(item)]
            data = "".join(line + "\n" for line in lines).encode()
            info = self._put_new(dataset_split_key(pid, version_id, split.value), data, "application/x-ndjson", written)
            counts = Counter(label for item in members for label in item.labels)
            # Classification counts items per label; chat and preference per stratum ("source:import",
            # "length:short"), which is what their splits are stratified by.
            names = project.label_schema.names if not task.generative else sorted(counts)
            by_label = {label: counts.get(label, 0) for label in names}
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
            row_format=task.row_format,
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
            checked_project_id(project_id),
            dataset_version_id=dataset_version_id,
            version_number=version_number,
        )

    def list_dataset_versions(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[DatasetVersion]:
        return self.store.list_dataset_versions(
            organization(organization_id), checked_project_id(project_id), offset=offset, limit=limit
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
