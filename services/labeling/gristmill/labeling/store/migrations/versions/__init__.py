"""The labeling schema's revisions, oldest first by ``down_revision``."""
