"""Deployment specs and applied alias sequences: the SQL implementation (``sql``, tables in ``tables``) of
``gristmill.serving.domain.ports.DeploymentStore``."""
