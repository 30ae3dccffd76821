"""The RegistryService servicer: validate → proto→domain → domain (in a thread) → domain→proto.

Every rule lives in ``gristmill.registry.domain``; errors are ``gristmill.core.errors`` classes that the
shared interceptor turns into statuses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from google.protobuf.empty_pb2 import Empty

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.auth import current_principal
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.values import Signature
from gristmill.registry.api import convert
from gristmill.registry.domain.model import Caller, ModelQuery, ModelVersion, VersionDraft, VersionQuery
from gristmill.registry.domain.registration import Registration
from gristmill.registry.domain.services import RegistryServices

log = logging.getLogger(__name__)


def caller_of(context: Any) -> Caller:
    """Who is calling: the API key's organisation, and ``key/<id>`` for history (the one place the auth
    hook's identity is read). With auth off (embedded dev mode) the caller is anonymous in the default
    organisation."""
    principal = current_principal()
    return Caller(actor=principal.actor, organization_id=principal.organization_id)


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, services: RegistryServices) -> None:
        self.catalog = services.catalog
        self.registrations = services.registrations
        self.promotions = services.promotions
        self.cards = services.cards
        self.base_models = services.base_models
        # Verifications started by RegisterModelVersion(wait_for_verification=false), kept so they are not
        # garbage-collected mid-flight; a restart resumes whatever was PENDING.
        self._background: set[asyncio.Task[ModelVersion]] = set()

    # -- registered models ---------------------------------------------------------------------------------

    async def CreateRegisteredModel(self, request: pb.CreateRegisteredModelRequest, context: Any) -> pb.RegisteredModel:
        model = await asyncio.to_thread(
            self.catalog.create_model,
            caller_of(context),
            name=request.name,
            description=request.description,
            task=convert.task_from_proto(request.task),
            label_map=tuple(request.label_map.labels),
            tags=dict(request.tags),
        )
        return convert.model_to_proto(model)

    async def GetRegisteredModel(self, request: pb.GetRegisteredModelRequest, context: Any) -> pb.RegisteredModel:
        model = await asyncio.to_thread(self.catalog.get_model, caller_of(context), request.name)
        return convert.model_to_proto(model)

    async def SearchRegisteredModels(
        self, request: pb.SearchRegisteredModelsRequest, context: Any
    ) -> pb.SearchRegisteredModelsResponse:
        task = convert.task_from_proto(request.task)
        query = ModelQuery(
            name_prefix=request.name_prefix,
            tags=dict(request.tags),
            has_alias=request.has_alias,
            task="" if task == "TASK_TYPE_UNSPECIFIED" else task,
        )
        items, token = await asyncio.to_thread(
            self.catalog.search_models, caller_of(context), query, request.page.page_size, request.page.page_token
        )
        return pb.SearchRegisteredModelsResponse(
            registered_models=[convert.model_to_proto(m) for m in items], next_page_token=token
        )

    async def UpdateRegisteredModel(self, request: pb.UpdateRegisteredModelRequest, context: Any) -> pb.RegisteredModel:
        new = request.registered_model
        model = await asyncio.to_thread(
            self.catalog.update_model,
            caller_of(context),
            request.name,
            list(request.update_mask.paths),
            description=new.description,
            tags=dict(new.tags),
            label_map=tuple(new.label_map.labels),
        )
        return convert.model_to_proto(model)

    # -- versions ------------------------------------------------------------------------------------------

    async def RegisterModelVersion(self, request: pb.RegisterModelVersionRequest, context: Any) -> pb.ModelVersion:
        registration = Registration(
            model_name=request.registered_model_name,
            create_model_if_missing=request.create_model_if_missing,
            draft=VersionDraft(
                source_prefix=request.source_prefix,
                source_manifest=convert.file_from_proto(request.manifest),
                signature=_signature(request),
                task=convert.task_from_proto(request.task),
                label_map=tuple(request.label_map.labels),
                metrics=tuple(convert.metric_from_proto(m) for m in request.metrics),
                lineage=convert.lineage_from_proto(request.lineage),
                description=request.description,
                tags=dict(request.tags),
            ),
        )
        version, needs = await asyncio.to_thread(
            self.registrations.register_version, caller_of(context), registration, wait=request.wait_for_verification
        )
        if needs:
            task = asyncio.create_task(asyncio.to_thread(self.registrations.verify_and_finish, version))
            self._background.add(task)
            task.add_done_callback(self._verification_done)
        return convert.version_to_proto(version)

    def _verification_done(self, task: asyncio.Task[ModelVersion]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The version stays PENDING and is verified again at the next start.
            log.warning("background verification failed: %s", task.exception())

    async def drain(self) -> None:
        """Wait for background verifications (tests and shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context: Any) -> pb.ModelVersion:
        version, alias = convert.selector(request.selector)
        found = await asyncio.to_thread(
            self.catalog.get_version, caller_of(context), request.registered_model_name, version=version, alias=alias
        )
        return convert.version_to_proto(found)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Any
    ) -> pb.ListModelVersionsResponse:
        query = VersionQuery(
            statuses=tuple(convert.status_from_proto(s) for s in request.statuses),
            tags=dict(request.tags),
            alias=request.alias,
            metric_filters=tuple(convert.metric_filter_from_proto(f) for f in request.metric_filters),
        )
        items, token = await asyncio.to_thread(
            self.catalog.list_versions,
            caller_of(context),
            request.registered_model_name,
            query,
            request.page.page_size,
            request.page.page_token,
        )
        return pb.ListModelVersionsResponse(
            model_versions=[convert.version_to_proto(v) for v in items], next_page_token=token
        )

    async def UpdateModelVersion(self, request: pb.UpdateModelVersionRequest, context: Any) -> pb.ModelVersion:
        version = await asyncio.to_thread(
            self.catalog.update_version,
            caller_of(context),
            request.registered_model_name,
            request.version,
            list(request.update_mask.paths),
            description=request.model_version.description,
            tags=dict(request.model_version.tags),
        )
        return convert.version_to_proto(version)

    # -- aliases -------------------------------------------------------------------------------------------

    async def SetAlias(self, request: pb.SetAliasRequest, context: Any) -> pb.SetAliasResponse:
        expected = request.expected_current_version if request.HasField("expected_current_version") else None
        change, changed = await asyncio.to_thread(
            self.promotions.set_alias,
            caller_of(context),
            request.registered_model_name,
            request.alias,
            request.version,
            reason=request.reason,
            expected=expected,
        )
        response = pb.SetAliasResponse(changed=changed)
        if change is not None:
            response.change.CopyFrom(convert.change_to_proto(change))
        return response

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: Any) -> pb.AliasChange:
        expected = request.expected_current_version if request.HasField("expected_current_version") else None
        change = await asyncio.to_thread(
            self.promotions.delete_alias,
            caller_of(context),
            request.registered_model_name,
            request.alias,
            reason=request.reason,
            expected=expected,
        )
        return convert.change_to_proto(change)

    async def GetAliasHistory(self, request: pb.GetAliasHistoryRequest, context: Any) -> pb.GetAliasHistoryResponse:
        items, token = await asyncio.to_thread(
            self.promotions.alias_history,
            caller_of(context),
            request.registered_model_name,
            request.alias,
            request.page.page_size,
            request.page.page_token,
        )
        return pb.GetAliasHistoryResponse(changes=[convert.change_to_proto(c) for c in items], next_page_token=token)

    # -- promotion policies --------------------------------------------------------------------------------

    async def SetPromotionPolicy(self, request: pb.SetPromotionPolicyRequest, context: Any) -> pb.PromotionPolicy:
        if not request.HasField("policy"):
            raise InvalidArgumentError("policy is required")
        policy = await asyncio.to_thread(
            self.promotions.set_policy, caller_of(context), convert.policy_from_proto(request.policy)
        )
        return convert.policy_to_proto(policy)

    async def GetPromotionPolicy(self, request: pb.GetPromotionPolicyRequest, context: Any) -> pb.PromotionPolicy:
        policy = await asyncio.to_thread(self.promotions.get_policy, caller_of(context), request.registered_model_name)
        return convert.policy_to_proto(policy)

    async def DeletePromotionPolicy(self, request: pb.DeletePromotionPolicyRequest, context: Any) -> Empty:
        await asyncio.to_thread(self.promotions.delete_policy, caller_of(context), request.registered_model_name)
        return Empty()

    async def ListPendingPromotions(
        self, request: pb.ListPendingPromotionsRequest, context: Any
    ) -> pb.ListPendingPromotionsResponse:
        items, token = await asyncio.to_thread(
            self.promotions.list_pending,
            caller_of(context),
            request.registered_model_name,
            request.include_decided,
            request.page.page_size,
            request.page.page_token,
        )
        return pb.ListPendingPromotionsResponse(
            promotions=[convert.promotion_to_proto(p) for p in items], next_page_token=token
        )

    async def ApprovePromotion(self, request: pb.ApprovePromotionRequest, context: Any) -> pb.PendingPromotion:
        promotion = await asyncio.to_thread(
            self.promotions.approve, caller_of(context), request.promotion_id, request.reason
        )
        return convert.promotion_to_proto(promotion)

    async def RejectPromotion(self, request: pb.RejectPromotionRequest, context: Any) -> pb.PendingPromotion:
        promotion = await asyncio.to_thread(
            self.promotions.reject, caller_of(context), request.promotion_id, request.reason
        )
        return convert.promotion_to_proto(promotion)

    # -- model cards ---------------------------------------------------------------------------------------

    async def GetModelCard(self, request: pb.GetModelCardRequest, context: Any) -> pb.ModelCard:
        version, alias = convert.selector(request.selector)
        card = await asyncio.to_thread(
            self.cards.get_card, caller_of(context), request.registered_model_name, version=version, alias=alias
        )
        return convert.card_to_proto(card)

    async def UpdateModelCard(self, request: pb.UpdateModelCardRequest, context: Any) -> pb.ModelCard:
        card = await asyncio.to_thread(
            self.cards.update_card,
            caller_of(context),
            request.registered_model_name,
            request.version,
            list(request.update_mask.paths),
            convert.card_text_from_proto(request.model_card),
        )
        return convert.card_to_proto(card)

    # -- base models ---------------------------------------------------------------------------------------

    async def ImportBaseModel(self, request: pb.ImportBaseModelRequest, context: Any) -> pb.BaseModel:
        source = request.WhichOneof("source")
        base = await asyncio.to_thread(
            self.base_models.import_base_model,
            caller_of(context),
            request.name,
            local_path=request.local_path if source == "local_path" else None,
            object_prefix=request.object_prefix if source == "object_prefix" else None,
            gguf_file=request.gguf_file if source == "gguf_file" else None,
            gguf_object_key=request.gguf_object_key if source == "gguf_object_key" else None,
            license=request.license,
            description=request.description,
            tasks=tuple(convert.task_from_proto(t) for t in request.tasks),
        )
        return convert.base_model_to_proto(base)

    async def ListBaseModels(self, request: pb.ListBaseModelsRequest, context: Any) -> pb.ListBaseModelsResponse:
        items, token = await asyncio.to_thread(
            self.base_models.list_base_models,
            caller_of(context),
            convert.task_from_proto(request.task),
            request.page.page_size,
            request.page.page_token,
        )
        return pb.ListBaseModelsResponse(
            base_models=[convert.base_model_to_proto(b) for b in items], next_page_token=token
        )

    async def GetBaseModel(self, request: pb.GetBaseModelRequest, context: Any) -> pb.BaseModel:
        base = await asyncio.to_thread(self.base_models.get_base_model, caller_of(context), request.name)
        return convert.base_model_to_proto(base)

    # -- download manifest ---------------------------------------------------------------------------------

    async def GetDownloadManifest(self, request: pb.GetDownloadManifestRequest, context: Any) -> pb.DownloadManifest:
        version, alias = convert.selector(request.selector)
        found = await asyncio.to_thread(
            self.catalog.download_manifest,
            caller_of(context),
            request.registered_model_name,
            version=version,
            alias=alias,
        )
        out = pb.DownloadManifest(
            registered_model_name=found.model_name,
            version=found.version,
            resolved_alias=alias or "",
            artifact_prefix=found.artifact_prefix,
            files=[convert.file_to_proto(f) for f in found.files],
            signature=convert.signature_to_proto(found.signature),
            task=convert.task_to_proto(found.task),
            label_map=common_pb2.LabelMap(labels=list(found.label_map)),
            lineage=convert.lineage_to_proto(found.lineage),
        )
        if found.manifest is not None:
            out.manifest.CopyFrom(convert.file_to_proto(found.manifest))
        return out


def _signature(request: pb.RegisterModelVersionRequest) -> Signature | None:
    if not request.HasField("signature"):
        return None
    sig = convert.signature_from_proto(request.signature)
    if sig is None:
        raise InvalidArgumentError("signature is set but has no inputs or outputs; give both, or leave it unset")
    return sig


def registration(services: RegistryServices) -> tuple[ServiceRegistration, RegistryServicer]:
    """The servicer and how to add it to a gRPC server."""
    servicer = RegistryServicer(services)
    return (
        ServiceRegistration(
            pb.DESCRIPTOR.services_by_name["RegistryService"],
            lambda server: pb_grpc.add_RegistryServiceServicer_to_server(servicer, server),
        ),
        servicer,
    )
