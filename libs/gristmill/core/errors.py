"""One exception family for the whole platform.

Every error a service raises on purpose is a ``GristmillError`` subclass that knows its gRPC
status code, so one server interceptor (``gristmill.core.grpcserver``) can turn it into a status
without each servicer repeating try/except. Messages are written for a person: they say what was
wrong and what to do, and never contain secrets or stack traces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import grpc


class GristmillError(Exception):
    """Base class. ``grpc_code`` is the status the interceptor answers with."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, details: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Small, non-secret key/value context (e.g. the offending field) sent as trailing metadata.
        self.details: dict[str, str] = dict(details or {})

    def __str__(self) -> str:
        return self.message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """What the server sends with the status: each detail as ``gristmill-<key>``."""
        return tuple((f"gristmill-{k.lower()}", v) for k, v in self.details.items())


class InvalidArgumentError(GristmillError):
    """The request itself is wrong (bad field, malformed payload); retrying it unchanged fails again."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(GristmillError):
    """A named thing (project, job, model, version, object) does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(GristmillError):
    """Creating something whose name or id is taken."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(GristmillError):
    """The request is well-formed but the system is not in a state that allows it."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class DataIntegrityError(FailedPreconditionError):
    """Stored data failed verification (checksum mismatch, truncated object)."""


class UnauthenticatedError(GristmillError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(GristmillError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(GristmillError):
    """A quota or a bounded queue is full.

    ``retry_after_s`` (rounded up to whole seconds, at least 1) is sent as trailing metadata
    ``retry-after``, the name HTTP clients know, and as ``gristmill-retry-after`` like any detail.
    """

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, details: Mapping[str, str] | None = None
    ) -> None:
        merged = dict(details or {})
        self.retry_after_s: int | None = None
        if retry_after_s is not None:
            self.retry_after_s = max(1, math.ceil(retry_after_s))
            merged["retry-after"] = str(self.retry_after_s)
        super().__init__(message, details=merged)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        extra = (("retry-after", str(self.retry_after_s)),) if self.retry_after_s is not None else ()
        return super().trailing_metadata() + extra


class UnavailableError(GristmillError):
    """A dependency (broker, object store, model) is not ready; retrying later may succeed."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(GristmillError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class AbortedError(GristmillError):
    """A concurrent change won (optimistic concurrency); the caller may retry."""

    grpc_code = grpc.StatusCode.ABORTED


class ConfigurationError(GristmillError):
    """A setting is missing or invalid. Raised at start, before anything is served."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE: dict[grpc.StatusCode, type[GristmillError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnauthenticatedError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        AbortedError,
    )
}


def error_for_status(code: grpc.StatusCode, message: str, details: Mapping[str, str] | None = None) -> GristmillError:
    """The exception a client raises for a gRPC status (the inverse of the server's error mapping)."""
    return _BY_CODE.get(code, GristmillError)(message, details=details)


def remote_call_error(exc: grpc.RpcError, *, service: str, address: str, what: str) -> GristmillError:
    """What to raise when this service's call to another one (``service`` at ``address``) about ``what`` failed.

    NOT_FOUND, FAILED_PRECONDITION and INVALID_ARGUMENT keep their meaning: they are the other service's answer
    about ``what``. Anything else (not reachable, past its deadline, this service's own key refused, an internal
    error there) is UNAVAILABLE naming the service and its address: the request being served was not at fault.
    """
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"the {service} does not know {what}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(f"the {service} cannot serve {what}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(f"the {service} refused {what}: {details}")
    return UnavailableError(f"the {service} at {address} did not answer for {what} ({code}): {details}")
