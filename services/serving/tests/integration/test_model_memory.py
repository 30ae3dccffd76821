"""The real all-MiniLM-L6-v2 classifier, downloaded from the S3 server with every checksum verified: the
resident memory it adds stays within 1.5x its weight file, and freeing it gives the memory back.

Measured per model, with the BERT architecture's code already imported (a tiny BERT is loaded first):
importing transformers' model code is a one-time cost of the process (~200 MB), not of each model.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from gristmill.core.settings import S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.serving.domain.sources import LoadOptions, ModelFile, ResolvedVersion
from gristmill.serving.runtime.classifier import load_transformers_classifier
from gristmill.serving.runtime.memory import release_memory, resident_bytes
from gristmill.serving.runtime.sources import download_verified
from tests.conftest import SHARED_DATA
from tests.support.tiny_model import make_tiny_bert, minilm_path

pytestmark = pytest.mark.integration

# Files a Hugging Face classifier needs (the sentence-transformers extras are not served).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def test_minilm_from_s3_adds_at_most_1_5x_its_weights_and_is_freed(tmp_path: Path, s3_endpoint: dict[str, str]) -> None:
    objects = S3ObjectStore(
        S3Settings(
            endpoint=s3_endpoint["endpoint"],
            access_key=s3_endpoint["access_key"],
            secret_key=SecretStr(s3_endpoint["secret_key"]),
            bucket="gristmill-test",
        )
    )
    prefix = f"models/minilm-{uuid.uuid4().hex[:8]}/1"
    files = []
    for name in MODEL_FILES:
        info = objects.put_file(f"{prefix}/{name}", minilm_path() / name)
        files.append(ModelFile(name, info.key, info.sha256, info.size))
    resolved = ResolvedVersion("minilm", 1, files=tuple(files), label_map=("negative", "positive"))
    directory = download_verified(objects, resolved, tmp_path / "cache" / prefix)
    weights = (directory / "model.safetensors").stat().st_size

    tiny = make_tiny_bert(tmp_path / "tiny", ["warm up the architecture"], ["negative", "positive"])
    load_transformers_classifier(tiny, ResolvedVersion("tiny", 1), LoadOptions(), trace=False).close()
    release_memory()
    before = resident_bytes()

    # Eager: the model's own memory (the TorchScript trace's is measured below).
    classifier = load_transformers_classifier(directory, resolved, LoadOptions(), trace=False)
    assert 0 < classifier.memory_bytes <= 1.5 * weights, (classifier.memory_bytes, weights)
    # Serving touches more of the weights (embedding rows): still within the budget once the
    # batches' scratch memory is returned.
    lines = (SHARED_DATA / "sentiment" / "imdb_labelled.txt").read_text(encoding="utf-8").splitlines()
    texts = [line.split("\t")[0] for line in lines[:256]]
    for start in range(0, len(texts), 32):
        probabilities = classifier.predict(classifier.encode(texts[start : start + 32], 128))
        assert len(probabilities) == len(texts[start : start + 32])
    release_memory()
    serving = resident_bytes() - before
    assert serving <= 1.5 * weights, (serving, weights)
    print(
        f"MiniLM: weights {weights / 1e6:.1f} MB, load adds {classifier.memory_bytes / 1e6:.1f} MB, "
        f"after 256 texts {serving / 1e6:.1f} MB ({serving / weights:.2f}x)"
    )

    classifier.close()
    del classifier
    release_memory()
    assert resident_bytes() - before < 0.25 * weights, "freeing the model must give its memory back"


def test_a_traced_load_keeps_only_the_tracers_bytes_after_it_is_freed(tmp_path: Path) -> None:
    """torch's tracer (2.15) keeps state of every trace for the life of the process, freed module or not: about
    5-11 MB per MiniLM load, not its weights (90 MB). A serving process that swaps versions very often can turn
    tracing off (GRISTMILL_SERVING_TRACE_MODELS=false, ~3 ms more per single-text call). This pins the bound, so
    that a torch that keeps more (the weights, say) fails here."""
    resolved = ResolvedVersion("minilm", 1, label_map=("negative", "positive"))
    weights = (minilm_path() / "model.safetensors").stat().st_size
    load_transformers_classifier(minilm_path(), resolved, LoadOptions()).close()  # the JIT's one-time start
    release_memory()
    kept = []
    for _ in range(3):
        before = resident_bytes()
        classifier = load_transformers_classifier(minilm_path(), resolved, LoadOptions())
        assert classifier.traced
        classifier.close()
        del classifier
        release_memory()
        kept.append(resident_bytes() - before)
    print(f"traced MiniLM loads, kept after freeing: {[round(k / 1e6, 1) for k in kept]} MB")
    assert max(kept) < 0.25 * weights, kept
