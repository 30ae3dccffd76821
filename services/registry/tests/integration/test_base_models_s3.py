"""ImportBaseModel of the real all-MiniLM-L6-v2 directory into the S3 server, over real gRPC."""

from __future__ import annotations

import hashlib
import math
import uuid
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr
from safetensors import safe_open

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.core.settings import S3Settings
from gristmill.core.storage.base import sha256_file
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from tests.support.tiny_model import minilm_path

pytestmark = pytest.mark.integration


async def test_import_minilm_into_s3(tmp_path: Path, s3_endpoint: dict[str, str]) -> None:
    source = minilm_path()
    s3 = S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )
    settings = RegistrySettings(data_dir=tmp_path, grpc_port=0, allow_local_paths=True)
    app = build_app(settings, Infrastructure(s3=s3), embedded_security("registry"))
    objects = app.host.platform.objects
    name = f"minilm-{uuid.uuid4().hex[:8]}"
    port = await app.host.start()
    imported = pb.BaseModel()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            imported = await stub.ImportBaseModel(
                pb.ImportBaseModelRequest(name=name, local_path=str(source), license="apache-2.0")
            )
            # The parameter count read from the header equals what the safetensors library counts.
            with safe_open(str(source / "model.safetensors"), "np") as weights:
                expected = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
            assert imported.parameter_count == expected
            assert imported.model_type == "bert" and list(imported.architectures) == ["BertModel"]
            assert common_pb2.TASK_TYPE_TEXT_CLASSIFICATION in imported.tasks
            assert imported.artifact_prefix == f"base-models/{name}/"
            local = {
                p.relative_to(source).as_posix(): sha256_file(p)
                for p in source.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
            }
            stored = {f.key.removeprefix(imported.artifact_prefix): f.sha256 for f in imported.files}
            assert stored == local  # every file, with its checksum; hidden files left out
            lines = "".join(f"{n}\t{local[n]}\n" for n in sorted(local))
            assert imported.content_sha256 == hashlib.sha256(lines.encode()).hexdigest()
            config = next(f for f in imported.files if f.key == imported.artifact_prefix + "config.json")
            assert objects.get_bytes(config.key, expected_sha256=config.sha256) == (source / "config.json").read_bytes()
            assert await stub.GetBaseModel(pb.GetBaseModelRequest(name=name)) == imported
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.ImportBaseModel(pb.ImportBaseModelRequest(name=name, local_path=str(source)))
            assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await app.host.stop()
        # ~90 MB per run in a bucket every developer shares: remove it.
        for ref in imported.files:
            objects.delete(ref.key)
