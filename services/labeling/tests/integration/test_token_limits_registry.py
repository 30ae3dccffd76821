"""Token limits with a registry base model's tokenizer, on the real stack: the registry service and the labeling
service (their real apps) over real gRPC, Kafka and the S3 server.

all-MiniLM-L6-v2 is imported into the registry as a base model (``ImportBaseModel(local_path=...)``); a chat
project names it as ``cleaning.tokenizer`` with a small ``max_tokens``; an import over ``ImportItems`` cuts a
long conversation and drops a hopeless one, and the report says so; labeling downloaded only the tokenizer's
files, verified, into its cache. A project naming a base model the registry does not have is INVALID_ARGUMENT
and is not created; with the registry gone, it is UNAVAILABLE.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from opentelemetry.sdk.trace import TracerProvider

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.api.registry.v1 import registry_pb2, registry_pb2_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.storage.base import sha256_file
from gristmill.labeling.app import LabelingApp
from gristmill.labeling.app import build_app as build_labeling
from gristmill.labeling.runtime.tokenizers import TOKENIZER_FILES
from gristmill.labeling.settings import LabelingSettings
from gristmill.registry.app import RegistryApp
from gristmill.registry.app import build_app as build_registry
from gristmill.registry.settings import RegistrySettings
from tests.support.tiny_model import minilm_path

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry(tmp_path: Path, s3: S3Settings) -> AsyncIterator[tuple[RegistryApp, int]]:
    settings = RegistrySettings(data_dir=tmp_path / "registry", grpc_port=0, allow_local_paths=True)
    app = build_registry(settings, Infrastructure(s3=s3), embedded_security("registry"))
    port = await app.host.start()
    yield app, port
    await app.host.stop()  # safe twice: the last test stops it early


@pytest.fixture
async def base_model(registry: tuple[RegistryApp, int]) -> AsyncIterator[registry_pb2.BaseModel]:
    app, port = registry
    name = f"minilm-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        imported: registry_pb2.BaseModel = await registry_pb2_grpc.RegistryServiceStub(channel).ImportBaseModel(
            registry_pb2.ImportBaseModelRequest(name=name, local_path=str(minilm_path()), license="apache-2.0")
        )
    yield imported
    # ~90 MB per run in a bucket every developer shares: remove it.
    for ref in imported.files:
        app.host.platform.objects.delete(ref.key)


@pytest.fixture
async def labeling(
    tmp_path: Path,
    kafka_bootstrap: str,
    s3: S3Settings,
    tracing: tuple[TracerProvider, Any],
    registry: tuple[RegistryApp, int],
) -> AsyncIterator[LabelingApp]:
    run = uuid.uuid4().hex[:8]
    settings = LabelingSettings(
        data_dir=tmp_path / "labeling",
        grpc_port=0,
        active_learning_group=f"labeling-it-{run}",
        feedback_group=f"labeling-feedback-it-{run}",
        registry_address=f"127.0.0.1:{registry[1]}",
        registry_timeout_s=10,
    )
    infra = Infrastructure(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), s3=s3, tracer_provider=tracing[0])
    app = build_labeling(settings, infra, embedded_security("labeling"))
    await app.host.start()
    yield app
    await app.host.stop()


def _chat(record_id: str, *turns: tuple[str, str]) -> dict[str, Any]:
    return {"id": record_id, "messages": [{"role": role, "content": content} for role, content in turns]}


def _words(count: int, word: str) -> str:
    return " ".join([word] * count)


async def _import(stub: pb_grpc.LabelingServiceStub, project_id: str, rows: list[dict[str, Any]]) -> pb.ImportReport:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)

    async def messages() -> AsyncIterator[pb.ImportItemsRequest]:
        yield pb.ImportItemsRequest(
            options=pb.ImportOptions(project_id=project_id, format=pb.IMPORT_FORMAT_JSONL, source_name="chats.jsonl")
        )
        for start in range(0, len(data), 101):  # chunks that cut lines
            yield pb.ImportItemsRequest(chunk=data[start : start + 101])

    report: pb.ImportReport = await stub.ImportItems(messages())
    return report


def _settings(tokenizer: str, max_tokens: int) -> pb.ProjectSettings:
    return pb.ProjectSettings(cleaning=pb.CleaningSettings(max_tokens=max_tokens, tokenizer=tokenizer))


async def test_an_import_cuts_and_drops_by_the_registry_tokenizer(
    labeling: LabelingApp, base_model: registry_pb2.BaseModel, registry: tuple[RegistryApp, int]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{labeling.host.server.port}") as channel:
        stub = pb_grpc.LabelingServiceStub(channel)
        project = await stub.CreateProject(
            pb.CreateProjectRequest(
                project_id="support-chat",
                task_type=common_pb2.TASK_TYPE_CHAT,
                settings=_settings(base_model.name, 40),
            )
        )
        assert (project.settings.cleaning.tokenizer, project.settings.cleaning.max_tokens) == (base_model.name, 40)

        # MiniLM's WordPiece: each word below is one token; without a chat template a turn costs its tokens + 4.
        report = await _import(
            stub,
            "support-chat",
            [
                _chat("short", ("user", "how do i reset the phone"), ("assistant", "hold the button")),
                _chat(
                    "long",
                    ("system", "you help with the phone"),
                    ("user", _words(10, "first")),
                    ("assistant", _words(10, "answer")),
                    ("user", "and the password"),
                    ("assistant", "it is on the label"),
                ),
                _chat("hopeless", ("user", "why"), ("assistant", _words(60, "because"))),
            ],
        )
        assert (report.received_count, report.accepted_count) == (3, 2)
        assert (report.truncated_count, report.truncated_turn_count, report.dropped_too_many_tokens_count) == (1, 2, 1)
        drops = {drop.external_id: drop for drop in report.drops}
        assert drops["long"].reason == pb.DROP_REASON_TRUNCATED
        assert (drops["long"].removed_turn_count, drops["long"].token_count) == (2, 9 + 7 + 9)
        assert drops["hopeless"].reason == pb.DROP_REASON_TOO_MANY_TOKENS
        assert drops["hopeless"].token_count == 5 + 64
        assert (
            await stub.GetImport(pb.GetImportRequest(project_id="support-chat", import_id=report.import_id)) == report
        )

        items = await stub.ListItems(pb.ListItemsRequest(project_id="support-chat"))
        by_id = {item.external_id: item for item in items.items}
        assert set(by_id) == {"short", "long"}
        assert [(t.role, t.content) for t in by_id["long"].conversation.messages] == [
            ("system", "you help with the phone"),
            ("user", "and the password"),
            ("assistant", "it is on the label"),
        ]

        # Only the tokenizer's files came down, each as the registry recorded it, under the model's content hash.
        cache = Path(labeling.host.settings.data_dir) / "tokenizers" / base_model.content_sha256
        cached = {path.name: sha256_file(path) for path in cache.iterdir()}
        recorded = {ref.key.removeprefix(base_model.artifact_prefix): ref.sha256 for ref in base_model.files}
        assert set(cached) <= TOKENIZER_FILES and {"tokenizer.json", "vocab.txt"} <= set(cached)
        assert cached == {name: recorded[name] for name in cached}
        assert "model.safetensors" in recorded

        # A base model the registry does not have: INVALID_ARGUMENT naming the field, no project.
        missing = f"no-such-model-{uuid.uuid4().hex[:6]}"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateProject(
                pb.CreateProjectRequest(
                    project_id="ghost", task_type=common_pb2.TASK_TYPE_CHAT, settings=_settings(missing, 100)
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            f"settings.cleaning.tokenizer: base model '{missing}' does not exist in the registry"
        )
        with pytest.raises(grpc.aio.AioRpcError) as absent:
            await stub.GetProject(pb.GetProjectRequest(project_id="ghost"))
        assert absent.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListProjects(pb.ListProjectsRequest())
        assert [p.project_id for p in listed.projects] == ["support-chat"]

        # Nor may an update name one; the project keeps its tokenizer.
        with pytest.raises(grpc.aio.AioRpcError) as update:
            await stub.UpdateProject(
                pb.UpdateProjectRequest(
                    project_id="support-chat",
                    project=pb.Project(settings=_settings(missing, 40)),
                    update_mask=field_mask_pb2.FieldMask(paths=["settings.cleaning.tokenizer"]),
                )
            )
        assert update.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        kept = await stub.GetProject(pb.GetProjectRequest(project_id="support-chat"))
        assert kept.settings.cleaning.tokenizer == base_model.name

        # The registry gone: a tokenizer cannot be checked (UNAVAILABLE, nothing created), nor an import counted.
        await registry[0].host.stop()
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await stub.CreateProject(
                pb.CreateProjectRequest(
                    project_id="later", task_type=common_pb2.TASK_TYPE_CHAT, settings=_settings(base_model.name, 40)
                )
            )
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as no_import:
            await _import(stub, "support-chat", [_chat("more", ("user", "hello"), ("assistant", "hi"))])
        assert no_import.value.code() == grpc.StatusCode.UNAVAILABLE
        listed = await stub.ListProjects(pb.ListProjectsRequest())
        assert [p.project_id for p in listed.projects] == ["support-chat"]
