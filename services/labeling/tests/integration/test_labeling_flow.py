"""The labeling service over real gRPC, Kafka and S3: the issue's "done when" flow, end to end.

create project → import ../shared/data/sentiment/amazon_cells_labelled.txt → two simulated annotators
(one noisy) label through NextTask/SubmitAnnotation → agreement → consensus and adjudication → publish →
manifest and files in S3 with correct checksums → the event on Kafka, in the trace of the publish call.
"""

from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy.orm import Session

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.core.events import Event, KafkaEventBus
from gristmill.core.events.topics import DATASET_VERSION_PUBLISHED
from gristmill.core.host import ServiceHost
from gristmill.core.manifests import DatasetManifest
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.sql import Database
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.core.telemetry import extract_context
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration

DATA = Path(SHARED_DATA) / "sentiment" / "amazon_cells_labelled.txt"
# The file's first 500 reviews (two of them verbatim repeats): every step of the flow on real data, in half the
# time of the whole file's 1,000 (two annotators label every item over gRPC).
LINES = 500
NOISE = 0.15


class Published:
    """Collects this test's DatasetVersionPublished events from Kafka (the topic is shared: filter by key)."""

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        self.events: list[tuple[Event, events_pb2.DatasetVersionPublished]] = []
        self.seen = threading.Event()

    def __call__(self, event: Event, session: Session) -> None:
        if event.key == self.project_id:
            self.events.append((event, events_pb2.DatasetVersionPublished.FromString(event.payload)))
            self.seen.set()


async def test_import_label_agree_publish_on_kafka_and_s3(
    host: ServiceHost,
    tmp_path: Path,
    kafka_bootstrap: str,
    s3: S3Settings,
    tracing: tuple[TracerProvider, Any],
) -> None:
    provider, _ = tracing
    project_id = f"it-sentiment-{uuid.uuid4().hex[:8]}"
    published = Published(project_id)
    subscriber = KafkaEventBus(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), database=_database(tmp_path / "subscriber.db")
    )
    consumer = subscriber.subscribe(
        [DATASET_VERSION_PUBLISHED], f"labeling-it-{uuid.uuid4().hex[:8]}", published
    ).run_in_background()
    address = f"127.0.0.1:{host.server.port}"
    try:
        async with grpc.aio.insecure_channel(
            address, interceptors=aio_client_interceptors(tracer_provider=provider)
        ) as channel:
            stub = pb_grpc.LabelingServiceStub(channel)
            await _run_flow(stub, project_id, published, provider, s3)
    finally:
        consumer.stop()
        subscriber.close()


async def _run_flow(
    stub: pb_grpc.LabelingServiceStub,
    project_id: str,
    published: Published,
    provider: TracerProvider,
    s3: S3Settings,
) -> None:
    await stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project_id,
            display_name="Amazon cell phone reviews",
            task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            labels=[
                pb.LabelDefinition(name="0", description="negative"),
                pb.LabelDefinition(name="1", description="positive"),
            ],
            settings=pb.ProjectSettings(annotations_per_item=2),
        )
    )

    # The gold label column becomes metadata: the simulated annotators label the items themselves.
    options = pb.ImportOptions(
        project_id=project_id,
        format=pb.IMPORT_FORMAT_CSV,
        source_name=DATA.name,
        csv=pb.CsvOptions(delimiter="\t", column_names=["text", "gold"], disable_quoting=True),
    )
    data = b"".join(DATA.read_bytes().splitlines(keepends=True)[:LINES])
    chunks = [pb.ImportItemsRequest(options=options)]
    chunks += [pb.ImportItemsRequest(chunk=data[i : i + 16_384]) for i in range(0, len(data), 16_384)]
    report = await stub.ImportItems(iter(chunks))
    assert report.received_count == LINES
    # The file repeats some sentences verbatim or nearly: cleaning drops them and says why.
    assert report.accepted_count == LINES - report.dropped_exact_duplicate_count - report.dropped_near_duplicate_count
    assert LINES - 25 < report.accepted_count < LINES and report.dropped_exact_duplicate_count > 0

    # Two annotators: "sim-careful" gives the gold label, "sim-noisy" flips it 15% of the time.
    rng = random.Random(1234)
    given: dict[str, dict[str, str]] = {"sim-careful": {}, "sim-noisy": {}}
    for annotator, noise in (("sim-careful", 0.0), ("sim-noisy", NOISE)):
        while True:
            response = await stub.NextTask(pb.NextTaskRequest(project_id=project_id, annotator_id=annotator))
            if not response.HasField("task"):
                break
            task = response.task
            gold = task.item.metadata["gold"]
            label = ("1" if gold == "0" else "0") if rng.random() < noise else gold
            given[annotator][task.item.item_id] = label
            await stub.SubmitAnnotation(
                pb.SubmitAnnotationRequest(
                    project_id=project_id,
                    item_id=task.item.item_id,
                    annotator_id=annotator,
                    task_id=task.task_id,
                    labels=[label],
                )
            )
    careful, noisy = given["sim-careful"], given["sim-noisy"]
    assert set(careful) == set(noisy) and len(careful) == report.accepted_count

    agreement = await stub.GetAgreement(pb.GetAgreementRequest(project_id=project_id))
    assert agreement.item_count == report.accepted_count and agreement.annotator_count == 2
    (pair,) = agreement.pairs
    assert pair.cohen_kappa == pytest.approx(_cohen(careful, noisy), abs=1e-9)
    assert 0.55 < pair.cohen_kappa < 0.85  # ~0.7 expected for 15% random flips of balanced labels
    disagreements = sum(careful[i] != noisy[i] for i in careful)
    assert agreement.conflict_item_count == disagreements
    assert agreement.agreed_item_count == report.accepted_count - disagreements

    # Adjudication: a reviewer resolves every conflict with the gold label.
    conflicts = await _all_items(stub, project_id, [pb.ITEM_STATUS_CONFLICT])
    assert len(conflicts) == disagreements and all(item.consensus.tied for item in conflicts)
    for item in conflicts:
        await stub.ResolveItem(
            pb.ResolveItemRequest(
                project_id=project_id, item_id=item.item_id, reviewer_id="lead", labels=[careful[item.item_id]]
            )
        )
    project = await stub.GetProject(pb.GetProjectRequest(project_id=project_id))
    assert project.stats.labeled_item_count == report.accepted_count and project.stats.conflict_item_count == 0

    # Publish inside a client span: the event must carry this trace.
    tracer = trace.get_tracer("labeling-it", tracer_provider=provider)
    request = pb.PublishDatasetVersionRequest(
        project_id=project_id, ratios=pb.SplitRatios(train=0.8, validation=0.1, test=0.1), seed=42
    )
    with tracer.start_as_current_span("client publish") as span:
        response = await stub.PublishDatasetVersion(request)
    trace_id = span.get_span_context().trace_id
    version = response.dataset_version
    assert response.created and version.version_number == 1

    # The files in S3: manifest verified against the version's checksum, every split against the manifest.
    objects = S3ObjectStore(s3)
    manifest = DatasetManifest.from_json(
        objects.get_bytes(version.manifest.key, expected_sha256=version.manifest.sha256)
    )
    assert manifest.dataset_version_id == version.dataset_version_id and manifest.project_id == project_id
    total = 0
    for summary in version.splits:
        name = {1: "train", 2: "validation", 3: "test"}[summary.split]
        rows = list(manifest.read_rows(objects, name))  # raises on a checksum mismatch
        assert manifest.splits[name].file.sha256 == summary.file.sha256
        assert len(rows) == summary.item_count == manifest.splits[name].count
        assert all(row.label == careful[row.id] for row in rows)  # consensus and resolutions = gold here
        for label in ("0", "1"):
            count = sum(1 for row in rows if row.label == label)
            share = sum(1 for v in careful.values() if v == label) * {1: 0.8, 2: 0.1, 3: 0.1}[summary.split]
            assert abs(count - share) < 1, (name, label, count, share)
        total += len(rows)
    assert total == report.accepted_count

    # The event on Kafka, once, with the publish call's trace id.
    assert published.seen.wait(60), "DatasetVersionPublished never arrived on Kafka"
    event, message = published.events[0]
    assert message.dataset_version_id == version.dataset_version_id
    assert message.manifest.sha256 == version.manifest.sha256 and list(message.label_map.labels) == ["0", "1"]
    assert trace.get_current_span(extract_context(event.trace_headers)).get_span_context().trace_id == trace_id

    # Publishing again with nothing changed returns the same version and announces nothing.
    again = await stub.PublishDatasetVersion(request)
    assert not again.created and again.dataset_version.dataset_version_id == version.dataset_version_id
    chunks_out = [
        c
        async for c in stub.ExportDataset(
            pb.ExportDatasetRequest(project_id=project_id, dataset_version_id=version.dataset_version_id)
        )
    ]
    assert [c.file_name for c in chunks_out if c.last_chunk] == [
        "manifest.json",
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
    ]


def _cohen(a: dict[str, str], b: dict[str, str]) -> float:
    """Cohen's kappa computed independently of the service: (p_o - p_e) / (1 - p_e)."""
    n = len(a)
    p_o = sum(a[i] == b[i] for i in a) / n
    p_e = sum((sum(v == k for v in a.values()) / n) * (sum(v == k for v in b.values()) / n) for k in ("0", "1"))
    return (p_o - p_e) / (1 - p_e)


async def _all_items(stub: pb_grpc.LabelingServiceStub, project_id: str, statuses: list[Any]) -> list[pb.Item]:
    items: list[pb.Item] = []
    token = ""
    while True:
        page = await stub.ListItems(
            pb.ListItemsRequest(
                project_id=project_id, statuses=statuses, page=common_pb2.PageRequest(page_size=200, page_token=token)
            )
        )
        items += page.items
        token = page.next_page_token
        if not token:
            return items


def _database(path: Path) -> Database:
    db = Database(f"sqlite:///{path}")
    db.create_all()
    return db
