"""torch's intra-op threads in the serving process.

On Linux torch runs its CPU ops with OpenMP (libgomp). Every OS thread that runs an op with more than one
intra-op thread keeps a pool of worker threads of its own for as long as it lives. Once the pools of all threads
together hold more threads than the machine has cores, libgomp stops letting idle workers spin between parallel
regions ("throttled" spinning) and they sleep after each one; a forward pass is hundreds of small regions, each
of which then waits for the kernel to wake its workers. Measured on the 2-core machine: SmolLM2's prefill of an
81-token prompt took 115 ms on a thread whose pool was the only one and 175 ms while another thread's pool
existed (``OMP_WAIT_POLICY=PASSIVE`` made both ~200 ms).

So the process default stays the service's ``torch_threads`` (1: classifier batch workers run side by side
with no pools), and a generator's model thread takes every core for itself without changing the default that
every other thread starts with (``use_threads_here``).

Between parallel regions libgomp's idle workers spin 300,000 rounds before they sleep (``GOMP_SPINCOUNT``'s
default): ~8 ms on the 2-core AMD EPYC machine, after every forward pass. A classifier batch that runs alone
takes both cores (``light_load_thread_setup``), so its worker then spun through the gap to the next call, on the
core the event loop, the usage commit and (in the networked stack) PostgreSQL, Kafka and the admin needed: at one
call at a time the process burned ~28 ms of CPU per ~14 ms call. ``configure_torch`` sets 20,000 rounds (~0.5
ms: still longer than the gaps between the regions of one forward pass, so a pass runs as fast) unless the
environment sets ``GOMP_SPINCOUNT``. libgomp reads it when torch loads it, so torch is imported in the
functions here, never at this module's import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

# libgomp's busy-wait rounds between parallel regions (see the module docstring).
OPENMP_SPINCOUNT = "20000"


def configure_torch(threads: int) -> None:
    """Intra-op threads for inference (0: one per core); one inter-op thread (a batch is one graph). Call it
    before anything imports torch: it also bounds OpenMP's spinning (``GOMP_SPINCOUNT``), read when torch loads."""
    if "torch" in sys.modules:
        log.debug("torch was imported before configure_torch: OpenMP keeps its spin count")
    else:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or work already ran: keep torch's value
        torch.set_num_interop_threads(1)


# Below this many parameters a generator's forward pass is too small to share: on the 2-core machine one decode
# step (batch 1, after a 40-token prompt) took the same time on one thread as on two (Llamas of 0.08M, 2.4M and
# 6.8M parameters, within 5 %), while with two busy processes beside it two threads made the 0.08M model 3.5-5x
# slower (41 forward passes: 36-47 ms on one thread, 156-167 ms on two: every small op waits for the thread
# the scheduler took off its core). Such models are tests' and demos' tiny ones, on busy machines.
SMALL_MODEL_PARAMETERS = 10_000_000


def threads_for_model(parameters: int, threads: int) -> int:
    """The intra-op threads a generator's model thread takes: ``threads``, or one for a model under
    ``SMALL_MODEL_PARAMETERS``."""
    return 1 if threads > 1 and parameters < SMALL_MODEL_PARAMETERS else threads


def use_threads_here(threads: int) -> None:
    """Give the calling thread ``threads`` intra-op threads and leave the process default as it was.

    ``torch.set_num_threads`` sets the calling thread's team size and also the default of every thread that has
    not run an op yet. The default is put back by a short-lived thread of its own, whose team size ends with it.
    Call it first in a new thread: its ``get_num_threads`` is then the process default.
    """
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    if default != threads:
        restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="torch-threads-default")
        restore.start()
        restore.join()
