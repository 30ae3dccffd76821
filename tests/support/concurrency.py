"""Running one function on many threads at once, for tests of races."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any


def run_in_threads(
    target: Callable[..., Any], args: Iterable[Any], *, timeout_s: float | None = None
) -> list[threading.Thread]:
    """Start ``target(arg)`` on a thread per arg, then join them all (each for at most ``timeout_s``)."""
    threads = [threading.Thread(target=target, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    return threads
