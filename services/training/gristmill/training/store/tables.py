"""The training service's tables (SQLAlchemy ORM). Names and column types are what migrations are written from.

The spec, progress, metrics and result are JSON columns written by the domain's generic converter; the
columns that queries filter on (state, project, organisation, request id) are real columns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class TrainingBase(DeclarativeBase):
    metadata = MetaData()


class JobRow(TrainingBase):
    __tablename__ = "training_jobs"
    __table_args__ = (UniqueConstraint("organization_id", "request_id", name="uq_training_jobs_request"),)

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(128), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    project_id: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    trigger: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)
    latest_metrics: Mapped[list[Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    ray_run_name: Mapped[str] = mapped_column(String(128), default="")
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class JobEventRow(TrainingBase):
    __tablename__ = "training_job_events"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("training_jobs.job_id"), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class PolicyRow(TrainingBase):
    __tablename__ = "training_auto_train_policies"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    template: Mapped[dict[str, Any]] = mapped_column(JSON)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


TRAINING_TABLES = TrainingBase.metadata
