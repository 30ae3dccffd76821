"""The LabelingService gRPC servicer: validate → proto→domain → domain (in a thread) → domain→proto.

Errors are ``gristmill.core.errors`` classes raised by the domain or here; the shared interceptor turns
them into statuses. Every call acts for the caller's organisation (its API key's; the default one when auth
is off in the embedded dev mode): another organisation's project answers exactly like a missing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import field_mask_pb2

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.core.auth import current_organization
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.paging import Page, fingerprint, page_request
from gristmill.labeling.api import convert
from gristmill.labeling.domain.importer import ImportSession
from gristmill.labeling.domain.model import ImportFormat, ImportReport
from gristmill.labeling.domain.service import LabelingService

_TOP_LEVEL_PATHS = ("display_name", "description", "settings")


class LabelingServicer(pb_grpc.LabelingServiceServicer):
    def __init__(self, service: LabelingService) -> None:
        self.service = service

    # ------------------------------------------------------------------------- projects and schemas

    async def CreateProject(self, request: pb.CreateProjectRequest, context: Any) -> pb.Project:
        project = await asyncio.to_thread(
            self.service.create_project,
            current_organization(),
            project_id=request.project_id,
            display_name=request.display_name,
            description=request.description,
            task_type=convert.task_type_in(request.task_type),
            labels=convert.labels_in(request.labels),
            settings=convert.settings_in(request.settings),
        )
        return convert.project_out(project)

    async def GetProject(self, request: pb.GetProjectRequest, context: Any) -> pb.Project:
        return convert.project_out(
            await asyncio.to_thread(self.service.get_project, current_organization(), request.project_id)
        )

    async def ListProjects(self, request: pb.ListProjectsRequest, context: Any) -> pb.ListProjectsResponse:
        page = _page(request.page, "projects")
        rows = await asyncio.to_thread(
            self.service.list_projects, current_organization(), offset=page.offset, limit=page.fetch_limit()
        )
        projects, token = page.finish(rows)
        return pb.ListProjectsResponse(projects=[convert.project_out(p) for p in projects], next_page_token=token)

    async def UpdateProject(self, request: pb.UpdateProjectRequest, context: Any) -> pb.Project:
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgumentError(
                "update_mask is empty: name the fields to change (display_name, description, settings or a "
                "settings sub-field such as settings.task_ordering)"
            )
        for path in paths:
            if path.split(".", 1)[0] not in _TOP_LEVEL_PATHS or not field_mask_pb2.FieldMask(
                paths=[path]
            ).IsValidForDescriptor(pb.Project.DESCRIPTOR):
                raise InvalidArgumentError(
                    f"update_mask: {path!r} cannot be changed here; allowed: display_name, description, settings, "
                    "settings.<field> (task type and labels: see UpdateLabelSchema)"
                )
        current = await asyncio.to_thread(self.service.get_project, current_organization(), request.project_id)
        merged = convert.project_out(current)
        request.update_mask.MergeMessage(
            request.project, merged, replace_message_field=True, replace_repeated_field=True
        )
        touched = {path.split(".", 1)[0] for path in paths}
        project = await asyncio.to_thread(
            self.service.update_project,
            current_organization(),
            request.project_id,
            display_name=merged.display_name if "display_name" in touched else None,
            description=merged.description if "description" in touched else None,
            settings=convert.settings_in(merged.settings) if "settings" in touched else None,
        )
        return convert.project_out(project)

    async def UpdateLabelSchema(self, request: pb.UpdateLabelSchemaRequest, context: Any) -> pb.LabelSchema:
        schema = await asyncio.to_thread(
            self.service.update_label_schema,
            current_organization(),
            request.project_id,
            convert.labels_in(request.labels),
        )
        return convert.schema_out(schema)

    async def GetLabelSchema(self, request: pb.GetLabelSchemaRequest, context: Any) -> pb.LabelSchema:
        version = request.version if request.HasField("version") else None
        return convert.schema_out(
            await asyncio.to_thread(self.service.get_label_schema, current_organization(), request.project_id, version)
        )

    async def ListLabelSchemas(self, request: pb.ListLabelSchemasRequest, context: Any) -> pb.ListLabelSchemasResponse:
        page = _page(request.page, "schemas", request.project_id)
        rows = await asyncio.to_thread(
            self.service.list_label_schemas,
            current_organization(),
            request.project_id,
            offset=page.offset,
            limit=page.fetch_limit(),
        )
        schemas, token = page.finish(rows)
        return pb.ListLabelSchemasResponse(schemas=[convert.schema_out(s) for s in schemas], next_page_token=token)

    # ------------------------------------------------------------------------- imports

    async def ImportItems(
        self, request_iterator: AsyncIterator[pb.ImportItemsRequest], context: Any
    ) -> pb.ImportReport:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "options":
            raise InvalidArgumentError("the first ImportItems message must carry options (project, format)")
        options = convert.import_options_in(first.options)
        started = await asyncio.to_thread(self.service.begin_import, current_organization(), options)
        if isinstance(started, ImportReport):
            # A retry of a finished import: read what the client sends, store nothing, answer the same.
            async for _ in request_iterator:
                pass
            return convert.report_out(started)
        try:
            await self._feed(started, request_iterator)
        except BaseException:
            started.close()
            raise
        return convert.report_out(await asyncio.to_thread(self.service.finish_import, started))

    async def _feed(self, session: ImportSession, messages: AsyncIterator[pb.ImportItemsRequest]) -> None:
        items_format = session.options.format is ImportFormat.ITEMS
        expected = "items" if items_format else "chunk"
        number = 1
        async for message in messages:
            number += 1
            kind = message.WhichOneof("payload")
            if kind != expected:
                raise InvalidArgumentError(
                    f"message {number} carries {kind or 'nothing'}, but an import of format "
                    f"{session.options.format.value} takes only {expected} after the first message"
                )
            if items_format:
                await asyncio.to_thread(self._feed_items, session, message.items)
            else:
                await asyncio.to_thread(session.feed_chunk, message.chunk)

    @staticmethod
    def _feed_items(session: ImportSession, batch: pb.ItemBatch) -> None:
        builder = session.builder
        records = []
        for entry in batch.items:
            index = builder.count + 1
            content = entry.WhichOneof("content")
            if content == "image_key":
                raise InvalidArgumentError(f"item {index}: image items are not supported yet (text projects only)")
            if content == "conversation":
                if not builder.generative:
                    raise InvalidArgumentError(
                        f"item {index}: a conversation goes into a chat or preference project; this project "
                        "classifies texts"
                    )
                if entry.labels:
                    raise InvalidArgumentError(
                        f"item {index}, field 'labels': chat and preference items have no labels"
                    )
                conversation = convert.conversation_in(entry.conversation)
                records.append(
                    builder.build_conversation(
                        index, entry.external_id.strip(), conversation, (), dict(entry.metadata), "items"
                    )
                )
                continue
            text = entry.text if content == "text" else None
            records.append(
                builder.build(index, entry.external_id.strip(), text, tuple(entry.labels), dict(entry.metadata))
            )
        session.feed_records(records)

    async def ImportItemsFromObject(self, request: pb.ImportItemsFromObjectRequest, context: Any) -> pb.ImportReport:
        options = convert.import_options_in(request.options)
        report = await asyncio.to_thread(
            self.service.import_from_object, current_organization(), options, request.object_key
        )
        return convert.report_out(report)

    async def GetImport(self, request: pb.GetImportRequest, context: Any) -> pb.ImportReport:
        report = await asyncio.to_thread(
            self.service.get_import, current_organization(), request.project_id, request.import_id
        )
        return convert.report_out(report)

    async def ListImports(self, request: pb.ListImportsRequest, context: Any) -> pb.ListImportsResponse:
        page = _page(request.page, "imports", request.project_id)
        rows = await asyncio.to_thread(
            self.service.list_imports,
            current_organization(),
            request.project_id,
            offset=page.offset,
            limit=page.fetch_limit(),
        )
        reports, token = page.finish(rows)
        return pb.ListImportsResponse(imports=[convert.report_out(r) for r in reports], next_page_token=token)

    # ------------------------------------------------------------------------- items, tasks, annotations

    async def GetItem(self, request: pb.GetItemRequest, context: Any) -> pb.Item:
        return convert.item_out(
            await asyncio.to_thread(self.service.get_item, current_organization(), request.project_id, request.item_id)
        )

    async def ListItems(self, request: pb.ListItemsRequest, context: Any) -> pb.ListItemsResponse:
        statuses = convert.statuses_in(request.statuses)
        source = convert.source_in(request.source)
        page = _page(
            request.page,
            "items",
            request.project_id,
            sorted(s.value for s in statuses),
            source,
            request.include_annotations,
        )
        rows = await asyncio.to_thread(
            self.service.list_items,
            current_organization(),
            request.project_id,
            statuses=statuses,
            source=source,
            include_annotations=request.include_annotations,
            offset=page.offset,
            limit=page.fetch_limit(),
        )
        items, token = page.finish(rows)
        return pb.ListItemsResponse(items=[convert.item_out(i) for i in items], next_page_token=token)

    async def NextTask(self, request: pb.NextTaskRequest, context: Any) -> pb.NextTaskResponse:
        lease = request.lease_seconds if request.HasField("lease_seconds") else None
        task, remaining = await asyncio.to_thread(
            self.service.next_task, current_organization(), request.project_id, request.annotator_id, lease
        )
        response = pb.NextTaskResponse(remaining_count=remaining)
        if task is not None:
            response.task.CopyFrom(convert.task_out(task))
        return response

    async def SubmitAnnotation(self, request: pb.SubmitAnnotationRequest, context: Any) -> pb.Annotation:
        annotation = await asyncio.to_thread(
            self.service.submit_annotation,
            current_organization(),
            request.project_id,
            request.item_id,
            request.annotator_id,
            task_id=request.task_id,
            labels=list(request.labels),
            spans=convert.spans_in(request.spans),
            comment=request.comment,
            response=convert.response_in(request.response),
        )
        return convert.annotation_out(annotation)

    async def UpdateAnnotation(self, request: pb.UpdateAnnotationRequest, context: Any) -> pb.Annotation:
        annotation = await asyncio.to_thread(
            self.service.update_annotation,
            current_organization(),
            request.project_id,
            request.annotation_id,
            request.annotator_id,
            labels=list(request.labels),
            spans=convert.spans_in(request.spans),
            comment=request.comment,
            response=convert.response_in(request.response),
        )
        return convert.annotation_out(annotation)

    async def SkipTask(self, request: pb.SkipTaskRequest, context: Any) -> pb.SkipTaskResponse:
        await asyncio.to_thread(
            self.service.skip_task,
            current_organization(),
            request.project_id,
            request.task_id,
            request.annotator_id,
            request.reason,
        )
        return pb.SkipTaskResponse()

    async def RenewTask(self, request: pb.RenewTaskRequest, context: Any) -> pb.RenewTaskResponse:
        expire = await asyncio.to_thread(
            self.service.renew_task,
            current_organization(),
            request.project_id,
            request.task_id,
            request.annotator_id,
            request.lease_seconds if request.HasField("lease_seconds") else None,
        )
        response = pb.RenewTaskResponse()
        response.lease_expire_time.FromDatetime(expire)
        return response

    async def AttachPredictions(
        self, request: pb.AttachPredictionsRequest, context: Any
    ) -> pb.AttachPredictionsResponse:
        inputs = convert.prediction_inputs_in(request.predictions)
        count = await asyncio.to_thread(
            self.service.attach_predictions, current_organization(), request.project_id, inputs
        )
        return pb.AttachPredictionsResponse(attached_count=count)

    async def GetAgreement(self, request: pb.GetAgreementRequest, context: Any) -> pb.AgreementReport:
        report = await asyncio.to_thread(
            self.service.get_agreement, current_organization(), request.project_id, list(request.annotator_ids)
        )
        return convert.agreement_out(report)

    async def ResolveItem(self, request: pb.ResolveItemRequest, context: Any) -> pb.Item:
        item = await asyncio.to_thread(
            self.service.resolve_item,
            current_organization(),
            request.project_id,
            request.item_id,
            request.reviewer_id,
            list(request.labels),
            request.comment,
            convert.response_in(request.response),
        )
        return convert.item_out(item)

    # ------------------------------------------------------------------------- dataset versions

    async def PublishDatasetVersion(
        self, request: pb.PublishDatasetVersionRequest, context: Any
    ) -> pb.PublishDatasetVersionResponse:
        version, created = await asyncio.to_thread(
            self.service.publish_dataset_version,
            current_organization(),
            request.project_id,
            ratios=convert.ratios_in(request.ratios),
            seed=request.seed,
            strategy=convert.strategy_in(request.split_strategy),
            description=request.description,
        )
        return pb.PublishDatasetVersionResponse(dataset_version=convert.dataset_version_out(version), created=created)

    async def GetDatasetVersion(self, request: pb.GetDatasetVersionRequest, context: Any) -> pb.DatasetVersion:
        which = request.WhichOneof("version")
        version = await asyncio.to_thread(
            self.service.get_dataset_version,
            current_organization(),
            request.project_id,
            dataset_version_id=request.dataset_version_id if which == "dataset_version_id" else "",
            version_number=request.version_number if which == "version_number" else 0,
        )
        return convert.dataset_version_out(version)

    async def ListDatasetVersions(
        self, request: pb.ListDatasetVersionsRequest, context: Any
    ) -> pb.ListDatasetVersionsResponse:
        page = _page(request.page, "versions", request.project_id)
        rows = await asyncio.to_thread(
            self.service.list_dataset_versions,
            current_organization(),
            request.project_id,
            offset=page.offset,
            limit=page.fetch_limit(),
        )
        versions, token = page.finish(rows)
        return pb.ListDatasetVersionsResponse(
            dataset_versions=[convert.dataset_version_out(v) for v in versions], next_page_token=token
        )

    async def ExportDataset(
        self, request: pb.ExportDatasetRequest, context: Any
    ) -> AsyncIterator[pb.ExportDatasetChunk]:
        splits = convert.splits_in(request.splits)
        chunks = await asyncio.to_thread(
            self.service.export_dataset, current_organization(), request.project_id, request.dataset_version_id, splits
        )
        while True:
            # Reading an object blocks: each step runs in a thread.
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield pb.ExportDatasetChunk(
                file_name=chunk.file_name,
                data=chunk.data,
                last_chunk=chunk.last_chunk,
                sha256=chunk.sha256,
                size_bytes=chunk.size_bytes,
            )


def _page(request: common_pb2.PageRequest, kind: str, *query: object) -> Page:
    """The page a List request asks for; ``query`` (project id, filters) is what its token is bound to."""
    return page_request(request.page_size, request.page_token, fingerprint(kind, [str(part) for part in query]))
