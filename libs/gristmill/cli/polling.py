"""Waiting for what the platform does after a call returns (event-driven steps: registration, promotion, loading)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.client import DeadlineExceededError, Gristmill, NotFoundError, UnavailableError
from gristmill.core.errors import FailedPreconditionError

T = TypeVar("T")


def wait_until(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.5) -> T:
    """Poll ``probe`` until it returns something; a service that is restarting (UNAVAILABLE) is waited for."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except UnavailableError as exc:
            last = f" (last error: {exc})"
        if time.monotonic() > deadline:
            raise DeadlineExceededError(f"timed out after {timeout_s:.0f}s waiting for {what}{last}")
        time.sleep(interval_s)


def registered_version(gm: Gristmill, model: str, job_id: str, timeout_s: float) -> rg.ModelVersion:
    """The READY version of ``model`` that training job ``job_id`` produced.

    The registry registers a finished job's model from the job's event, so it appears shortly after the job
    succeeds; a version that failed verification is an error, not something to wait for.
    """

    def ready() -> rg.ModelVersion | None:
        try:
            versions = gm.registry.ListModelVersions(
                rg.ListModelVersionsRequest(registered_model_name=model)
            ).model_versions
        except NotFoundError:
            return None  # the registered model is created with its first version
        for version in versions:
            if version.lineage.training_job_id == job_id:
                if version.status == rg.MODEL_VERSION_STATUS_FAILED:
                    raise FailedPreconditionError(f"version {version.version} failed: {version.status_reason}")
                if version.status == rg.MODEL_VERSION_STATUS_READY:
                    return version
        return None

    return wait_until(f"the registry to register job {job_id} as a version of {model!r}", ready, timeout_s)
