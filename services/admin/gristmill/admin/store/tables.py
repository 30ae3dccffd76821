"""The admin service's tables (SQLAlchemy ORM). Names and column types are what migrations are written from."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_ID = 128


class AdminBase(DeclarativeBase):
    metadata = MetaData()


ADMIN_TABLES = AdminBase.metadata


class OrganizationRow(AdminBase):
    __tablename__ = "admin_organizations"

    organization_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    display_name: Mapped[str] = mapped_column(Text, default="")
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(AdminBase):
    __tablename__ = "admin_api_keys"

    # Insertion order: "newest first" listings and their paging follow it.
    ordinal: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    api_key_id: Mapped[str] = mapped_column(String(_ID), unique=True)
    organization_id: Mapped[str] = mapped_column(String(_ID), index=True)
    display_name: Mapped[str] = mapped_column(Text, default="")
    scopes: Mapped[list[str]] = mapped_column(JSON)
    secret_hash: Mapped[str] = mapped_column(String(255))
    secret_prefix: Mapped[str] = mapped_column(String(32))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expire_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoke_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rotated_from: Mapped[str] = mapped_column(String(_ID), default="")


class UsageRow(AdminBase):
    __tablename__ = "admin_usage_hourly"

    organization_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    # Empty for usage not caused by a key.
    api_key_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    hour_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    quantity: Mapped[float] = mapped_column(Float)
