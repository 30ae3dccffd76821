"""Alembic's entry point for the training migrations; all of it lives in ``gristmill.core.migrations``."""

from gristmill.core.migrations import run_env

run_env()
