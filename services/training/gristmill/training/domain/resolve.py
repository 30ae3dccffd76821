"""Resolving a job spec against the world before anything is scheduled.

``SpecResolver.resolve`` checks, in this order, and refuses with the matching status:

- resources: no more workers / CPUs / GPUs than the cluster can ever provide, and GPU workers for QLoRA
  (FAILED_PRECONDITION; QLoRA's names ``spec.method``);
- the dataset version: its manifest exists (NOT_FOUND), is a dataset manifest of that version and
  verifies against its checksum (FAILED_PRECONDITION); the spec's objective trains its task type
  (INVALID_ARGUMENT naming ``spec.objective``), and that objective is available (FAILED_PRECONDITION); its
  rows are the objective's row format (FAILED_PRECONDITION); every split file verifies
  (FAILED_PRECONDITION), every row is well formed (a label in the label map, a conversation with an
  assistant turn), the train split is not empty; the spec's task matches it (INVALID_ARGUMENT); QLoRA,
  ``publish_merged`` and ``json_match_keys`` are for generative objectives, ``spec.dpo`` for dpo (INVALID_ARGUMENT
  naming the field);
- the base model: exists (NOT_FOUND), is a Hugging Face directory with a config and a tokenizer that the
  objective's model class can be built from, its classification head (if any) has as many labels as the
  dataset, LoRA target modules exist in it, the maximum sequence length fits its context, a chat objective
  has a chat template (the base tokenizer's or ``spec.chat_template``) that renders the first training
  conversations with assistant tokens to learn (INVALID_ARGUMENT naming the field);
- the validation metric (early stopping, search) is one the objective reports (INVALID_ARGUMENT).

The result carries the verified references (manifest checksum, base model content checksum) that the
job, its lineage and its events record.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from gristmill.core.base_models import StoredBaseModel, content_sha256
from gristmill.core.errors import (
    DataIntegrityError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
    NotFoundError,
)
from gristmill.core.manifests import (
    SPLITS,
    DatasetManifest,
    DatasetRecord,
    FileEntry,
    ModelManifest,
    dataset_manifest_key,
)
from gristmill.core.storage import ObjectStore, validate_key
from gristmill.core.storage.base import sha256_file_cached
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.refs import BaseModelRef, DatasetRef, FileRef
from gristmill.training.domain.search import check_search_bounds
from gristmill.training.domain.spec import (
    DEFAULT_HIDDEN_WEIGHT,
    DEFAULT_VALIDATION_METRIC,
    MINIMIZED_METRICS,
    OBJECTIVE_TASK_TYPES,
    PARAPHRASER,
    TEACHER,
    DpoSettings,
    EarlyStopping,
    Goal,
    JobSpec,
    Method,
    Objective,
    Pruning,
    TaskType,
    check_compression,
    check_evaluation_dataset,
    check_few_labels,
    check_fsdp,
    check_json_match_keys,
    check_method_objective,
    check_search_objective,
    default_objective,
    dpo_without_dpo,
    objective_not_available,
    qlora_needs_gpus,
)
from gristmill.training.tasks import TRAINING_TASKS, TrainingTask, training_task

# Model types ``ml.slimming`` can cut (named here: the service does not import the torch side to validate).
SLIMMABLE_MODEL_TYPES = frozenset({"bert"})

# How many training rows SubmitJob encodes with the base's tokenizer (and chat template) before accepting a job:
# enough to catch a template that cannot render the rows, few enough to stay quick.
PROBE_EXAMPLES = 16


@dataclass(frozen=True)
class DatasetSplits:
    """The rows of a dataset version as the training loop needs them: the task's examples per split (texts and
    class indexes for classification, conversations for chat)."""

    # The labels the trained model outputs (``TrainingTask.output_labels``; empty for chat).
    label_map: tuple[str, ...]
    examples: dict[str, list[Any]]

    def count(self, split: str) -> int:
        return len(self.examples.get(split, ()))


@dataclass(frozen=True)
class ResolvedDataset:
    ref: DatasetRef
    task: TaskType
    label_map: tuple[str, ...]
    files: tuple[FileRef, ...]
    counts: dict[str, int]
    manifest: DatasetManifest
    # The rows, as read and verified while resolving.
    splits: DatasetSplits


@dataclass(frozen=True)
class ResolvedBaseModel:
    ref: BaseModelRef
    # Where the files are on this host (a cache directory for object-store base models).
    local_dir: Path
    # Their objects in the object store (relative name -> entry); empty for a model given by local path.
    files: Mapping[str, FileEntry] = field(default_factory=dict)


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
    # The longest sequence the architecture takes (config.max_position_embeddings); None when it says none.
    max_positions: int | None = None
    # The tokenizer's default chat template ("" when it has none).
    chat_template: str = ""
    # config.json as read (pruning and distillation check layers, widths and labels against it).
    config: Mapping[str, Any] = field(default_factory=dict)
    # Whether the task's model class can recompute its blocks' activations (transformers'
    # ``supports_gradient_checkpointing``).
    supports_gradient_checkpointing: bool = True


class ModelInspector(Protocol):
    def inspect(self, model_dir: Path, task: TrainingTask, label_map: Sequence[str]) -> ModelInfo:
        """Describe the Hugging Face model in ``model_dir`` as ``task`` would train it; ``InvalidArgumentError`` if
        it is not one, or not one the task's model class can be built from."""
        ...

    def check_examples(
        self, model_dir: Path, task: TrainingTask, examples: Sequence[Any], *, chat_template: str, max_length: int
    ) -> None:
        """``InvalidArgumentError`` naming the field when the base's tokenizer (with ``chat_template``, when
        given) cannot encode ``examples`` as the training loop will."""
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
    # The models besides the base, by role (``spec.side_models``): the distillation teacher, the paraphraser.
    side_models: dict[str, ResolvedBaseModel] = field(default_factory=dict)


def task_for_objective(objective: Objective, where: str) -> TrainingTask:
    """The registered task that trains ``objective`` (FAILED_PRECONDITION when none does yet)."""
    for name in TRAINING_TASKS.names():
        task = training_task(name)
        if task.objective is objective:
            return task
    raise objective_not_available(objective, where)


# --------------------------------------------------------------------------- datasets


class DatasetCatalog:
    """Dataset versions as the labeling service publishes them in the object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    def _manifest(self, ref: DatasetRef, field_name: str = "dataset_version") -> tuple[DatasetManifest, FileRef]:
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
                details={"field": f"spec.{field_name}"},
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

    def resolve(self, ref: DatasetRef, objective: Objective | None = None) -> ResolvedDataset:
        """Read and verify the manifest and every split file; refuse a version that cannot be trained on, or not
        with ``objective`` (None: the version's own), before its rows are read."""
        manifest, manifest_ref = self._manifest(ref)
        name = f"dataset version {ref.project_id}/{ref.dataset_version_id}"
        try:
            task = TaskType(manifest.task_type)
        except ValueError:
            raise FailedPreconditionError(f"{name} has unknown task type {manifest.task_type!r}") from None
        own = default_objective(task)
        if objective is not None and own is not objective:
            trains = ", ".join(sorted(t.value for t in OBJECTIVE_TASK_TYPES[objective]))
            raise InvalidArgumentError(
                f"spec.objective is {objective.value} but {name} is a {task.value} dataset"
                + (f" (trained with objective {own.value})" if own is not None else "")
                + f"; objective {objective.value} trains {trains} versions. Leave spec.objective unset to use the "
                "version's",
                details={"field": "spec.objective"},
            )
        if own is not None and task.value not in TRAINING_TASKS:
            raise objective_not_available(own, f"{name} is a {task.value} dataset")
        try:
            trainer = training_task(task.value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(
                f"{name} is a {task.value} dataset: {exc.message}", details={"field": "spec.dataset_version"}
            ) from None
        if manifest.row_format != trainer.row_format:
            raise FailedPreconditionError(
                f"{name} has {manifest.row_format!r} rows, but objective {trainer.objective.value} reads "
                f"{trainer.row_format!r} rows"
            )
        trainer.check_label_map(manifest.label_map, name)
        labels = trainer.output_labels(manifest.label_map)
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
            splits=splits,
        )

    def resolve_evaluation(self, ref: DatasetRef) -> tuple[DatasetRef, list[Any]]:
        """``spec.evaluation_dataset_version``: a chat version (SFT rows) with test rows, read and verified; its
        reference with the manifest's checksum, and the test split's conversations."""
        field_name = "evaluation_dataset_version"
        manifest, manifest_ref = self._manifest(ref, field_name)
        name = f"spec.{field_name} {ref.project_id}/{ref.dataset_version_id}"
        if manifest.task_type != TaskType.CHAT.value:
            raise FailedPreconditionError(
                f"{name} is a {manifest.task_type} version; the generation evaluation replies to chat conversations: "
                "name a chat project's version",
                details={"field": f"spec.{field_name}"},
            )
        test = self.load(manifest).examples.get("test", [])
        if not test:
            raise FailedPreconditionError(
                f"{name} has no test rows to reply to: publish it with a test split",
                details={"field": f"spec.{field_name}"},
            )
        return replace(ref, manifest=manifest_ref), test

    def evaluation_examples(self, ref: DatasetRef) -> list[Any]:
        """The test conversations of a resolved ``spec.evaluation_dataset_version``, verified again."""
        return self.resolve_evaluation(ref)[1]

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
        examples: dict[str, list[Any]] = {}
        for split in SPLITS:
            if split not in manifest.splits:
                continue
            entry = manifest.splits[split]
            where = f"dataset file {entry.file.key!r}"
            try:
                records: Sequence[DatasetRecord] = list(manifest.read_records(self._objects, split))
                split_examples = objective.examples(records, manifest.label_map, where)
            except NotFoundError:
                raise FailedPreconditionError(
                    f"dataset file {entry.file.key!r} listed in the manifest is missing from the object store"
                ) from None
            except InvalidArgumentError as exc:
                raise FailedPreconditionError(f"dataset file {entry.file.key!r} is malformed: {exc.message}") from None
            # The manifest counts items: one row each, except a preference item, which publishes a row (with the
            # item's id) for every pair its ranking orders.
            items = len({str(record.data.get("id")) for record in records})
            if entry.count != items:
                raise DataIntegrityError(
                    f"dataset file {entry.file.key!r} has {items} items ({len(split_examples)} rows) but the manifest "
                    f"says {entry.count}"
                )
            counted = objective.label_counts(split_examples, manifest.label_map)
            if (
                counted is not None
                and entry.label_counts
                and counted != {k: v for k, v in entry.label_counts.items() if v}
            ):
                raise DataIntegrityError(f"dataset file {entry.file.key!r} label counts differ from the manifest's")
            examples[split] = split_examples
        return DatasetSplits(label_map=objective.output_labels(manifest.label_map), examples=examples)


# --------------------------------------------------------------------------- base models


class BaseModelLookup(Protocol):
    """Base models by registry name (``gristmill.core.base_models.RegistryBaseModels``)."""

    def lookup(self, organization_id: str, name: str) -> StoredBaseModel: ...


class BaseModelCatalog:
    """Base models by registry name, from a local Hugging Face directory, or from an object-store prefix with a
    model manifest. Downloaded files are cached by content checksum under ``cache_dir``."""

    def __init__(
        self,
        objects: ObjectStore,
        cache_dir: Path,
        *,
        allow_local_paths: bool,
        registry: BaseModelLookup | None = None,
    ) -> None:
        self._objects = objects
        self._cache_dir = Path(cache_dir)
        self._allow_local_paths = allow_local_paths
        self._registry = registry
        # One download of a given content at a time (a submit and the supervisor may resolve the same model).
        self._downloading = threading.Lock()

    def resolve(self, ref: BaseModelRef, organization_id: str = "") -> ResolvedBaseModel:
        """The base model's files on this host; ``organization_id``: whose registry catalog a name is looked up in."""
        if ref.name:
            return self._registered(ref, organization_id)
        if ref.local_path:
            return self._local(ref)
        return self._stored(ref)

    def _registered(self, ref: BaseModelRef, organization_id: str) -> ResolvedBaseModel:
        if self._registry is None:
            raise FailedPreconditionError(
                f"base model {ref.name!r}: this training service has no registry to look base models up in; pass "
                "spec.base_model.object_prefix or local_path",
                details={"field": "spec.base_model.base_model_name"},
            )
        try:
            stored = self._registry.lookup(organization_id, ref.name)
        except NotFoundError:
            raise NotFoundError(
                f"base model {ref.name!r} is not in the registry; import it first (gristmill base-models import)",
                details={"field": "spec.base_model.base_model_name"},
            ) from None
        with self._downloading:
            local = stored.download(self._objects, self._cache_dir / stored.content_sha256)
        return ResolvedBaseModel(
            ref=replace(ref, content_sha256=stored.content_sha256), local_dir=local, files=dict(stored.files)
        )

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
            file.relative_to(path).as_posix(): sha256_file_cached(file)
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
        return ResolvedBaseModel(
            ref=replace(ref, object_prefix=prefix, content_sha256=digest), local_dir=dest, files=dict(manifest.files)
        )


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
        if spec.method is Method.QLORA and not res.use_gpu:
            raise qlora_needs_gpus("the job asks for no GPU workers (resources.use_gpu is false)")
        if spec.method is Method.QLORA and cap.gpus <= 0:
            raise qlora_needs_gpus("the Ray cluster has no GPUs")
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
        self, spec: JobSpec, task: TrainingTask, label_map: tuple[str, ...] | None, organization_id: str
    ) -> tuple[ResolvedBaseModel, ModelInfo, LoraSettings | None]:
        base = self._base_models.resolve(spec.base_model, organization_id)
        info = self._inspector.inspect(base.local_dir, task, label_map or ())
        if label_map and info.head_labels is not None and info.head_labels != len(label_map):
            raise InvalidArgumentError(
                f"the base model's classification head has {info.head_labels} labels but the dataset version has "
                f"{len(label_map)} ({', '.join(label_map[:10])}); use a base model without a head or with "
                f"{len(label_map)} labels",
                details={"field": "spec.base_model"},
            )
        if spec.hyper_parameters.gradient_checkpointing and not info.supports_gradient_checkpointing:
            raise InvalidArgumentError(
                f"spec.hyper_parameters.gradient_checkpointing: the {spec.base_model.describe()} ({info.model_type}) "
                f"cannot recompute activations for {task.name} training (transformers does not support gradient "
                "checkpointing for this model class); turn it off, or use a smaller batch or sequence length",
                details={"field": "spec.hyper_parameters.gradient_checkpointing"},
            )
        length = spec.hyper_parameters.max_sequence_length
        if info.max_positions is not None and length > info.max_positions:
            raise InvalidArgumentError(
                f"spec.hyper_parameters.max_sequence_length is {length} but the base model ({info.model_type}) takes "
                f"at most {info.max_positions} positions (config.max_position_embeddings); lower it to "
                f"{info.max_positions} or less",
                details={"field": "spec.hyper_parameters.max_sequence_length"},
            )
        if task.uses_chat_template and not (spec.chat_template or info.chat_template):
            raise InvalidArgumentError(
                f"the {spec.base_model.describe()} has no chat template, and objective {task.objective.value} renders "
                "conversations with one: set spec.chat_template (a Jinja template as transformers' "
                "apply_chat_template takes it) or use a base model whose tokenizer has one",
                details={"field": "spec.chat_template"},
            )
        lora = spec.lora
        if spec.method.adapters and lora is not None:
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

    def _objective_task(self, spec: JobSpec) -> TrainingTask:
        """The task a spec trains before its dataset is known (auto-train templates): its objective's, else its
        task type's, else text classification."""
        if spec.objective is not None:
            return task_for_objective(spec.objective, "spec.objective")
        return training_task(spec.task.value)

    def resolve_template(self, spec: JobSpec, organization_id: str = "") -> JobSpec:
        """An auto-train template: everything but the dataset (which each published version supplies).
        ``organization_id``: whose registry catalog a base model name is looked up in."""
        self.check_resources(spec)
        task = self._objective_task(spec)
        self._check_objective_fields(spec, task)
        base, _, lora = self._resolve_model(spec, task, None, organization_id)
        # The evaluation version is checked now: a policy naming a missing one fails when it is set, not at every
        # publish.
        return replace(spec, base_model=base.ref, lora=lora, evaluation_dataset=self._evaluation(spec))

    def _evaluation(self, spec: JobSpec) -> DatasetRef | None:
        """``spec.evaluation_dataset_version`` read and checked, pinned by its manifest's checksum (each run reads
        it again against that checksum)."""
        if spec.evaluation_dataset is None:
            return None
        return self._datasets.resolve_evaluation(spec.evaluation_dataset)[0]

    def resolve(self, spec: JobSpec, organization_id: str = "") -> ResolvedJob:
        # Cheap checks first: nothing is read when the cluster could never run the job.
        self.check_resources(spec)
        # Refuses a dataset whose task type training has no objective for (INVALID_ARGUMENT), or not the spec's.
        dataset = self._datasets.resolve(spec.dataset, spec.objective)
        if spec.task is not TaskType.UNSPECIFIED and spec.task is not dataset.task:
            raise InvalidArgumentError(
                f"spec.task is {spec.task.value} but the dataset version is {dataset.task.value}; leave task "
                "unspecified or make them match",
                details={"field": "spec.task"},
            )
        task = training_task(dataset.task.value)
        self._check_objective_fields(spec, task)
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
        spec = with_objective_metrics(spec, task)
        base, info, lora = self._resolve_model(spec, task, dataset.label_map, organization_id)
        if spec.pruning is not None:
            check_pruning(spec.pruning, info)
        side: dict[str, ResolvedBaseModel] = {}
        if spec.distillation is not None:
            side[TEACHER], teacher_info = self._resolve_teacher(
                spec.distillation.teacher, task, dataset.label_map, organization_id
            )
            spec = replace(
                spec,
                distillation=replace(
                    spec.distillation,
                    teacher=side[TEACHER].ref,
                    hidden_weight=_hidden_weight(spec.distillation.hidden_weight, info, teacher_info),
                ),
            )
        few = spec.hyper_parameters.few_labels
        if few.paraphrase_copies and few.paraphrase_model is not None:
            side[PARAPHRASER] = self._resolve_paraphraser(few.paraphrase_model, organization_id)
            few = replace(few, paraphrase_model=side[PARAPHRASER].ref)
            spec = replace(spec, hyper_parameters=replace(spec.hyper_parameters, few_labels=few))
        evaluation = self._evaluation(spec)
        chat_template = spec.chat_template or (info.chat_template if task.uses_chat_template else "")
        self._inspector.check_examples(
            base.local_dir,
            task,
            dataset.splits.examples["train"][:PROBE_EXAMPLES],
            chat_template=spec.chat_template,
            max_length=spec.hyper_parameters.max_sequence_length,
        )
        if spec.search is not None:
            check_search_bounds(spec)
            if not self._search_enabled:
                raise FailedPreconditionError(
                    "hyper-parameter search (spec.search) needs the Ray runner; this training service runs jobs "
                    "in-process",
                    details={"field": "spec.search"},
                )
        effective = replace(
            spec,
            dataset=dataset.ref,
            base_model=base.ref,
            lora=lora,
            task=dataset.task,
            objective=task.objective,
            chat_template=chat_template,
            # DPO's settings with their defaults, so that GetJob and the lineage show the beta trained with.
            dpo=(spec.dpo or DpoSettings()) if task.objective is Objective.DPO else None,
            evaluation_dataset=evaluation,
        )
        return ResolvedJob(spec=effective, dataset=dataset, base_model=base, model_info=info, side_models=side)

    def _side_model(
        self, ref: BaseModelRef, task: TrainingTask, label_map: Sequence[str], organization_id: str, where: str
    ) -> tuple[ResolvedBaseModel, ModelInfo]:
        """A model besides the base, resolved and inspected as ``task`` would build it; errors name ``where``."""
        try:
            model = self._base_models.resolve(ref, organization_id)
            return model, self._inspector.inspect(model.local_dir, task, label_map)
        except GristmillError as exc:
            # The catalog and the inspector speak of "the base model"; here it is another model of the job.
            raise type(exc)(f"{where}: {exc.message}", details={"field": where}) from None

    def _resolve_paraphraser(self, ref: BaseModelRef, organization_id: str) -> ResolvedBaseModel:
        """A causal language model with a chat template (the paraphrase prompt is a chat turn)."""
        where = "spec.hyper_parameters.few_labels.paraphrase_model"
        model, info = self._side_model(ref, training_task(TaskType.CHAT.value), (), organization_id, where)
        if not info.chat_template:
            raise InvalidArgumentError(
                f"{where}: the model ({info.model_type}) has no chat template; paraphrases are asked for in a chat "
                "turn, so use an instruction-tuned model with one (e.g. smollm2-135m-instruct)",
                details={"field": where},
            )
        return model

    def _resolve_teacher(
        self, ref: BaseModelRef, task: TrainingTask, label_map: tuple[str, ...], organization_id: str
    ) -> tuple[ResolvedBaseModel, ModelInfo]:
        """The teacher's files, once they proved to be a classifier over ``label_map``; errors name the field."""
        where = "spec.distillation.teacher"
        teacher, info = self._side_model(ref, task, label_map, organization_id, where)
        id2label = info.config.get("id2label")
        labels = (
            tuple(str(id2label[k]) for k in sorted(id2label, key=int))
            if isinstance(id2label, dict) and all(str(k).isdigit() for k in id2label)
            else ()
        )
        if info.head_labels is None or labels != tuple(label_map):
            found = f"labels {list(labels)}" if info.head_labels is not None else "no classification head"
            raise FailedPreconditionError(
                f"{where}: the teacher must be a classifier over the dataset's labels {list(label_map)} in that "
                f"order (config.json id2label); it has {found}. Use a version trained on this task",
                details={"field": where},
            )
        return teacher, info

    @staticmethod
    def _check_objective_fields(spec: JobSpec, task: TrainingTask) -> None:
        """The fields that only some objectives take (now that the objective is known)."""
        check_method_objective(spec.method, spec.publish_merged, task.objective)
        if spec.resources.fsdp:
            check_fsdp(spec.method, task.objective)
        check_search_objective(spec.search, task.objective)
        check_few_labels(spec.hyper_parameters.few_labels, task.objective)
        check_compression(spec.method, spec.pruning, spec.distillation, task.objective)
        if spec.chat_template and not task.uses_chat_template:
            raise InvalidArgumentError(
                f"spec.chat_template is only used by chat objectives (sft, dpo); objective {task.objective.value} does "
                "not render conversations",
                details={"field": "spec.chat_template"},
            )
        if spec.dpo is not None and task.objective is not Objective.DPO:
            raise dpo_without_dpo(task.objective)
        if spec.json_match_keys:
            check_json_match_keys(task.objective)
        if spec.evaluation_dataset is not None:
            check_evaluation_dataset(task.objective)


def _hidden_weight(given: float | None, base: ModelInfo, teacher: ModelInfo) -> float:
    """The hidden-state term's weight: the given one (refused when the hidden sizes differ), else the default when
    they match and 0 when they do not."""
    base_size, teacher_size = base.config.get("hidden_size"), teacher.config.get("hidden_size")
    same = base_size is not None and base_size == teacher_size
    if given is None:
        return DEFAULT_HIDDEN_WEIGHT if same else 0.0
    if given > 0 and not same:
        raise InvalidArgumentError(
            f"spec.distillation.hidden_weight matches the last layer's representation, which needs the same hidden "
            f"size; the base model's is {base_size} and the teacher's {teacher_size}: set it to 0 or leave it unset",
            details={"field": "spec.distillation.hidden_weight"},
        )
    return given


def check_pruning(pruning: Pruning, info: ModelInfo) -> None:
    """The cut fits the base model: a BERT-family encoder, at most its layers, an embedding narrower than it."""
    if info.model_type not in SLIMMABLE_MODEL_TYPES:
        raise FailedPreconditionError(
            f"spec.pruning cuts BERT-family encoders (model type {', '.join(sorted(SLIMMABLE_MODEL_TYPES))}); the base "
            f"model is a {info.model_type!r} model: remove pruning or use such a base",
            details={"field": "spec.pruning"},
        )
    layers = int(info.config.get("num_hidden_layers") or 0)
    hidden = int(info.config.get("hidden_size") or 0)
    intermediate = int(info.config.get("intermediate_size") or 0)
    if pruning.layers > layers:
        raise InvalidArgumentError(
            f"spec.pruning.layers is {pruning.layers} but the base model has {layers} layers; keep at most {layers}",
            details={"field": "spec.pruning.layers"},
        )
    if pruning.embedding_size >= hidden:
        raise InvalidArgumentError(
            f"spec.pruning.embedding_size is {pruning.embedding_size} but the base model's hidden size is {hidden}; a "
            f"factorised embedding must be narrower (at most {hidden - 1}), or 0 to keep it",
            details={"field": "spec.pruning.embedding_size"},
        )
    if pruning.intermediate_size >= intermediate:
        raise InvalidArgumentError(
            f"spec.pruning.intermediate_size is {pruning.intermediate_size} but the base model's feed-forward has "
            f"{intermediate} neurons; keep fewer (at most {intermediate - 1}), or 0 to keep them all",
            details={"field": "spec.pruning.intermediate_size"},
        )


def with_objective_metrics(spec: JobSpec, task: TrainingTask) -> JobSpec:
    """``spec`` with validation metrics (early stopping, search) its objective reports.

    The documented default, ``f1``, is classification's: an objective without it uses its own first metric
    instead (``loss`` for sft), minimised. Any other metric the objective does not report is INVALID_ARGUMENT."""
    hp = spec.hyper_parameters

    def fitted(metric: str, goal: Goal, field: str) -> tuple[str, Goal]:
        if metric in task.metrics:
            return metric, goal
        if metric == DEFAULT_VALIDATION_METRIC:
            own = task.metrics[0]
            return own, Goal.MINIMIZE if own in MINIMIZED_METRICS else Goal.MAXIMIZE
        raise InvalidArgumentError(
            f"{field} {metric!r} is not reported by objective {task.objective.value}; use one of "
            f"{', '.join(task.metrics)}",
            details={"field": field},
        )

    es = hp.early_stopping
    metric, goal = fitted(es.metric, es.goal, "spec.hyper_parameters.early_stopping.metric")
    early = EarlyStopping(patience=es.patience, metric=metric, goal=goal, min_delta=es.min_delta)
    search = spec.search
    if search is not None:
        metric, goal = fitted(search.metric, search.goal, "spec.search.metric")
        search = replace(search, metric=metric, goal=goal)
    return replace(spec, hyper_parameters=replace(hp, early_stopping=early), search=search)
