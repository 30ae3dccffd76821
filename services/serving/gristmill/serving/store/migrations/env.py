"""Alembic's entry point for the serving migrations; all of it lives in ``gristmill.core.migrations``."""

from gristmill.core.migrations import run_env

run_env()
