"""The transformers classifier on a tiny BERT built from a config, and verified downloads into the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.core.errors import DataIntegrityError, FailedPreconditionError
from gristmill.core.storage import LocalObjectStore
from gristmill.serving.domain.model import Quantization, VersionSelector
from gristmill.serving.domain.sources import LoadOptions, ResolvedVersion
from gristmill.serving.runtime.classifier import TransformersClassifier, load_transformers_classifier
from gristmill.serving.runtime.sources import LocalDirectoryModelSource, download_verified, resolved_from_manifest
from tests.support.tiny_model import make_tiny_bert

TEXTS = [
    "the food was great and the staff were lovely",
    "terrible service",
    "it was fine i guess but nothing special at all really",
    "great",
]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_bert(root / "sentiment" / "1", TEXTS, ["negative", "positive"], seed=1)
    return root


@pytest.fixture(scope="module")
def classifier(model_root: Path) -> TransformersClassifier:
    source = LocalDirectoryModelSource(model_root)
    resolved = source.resolve("default", "sentiment", VersionSelector.of_version(1))
    return load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions())


def test_loads_labels_limits_and_memory(classifier: TransformersClassifier) -> None:
    assert list(classifier.labels) == ["negative", "positive"]
    assert classifier.max_tokens == 128  # the tiny model's position embeddings
    assert not classifier.multi_label
    assert classifier.memory_bytes >= 0


def test_encoding_truncates_but_keeps_the_special_tokens(classifier: TransformersClassifier) -> None:
    full, cut = classifier.encode([TEXTS[2], TEXTS[2]], 128)[0], classifier.encode([TEXTS[2]], 6)[0]
    assert full.full_length == len(full.ids) == 13  # 11 words + [CLS] + [SEP]
    assert cut.full_length == 13 and len(cut.ids) == 6
    assert cut.ids[0] == full.ids[0] and cut.ids[-1] == full.ids[-1]  # [CLS] ... [SEP]


def test_batched_predictions_equal_one_by_one_predictions(classifier: TransformersClassifier) -> None:
    encoded = classifier.encode(TEXTS, 128)
    batched = np.asarray(classifier.predict(encoded))
    single = np.asarray([classifier.predict([item])[0] for item in encoded])
    assert batched.shape == (4, 2)
    assert batched.sum(axis=1) == pytest.approx([1.0] * 4, abs=1e-5)
    # Padding in a batch must not change any text's answer (the attention mask works).
    assert batched == pytest.approx(single, abs=1e-5)


def test_the_model_runs_traced_and_a_faithless_trace_falls_back_to_eager(
    model_root: Path, classifier: TransformersClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert classifier.traced
    source = LocalDirectoryModelSource(model_root)
    resolved = source.resolve("default", "sentiment", VersionSelector.of_version(1))
    reference = np.asarray(classifier.predict(classifier.encode(TEXTS, 128)))
    eager = load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions(), trace=False)
    assert not eager.traced
    assert np.asarray(eager.predict(eager.encode(TEXTS, 128))) == pytest.approx(reference, abs=1e-5)
    # A trace that answers differently from the model (shape baked in, say) is refused at load.
    monkeypatch.setattr(torch.jit, "trace", lambda module, example, **_: lambda ids, mask: module(ids, mask) + 1.0)
    checked = load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions())
    assert not checked.traced
    assert np.asarray(checked.predict(checked.encode(TEXTS, 128))) == pytest.approx(reference, abs=1e-5)


def test_dynamic_int8_quantisation_stays_close(model_root: Path, classifier: TransformersClassifier) -> None:
    source = LocalDirectoryModelSource(model_root)
    resolved = source.resolve("default", "sentiment", VersionSelector.of_version(1))
    quantized = load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions(Quantization.DYNAMIC_INT8))
    reference = np.asarray(classifier.predict(classifier.encode(TEXTS, 128)))
    approximate = np.asarray(quantized.predict(quantized.encode(TEXTS, 128)))
    assert approximate == pytest.approx(reference, abs=0.05)
    quantized.close()


def test_refuses_models_it_cannot_serve(model_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_root / "sentiment" / "1", copy)
    resolved = ResolvedVersion("sentiment", 1, label_map=("a", "b", "c"))
    with pytest.raises(FailedPreconditionError, match="2 outputs but 3 labels"):
        load_transformers_classifier(copy, resolved, LoadOptions())
    (copy / "model.safetensors").unlink()
    with pytest.raises(DataIntegrityError, match="no model.safetensors"):
        load_transformers_classifier(copy, ResolvedVersion("sentiment", 1), LoadOptions())


def _manifest(store: LocalObjectStore, model_dir: Path, prefix: str) -> registry_pb2.DownloadManifest:
    manifest = registry_pb2.DownloadManifest(
        registered_model_name="sentiment",
        version=1,
        resolved_alias="production",
        artifact_prefix=prefix,
        task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
        label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
    )
    manifest.lineage.dataset_version.project_id = "reviews"
    manifest.lineage.hyper_parameters["max_length"] = "64"
    for path in sorted(model_dir.iterdir()):
        info = store.put_file(f"{prefix}{path.name}", path)
        manifest.files.append(common_pb2.ObjectRef(key=info.key, sha256=info.sha256, size_bytes=info.size))
    return manifest


def test_downloads_are_verified_and_reused(model_root: Path, tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    resolved = resolved_from_manifest(_manifest(store, model_root / "sentiment" / "1", "models/sentiment/1/"))
    assert (resolved.version, resolved.resolved_alias, resolved.label_map) == (
        1,
        "production",
        ("negative", "positive"),
    )
    assert (resolved.labeling_project_id, resolved.max_sequence_length) == ("reviews", 64)
    assert "config.json" in {f.name for f in resolved.files}
    dest = tmp_path / "cache" / "models" / "sentiment" / "1"
    assert download_verified(store, resolved, dest) == dest
    assert (dest / "model.safetensors").read_bytes() == (
        model_root / "sentiment" / "1" / "model.safetensors"
    ).read_bytes()
    # A second load reuses the verified files; a damaged cached file is downloaded again.
    (dest / "config.json").write_text("{}")
    download_verified(store, resolved, dest)
    assert (dest / "config.json").read_bytes() == (model_root / "sentiment" / "1" / "config.json").read_bytes()
    # A file whose stored bytes differ from the manifest is refused, and nothing half-downloaded is left.
    store.put_bytes("models/sentiment/1/config.json", b"tampered", overwrite=True)
    shutil.rmtree(dest)
    with pytest.raises(DataIntegrityError):
        download_verified(store, resolved, dest)
    assert not dest.exists() and not any(p.name.startswith(".download") for p in dest.parent.iterdir())
