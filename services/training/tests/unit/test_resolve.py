"""Resolving a spec against the dataset version, the base model and the cluster, before anything runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from gristmill.core.base_models import StoredBaseModel, content_sha256
from gristmill.core.errors import (
    DataIntegrityError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from gristmill.core.manifests import FileEntry, dataset_manifest_key
from gristmill.core.storage import ObjectStore
from gristmill.training.devtools import LABELS, sentiment_rows, upload_model_directory, write_dataset_version
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import DatasetRef, FileRef
from gristmill.training.domain.resolve import (
    BaseModelCatalog,
    ClusterCapacity,
    DatasetCatalog,
    SpecResolver,
)
from gristmill.training.ml.inspect import HfModelInspector


class FixedCapacity:
    def __init__(self, cpus: float = 2.0, gpus: float = 0.0) -> None:
        self.value = ClusterCapacity(cpus=cpus, gpus=gpus, max_node_cpus=cpus, max_node_gpus=gpus)

    def capacity(self) -> ClusterCapacity:
        return self.value


def _resolver(objects: ObjectStore, tmp_path: Path, *, cpus: float = 2.0, local_paths: bool = True) -> SpecResolver:
    datasets = DatasetCatalog(objects)
    models = BaseModelCatalog(objects, tmp_path / "cache", allow_local_paths=local_paths)
    return SpecResolver(datasets, models, HfModelInspector(), FixedCapacity(cpus))


def _spec(model: Path | str, dataset: DatasetRef, **changes: object) -> d.JobSpec:
    method = changes.pop("method", d.Method.FULL)
    assert isinstance(method, d.Method)
    spec = d.build_spec(
        display_name="t",
        base_model=d.BaseModelRef(local_path=str(model)),
        dataset=DatasetRef(dataset.project_id, dataset.dataset_version_id),
        task=d.TaskType.UNSPECIFIED,
        method=method,
        lora=d.build_lora(method=method, given=False),
        hyper_parameters=d.build_hyper_parameters(method=method),
        resources=d.build_resources(),
        search=None,
        registered_model_name="",
        tags={},
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def test_a_valid_spec_resolves_with_verified_references(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    resolved = _resolver(objects, tmp_path).resolve(_spec(tiny_model, dataset))
    assert resolved.spec.dataset.manifest == dataset.manifest  # checksum of the manifest that was read
    assert resolved.spec.task is d.TaskType.TEXT_CLASSIFICATION
    assert len(resolved.spec.base_model.content_sha256) == 64
    assert resolved.dataset.counts == {"train": 96, "validation": 32, "test": 32}
    assert [f.key for f in resolved.dataset.files] == [
        "datasets/reviews/v1/test.jsonl",
        "datasets/reviews/v1/train.jsonl",
        "datasets/reviews/v1/validation.jsonl",
    ]


def test_unknown_dataset_version_is_not_found(objects: ObjectStore, tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="dataset version reviews/nope not found"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, DatasetRef("reviews", "nope")))


def test_a_tampered_dataset_file_fails_verification(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    # Replace the train split with different bytes: the manifest's checksum no longer matches.
    objects.put_bytes("datasets/reviews/v1/train.jsonl", b'{"id":"x","text":"t","label":"positive"}\n', overwrite=True)
    with pytest.raises(DataIntegrityError, match="does not match its manifest"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, dataset))


def test_a_manifest_checksum_given_by_the_caller_is_enforced(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    spec = replace(
        _spec(tiny_model, dataset), dataset=DatasetRef("reviews", "v1", FileRef(dataset.manifest.key, "0" * 64, 1))
    )  # type: ignore[union-attr]
    with pytest.raises(DataIntegrityError, match="dataset version reviews/v1"):
        _resolver(objects, tmp_path).resolve(spec)


def test_rows_with_labels_outside_the_label_map_are_refused(
    objects: ObjectStore, tiny_model: Path, tmp_path: Path
) -> None:
    ref = write_dataset_version(
        objects,
        project_id="reviews",
        dataset_version_id="v2",
        label_map=LABELS,
        splits={"train": [*sentiment_rows(4, 1), ("meh", "neutral")]},
    )
    with pytest.raises(FailedPreconditionError, match="label 'neutral', which is not in the version's label map"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, ref))


def test_an_empty_train_split_is_refused(objects: ObjectStore, tiny_model: Path, tmp_path: Path) -> None:
    ref = write_dataset_version(
        objects, project_id="reviews", dataset_version_id="v3", label_map=LABELS, splits={"train": []}
    )
    with pytest.raises(FailedPreconditionError, match="empty train split"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, ref))


def test_a_label_count_that_does_not_match_the_head_is_refused(
    objects: ObjectStore, tiny_model: Path, tmp_path: Path
) -> None:
    ref = write_dataset_version(
        objects,
        project_id="reviews",
        dataset_version_id="v4",
        label_map=("negative", "neutral", "positive"),
        splits={"train": [("bad", "negative"), ("ok", "neutral"), ("good", "positive")]},
    )
    with pytest.raises(InvalidArgumentError, match="head has 2 labels but the dataset version has 3"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, ref))


def test_a_model_without_a_head_takes_any_label_count(
    objects: ObjectStore, headless_model: Path, tmp_path: Path
) -> None:
    ref = write_dataset_version(
        objects,
        project_id="reviews",
        dataset_version_id="v5",
        label_map=("negative", "neutral", "positive"),
        splits={"train": [("bad", "negative"), ("ok", "neutral"), ("good", "positive")]},
    )
    resolved = _resolver(objects, tmp_path).resolve(_spec(headless_model, ref))
    assert resolved.model_info.head_labels is None and resolved.dataset.label_map == ("negative", "neutral", "positive")


def test_a_task_that_does_not_match_the_dataset_is_refused(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_model, dataset, task=d.TaskType.TEXT_MULTI_LABEL_CLASSIFICATION)
    with pytest.raises(InvalidArgumentError, match="spec.task"):
        _resolver(objects, tmp_path).resolve(spec)


def test_early_stopping_needs_a_validation_split(objects: ObjectStore, tiny_model: Path, tmp_path: Path) -> None:
    ref = write_dataset_version(
        objects, project_id="reviews", dataset_version_id="v6", label_map=LABELS, splits={"train": sentiment_rows(8, 1)}
    )
    spec = _spec(tiny_model, ref)
    spec = replace(
        spec,
        hyper_parameters=replace(spec.hyper_parameters, early_stopping=d.build_early_stopping(patience=2)),
    )
    with pytest.raises(InvalidArgumentError, match="early stopping needs a validation split"):
        _resolver(objects, tmp_path).resolve(spec)


def test_base_model_errors(objects: ObjectStore, dataset: DatasetRef, tmp_path: Path) -> None:
    resolver = _resolver(objects, tmp_path)
    with pytest.raises(NotFoundError, match="does not exist on the training service's host"):
        resolver.resolve(_spec(tmp_path / "missing", dataset))
    with pytest.raises(InvalidArgumentError, match="must be an absolute path"):
        resolver.resolve(_spec("relative/model", dataset))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InvalidArgumentError, match="is not a Hugging Face model: it has no config.json"):
        resolver.resolve(_spec(tmp_path / "not-a-model", dataset))
    with pytest.raises(NotFoundError, match="no manifest.json under object prefix"):
        resolver.resolve(replace(_spec("/x", dataset), base_model=d.BaseModelRef(object_prefix="base-models/none")))
    with pytest.raises(FailedPreconditionError, match="no registry to look base models up in"):
        resolver.resolve(replace(_spec("/x", dataset), base_model=d.BaseModelRef(name="minilm")))


def test_local_paths_can_be_disabled(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(FailedPreconditionError, match="local_path is disabled"):
        _resolver(objects, tmp_path, local_paths=False).resolve(_spec(tiny_model, dataset))


def test_a_base_model_from_the_object_store_is_downloaded_and_verified(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    upload_model_directory(objects, tiny_model, "base-models/tiny")
    spec = replace(_spec("/x", dataset), base_model=d.BaseModelRef(object_prefix="base-models/tiny"))
    resolved = _resolver(objects, tmp_path).resolve(spec)
    local = resolved.base_model.local_dir
    assert (local / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    # The same checksum as the local directory it came from: lineage names the content, not the place.
    from_disk = _resolver(objects, tmp_path).resolve(_spec(tiny_model, dataset))
    assert resolved.spec.base_model.content_sha256 == from_disk.spec.base_model.content_sha256
    manifest = json.loads(objects.get_bytes("base-models/tiny/manifest.json"))
    assert (
        content_sha256({n: e["sha256"] for n, e in manifest["files"].items()})
        == resolved.spec.base_model.content_sha256
    )


class RegistryCatalog:
    """The registry's answer for base models uploaded to ``objects`` (what ``RegistryBaseModels`` returns)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.models: dict[tuple[str, str], StoredBaseModel] = {}
        self.lookups: list[tuple[str, str]] = []

    def add(self, organization_id: str, name: str, directory: Path) -> StoredBaseModel:
        prefix = f"registry/base-models/{name}"
        upload_model_directory(self.objects, directory, prefix)
        manifest = json.loads(self.objects.get_bytes(f"{prefix}/manifest.json"))
        files = {n: FileEntry(e["key"], e["sha256"], e["size_bytes"]) for n, e in manifest["files"].items()}
        stored = StoredBaseModel(name, content_sha256({n: e.sha256 for n, e in files.items()}), files)
        self.models[organization_id, name] = stored
        return stored

    def lookup(self, organization_id: str, name: str) -> StoredBaseModel:
        self.lookups.append((organization_id, name))
        try:
            return self.models[organization_id, name]
        except KeyError:
            raise NotFoundError(f"base model {name!r} does not exist") from None


def test_a_base_model_named_in_the_registry_is_looked_up_for_the_callers_organisation_and_verified(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    registry = RegistryCatalog(objects)
    stored = registry.add("acme", "tiny-bert", tiny_model)
    catalog = BaseModelCatalog(objects, tmp_path / "cache", allow_local_paths=False, registry=registry)
    resolver = SpecResolver(DatasetCatalog(objects), catalog, HfModelInspector(), FixedCapacity())
    spec = replace(_spec("/x", dataset), base_model=d.BaseModelRef(name="tiny-bert"))

    resolved = resolver.resolve(spec, "acme")
    assert registry.lookups == [("acme", "tiny-bert")]
    assert resolved.spec.base_model == d.BaseModelRef(name="tiny-bert", content_sha256=stored.content_sha256)
    local = resolved.base_model.local_dir
    assert local == tmp_path / "cache" / stored.content_sha256
    assert (local / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    # The lineage names the content, whichever way the model was named.
    from_disk = _resolver(objects, tmp_path).resolve(_spec(tiny_model, dataset))
    assert resolved.spec.base_model.content_sha256 == from_disk.spec.base_model.content_sha256

    # Another organisation's catalog does not have it.
    with pytest.raises(NotFoundError, match="'tiny-bert' is not in the registry; import it first") as missing:
        resolver.resolve(spec, "other")
    assert missing.value.details == {"field": "spec.base_model.base_model_name"}

    # A file changed in the object store after the registry recorded its checksum: refused, never trained on.
    shutil.rmtree(local)
    objects.put_bytes(stored.files["config.json"].key, b"{}", overwrite=True)
    with pytest.raises(DataIntegrityError):
        resolver.resolve(spec, "acme")
    assert not local.exists()
    # A file gone from the object store: the registry's record is stale.
    objects.delete(stored.files["config.json"].key)
    with pytest.raises(FailedPreconditionError, match="a file the registry lists is missing from the object store"):
        resolver.resolve(spec, "acme")


def test_lora_target_modules_must_exist_in_the_model(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    resolver = _resolver(objects, tmp_path)
    spec = _spec(tiny_model, dataset, method=d.Method.LORA)
    assert resolver.resolve(spec).spec.lora == d.LoraSettings(8, 16.0, 0.1, ("query", "value"))  # BERT's default
    bad = replace(spec, lora=d.LoraSettings(8, 16.0, 0.1, ("q_proj",)))
    with pytest.raises(InvalidArgumentError, match=r"\['q_proj'\] are not linear layers"):
        resolver.resolve(bad)


def test_more_workers_than_the_cluster_can_ever_give_is_refused(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    resolver = _resolver(objects, tmp_path, cpus=2.0)
    with pytest.raises(FailedPreconditionError, match="3 worker\\(s\\) x 1 CPU = 3 CPUs, but the Ray cluster has 2"):
        resolver.resolve(_spec(tiny_model, dataset, resources=d.build_resources(num_workers=3)))
    with pytest.raises(FailedPreconditionError, match="the Ray cluster has no GPUs"):
        resolver.resolve(_spec(tiny_model, dataset, resources=d.build_resources(use_gpu=True)))


def test_a_search_needs_a_runner_that_supports_it(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    search = d.build_search(
        num_trials=2,
        dimensions=[
            d.build_search_dimension(
                0,
                parameter="learning_rate",
                distribution=d.Distribution.LOG_UNIFORM,
                low=1e-5,
                high=1e-3,
                method=d.Method.FULL,
            )
        ],
    )
    with pytest.raises(FailedPreconditionError, match="hyper-parameter search \\(spec.search\\) needs the Ray runner"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, dataset, search=search))
    too_high = d.build_search(
        num_trials=2,
        dimensions=[
            d.build_search_dimension(
                0,
                parameter="learning_rate",
                distribution=d.Distribution.UNIFORM,
                low=0.5,
                high=3.0,
                method=d.Method.FULL,
            )
        ],
    )
    with pytest.raises(InvalidArgumentError, match="'learning_rate' reaches 3, which is not allowed"):
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, dataset, search=too_high))


def test_without_a_manifest_reference_the_version_is_found_where_labeling_publishes_it() -> None:
    # The layout gristmill.core.manifests defines and labeling writes (its publish test checks its side):
    # datasets/<project>/<dataset version id>/manifest.json.
    assert dataset_manifest_key("reviews", "0123abcd") == "datasets/reviews/0123abcd/manifest.json"
