"""A registry served over real gRPC (in-process platform, port 0) and a client for the API tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.registry.app import RegistryApp
from services.registry.tests.support import SIGNATURE, upload_model

SIG = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(**t) for t in SIGNATURE["inputs"]],
    outputs=[common_pb2.TensorSpec(**t) for t in SIGNATURE["outputs"]],
)
TEST = common_pb2.DATASET_SPLIT_TEST


@dataclass
class Api:
    app: RegistryApp
    stub: pb_grpc.RegistryServiceStub
    tmp: Path

    def upload(self, prefix: str, **kwargs: Any) -> common_pb2.ObjectRef:
        ref = upload_model(self.app.host.platform.objects, prefix, **kwargs)
        return common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)

    async def register(
        self, model: str, prefix: str, *, accuracy: float = 0.9, wait: bool = True, job: str = "", **kwargs: Any
    ) -> pb.ModelVersion:
        request = pb.RegisterModelVersionRequest(
            registered_model_name=model,
            create_model_if_missing=True,
            source_prefix=prefix,
            manifest=self.upload(prefix, **kwargs),
            signature=SIG,
            task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
            metrics=[common_pb2.Metric(name="accuracy", value=accuracy, split=TEST)],
            lineage=common_pb2.Lineage(training_job_id=job),
            tags={"source": prefix},
            wait_for_verification=wait,
        )
        version: pb.ModelVersion = await self.stub.RegisterModelVersion(request)
        return version


async def fails(call: Any, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert message in (info.value.details() or ""), info.value.details()
