"""Resolving a job spec against the world before anything is scheduled.

``SpecResolver.resolve`` checks, in this order, and refuses with the matching status:

- the dataset version: its manifest exists (NOT_FOUND), is a dataset manifest of that version and
  verifies against its checksum (FAILED_PRECONDITION), every split file verifies (FAILED_PRECONDITION),
  every row's label is in the label map, the train split is not empty; training has an objective for its task
  type and the spec's task matches it (INVALID_ARGUMENT);
- the base model: exists (NOT_FOUND), is a Hugging Face directory with a config and a tokenizer, its
  classification head (if any) has as many labels as the dataset, LoRA target modules exist in it
  (INVALID_ARGUMENT);
- resources: no more workers / CPUs / GPUs than the cluster can ever provide (FAILED_PRECONDITION).

The result carries the verified references (manifest checksum, base model content checksum) that the
job, its lineage and its events record.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from gristmill.core.errors import (
    DataIntegrityError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from gristmill.core.manifests import SPLITS, DatasetManifest, DatasetRow, ModelManifest, dataset_manifest_key
from gristmill.core.storage import ObjectStore, validate_key
from gristmill.core.storage.base import sha256_file
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.refs import BaseModelRef, DatasetRef, FileRef
from gristmill.training.domain.search import check_search_bounds
from gristmill.training.domain.spec import JobSpec, Method, TaskType
from gristmill.training.tasks import training_task


@dataclass(frozen=True)
class DatasetSplits:
    """The rows of a dataset version as the training loop needs them: texts and class indexes per split."""

    label_map: tuple[str, ...]
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]

    def count(self, split: str) -> int:
        return len(self.texts.get(split, ()))


@dataclass(frozen=True)
class ResolvedDataset:
    ref: DatasetRef
    task: TaskType
    label_map: tuple[str, ...]
    files: tuple[FileRef, ...]
    counts: dict[str, int]
    manifest: DatasetManifest


@dataclass(frozen=True)
class ResolvedBaseModel:
    ref: BaseModelRef
    # Where the files are on this host (a cache directory for object-store base models).
    local_dir: Path


@dataclass(frozen=True)
class ModelInfo:
    """What the training service needs to know about a base model before training it."""

    model_type: str
    # Size of an existing sequence-classification head; None when the checkpoint has none.
    head_labels: int | None
    # Names (last dotted component) of the modules LoRA can adapt (linear layers).
    adaptable_modules: frozenset[str]
    # LoRA targets when the spec names none (the architecture's attention projections).
    default_lora_targets: tuple[str, ...]


class ModelInspector(Protocol):
    def inspect(self, model_dir: Path) -> ModelInfo:
        """Describe the Hugging Face model in ``model_dir``; ``InvalidArgumentError`` if it is not one."""
        ...


@dataclass(frozen=True)
class ClusterCapacity:
    """The most the cluster can ever provide: totals, and the largest single node."""

    cpus: float
    gpus: float
    max_node_cpus: float
    max_node_gpus: float


class CapacityProvider(Protocol):
    def capacity(self) -> ClusterCapacity: ...


@dataclass(frozen=True)
class ResolvedJob:
    spec: JobSpec
    dataset: ResolvedDataset
    base_model: ResolvedBaseModel
    model_info: ModelInfo


# --------------------------------------------------------------------------- datasets


class DatasetCatalog:
    """Dataset versions as the labeling service publishes them in the object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    def _manifest(self, ref: DatasetRef) -> tuple[DatasetManifest, FileRef]:
        key = (
            ref.manifest.key
            if ref.manifest is not None
            # Where labeling published the version's manifest (the job names no manifest object).
            else dataset_manifest_key(ref.project_id, ref.dataset_version_id)
        )
        name = f"{ref.project_id}/{ref.dataset_version_id}"
        try:
            data = self._objects.get_bytes(key, expected_sha256=ref.manifest.sha256 if ref.manifest else None)
        except NotFoundError:
            raise NotFoundError(
                f"dataset version {name} not found: no manifest at {key!r}; publish the version in the labeling "
                "service first",
                details={"field": "spec.dataset_version"},
            ) from None
        except DataIntegrityError as exc:
            raise DataIntegrityError(f"dataset version {name}: {exc.message}") from None
        try:
            manifest = DatasetManifest.from_json(data, where=f"dataset manifest {key!r}")
        except InvalidArgumentError as exc:
            raise FailedPreconditionError(f"dataset version {name} cannot be used: {exc.message}") from None
        if (manifest.project_id, manifest.dataset_version_id) != (ref.project_id, ref.dataset_version_id):
            raise DataIntegrityError(
                f"dataset manifest {key!r} describes {manifest.project_id}/{manifest.dataset_version_id}, not {name}"
            )
        return manifest, FileRef(key=key, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))

    def resolve(self, ref: DatasetRef) -> ResolvedDataset:
        """Read and verify the manifest and every split file; refuse a version that cannot be trained on."""
        manifest, manifest_ref = self._manifest(ref)
        name = f"dataset version {ref.project_id}/{ref.dataset_version_id}"
        try:
            task = TaskType(manifest.task_type)
        except ValueError:
            raise FailedPreconditionError(f"{name} has unknown task type {manifest.task_type!r}") from None
        try:
            objective = training_task(task.value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(
                f"{name} is a {task.value} dataset: {exc.message}", details={"field": "spec.dataset_version"}
            ) from None
        labels = tuple(manifest.label_map)
        objective.check_label_map(labels, name)
        # Reading the rows verifies every file against the manifest's checksums.
        splits = self.load(manifest)
        if splits.count("train") == 0:
            raise FailedPreconditionError(
                f"dataset version {ref.project_id}/{ref.dataset_version_id} has an empty train split"
            )
        files = tuple(
            FileRef(key=s.file.key, sha256=s.file.sha256, size_bytes=s.file.size_bytes)
            for _, s in sorted(manifest.splits.items())
        )
        counts = {name: splits.count(name) for name in SPLITS}
        return ResolvedDataset(
            ref=replace(ref, manifest=manifest_ref),
            task=task,
            label_map=labels,
            files=files,
            counts=counts,
            manifest=manifest,
        )

    def load_ref(self, ref: DatasetRef) -> tuple[DatasetSplits, tuple[FileRef, ...]]:
        """The rows and files of a resolved version, verified again (the manifest against ``ref``'s checksum)."""
        manifest, _ = self._manifest(ref)
        files = tuple(
            FileRef(key=s.file.key, sha256=s.file.sha256, size_bytes=s.file.size_bytes)
            for _, s in sorted(manifest.splits.items())
        )
        return self.load(manifest), files

    def load(self, manifest: DatasetManifest) -> DatasetSplits:
        objective = training_task(manifest.task_type, error=FailedPreconditionError)
        texts: dict[str, list[str]] = {}
        labels: dict[str, list[int]] = {}
        for split in SPLITS:
            if split not in manifest.splits:
                continue
            entry = manifest.splits[split]
            try:
                rows: Sequence[DatasetRow] = list(manifest.read_rows(self._objects, split))
            except NotFoundError:
                raise FailedPreconditionError(
                    f"dataset file {entry.file.key!r} listed in the manifest is missing from the object store"
                ) from None
            except InvalidArgumentError as exc:
                raise FailedPreconditionError(f"dataset file {entry.file.key!r} is malformed: {exc.message}") from None
            split_texts, split_labels = objective.examples(rows, manifest.label_map, f"dataset file {entry.file.key!r}")
            if entry.count != len(split_texts):
                raise DataIntegrityError(
                    f"dataset file {entry.file.key!r} has {len(split_texts)} rows but the manifest says {entry.count}"
                )
            counted = Counter(manifest.label_map[i] for i in split_labels)
            if entry.label_counts and dict(counted) != {k: v for k, v in entry.label_counts.items() if v}:
                raise DataIntegrityError(f"dataset file {entry.file.key!r} label counts differ from the manifest's")
            texts[split], labels[split] = split_texts, split_labels
        return DatasetSplits(label_map=tuple(manifest.label_map), texts=texts, labels=labels)


# --------------------------------------------------------------------------- base models


def content_sha256(files: dict[str, str]) -> str:
    """One checksum over a model's file names and file checksums (BaseModelRef.content_sha256)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]}\n".encode())
    return digest.hexdigest()


class BaseModelCatalog:
    """Base models from a local Hugging Face directory or an object-store prefix with a model manifest."""

    def __init__(self, objects: ObjectStore, cache_dir: Path, *, allow_local_paths: bool) -> None:
        self._objects = objects
        self._cache_dir = Path(cache_dir)
        self._allow_local_paths = allow_local_paths

    def resolve(self, ref: BaseModelRef) -> ResolvedBaseModel:
        if ref.name:
            raise FailedPreconditionError(
                f"base model {ref.name!r}: resolving base models by registry name is not available yet; pass "
                "spec.base_model.object_prefix (a model directory with a manifest.json) or local_path",
                details={"field": "spec.base_model.base_model_name"},
            )
        if ref.local_path:
            return self._local(ref)
        return self._stored(ref)

    def _local(self, ref: BaseModelRef) -> ResolvedBaseModel:
        if not self._allow_local_paths:
            raise FailedPreconditionError(
                "spec.base_model.local_path is disabled on this training service (GRISTMILL_TRAINING_ALLOW_LOCAL_PATHS"
                "=false); upload the model to the object store and pass object_prefix",
                details={"field": "spec.base_model.local_path"},
            )
        path = Path(ref.local_path)
        if not path.is_absolute():
            raise InvalidArgumentError(
                f"spec.base_model.local_path {ref.local_path[:200]!r} must be an absolute path",
                details={"field": "spec.base_model.local_path"},
            )
        if not path.is_dir():
            raise NotFoundError(
                f"base model directory {ref.local_path[:200]!r} does not exist on the training service's host",
                details={"field": "spec.base_model.local_path"},
            )
        checksums = {
            file.relative_to(path).as_posix(): sha256_file(file)
            for file in sorted(path.rglob("*"))
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        }
        return ResolvedBaseModel(ref=replace(ref, content_sha256=content_sha256(checksums)), local_dir=path)

    def _stored(self, ref: BaseModelRef) -> ResolvedBaseModel:
        prefix = validate_key(ref.object_prefix)
        key = f"{prefix}/manifest.json"
        try:
            data = self._objects.get_bytes(key)
        except NotFoundError:
            raise NotFoundError(
                f"base model not found: no manifest.json under object prefix {prefix!r}",
                details={"field": "spec.base_model.object_prefix"},
            ) from None
        try:
            manifest = ModelManifest.from_json(data, where=f"model manifest {key!r}")
        except InvalidArgumentError as exc:
            raise FailedPreconditionError(f"base model at {prefix!r} cannot be used: {exc.message}") from None
        checksums = {name: entry.sha256 for name, entry in manifest.files.items()}
        digest = content_sha256(checksums)
        dest = self._cache_dir / digest
        if not (dest / ".complete").exists():
            # Download next to the final place, then rename: a half-downloaded model is never used.
            staging = self._cache_dir / f".{digest}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                manifest.download(self._objects, staging)
            except NotFoundError:
                shutil.rmtree(staging, ignore_errors=True)
                raise FailedPreconditionError(
                    f"base model at {prefix!r}: a file listed in its manifest is missing from the object store"
                ) from None
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            (staging / ".complete").write_text(digest)
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        return ResolvedBaseModel(ref=replace(ref, object_prefix=prefix, content_sha256=digest), local_dir=dest)


# --------------------------------------------------------------------------- the whole spec


class SpecResolver:
    def __init__(
        self,
        datasets: DatasetCatalog,
        base_models: BaseModelCatalog,
        inspector: ModelInspector,
        cluster: CapacityProvider,
        *,
        search_enabled: bool = False,
    ) -> None:
        self._search_enabled = search_enabled
        self._datasets = datasets
        self._base_models = base_models
        self._inspector = inspector
        self._cluster = cluster

    def check_resources(self, spec: JobSpec) -> None:
        """FAILED_PRECONDITION when the cluster can never run the job's worker group."""
        res = spec.resources
        cap = self._cluster.capacity()
        need_cpus = res.num_workers * res.cpus_per_worker
        if res.cpus_per_worker > cap.max_node_cpus or need_cpus > cap.cpus:
            raise FailedPreconditionError(
                f"the job needs {res.num_workers} worker(s) x {res.cpus_per_worker:g} CPU = {need_cpus:g} CPUs, but "
                f"the Ray cluster has {cap.cpus:g} CPUs in all ({cap.max_node_cpus:g} on its largest node); lower "
                "resources.num_workers or resources.cpus_per_worker",
                details={"field": "spec.resources"},
            )
        if res.use_gpu:
            need_gpus = res.num_workers * res.gpus_per_worker
            if cap.gpus <= 0:
                raise FailedPreconditionError(
                    "the job asks for GPU workers (resources.use_gpu) but the Ray cluster has no GPUs",
                    details={"field": "spec.resources.use_gpu"},
                )
            if res.gpus_per_worker > cap.max_node_gpus or need_gpus > cap.gpus:
                raise FailedPreconditionError(
                    f"the job needs {need_gpus:g} GPUs ({res.num_workers} worker(s) x {res.gpus_per_worker:g}), but "
                    f"the Ray cluster has {cap.gpus:g} ({cap.max_node_gpus:g} on its largest node)",
                    details={"field": "spec.resources"},
                )

    def _resolve_model(
        self, spec: JobSpec, label_map: tuple[str, ...] | None
    ) -> tuple[ResolvedBaseModel, ModelInfo, LoraSettings | None]:
        base = self._base_models.resolve(spec.base_model)
        info = self._inspector.inspect(base.local_dir)
        if label_map is not None and info.head_labels is not None and info.head_labels != len(label_map):
            raise InvalidArgumentError(
                f"the base model's classification head has {info.head_labels} labels but the dataset version has "
                f"{len(label_map)} ({', '.join(label_map[:10])}); use a base model without a head or with "
                f"{len(label_map)} labels",
                details={"field": "spec.base_model"},
            )
        lora = spec.lora
        if spec.method is Method.LORA and lora is not None:
            targets = lora.target_modules or info.default_lora_targets
            if not targets:
                raise InvalidArgumentError(
                    f"spec.lora.target_modules is empty and there is no default for model type {info.model_type!r}; "
                    f"name the modules to adapt (for example {', '.join(sorted(info.adaptable_modules)[:6])})",
                    details={"field": "spec.lora.target_modules"},
                )
            unknown = [m for m in targets if m not in info.adaptable_modules]
            if unknown:
                raise InvalidArgumentError(
                    f"spec.lora.target_modules {unknown} are not linear layers of this {info.model_type} model; "
                    f"choose from {', '.join(sorted(info.adaptable_modules)[:20])}",
                    details={"field": "spec.lora.target_modules"},
                )
            lora = replace(lora, target_modules=tuple(targets))
        return base, info, lora

    def resolve_template(self, spec: JobSpec) -> JobSpec:
        """An auto-train template: everything but the dataset (which each published version supplies)."""
        self.check_resources(spec)
        base, _, lora = self._resolve_model(spec, None)
        return replace(spec, base_model=base.ref, lora=lora)

    def resolve(self, spec: JobSpec) -> ResolvedJob:
        # Cheap checks first: nothing is read when the cluster could never run the job.
        self.check_resources(spec)
        # Refuses a dataset whose task type training has no objective for (INVALID_ARGUMENT).
        dataset = self._datasets.resolve(spec.dataset)
        if spec.task is not TaskType.UNSPECIFIED and spec.task is not dataset.task:
            raise InvalidArgumentError(
                f"spec.task is {spec.task.value} but the dataset version is {dataset.task.value}; leave task "
                "unspecified or make them match",
                details={"field": "spec.task"},
            )
        has_validation = dataset.counts.get("validation", 0) > 0
        if spec.hyper_parameters.early_stopping.patience and not has_validation:
            raise InvalidArgumentError(
                "early stopping needs a validation split, and this dataset version has none; set "
                "hyper_parameters.early_stopping.patience to 0 or publish a version with a validation split",
                details={"field": "spec.hyper_parameters.early_stopping"},
            )
        if spec.search is not None and not has_validation:
            raise InvalidArgumentError(
                "a hyper-parameter search compares trials on the validation split, and this dataset version has none",
                details={"field": "spec.search"},
            )
        base, info, lora = self._resolve_model(spec, dataset.label_map)
        if spec.search is not None:
            check_search_bounds(spec)
            if not self._search_enabled:
                raise FailedPreconditionError(
                    "hyper-parameter search (spec.search) needs the Ray runner; this training service runs jobs "
                    "in-process",
                    details={"field": "spec.search"},
                )
        task = spec.task if spec.task is not TaskType.UNSPECIFIED else dataset.task
        effective = replace(spec, dataset=dataset.ref, base_model=base.ref, lora=lora, task=task)
        return ResolvedJob(spec=effective, dataset=dataset, base_model=base, model_info=info)
