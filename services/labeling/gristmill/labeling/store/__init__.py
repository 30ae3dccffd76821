"""Persistence: the store interface (``base``) and its SQLAlchemy implementation (``sql``)."""
