"""The dynamic batcher: one per loaded model version.

Callers ``submit`` items (one per text) and await their results. One asyncio worker task forms batches and
runs each on a thread of the batcher's own (``workers`` of them: batches that may run at once), so the event
loop stays free while the model computes:

- a batch closes when ``max_batch_size`` items wait or the oldest has waited ``max_delay``; with a delay of
  0 it runs as soon as the worker is free, and while a batch runs the next one fills up (adaptive batching);
- the oldest waiting item is always in the next batch (nobody starves); the rest of the batch is a run of items
  close to it in token length, chosen to waste the least compute per item: padding plus a fixed cost per
  forward pass. A batch may stay below ``max_batch_size`` when filling it would pad short texts to the length
  of long ones (the long ones then go together in a batch of their own);
- the queue is bounded (``ResourceExhaustedError`` for a request that does not fit, taken whole or not at
  all); per-request deadlines are honoured: an item whose deadline passed is dropped before its batch
  runs, and a caller never gets a result after its deadline (``DeadlineExceededError``);
- cancellation is safe: a cancelled caller's items leave the queue, and results of a batch already running
  are discarded for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gristmill.core.errors import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The weight of the latest batch in the moving average of overlap: a few batches of steady concurrency (or of
# none) switch batches going alone off (or on).
_OVERLAP_WEIGHT = 0.2


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_delay_s: float = 0.005
    max_queue_size: int = 2048
    # The fixed cost of one forward pass, in padded tokens: what a smaller batch costs per item. MiniLM on
    # 2 CPU cores: ~5 ms per forward vs ~0.13 ms per token.
    overhead_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_delay_s < 0 or self.max_queue_size < self.max_batch_size:
            raise InvalidArgumentError(f"invalid batch policy {self}")


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    length: int
    future: asyncio.Future[R]
    enqueued: float
    deadline: float | None


@dataclass
class BatchStats:
    """What the batcher has done, for tests and metrics."""

    batches: int = 0
    items: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    expired: int = 0
    rejected: int = 0
    # Wall time batches spent on the model's thread.
    busy_s: float = 0.0
    # Batches that ran alone, on every core.
    alone: int = 0
    sizes: list[int] = field(default_factory=list)


class DynamicBatcher(Generic[T, R]):
    """Batches items for ``run_batch`` (a blocking function run on the batcher's own thread)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        policy: BatchPolicy,
        *,
        name: str = "batcher",
        workers: int = 1,
        alone_thread_setup: Callable[[], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        # Read at each batch, so a new policy applies to the next batch.
        self.policy = policy
        self._run_batch = run_batch
        self._on_queue_depth = on_queue_depth
        self._clock = clock
        self._pending: list[_Entry[T, R]] = []
        self._running = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        # Batches that may run at once, each on its own thread (with single-threaded torch, one per core).
        self.workers = workers
        self._slots = asyncio.Semaphore(workers)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{name}")
        # A batch that finds no other batch running and nothing else queued (light load) takes every slot and
        # runs on a thread of its own, set up by ``alone_thread_setup`` to use every core (the model's intra-op
        # threads): one sentence then takes ~4.4 ms instead of ~6.2 on the 2-core machine (MiniLM). Under load
        # batches run side by side, one core each, as before. A thread of its own, not the workers', so the
        # workers never hold a multi-thread pool (see ``runtime.threads``).
        self._alone: ThreadPoolExecutor | None = None
        # A moving average of whether other work overlapped recent batches (``_run``): batches go alone below 0.5.
        self._overlap = 0.0
        if alone_thread_setup is not None and workers > 1:
            self._alone = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"infer-{name}-alone", initializer=alone_thread_setup
            )
        self._worker: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()
        # Keep only recent batch sizes: enough for tests and debugging, bounded for a long-running server.
        self._max_sizes_kept = 10_000

    # -- callers -----------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._running > 0

    async def submit(self, items: Sequence[T], lengths: Sequence[int], *, deadline: float | None = None) -> list[R]:
        """Results for ``items`` in order. ``deadline`` is on this batcher's clock (``time.monotonic``)."""
        if self._closed:
            raise UnavailableError(f"{self.name} is shutting down; retry on another replica or later")
        if len(items) != len(lengths):
            raise ValueError("items and lengths differ in length")
        if not items:
            return []
        if len(self._pending) + len(items) > self.policy.max_queue_size:
            self.stats.rejected += 1
            raise ResourceExhaustedError(
                f"{self.name}: the queue is full ({len(self._pending)} of {self.policy.max_queue_size} texts "
                f"waiting, this request has {len(items)}); retry later"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(f"{self.name}: the deadline passed before the request was queued")
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        entries = [
            _Entry(item, length, loop.create_future(), now, deadline)
            for item, length in zip(items, lengths, strict=True)
        ]
        self._pending.extend(entries)
        self._report_depth()
        self._wake.set()
        # One text (the common case) awaits its future directly: no gather, no extra task.
        single = len(entries) == 1
        waiting: Awaitable[Any] = entries[0].future if single else asyncio.gather(*(e.future for e in entries))
        try:
            if deadline is None:
                results = await waiting
            else:
                try:
                    async with asyncio.timeout_at(loop.time() + max(deadline - self._clock(), 0.0)):
                        results = await waiting
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"{self.name}: the deadline passed before the batch ran; the request was dropped"
                    ) from None
            return [results] if single else list(results)
        finally:
            self._forget(entries)

    def _forget(self, entries: list[_Entry[T, R]]) -> None:
        """Take a finished or abandoned request's items out of the queue; results still to come are dropped."""
        for entry in entries:
            if not entry.future.done():
                entry.future.cancel()
            elif not entry.future.cancelled():
                # Mark a second failure of the same request as seen (asyncio would log it as never retrieved).
                entry.future.exception()
        if any(e.future.cancelled() for e in entries):
            gone = set(map(id, entries))
            self._pending = [e for e in self._pending if id(e) not in gone]
            self._report_depth()

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        while self.busy:
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> None:
        """Stop taking work, fail what is queued with ``UnavailableError``, stop the worker and its thread."""
        self._closed = True
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(UnavailableError(f"{self.name} was stopped before the request ran"))
        self._pending.clear()
        self._report_depth()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for task in list(self._batches):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Do not wait for a batch still computing on the thread; its results are discarded.
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._alone is not None:
            self._alone.shutdown(wait=False, cancel_futures=True)
        self._idle.set()

    # -- the worker --------------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"{self.name}-worker")

    async def _work(self) -> None:
        while True:
            if not self._pending:
                if self._running == 0:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            # Take a free model thread first, then form the batch: it then holds everything queued meanwhile.
            await self._slots.acquire()
            try:
                await self._wait_for_batch_to_close()
                batch = self._take_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            slots = 1
            crowded = self._running > 0 or bool(self._pending)
            if self._alone is not None and not crowded and self._overlap < 0.5:
                # Nothing else runs (so every other slot is free), nothing waits, and recent batches did not
                # overlap with other work: this batch gets every core.
                for _ in range(self.workers - 1):
                    await self._slots.acquire()
                slots = self.workers
            self._running += len(batch)
            task = asyncio.get_running_loop().create_task(self._run(batch, slots, crowded), name=f"{self.name}-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Entry[T, R]], slots: int, crowded: bool) -> None:
        started = self._clock()
        try:
            loop = asyncio.get_running_loop()
            executor = self._alone if slots > 1 and self._alone is not None else self._executor
            results = await loop.run_in_executor(executor, self._run_batch, [e.item for e in batch])
        except asyncio.CancelledError:
            _fail(batch, UnavailableError(f"{self.name} was stopped while running"))
            raise
        except Exception as exc:
            log.exception("%s: a batch of %d failed", self.name, len(batch))
            _fail(batch, exc)
        else:
            if len(results) != len(batch):
                _fail(batch, RuntimeError(f"{self.name}: the model returned {len(results)} results for {len(batch)}"))
            else:
                for entry, result in zip(batch, results, strict=True):
                    if not entry.future.done():
                        entry.future.set_result(result)
        finally:
            self._running -= len(batch)
            # Did other work overlap this batch (running or queued when it started, queued meanwhile, or still
            # running)? Two callers at a time keep it so: then a batch alone makes the other wait (measured at
            # concurrency 2: 9 % fewer calls per second than side by side), so batches stop going alone until the
            # overlap fades.
            overlapped = crowded or bool(self._pending) or self._running > 0
            self._overlap = (1 - _OVERLAP_WEIGHT) * self._overlap + _OVERLAP_WEIGHT * overlapped
            self.stats.busy_s += self._clock() - started
            if slots > 1:
                self.stats.alone += 1
            for _ in range(slots):
                self._slots.release()
            if not self._pending and self._running == 0:
                self._idle.set()

    async def _wait_for_batch_to_close(self) -> None:
        policy = self.policy
        if policy.max_delay_s <= 0:
            return
        while self._pending and len(self._pending) < policy.max_batch_size:
            remaining = self._pending[0].enqueued + policy.max_delay_s - self._clock()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)

    def _take_batch(self) -> list[_Entry[T, R]]:
        """Remove and return the next batch: the oldest item plus its closest neighbours in length."""
        now = self._clock()
        live: list[_Entry[T, R]] = []
        for entry in self._pending:
            if entry.future.done():
                continue
            if entry.deadline is not None and entry.deadline <= now:
                self.stats.expired += 1
                entry.future.set_exception(
                    DeadlineExceededError(f"{self.name}: the deadline passed before the batch ran")
                )
                continue
            live.append(entry)
        size = self.policy.max_batch_size
        if len(live) <= 1:
            batch, self._pending = live, []
        else:
            batch = _closest_in_length(live, size, self.policy.overhead_tokens)
            chosen = set(map(id, batch))
            self._pending = [e for e in live if id(e) not in chosen]
        self._report_depth()
        if batch:
            longest = max(e.length for e in batch)
            real = sum(e.length for e in batch)
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.real_tokens += real
            self.stats.padded_tokens += longest * len(batch) - real
            if len(self.stats.sizes) < self._max_sizes_kept:
                self.stats.sizes.append(len(batch))
        return batch

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._pending))


def _closest_in_length(live: list[_Entry[T, R]], size: int, overhead_tokens: int) -> list[_Entry[T, R]]:
    """At most ``size`` entries including ``live[0]`` (the oldest) that waste the least compute per entry.

    In length order, a best batch containing the oldest is a window of consecutive entries around it. Its waste
    per entry is (overhead + padding) / entries, where padding = entries * longest - total length; real tokens
    are not waste (they are computed whatever the batching). Windows are scored with prefix sums.
    """
    oldest = live[0]
    ordered = sorted(live, key=lambda e: e.length)  # stable: equal lengths keep arrival order
    anchor = next(i for i, e in enumerate(ordered) if e is oldest)
    prefix = [0]
    for entry in ordered:
        prefix.append(prefix[-1] + entry.length)
    count = len(ordered)
    best: tuple[float, int, int] | None = None  # (waste per entry, -entries, start)
    for entries in _candidate_sizes(min(size, count)):
        for start in range(max(0, anchor - entries + 1), min(anchor, count - entries) + 1):
            end = start + entries
            padding = entries * ordered[end - 1].length - (prefix[end] - prefix[start])
            score = ((overhead_tokens + padding) / entries, -entries, start)
            if best is None or score < best:
                best = score
    assert best is not None
    _, negative_entries, start = best
    return ordered[start : start - negative_entries]


def _candidate_sizes(most: int) -> list[int]:
    """Every batch size up to 64; above that, halvings of ``most`` (keeps a batch decision well under 1 ms)."""
    if most <= 64:
        return list(range(1, most + 1))
    sizes, size = [], most
    while size >= 1:
        sizes.append(size)
        size //= 2
    return sizes


def _fail(batch: Sequence[_Entry[Any, Any]], error: BaseException) -> None:
    """Answer every caller of ``batch`` still waiting with ``error``."""
    for entry in batch:
        if not entry.future.done():
            entry.future.set_exception(error)
