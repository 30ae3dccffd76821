"""Deployment specs and applied alias sequences: an interface (``base``) and its SQL implementation (``sql``)."""
