"""Turning a failed Ray Train run into the one line a job's state_reason shows (no Ray import needed)."""

from __future__ import annotations

import re


def describe_failure(error: BaseException) -> str:
    """One line for the job's state_reason: the first worker's error rather than Ray's whole report."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        return f"worker {rank} failed: {_last_line(failures[rank])}"
    inner = getattr(error, "controller_failure", None)
    if isinstance(inner, BaseException):
        return f"the Ray Train controller failed: {_last_line(inner)}"
    return _last_line(error)


# What pyarrow's S3 filesystem (Ray Train's checkpoint storage) and the AWS SDK say when the S3 server cannot be
# reached at all. Ray wraps the worker's or controller's exception into text, so the text is what is left.
_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|Could not connect to server|curlCode: 7|Connection refused|ECONNREFUSED", re.IGNORECASE
)
# The workers' own connections to each other (torch.distributed's Gloo or NCCL rendezvous) fail with the same
# words; that is the worker group's failure (a peer gone, a wrong address), not the storage's.
_COLLECTIVE = re.compile(r"\bGloo\b|\bNCCL\b|connectFullMesh|\bc10d\b|ProcessGroup", re.IGNORECASE)


def storage_unreachable(error: BaseException) -> bool:
    """Whether the run failed because its storage (S3) could not be reached: a fault to wait out, not the job's."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        if _UNREACHABLE.search(text) and not _COLLECTIVE.search(text):
            return True
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending += [f for f in failures.values() if isinstance(f, BaseException)]
        for linked in (getattr(current, "controller_failure", None), current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)
    return False


_NAMED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:")


def _last_line(error: BaseException) -> str:
    # Ray's wrapped errors end with the original "ValueError: ..." line after the remote traceback; a plain
    # exception gets its type name in front.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[-1] if _NAMED.match(lines[-1]) or len(lines) > 1 else f"{type(error).__name__}: {lines[-1]}"
    return text[:1000]
