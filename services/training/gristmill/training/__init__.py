"""Gristmill training service: fine-tuning jobs on Ray Train, LoRA via PEFT, checkpoints in the object store."""

from __future__ import annotations

from importlib import metadata

SERVICE_NAME = "training"


def code_version() -> str:
    """The installed package version (recorded in every model's lineage)."""
    try:
        return f"gristmill-training {metadata.version('gristmill-training')}"
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        return "gristmill-training (not installed)"
