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


_NAMED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:")


def _last_line(error: BaseException) -> str:
    # Ray's wrapped errors end with the original "ValueError: ..." line after the remote traceback; a plain
    # exception gets its type name in front.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[-1] if _NAMED.match(lines[-1]) or len(lines) > 1 else f"{type(error).__name__}: {lines[-1]}"
    return text[:1000]
