"""SQL part of the registry store: registered models, their tags, and the locks that serialise writers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from gristmill.core.errors import AlreadyExistsError
from gristmill.core.paging import Page
from gristmill.core.sql import utc
from gristmill.registry.domain.model import ModelQuery, RegisteredModel
from gristmill.registry.domain.ports import ModelRepository
from gristmill.registry.store.sql_common import SqlUnit
from gristmill.registry.store.tables import MODEL_COUNT_LOCK, AliasRow, LockRow, ModelRow, ModelTagRow


class SqlModels(SqlUnit, ModelRepository):
    def _model(self, row: ModelRow) -> RegisteredModel:
        return self._models([row])[0]

    def _models(self, rows: Sequence[ModelRow]) -> list[RegisteredModel]:
        ids = [r.id for r in rows]
        tags: dict[int, dict[str, str]] = {i: {} for i in ids}
        aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
        if ids:
            for t in self.session.execute(select(ModelTagRow).where(ModelTagRow.model_id.in_(ids))).scalars():
                tags[t.model_id][t.key] = t.value
            for a in self.session.execute(select(AliasRow).where(AliasRow.model_id.in_(ids))).scalars():
                aliases[a.model_id][a.name] = a.version
        return [
            RegisteredModel(
                organization_id=r.organization_id,
                name=r.name,
                description=r.description,
                task=r.task,
                label_map=tuple(r.label_map),
                tags=tags[r.id],
                aliases=aliases[r.id],
                latest_version=r.latest_version,
                created_by=r.created_by,
                create_time=utc(r.create_time),
                update_time=utc(r.update_time),
            )
            for r in rows
        ]

    def _replace_model_tags(self, model_id: int, tags: dict[str, str]) -> None:
        self.session.execute(delete(ModelTagRow).where(ModelTagRow.model_id == model_id))
        self.session.add_all(ModelTagRow(model_id=model_id, key=k, value=v) for k, v in tags.items())

    # -- registered models ----------------------------------------------------------------------------------

    def insert_model(
        self,
        org: str,
        name: str,
        *,
        description: str,
        task: str,
        label_map: tuple[str, ...],
        tags: dict[str, str],
        created_by: str,
        now: datetime,
    ) -> RegisteredModel:
        row = ModelRow(
            organization_id=org,
            name=name,
            description=description,
            task=task,
            label_map=list(label_map),
            latest_version=0,
            alias_sequence=0,
            lock_counter=0,
            created_by=created_by,
            create_time=now,
            update_time=now,
        )
        try:
            self.session.add(row)
            self.session.flush()
        except IntegrityError:
            raise AlreadyExistsError(
                f"registered model {name!r} already exists; choose another name or register a version of it"
            ) from None
        self._replace_model_tags(row.id, tags)
        self.session.flush()
        return self._model(row)

    def get_model(self, org: str, name: str) -> RegisteredModel | None:
        row = self._model_row(org, name)
        return None if row is None else self._model(row)

    def count_models(self) -> int:
        return int(self.session.execute(select(func.count()).select_from(ModelRow)).scalar_one())

    def lock_model_count(self) -> None:
        # An UPDATE takes the row lock on PostgreSQL and the write lock on SQLite, as lock_model does.
        self.session.execute(
            update(LockRow)
            .where(LockRow.name == MODEL_COUNT_LOCK)
            .values(counter=LockRow.counter + 1)
            .execution_options(synchronize_session=False)
        )

    def lock_model(self, org: str, name: str) -> bool:
        result = self.session.execute(
            update(ModelRow)
            .where(ModelRow.organization_id == org, ModelRow.name == name)
            .values(lock_counter=ModelRow.lock_counter + 1)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    def update_model(
        self,
        org: str,
        name: str,
        *,
        now: datetime,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        label_map: tuple[str, ...] | None = None,
    ) -> RegisteredModel:
        row = self._require_model_row(org, name)
        if description is not None:
            row.description = description
        if label_map is not None:
            row.label_map = list(label_map)
        if tags is not None:
            self._replace_model_tags(row.id, tags)
        row.update_time = now
        self.session.flush()
        return self._model(row)

    def search_models(self, org: str, query: ModelQuery, page: Page) -> tuple[list[RegisteredModel], str | None]:
        stmt = select(ModelRow).where(ModelRow.organization_id == org)
        if query.name_prefix:
            stmt = stmt.where(ModelRow.name.startswith(query.name_prefix, autoescape=True))
        if query.task:
            stmt = stmt.where(ModelRow.task == query.task)
        for key, value in sorted(query.tags.items()):
            stmt = stmt.where(
                exists().where(ModelTagRow.model_id == ModelRow.id, ModelTagRow.key == key, ModelTagRow.value == value)
            )
        if query.has_alias:
            stmt = stmt.where(exists().where(AliasRow.model_id == ModelRow.id, AliasRow.name == query.has_alias))
        if page.after is not None:
            stmt = stmt.where(ModelRow.name > page.after)
        rows = list(self.session.execute(stmt.order_by(ModelRow.name).limit(page.size + 1)).scalars())
        more = len(rows) > page.size
        rows = rows[: page.size]
        return self._models(rows), (rows[-1].name if more and rows else None)
