"""Resident memory of this process, and giving freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import cache


def resident_bytes() -> int:
    """The process's resident set size (Linux /proc; 0 where it is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and ask glibc to return free heap pages (a freed model's tensors) to the OS."""
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
