"""Base models over real gRPC: import from a Hugging Face directory, copies, and local paths refused unless enabled."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grpc

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from services.registry.tests.api import Api, fails


def _hf_directory(root: Path) -> Path:
    root.mkdir(parents=True)
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "embeddings.weight": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
            "classifier.bias": {"dtype": "F32", "shape": [2], "data_offsets": [160, 168]},
        }
    ).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 168)
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (root / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (root / ".gitattributes").write_text("*.bin lfs")
    return root


async def test_base_models(api: Api) -> None:
    source = _hf_directory(api.tmp / "hf")
    imported = await api.stub.ImportBaseModel(
        pb.ImportBaseModelRequest(name="tiny-bert", local_path=str(source), license="apache-2.0")
    )
    assert (imported.model_type, list(imported.architectures), imported.parameter_count) == ("bert", ["BertModel"], 42)
    assert common_pb2.TASK_TYPE_TEXT_CLASSIFICATION in imported.tasks
    assert sorted(f.key for f in imported.files) == [
        "base-models/tiny-bert/config.json",
        "base-models/tiny-bert/model.safetensors",
        "base-models/tiny-bert/vocab.txt",
    ]  # hidden files are not part of a model
    # The same files from the object store give the same content checksum.
    objects = api.app.host.platform.objects
    for path in ("config.json", "model.safetensors", "vocab.txt"):
        objects.put_file(f"uploads/hf/{path}", source / path)
    copy = await api.stub.ImportBaseModel(
        pb.ImportBaseModelRequest(
            name="tiny-bert-2", object_prefix="uploads/hf", tasks=[common_pb2.TASK_TYPE_CAUSAL_LM]
        )
    )
    assert copy.content_sha256 == imported.content_sha256 and list(copy.tasks) == [common_pb2.TASK_TYPE_CAUSAL_LM]
    listed = await api.stub.ListBaseModels(pb.ListBaseModelsRequest(task=common_pb2.TASK_TYPE_CAUSAL_LM))
    assert [b.name for b in listed.base_models] == ["tiny-bert-2"]
    got = await api.stub.GetBaseModel(pb.GetBaseModelRequest(name="tiny-bert"))
    assert got == imported

    (api.tmp / "empty").mkdir()
    (api.tmp / "empty" / "config.json").write_text("{}")
    for request, code, message in [
        (pb.ImportBaseModelRequest(name="tiny-bert", local_path=str(source)), grpc.StatusCode.ALREADY_EXISTS, "exists"),
        (
            pb.ImportBaseModelRequest(name="x", local_path=str(api.tmp / "nope")),
            grpc.StatusCode.NOT_FOUND,
            "not a directory",
        ),
        (
            pb.ImportBaseModelRequest(name="x", local_path=str(api.tmp / "empty")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no weights",
        ),
        (pb.ImportBaseModelRequest(name="x", local_path="relative/dir"), grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        (
            pb.ImportBaseModelRequest(name="x", object_prefix="uploads/none"),
            grpc.StatusCode.NOT_FOUND,
            "holds no objects",
        ),
        (pb.ImportBaseModelRequest(name="x"), grpc.StatusCode.INVALID_ARGUMENT, "exactly one source"),
        (
            pb.ImportBaseModelRequest(name="Bad", local_path=str(source)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "base model name",
        ),
    ]:
        await fails(api.stub.ImportBaseModel(request), code, message)
    await fails(api.stub.GetBaseModel(pb.GetBaseModelRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "'nope'")
    assert [b.name for b in (await api.stub.ListBaseModels(pb.ListBaseModelsRequest())).base_models] == [
        "tiny-bert",
        "tiny-bert-2",
    ]


async def test_local_paths_are_refused_unless_enabled(tmp_path: Path) -> None:
    settings = RegistrySettings(data_dir=tmp_path / "data", grpc_port=0)  # the default: disabled
    app = build_app(settings, Infrastructure(), embedded_security("registry"))
    port = await app.host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            await fails(
                stub.ImportBaseModel(
                    pb.ImportBaseModelRequest(name="x", local_path=str(_hf_directory(tmp_path / "hf")))
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
                "local path is disabled",
            )
            # A GGUF file on the host is a local path too; the object store is the way in.
            await fails(
                stub.ImportBaseModel(pb.ImportBaseModelRequest(name="x", gguf_file=str(tmp_path / "x.gguf"))),
                grpc.StatusCode.FAILED_PRECONDITION,
                "use gguf_object_key",
            )
    finally:
        await app.host.stop()
