"""The transformers classifier on a tiny BERT built from a config, and verified downloads into the cache."""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.core.errors import DataIntegrityError, FailedPreconditionError
from gristmill.core.storage import LocalObjectStore
from gristmill.serving.domain.model import Quantization, VersionSelector
from gristmill.serving.domain.sources import Encoded, LoadOptions, ResolvedVersion
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


# Reviews whose label is one word: "great" (positive) or "terrible" (negative), among filler words.
_FILLER = "the food was and staff were it fine i guess but nothing special at all really service table"


@pytest.fixture(scope="module")
def sharp(tmp_path_factory: pytest.TempPathFactory) -> TransformersClassifier:
    """A tiny BERT fitted to reviews that one word decides: an untrained one answers ~0.5 to everything, which no
    attribution could tell anything from."""
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(64):
        words = rng.sample(_FILLER.split(), rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), "great" if i % 2 else "terrible")
        texts.append(" ".join(words))
        labels.append(i % 2)
    root = tmp_path_factory.mktemp("sharp")
    directory = make_tiny_bert(root / "sharp" / "1", texts, ["negative", "positive"], seed=1)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(30):
        model(**batch, labels=torch.tensor(labels)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    source = LocalDirectoryModelSource(root)
    resolved = source.resolve("default", "sharp", VersionSelector.of_version(1))
    return load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions())


def test_explanations_point_at_the_deciding_word_and_agree_with_the_predictions(
    sharp: TransformersClassifier,
) -> None:
    """What an explanation reports is what ``predict`` says: the probability of the text and of the baseline (the
    special tokens kept, padding in place of every word), and ``delta`` is the scores' sum minus their gap.
    (Completeness itself, the sum meeting the gap, is checked on a real model: tests/integration/
    test_served_sentiment_model.py. On this tiny model the path from the baseline crosses a cliff that no
    affordable number of steps integrates, and ``delta`` says so.)"""
    classifier = sharp
    texts = ["staff great table", "the food was fine and the service nothing special", "great"]
    encoded = classifier.encode(texts, 128)
    rows = classifier.predict(encoded)
    labels = [int(np.argmax(row)) for row in rows]
    assert labels == [1, 0, 1] and min(max(row) for row in rows) > 0.9, rows
    explanations = classifier.explain(texts, 128, labels, 32)
    specials = {encoded[0].ids[0], encoded[0].ids[-1]}
    pad = classifier._pad_id
    for text, item, row, label, explanation in zip(texts, encoded, rows, labels, explanations, strict=True):
        assert explanation.label_index == label
        assert explanation.probability == pytest.approx(row[label], abs=1e-4)
        baseline = Encoded([i if i in specials else pad for i in item.ids], item.full_length)
        assert explanation.baseline_probability == pytest.approx(classifier.predict([baseline])[0][label], abs=1e-4)
        total = sum(t.score for t in explanation.tokens)
        gap = explanation.probability - explanation.baseline_probability
        assert explanation.delta == pytest.approx(total - gap, abs=1e-3)
        # One attribution per word of the text (the special tokens are left out), each pointing at its word.
        assert [text[t.start : t.end] for t in explanation.tokens] == text.split()
        assert [t.token for t in explanation.tokens] == text.split()
    # "great" made the first text positive: it has the largest share, and a positive one.
    first = {t.token: t.score for t in explanations[0].tokens}
    assert max(first, key=first.__getitem__) == "great" and first["great"] > 0, first
    # The filler text is as negative as the baseline (the model learned "negative unless great"): nothing to share.
    assert abs(explanations[1].probability - explanations[1].baseline_probability) < 0.05
    assert all(abs(t.score) < 0.05 for t in explanations[1].tokens), explanations[1]


def test_explanations_follow_truncation_and_do_not_disturb_predictions_beside_them(
    sharp: TransformersClassifier,
) -> None:
    classifier = sharp
    [short] = classifier.explain([TEXTS[2]], 6, [0], 16)
    assert [t.token for t in short.tokens] == TEXTS[2].split()[:4]  # 6 tokens: [CLS], four words, [SEP]
    # Explaining runs the eager model on another thread while batches run: their answers must not change.
    encoded = classifier.encode(TEXTS, 128)
    reference = np.asarray(classifier.predict(encoded))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (classifier.explain(TEXTS * 2, 128, [0] * 8, 64), done.set()))
    worker.start()
    answers = 0
    while not done.is_set():
        assert np.asarray(classifier.predict(encoded)) == pytest.approx(reference, abs=1e-5)
        answers += 1
    worker.join()
    assert answers > 0


def test_a_quantised_model_refuses_to_explain(model_root: Path) -> None:
    source = LocalDirectoryModelSource(model_root)
    resolved = source.resolve("default", "sentiment", VersionSelector.of_version(1))
    quantized = load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions(Quantization.DYNAMIC_INT8))
    with pytest.raises(FailedPreconditionError, match="dynamic int8"):
        quantized.explain(TEXTS[:1], 128, [0], 8)
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


def test_a_pruned_student_serves_traced_and_explains(model_root: Path, tmp_path: Path) -> None:
    """Training's pruning publishes an ALBERT (factorised embeddings, fewer layers): serving loads it with the
    Auto classes, traces it faithfully, and explains it over its narrower embeddings."""
    from gristmill.training.ml.slimming import SlimShape, slim_bert_classifier

    teacher = AutoModelForSequenceClassification.from_pretrained(str(model_root / "sentiment" / "1"))
    student = slim_bert_classifier(teacher, SlimShape(layers=1, embedding_size=8)).eval()
    directory = tmp_path / "student" / "1"
    student.save_pretrained(directory)  # type: ignore[operator]
    AutoTokenizer.from_pretrained(str(model_root / "sentiment" / "1")).save_pretrained(directory)
    source = LocalDirectoryModelSource(tmp_path)
    resolved = source.resolve("default", "student", VersionSelector.of_version(1))
    served = load_transformers_classifier(source.fetch(resolved), resolved, LoadOptions())
    assert served.traced
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    with torch.no_grad():
        expected = student(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    assert np.asarray(served.predict(served.encode(TEXTS, 128))) == pytest.approx(expected, abs=1e-5)
    explanation = served.explain([TEXTS[0]], 128, [1], 8)[0]
    assert [t.token for t in explanation.tokens] == TEXTS[0].split()
    assert explanation.probability == pytest.approx(float(expected[0][1]), abs=1e-4)


def test_a_batch_alone_gets_the_cores_of_every_slot_where_that_is_more(
    classifier: TransformersClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``light_load_thread_setup``: the alone thread's intra-op threads are the default times the slots, at most
    one per core; no setup when that is no more than the default (nothing to gain, one more OpenMP pool)."""
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        setup = classifier.light_load_thread_setup(2)
        assert setup is not None
        seen: list[int] = []

        def alone() -> None:
            setup()
            seen.append(torch.get_num_threads())
            classifier.predict(classifier.encode(["a fine phone"], 32))

        thread = threading.Thread(target=alone)
        thread.start()
        thread.join()
        assert seen == [2] and torch.get_num_threads() == 1, "the setup changes its own thread only"
        assert classifier.light_load_thread_setup(8) is not None  # capped at 4 cores, still more than 1
        assert classifier.light_load_thread_setup(1) is None
        torch.set_num_threads(4)
        assert classifier.light_load_thread_setup(2) is None, "every batch already has every core"
    finally:
        torch.set_num_threads(before)
