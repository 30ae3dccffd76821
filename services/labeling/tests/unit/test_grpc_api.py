"""Every RPC over a real gRPC channel to the in-process host (SQLite, local objects, in-process bus):
the happy path, and bad input answered with the right status and a message a person can act on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.labeling.app import build_app
from gristmill.labeling.settings import LabelingSettings

CODE = grpc.StatusCode


@pytest.fixture
async def stub(tmp_path: Path, clock: Any) -> AsyncIterator[pb_grpc.LabelingServiceStub]:
    host = build_app(
        LabelingSettings(data_dir=tmp_path, grpc_port=0), Infrastructure(), embedded_security("labeling"), clock=clock
    ).host
    port = await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.LabelingServiceStub(channel)
    await host.stop()


async def _fails(call: Any, code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert match in (info.value.details() or ""), info.value.details()


async def _create(stub: pb_grpc.LabelingServiceStub, project_id: str = "p1", **settings: Any) -> pb.Project:
    return await stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project_id,
            display_name="Reviews",
            task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            labels=[pb.LabelDefinition(name="neg"), pb.LabelDefinition(name="pos")],
            settings=pb.ProjectSettings(**settings),
        )
    )


def _stream(options: pb.ImportOptions, payloads: Iterable[bytes | pb.ItemBatch]) -> list[pb.ImportItemsRequest]:
    messages = [pb.ImportItemsRequest(options=options)]
    for payload in payloads:
        if isinstance(payload, bytes):
            messages.append(pb.ImportItemsRequest(chunk=payload))
        else:
            messages.append(pb.ImportItemsRequest(items=payload))
    return messages


JSONL = pb.ImportOptions(project_id="p1", format=pb.IMPORT_FORMAT_JSONL)


async def _import(stub: pb_grpc.LabelingServiceStub, rows: str, **options: Any) -> pb.ImportReport:
    opts = pb.ImportOptions(project_id="p1", format=pb.IMPORT_FORMAT_JSONL, **options)
    data = rows.encode()
    return await stub.ImportItems(iter(_stream(opts, [data[:5], data[5:]])))


async def test_projects_and_schemas(stub: pb_grpc.LabelingServiceStub) -> None:
    created = await _create(stub)
    assert created.label_schema.version == 1 and created.settings.annotations_per_item == 1
    assert created.settings.lease_seconds == 600 and created.organization_id == "default"
    derived = await stub.CreateProject(
        pb.CreateProjectRequest(
            display_name="Support Tickets (EN)",
            task_type=common_pb2.TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION,
            labels=[pb.LabelDefinition(name="bug")],
        )
    )
    assert derived.project_id == "support-tickets-en"
    assert (await stub.GetProject(pb.GetProjectRequest(project_id="p1"))).display_name == "Reviews"
    page = await stub.ListProjects(pb.ListProjectsRequest(page=common_pb2.PageRequest(page_size=1)))
    assert [p.project_id for p in page.projects] == ["support-tickets-en"] and page.next_page_token
    rest = await stub.ListProjects(
        pb.ListProjectsRequest(page=common_pb2.PageRequest(page_size=1, page_token=page.next_page_token))
    )
    assert [p.project_id for p in rest.projects] == ["p1"] and not rest.next_page_token

    updated = await stub.UpdateProject(
        pb.UpdateProjectRequest(
            project_id="p1",
            project=pb.Project(
                description="new", settings=pb.ProjectSettings(task_ordering=pb.TASK_ORDERING_RANDOM, lease_seconds=5)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "settings.task_ordering"]),
        )
    )
    assert updated.description == "new" and updated.settings.task_ordering == pb.TASK_ORDERING_RANDOM
    assert updated.settings.lease_seconds == 600  # not in the mask: unchanged

    v2 = await stub.UpdateLabelSchema(
        pb.UpdateLabelSchemaRequest(
            project_id="p1", labels=[pb.LabelDefinition(name=n) for n in ("neg", "pos", "mixed")]
        )
    )
    assert v2.version == 2
    v1 = await stub.GetLabelSchema(pb.GetLabelSchemaRequest(project_id="p1", version=1))
    assert [label.name for label in v1.labels] == ["neg", "pos"]
    assert (await stub.GetLabelSchema(pb.GetLabelSchemaRequest(project_id="p1"))).version == 2
    listed = await stub.ListLabelSchemas(pb.ListLabelSchemasRequest(project_id="p1"))
    assert [s.version for s in listed.schemas] == [2, 1]


async def test_project_and_schema_bad_input(stub: pb_grpc.LabelingServiceStub) -> None:
    await _fails(_create(stub, "Bad Id!"), CODE.INVALID_ARGUMENT, "project_id 'Bad Id!' is not valid")
    bad_labels = pb.CreateProjectRequest(
        project_id="x", task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION, labels=[pb.LabelDefinition(name="only")]
    )
    await _fails(stub.CreateProject(bad_labels), CODE.INVALID_ARGUMENT, "at least 2 labels")
    later = pb.CreateProjectRequest(project_id="x", task_type=common_pb2.TASK_TYPE_TOKEN_CLASSIFICATION)
    await _fails(stub.CreateProject(later), CODE.INVALID_ARGUMENT, "not supported yet")
    await _fails(_create(stub, "x", annotations_per_item=-1), CODE.INVALID_ARGUMENT, "settings.annotations_per_item")
    await _create(stub)
    await _fails(_create(stub), CODE.ALREADY_EXISTS, "'p1' already exists")
    await _fails(stub.GetProject(pb.GetProjectRequest(project_id="ghost")), CODE.NOT_FOUND, "'ghost' does not exist")
    await _fails(
        stub.ListProjects(pb.ListProjectsRequest(page=common_pb2.PageRequest(page_token="garbage!"))),
        CODE.INVALID_ARGUMENT,
        "page_token is malformed",
    )
    await _fails(
        stub.ListProjects(pb.ListProjectsRequest(page=common_pb2.PageRequest(page_size=-1))),
        CODE.INVALID_ARGUMENT,
        "page_size must not be negative",
    )
    await _fails(
        stub.UpdateProject(pb.UpdateProjectRequest(project_id="p1")), CODE.INVALID_ARGUMENT, "update_mask is empty"
    )
    await _fails(
        stub.UpdateProject(
            pb.UpdateProjectRequest(project_id="p1", update_mask=field_mask_pb2.FieldMask(paths=["task_type"]))
        ),
        CODE.INVALID_ARGUMENT,
        "'task_type' cannot be changed here",
    )
    await _fails(
        stub.UpdateProject(
            pb.UpdateProjectRequest(
                project_id="p1",
                project=pb.Project(
                    settings=pb.ProjectSettings(cleaning=pb.CleaningSettings(near_duplicate_threshold=2))
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["settings.cleaning.near_duplicate_threshold"]),
            )
        ),
        CODE.INVALID_ARGUMENT,
        "near_duplicate_threshold must be in (0, 1]",
    )
    await _fails(
        stub.UpdateLabelSchema(
            pb.UpdateLabelSchemaRequest(
                project_id="p1", labels=[pb.LabelDefinition(name="a"), pb.LabelDefinition(name="a")]
            )
        ),
        CODE.INVALID_ARGUMENT,
        "appears twice",
    )
    await _fails(stub.GetLabelSchema(pb.GetLabelSchemaRequest(project_id="p1", version=7)), CODE.NOT_FOUND, "version 7")
    await _fails(stub.ListLabelSchemas(pb.ListLabelSchemasRequest(project_id="ghost")), CODE.NOT_FOUND, "ghost")


async def test_removing_a_used_label_is_a_failed_precondition(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _import(stub, '{"text": "good", "label": "pos"}\n')
    await _fails(
        stub.UpdateLabelSchema(
            pb.UpdateLabelSchemaRequest(
                project_id="p1", labels=[pb.LabelDefinition(name="neg"), pb.LabelDefinition(name="other")]
            )
        ),
        CODE.FAILED_PRECONDITION,
        "label 'pos' is used",
    )


async def test_imports_over_the_stream(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    report = await _import(
        stub, '{"id": "a", "text": "great  phone", "label": "pos"}\n{"id": "b", "text": "great phone"}\n'
    )
    assert (report.received_count, report.accepted_count, report.dropped_exact_duplicate_count) == (2, 1, 1)
    assert report.drops[0].reason == pb.DROP_REASON_EXACT_DUPLICATE and report.drops[0].line_number == 2
    items_options = pb.ImportOptions(project_id="p1", format=pb.IMPORT_FORMAT_ITEMS, existing_label_annotator_id="seed")
    batches = [
        pb.ItemBatch(
            items=[pb.ItemInput(external_id="c", text="broke in a day", labels=["neg"], metadata={"src": "web"})]
        ),
        pb.ItemBatch(items=[pb.ItemInput(text="call 0612 345 678 please")]),
    ]
    structured = await stub.ImportItems(iter(_stream(items_options, batches)))
    assert structured.accepted_count == 2 and structured.pii_masked_by_kind == {"PHONE": 1}
    assert (await stub.GetImport(pb.GetImportRequest(project_id="p1", import_id=report.import_id))) == report
    imports = await stub.ListImports(pb.ListImportsRequest(project_id="p1"))
    assert {i.import_id for i in imports.imports} == {report.import_id, structured.import_id}
    assert all(not i.drops for i in imports.imports)
    items = await stub.ListItems(pb.ListItemsRequest(project_id="p1", include_annotations=True))
    assert [i.external_id for i in items.items] == ["a", "c", f"{structured.import_id}-2"]
    assert items.items[1].metadata == {"src": "web"} and items.items[1].annotations[0].annotator_id == "seed"
    labeled = await stub.ListItems(pb.ListItemsRequest(project_id="p1", statuses=[pb.ITEM_STATUS_LABELED]))
    assert [i.external_id for i in labeled.items] == ["a", "c"]
    item = await stub.GetItem(pb.GetItemRequest(project_id="p1", item_id=items.items[2].item_id))
    assert item.text == "call [PHONE] please"


async def test_import_bad_input_stores_nothing(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _fails(
        stub.ImportItems(iter([pb.ImportItemsRequest(chunk=b"{}")])),
        CODE.INVALID_ARGUMENT,
        "first ImportItems message must carry options",
    )
    await _fails(
        stub.ImportItems(iter(_stream(JSONL, [pb.ItemBatch()]))), CODE.INVALID_ARGUMENT, "message 2 carries items"
    )
    await _fails(
        _import(stub, '{"text": "ok"}\n{"text": "x", "label": "maybe"}\n'),
        CODE.INVALID_ARGUMENT,
        "line 2, field 'label'",
    )
    unknown = pb.ImportOptions(project_id="ghost", format=pb.IMPORT_FORMAT_JSONL)
    await _fails(stub.ImportItems(iter(_stream(unknown, [b'{"text": "x"}']))), CODE.NOT_FOUND, "ghost")
    no_format = pb.ImportOptions(project_id="p1")
    await _fails(stub.ImportItems(iter(_stream(no_format, []))), CODE.INVALID_ARGUMENT, "options.format must be set")
    image = pb.ImportOptions(project_id="p1", format=pb.IMPORT_FORMAT_ITEMS)
    await _fails(
        stub.ImportItems(iter(_stream(image, [pb.ItemBatch(items=[pb.ItemInput(image_key="a/b.png")])]))),
        CODE.INVALID_ARGUMENT,
        "item 1: image items are not supported yet",
    )
    assert (await stub.GetProject(pb.GetProjectRequest(project_id="p1"))).stats.item_count == 0
    await _fails(
        stub.GetImport(pb.GetImportRequest(project_id="p1", import_id="0" * 32)), CODE.NOT_FOUND, "does not exist"
    )
    await _fails(stub.ListImports(pb.ListImportsRequest(project_id="ghost")), CODE.NOT_FOUND, "ghost")
    await _fails(stub.GetItem(pb.GetItemRequest(project_id="p1", item_id="0" * 32)), CODE.NOT_FOUND, "item")
    await _fails(
        stub.ListItems(pb.ListItemsRequest(project_id="p1", statuses=[99])), CODE.INVALID_ARGUMENT, "statuses[0]"
    )


async def test_import_from_object(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    options = pb.ImportOptions(project_id="p1", format=pb.IMPORT_FORMAT_JSONL)
    await _fails(
        stub.ImportItemsFromObject(
            pb.ImportItemsFromObjectRequest(options=options, object_key="uploads/missing.jsonl")
        ),
        CODE.NOT_FOUND,
        "does not exist",
    )
    await _fails(
        stub.ImportItemsFromObject(pb.ImportItemsFromObjectRequest(options=options, object_key="/abs/../x")),
        CODE.INVALID_ARGUMENT,
        "object key",
    )


async def test_tasks_annotations_agreement_and_review(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub, annotations_per_item=2)
    await _import(stub, '{"id": "a", "text": "first review here"}\n{"id": "b", "text": "second one over there"}\n')
    labels = {"ann-a": {"a": "pos", "b": "pos"}, "ann-b": {"a": "pos", "b": "neg"}}
    annotation_ids = {}
    for annotator, wanted in labels.items():
        while True:
            response = await stub.NextTask(
                pb.NextTaskRequest(project_id="p1", annotator_id=annotator, lease_seconds=30)
            )
            if not response.HasField("task"):
                break
            task = response.task
            note = await stub.SubmitAnnotation(
                pb.SubmitAnnotationRequest(
                    project_id="p1",
                    item_id=task.item.item_id,
                    annotator_id=annotator,
                    task_id=task.task_id,
                    labels=[wanted[task.item.external_id]],
                )
            )
            annotation_ids[(annotator, task.item.external_id)] = note.annotation_id
    agreement = await stub.GetAgreement(pb.GetAgreementRequest(project_id="p1"))
    assert (agreement.item_count, agreement.agreed_item_count, agreement.conflict_item_count) == (2, 1, 1)
    # p_o = 1/2; ann-a said pos twice, ann-b pos once: p_e = 1 * 1/2 + 0 * 1/2 = 1/2, so kappa = 0 (and set).
    assert agreement.pairs[0].HasField("cohen_kappa") and agreement.pairs[0].cohen_kappa == 0.0
    assert agreement.HasField("krippendorff_alpha")
    conflicts = await stub.ListItems(pb.ListItemsRequest(project_id="p1", statuses=[pb.ITEM_STATUS_CONFLICT]))
    (conflict,) = conflicts.items
    assert conflict.consensus.tied
    resolved = await stub.ResolveItem(
        pb.ResolveItemRequest(project_id="p1", item_id=conflict.item_id, reviewer_id="lead", labels=["neg"])
    )
    assert resolved.status == pb.ITEM_STATUS_RESOLVED and resolved.consensus.resolved_by == "lead"
    changed = await stub.UpdateAnnotation(
        pb.UpdateAnnotationRequest(
            project_id="p1", annotation_id=annotation_ids[("ann-a", "b")], annotator_id="ann-a", labels=["neg"]
        )
    )
    assert list(changed.labels) == ["neg"]


async def test_task_bad_input(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _import(stub, '{"id": "a", "text": "a review"}\n')
    await _fails(stub.NextTask(pb.NextTaskRequest(project_id="ghost", annotator_id="ann")), CODE.NOT_FOUND, "ghost")
    await _fails(
        stub.NextTask(pb.NextTaskRequest(project_id="p1", annotator_id="")),
        CODE.INVALID_ARGUMENT,
        "annotator_id must not be empty",
    )
    await _fails(
        stub.NextTask(pb.NextTaskRequest(project_id="p1", annotator_id="ann", lease_seconds=0)),
        CODE.INVALID_ARGUMENT,
        "lease_seconds",
    )
    task = (await stub.NextTask(pb.NextTaskRequest(project_id="p1", annotator_id="ann"))).task
    submit = pb.SubmitAnnotationRequest(
        project_id="p1", item_id=task.item.item_id, annotator_id="ann", labels=["maybe"]
    )
    await _fails(stub.SubmitAnnotation(submit), CODE.INVALID_ARGUMENT, "'maybe' is not a label")
    spans = pb.SubmitAnnotationRequest(
        project_id="p1",
        item_id=task.item.item_id,
        annotator_id="ann",
        labels=["pos"],
        spans=[pb.SpanLabel(start=0, end=1, label="pos")],
    )
    await _fails(stub.SubmitAnnotation(spans), CODE.INVALID_ARGUMENT, "span labels")
    good = pb.SubmitAnnotationRequest(project_id="p1", item_id=task.item.item_id, annotator_id="ann", labels=["pos"])
    first = await stub.SubmitAnnotation(good)
    # The same submission again is a retry whose first reply was lost: the same annotation, nothing added.
    assert (await stub.SubmitAnnotation(good)).annotation_id == first.annotation_id
    other = pb.SubmitAnnotationRequest(project_id="p1", item_id=task.item.item_id, annotator_id="ann", labels=["neg"])
    await _fails(stub.SubmitAnnotation(other), CODE.ALREADY_EXISTS, "use UpdateAnnotation")
    await _fails(
        stub.SubmitAnnotation(
            pb.SubmitAnnotationRequest(project_id="p1", item_id="0" * 32, annotator_id="ann", labels=["pos"])
        ),
        CODE.NOT_FOUND,
        "item",
    )
    await _fails(
        stub.UpdateAnnotation(
            pb.UpdateAnnotationRequest(project_id="p1", annotation_id="0" * 32, annotator_id="ann", labels=["pos"])
        ),
        CODE.NOT_FOUND,
        "annotation",
    )
    await _fails(
        stub.SkipTask(pb.SkipTaskRequest(project_id="p1", task_id="0" * 32, annotator_id="ann")), CODE.NOT_FOUND, "task"
    )
    await _fails(
        stub.SkipTask(pb.SkipTaskRequest(project_id="p1", task_id=task.task_id, annotator_id="someone-else")),
        CODE.FAILED_PRECONDITION,
        "leased to annotator 'ann'",
    )
    await _fails(
        stub.ResolveItem(
            pb.ResolveItemRequest(project_id="p1", item_id=task.item.item_id, reviewer_id="lead", labels=["maybe"])
        ),
        CODE.INVALID_ARGUMENT,
        "'maybe' is not a label",
    )
    await _fails(stub.GetAgreement(pb.GetAgreementRequest(project_id="ghost")), CODE.NOT_FOUND, "ghost")
    await _fails(
        stub.GetAgreement(pb.GetAgreementRequest(project_id="p1", annotator_ids=["NO!"])),
        CODE.INVALID_ARGUMENT,
        "annotator_ids[0]",
    )


async def test_skip_task_over_grpc(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _import(stub, '{"id": "a", "text": "a review"}\n')
    task = (await stub.NextTask(pb.NextTaskRequest(project_id="p1", annotator_id="ann"))).task
    await stub.SkipTask(
        pb.SkipTaskRequest(project_id="p1", task_id=task.task_id, annotator_id="ann", reason="ambiguous")
    )
    again = await stub.NextTask(pb.NextTaskRequest(project_id="p1", annotator_id="ann"))
    assert not again.HasField("task") and again.remaining_count == 0


async def test_renew_task_over_grpc(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _import(stub, '{"id": "a", "text": "a review"}\n')
    task = (await stub.NextTask(pb.NextTaskRequest(project_id="p1", annotator_id="ann"))).task
    renewed = await stub.RenewTask(
        pb.RenewTaskRequest(project_id="p1", task_id=task.task_id, annotator_id="ann", lease_seconds=3600)
    )
    assert renewed.lease_expire_time.ToSeconds() > task.lease_expire_time.ToSeconds()
    await _fails(
        stub.RenewTask(pb.RenewTaskRequest(project_id="p1", task_id=task.task_id, annotator_id="someone-else")),
        CODE.FAILED_PRECONDITION,
        "leased to annotator 'ann'",
    )
    await _fails(
        stub.RenewTask(pb.RenewTaskRequest(project_id="p1", task_id="0" * 32, annotator_id="ann")),
        CODE.NOT_FOUND,
        "task",
    )
    await _fails(
        stub.RenewTask(pb.RenewTaskRequest(project_id="p1", task_id=task.task_id, annotator_id="ann", lease_seconds=0)),
        CODE.INVALID_ARGUMENT,
        "lease_seconds",
    )


async def test_attach_predictions(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _import(stub, '{"id": "a", "text": "a review"}\n')
    prediction = pb.Prediction(
        model_name="clf", model_version=1, labels=["pos"], probabilities={"pos": 0.7, "neg": 0.3}
    )
    response = await stub.AttachPredictions(
        pb.AttachPredictionsRequest(
            project_id="p1", predictions=[pb.PredictionInput(external_id="a", prediction=prediction)]
        )
    )
    assert response.attached_count == 1
    bad = pb.Prediction(model_name="clf", model_version=1, labels=["pos"], probabilities={"pos": 1.7})
    await _fails(
        stub.AttachPredictions(
            pb.AttachPredictionsRequest(
                project_id="p1", predictions=[pb.PredictionInput(external_id="a", prediction=bad)]
            )
        ),
        CODE.INVALID_ARGUMENT,
        "outside [0, 1]",
    )
    await _fails(
        stub.AttachPredictions(
            pb.AttachPredictionsRequest(
                project_id="p1", predictions=[pb.PredictionInput(external_id="zz", prediction=prediction)]
            )
        ),
        CODE.NOT_FOUND,
        "external id 'zz'",
    )
    await _fails(
        stub.AttachPredictions(
            pb.AttachPredictionsRequest(project_id="p1", predictions=[pb.PredictionInput(prediction=prediction)])
        ),
        CODE.INVALID_ARGUMENT,
        "exactly one of item_id and external_id",
    )


async def test_dataset_versions(stub: pb_grpc.LabelingServiceStub) -> None:
    await _create(stub)
    await _fails(
        stub.PublishDatasetVersion(pb.PublishDatasetVersionRequest(project_id="p1")),
        CODE.FAILED_PRECONDITION,
        "no item with a consensus",
    )
    rows = "".join(
        f'{{"id": "e{i}", "text": "review {i} {"x" * i}", "label": "{"pos" if i % 2 else "neg"}"}}\n' for i in range(10)
    )
    await _import(stub, rows)
    await _fails(
        stub.PublishDatasetVersion(
            pb.PublishDatasetVersionRequest(project_id="p1", ratios=pb.SplitRatios(train=0.9, validation=0.2))
        ),
        CODE.INVALID_ARGUMENT,
        "must sum to 1",
    )
    request = pb.PublishDatasetVersionRequest(project_id="p1", seed=5, description="v1")
    published = await stub.PublishDatasetVersion(request)
    assert published.created and published.dataset_version.version_number == 1
    assert published.dataset_version.label_map.labels == ["neg", "pos"]
    again = await stub.PublishDatasetVersion(request)
    assert not again.created and again.dataset_version == published.dataset_version
    version_id = published.dataset_version.dataset_version_id
    got = await stub.GetDatasetVersion(pb.GetDatasetVersionRequest(project_id="p1", version_number=1))
    assert got.dataset_version_id == version_id
    listed = await stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(project_id="p1"))
    assert [v.dataset_version_id for v in listed.dataset_versions] == [version_id]
    chunks = [
        c async for c in stub.ExportDataset(pb.ExportDatasetRequest(project_id="p1", dataset_version_id=version_id))
    ]
    assert [c.file_name for c in chunks if c.last_chunk] == [
        "manifest.json",
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
    ]
    assert sum(c.data.count(b"\n") for c in chunks if c.file_name.endswith(".jsonl")) == 10
    await _fails(
        stub.GetDatasetVersion(pb.GetDatasetVersionRequest(project_id="p1", version_number=9)),
        CODE.NOT_FOUND,
        "number 9",
    )
    await _fails(
        stub.GetDatasetVersion(pb.GetDatasetVersionRequest(project_id="p1")),
        CODE.INVALID_ARGUMENT,
        "set dataset_version_id",
    )
    await _fails(stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(project_id="ghost")), CODE.NOT_FOUND, "ghost")

    async def export(request: pb.ExportDatasetRequest) -> list[pb.ExportDatasetChunk]:
        return [c async for c in stub.ExportDataset(request)]

    await _fails(
        export(pb.ExportDatasetRequest(project_id="p1", dataset_version_id="0" * 32)), CODE.NOT_FOUND, "does not exist"
    )
    await _fails(
        export(pb.ExportDatasetRequest(project_id="p1", dataset_version_id=version_id, splits=[7])),
        CODE.INVALID_ARGUMENT,
        "splits[0]",
    )


async def test_a_project_masks_the_pii_kinds_it_names_and_refuses_unknown_ones(
    stub: pb_grpc.LabelingServiceStub,
) -> None:
    only_email = pb.CleaningSettings(pii=pb.PiiSettings(kinds=[pb.PII_KIND_EMAIL]))
    created = await _create(stub, cleaning=only_email)
    assert list(created.settings.cleaning.pii.kinds) == [pb.PII_KIND_EMAIL]
    fetched = await stub.GetProject(pb.GetProjectRequest(project_id="p1"))
    assert list(fetched.settings.cleaning.pii.kinds) == [pb.PII_KIND_EMAIL]
    report = await _import(stub, '{"id": "a", "text": "mail ann@example.com or call 0612 345 678"}\n')
    assert report.pii_masked_by_kind == {"EMAIL": 1}
    item = (await stub.ListItems(pb.ListItemsRequest(project_id="p1"))).items[0]
    assert "ann@example.com" not in item.text and "0612 345 678" in item.text
    # Not a kind (unspecified, or a number the API does not define): refused, and no project is created.
    for kind in (pb.PII_KIND_UNSPECIFIED, 99):
        await _fails(
            _create(stub, "p2", cleaning=pb.CleaningSettings(pii=pb.PiiSettings(kinds=[kind]))),
            CODE.INVALID_ARGUMENT,
            "is not a PII kind; use one of PII_KIND_EMAIL",
        )
    await _fails(stub.GetProject(pb.GetProjectRequest(project_id="p2")), CODE.NOT_FOUND, "p2")
