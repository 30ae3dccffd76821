"""The training schema's revisions, oldest first by ``down_revision``."""
