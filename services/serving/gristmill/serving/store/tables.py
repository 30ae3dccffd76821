"""The serving service's tables (SQLAlchemy ORM). Names and column types are what migrations are written from."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class ServingBase(DeclarativeBase):
    metadata = MetaData()


class DeploymentRow(ServingBase):
    __tablename__ = "serving_deployments"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    registered_model_name: Mapped[str] = mapped_column(String(128), index=True)
    spec: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasSequenceRow(ServingBase):
    __tablename__ = "serving_alias_sequences"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    registered_model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger)


TABLES = ServingBase.metadata
