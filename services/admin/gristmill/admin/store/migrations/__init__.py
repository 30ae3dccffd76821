"""The admin store's schema migrations (Alembic), run at start by ``gristmill.core.migrations``.

New revision: ``python -m gristmill.core.migrations revision admin -m "what changed"``, then review it.
"""

from __future__ import annotations

from sqlalchemy import MetaData


def target_metadata() -> list[MetaData]:
    """The admin service's own tables (the shared ones come from ``gristmill.core.sql.Base``): what its
    ``app.py`` passes to ``open_platform`` as ``tables``."""
    from gristmill.admin.store.sql import ADMIN_TABLES

    return [ADMIN_TABLES]
