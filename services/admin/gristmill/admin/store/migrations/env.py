"""Alembic's entry point for the admin migrations; all of it lives in ``gristmill.core.migrations``."""

from gristmill.core.migrations import run_env

run_env()
