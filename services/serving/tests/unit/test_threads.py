"""torch's intra-op threads: a generator's model thread takes every core without changing the default that
every other thread of the serving process starts with (``runtime/threads.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from gristmill.serving.runtime.threads import OPENMP_SPINCOUNT, use_threads_here


def _on_new_thread(work: Callable[[], int]) -> int:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def default_of_one() -> Iterator[None]:
    """The serving process's default (``torch_threads`` 1), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("default_of_one")
def test_use_threads_here_sets_the_calling_thread_only() -> None:
    def model_thread() -> int:
        use_threads_here(2)
        return torch.get_num_threads()

    assert _on_new_thread(model_thread) == 2
    # A thread that starts afterwards (a classifier's batch worker, the loader of the next model) and the caller
    # keep the process default.
    assert _on_new_thread(torch.get_num_threads) == 1
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("default_of_one")
def test_use_threads_here_keeps_its_setting_while_other_threads_start() -> None:
    ready, done = threading.Event(), threading.Event()
    seen: list[int] = []

    def model_thread() -> None:
        use_threads_here(2)
        ready.set()
        done.wait(10)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=model_thread)
    thread.start()
    assert ready.wait(10)
    assert _on_new_thread(torch.get_num_threads) == 1
    done.set()
    thread.join()
    assert seen == [2]


_CONFIGURE = """
import os, sys
from gristmill.serving.runtime.threads import configure_torch
loaded_at_import = "torch" in sys.modules
configure_torch(1)
print(loaded_at_import, os.environ.get("GOMP_SPINCOUNT"), sys.modules["torch"].get_num_threads())
"""


@pytest.mark.parametrize(("given", "expected"), [(None, OPENMP_SPINCOUNT), ("100", "100")])
def test_configure_torch_bounds_openmp_spinning_before_torch_loads_unless_the_environment_says(
    given: str | None, expected: str
) -> None:
    # A fresh interpreter: libgomp reads GOMP_SPINCOUNT once, when torch loads it.
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run([sys.executable, "-c", _CONFIGURE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", expected, "1"]
