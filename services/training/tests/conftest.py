"""Fixtures of the training service's tests: a tiny BERT and a tiny Llama, small dataset versions (sentiment
classification, chat, preference), stores and a host."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.storage import LocalObjectStore, ObjectStore
from gristmill.training.app import TrainingApp
from gristmill.training.devtools import (
    LABELS,
    chat_rows,
    chat_vocabulary_text,
    preference_rows,
    sentiment_rows,
    vocabulary_text,
    write_chat_version,
    write_dataset_version,
    write_preference_version,
)
from gristmill.training.domain.refs import DatasetRef
from gristmill.training.runner.in_process import InProcessRunner
from services.training.tests.service_support import start_host
from tests.conftest import kafka_bootstrap, s3_endpoint, tracing  # noqa: F401
from tests.support.tiny_model import make_tiny_bert, make_tiny_llama

ALL_TEXTS = [vocabulary_text()]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with a 2-label head, built from a config."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), ALL_TEXTS, list(LABELS))


@pytest.fixture(scope="session")
def headless_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny BERT saved without a classification head (a plain encoder, like a hub base model)."""
    from transformers import AutoTokenizer, BertModel

    source = make_tiny_bert(tmp_path_factory.mktemp("tiny-src"), ALL_TEXTS, list(LABELS))
    dest = tmp_path_factory.mktemp("tiny-encoder")
    BertModel.from_pretrained(str(source)).save_pretrained(str(dest), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama causal LM (hidden 32) with a byte-level BPE tokenizer and a ChatML chat template, its random
    weights at the scale of a trained model's (so LoRA moves its loss within a few steps)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), [chat_vocabulary_text()], initializer_range=0.5)


@pytest.fixture(scope="session")
def templateless_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a tokenizer that has no chat template (a base model, not a chat model)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-base"), [chat_vocabulary_text()], chat_template=None)


def write_chat_rows_version(
    objects: ObjectStore, project_id: str = "chats", version_id: str = "v1", *, train: int = 64, held_out: int = 16
) -> DatasetRef:
    return write_chat_version(
        objects,
        project_id=project_id,
        dataset_version_id=version_id,
        splits={"train": chat_rows(train, 1), "validation": chat_rows(held_out, 2), "test": chat_rows(held_out, 3)},
    )


@pytest.fixture
def chat_version() -> Callable[..., DatasetRef]:
    """``chat_version(objects, project_id, version_id, train=..., held_out=...)`` writes a chat (SFT) version."""
    return write_chat_rows_version


def write_preference_rows_version(
    objects: ObjectStore, project_id: str = "prefs", version_id: str = "v1", *, train: int = 64, held_out: int = 16
) -> DatasetRef:
    return write_preference_version(
        objects,
        project_id=project_id,
        dataset_version_id=version_id,
        splits={
            "train": preference_rows(train, 1),
            "validation": preference_rows(held_out, 2),
            "test": preference_rows(held_out, 3),
        },
    )


@pytest.fixture
def preference_version() -> Callable[..., DatasetRef]:
    """``preference_version(objects, project_id, version_id, train=..., held_out=...)`` writes a preference (DPO)
    version."""
    return write_preference_rows_version


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def write_sentiment_version(
    objects: ObjectStore, project_id: str = "reviews", version_id: str = "v1", *, train: int = 96, held_out: int = 32
) -> DatasetRef:
    return write_dataset_version(
        objects,
        project_id=project_id,
        dataset_version_id=version_id,
        label_map=LABELS,
        splits={
            "train": sentiment_rows(train, 1),
            "validation": sentiment_rows(held_out, 2),
            "test": sentiment_rows(held_out, 3),
        },
    )


@pytest.fixture
def dataset(objects: ObjectStore) -> DatasetRef:
    return write_sentiment_version(objects)


@pytest.fixture
def sentiment_version() -> Callable[..., DatasetRef]:
    """``sentiment_version(objects, project_id, version_id, train=..., held_out=...)`` writes a version."""
    return write_sentiment_version


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[TrainingApp, pb_grpc.TrainingServiceStub]]:
    app, port = await start_host(tmp_path, InProcessRunner(tmp_path / "runs", cpus=2))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield app, pb_grpc.TrainingServiceStub(channel)
    await app.host.stop()
