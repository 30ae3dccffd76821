"""Builders of the console's integration tests: the console in front of the real admin and labeling services
(API keys on, real Kafka and S3), with one project of 31 reviews (one of them hostile markup), for the HTTP and
the browser tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import SecretStr

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.console.app import ConsoleApp, build_app
from gristmill.console.settings import ConsoleSettings
from gristmill.core.auth import LABELING_READ, LABELING_WRITE, AuthSettings
from gristmill.core.host import Infrastructure
from gristmill.core.licensing import License
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.labeling.app import METHOD_SCOPES
from gristmill.labeling.app import build_app as build_labeling
from gristmill.labeling.settings import LabelingSettings
from services.admin.tests.support import ROOT, RunningAdmin, bearer, running_admin
from tests.conftest import SHARED_DATA

HOSTILE = '<script>alert("x")</script><img src=x onerror="alert(1)"> hostile review'


@dataclass
class Stack:
    admin: RunningAdmin
    labeling: pb_grpc.LabelingServiceStub
    console: ConsoleApp
    keys: dict[str, str]
    project_id: str


@asynccontextmanager
async def running_stack(tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]) -> AsyncIterator[Stack]:
    run = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    async with running_admin(tmp_path, kafka=kafka, metering_group=f"console-it-{run}") as admin:
        await admin.create_org("acme")
        await admin.create_org("globex")
        keys = {
            "writer": await admin.create_key("acme", LABELING_WRITE),
            "reader": await admin.create_key("acme", LABELING_READ),
            "other": await admin.create_key("globex", LABELING_WRITE),
        }
        auth = AuthSettings(admin_address=admin.address, root_organization_id=ROOT, cache_ttl_s=0)
        hook = build_auth_hook(auth, method_scopes=METHOD_SCOPES, embedded=False)
        s3 = S3Settings(
            endpoint=s3_endpoint["endpoint"],
            access_key=s3_endpoint["access_key"],
            secret_key=SecretStr(s3_endpoint["secret_key"]),
            bucket="gristmill-test",
        )
        settings = LabelingSettings(
            data_dir=tmp_path / "labeling",
            grpc_port=0,
            active_learning_group=f"console-it-al-{run}",
            feedback_group=f"console-it-fb-{run}",
        )
        labeling = build_labeling(settings, Infrastructure(kafka=kafka, s3=s3), Security(hook, License(), auth=auth))
        port = await labeling.host.start()
        console = build_app(
            ConsoleSettings(
                http_port=0, labeling_address=f"127.0.0.1:{port}", admin_address=admin.address, session_secret="t"
            )
        )
        await console.open()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.LabelingServiceStub(channel)
                project_id = await _project(stub, keys["writer"], f"reviews-{run}")
                yield Stack(admin, stub, console, keys, project_id)
        finally:
            await console.close()
            await labeling.host.stop()


async def _project(stub: pb_grpc.LabelingServiceStub, key: str, project_id: str) -> str:
    await stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project_id,
            display_name="Phone <b>reviews</b>",
            task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            labels=[pb.LabelDefinition(name="negative"), pb.LabelDefinition(name="positive")],
        ),
        metadata=bearer(key),
    )
    lines = (Path(SHARED_DATA) / "sentiment" / "amazon_cells_labelled.txt").read_text().splitlines()[:30]
    texts = [line.split("\t")[0] for line in lines] + [HOSTILE]
    options = pb.ImportOptions(
        project_id=project_id,
        format=pb.IMPORT_FORMAT_CSV,
        source_name="reviews.txt",
        csv=pb.CsvOptions(delimiter="\t", column_names=["text"], disable_quoting=True),
    )
    data = ("\n".join(texts) + "\n").encode()
    report = await stub.ImportItems(
        iter([pb.ImportItemsRequest(options=options), pb.ImportItemsRequest(chunk=data)]), metadata=bearer(key)
    )
    assert report.accepted_count >= 25, report
    return project_id
