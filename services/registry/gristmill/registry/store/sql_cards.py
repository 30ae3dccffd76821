"""SQL part of the registry store: model card revisions and base models."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gristmill.core.errors import AbortedError, AlreadyExistsError
from gristmill.core.paging import Page
from gristmill.core.serialization import from_plain, to_plain
from gristmill.core.sql import utc
from gristmill.core.values import FileRef
from gristmill.registry.domain.model import BaseModel, CardText, ModelCard
from gristmill.registry.domain.ports import BaseModelRepository, CardRepository
from gristmill.registry.store.sql_common import SqlUnit, metrics_from_plain, metrics_to_plain, optional
from gristmill.registry.store.tables import BaseModelRow, ModelCardRow


class SqlCards(SqlUnit, CardRepository):
    # -- model cards ----------------------------------------------------------------------------------------

    def latest_card(self, org: str, model_name: str, version: int) -> ModelCard | None:
        model = self._model_row(org, model_name)
        if model is None:
            return None
        row = self.session.execute(
            select(ModelCardRow)
            .where(ModelCardRow.model_id == model.id, ModelCardRow.version == version)
            .order_by(ModelCardRow.revision.desc())
            .limit(1)
        ).scalar_one_or_none()
        if row is None:
            return None
        return ModelCard(
            model_name=model.name,
            version=row.version,
            revision=row.revision,
            text=CardText(row.intended_use, row.limitations, row.ethical_considerations),
            training_summary=row.training_summary,
            metrics=metrics_from_plain(row.metrics),
            markdown=row.markdown,
            object=optional(FileRef, row.object),
            updated_by=row.updated_by,
            update_time=utc(row.update_time),
        )

    def add_card(self, org: str, card: ModelCard) -> ModelCard:
        model = self._require_model_row(org, card.model_name)
        row = ModelCardRow(
            model_id=model.id,
            version=card.version,
            revision=card.revision,
            intended_use=card.text.intended_use,
            limitations=card.text.limitations,
            ethical_considerations=card.text.ethical_considerations,
            training_summary=card.training_summary,
            metrics=metrics_to_plain(card.metrics),
            markdown=card.markdown,
            object=to_plain(card.object) if card.object else None,
            updated_by=card.updated_by,
            update_time=card.update_time,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AbortedError(
                f"the model card of {card.model_name!r} version {card.version} was edited concurrently; retry"
            ) from None
        return card


class SqlBaseModels(SqlUnit, BaseModelRepository):
    # -- base models ----------------------------------------------------------------------------------------

    @staticmethod
    def _base_model(row: BaseModelRow) -> BaseModel:
        return BaseModel(
            organization_id=row.organization_id,
            name=row.name,
            model_type=row.model_type,
            architectures=tuple(row.architectures),
            tasks=tuple(row.tasks),
            parameter_count=row.parameter_count,
            license=row.license,
            description=row.description,
            artifact_prefix=row.artifact_prefix,
            files=tuple(from_plain(FileRef, f) for f in row.files),
            content_sha256=row.content_sha256,
            create_time=utc(row.create_time),
            chat_template_sha256=row.chat_template_sha256,
        )

    def insert_base_model(self, base_model: BaseModel) -> BaseModel:
        row = BaseModelRow(
            organization_id=base_model.organization_id,
            name=base_model.name,
            model_type=base_model.model_type,
            architectures=list(base_model.architectures),
            tasks=list(base_model.tasks),
            parameter_count=base_model.parameter_count,
            license=base_model.license,
            description=base_model.description,
            artifact_prefix=base_model.artifact_prefix,
            files=[to_plain(f) for f in base_model.files],
            content_sha256=base_model.content_sha256,
            create_time=base_model.create_time,
            chat_template_sha256=base_model.chat_template_sha256,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AlreadyExistsError(f"base model {base_model.name!r} already exists; choose another name") from None
        return self._base_model(row)

    def get_base_model(self, org: str, name: str) -> BaseModel | None:
        row = self.session.execute(
            select(BaseModelRow).where(BaseModelRow.organization_id == org, BaseModelRow.name == name)
        ).scalar_one_or_none()
        return None if row is None else self._base_model(row)

    def list_base_models(self, org: str, task: str, page: Page) -> tuple[list[BaseModel], str | None]:
        stmt = select(BaseModelRow).where(BaseModelRow.organization_id == org)
        if page.after is not None:
            stmt = stmt.where(BaseModelRow.name > page.after)
        items: list[BaseModel] = []
        more = False
        # The task filter looks inside a JSON list, which the two back-ends query differently; base models
        # are few, so filter while streaming in name order.
        for row in self.session.execute(stmt.order_by(BaseModelRow.name)).scalars():
            if task and task not in row.tasks:
                continue
            if len(items) == page.size:
                more = True
                break
            items.append(self._base_model(row))
        return items, (items[-1].name if more and items else None)
