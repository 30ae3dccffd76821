"""The dynamic batcher, property by property, with a fake model function."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from gristmill.core.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from gristmill.serving.domain.batcher import BatchPolicy, DynamicBatcher


class Model:
    """Doubles each item; records batches; ``gate`` holds a batch running until opened."""

    def __init__(self, *, sleep_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.sleep_s = sleep_s
        self.fail: Exception | None = None

    def __call__(self, items: list[int]) -> Sequence[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail is not None:
            raise self.fail
        return [2 * i for i in items]


async def _hold_worker(batcher: DynamicBatcher[int, int], model: Model) -> asyncio.Task[list[int]]:
    """Start a batch that stays running until ``model.gate`` opens; returns its task."""
    model.gate = threading.Event()
    model.entered.clear()
    task = asyncio.create_task(batcher.submit([-1], [1]))
    assert await asyncio.to_thread(model.entered.wait, 5)
    return task


async def test_a_batch_closes_when_max_batch_size_items_wait() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=4, max_delay_s=10.0, max_queue_size=64))
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit([i], [3]) for i in range(4)))
    assert results == [[0], [2], [4], [6]]
    assert model.batches == [[0, 1, 2, 3]]
    # Far sooner than the 10 s delay: the batch closed because it was full.
    assert time.monotonic() - started < 2.0
    await batcher.close()


async def test_a_batch_closes_after_max_delay_when_not_full() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=32, max_delay_s=0.15, max_queue_size=64))
    started = time.monotonic()
    results = await asyncio.gather(*(batcher.submit([i], [3]) for i in range(3)))
    elapsed = time.monotonic() - started
    assert results == [[0], [2], [4]]
    assert model.batches == [[0, 1, 2]]
    assert 0.14 <= elapsed < 2.0
    await batcher.close()


async def test_zero_delay_runs_at_once_and_fills_the_next_batch_while_one_runs() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    waiting = [asyncio.create_task(batcher.submit([i], [2])) for i in range(5)]
    await asyncio.sleep(0.05)
    assert batcher.queued == 5
    assert model.gate is not None
    model.gate.set()
    assert await first == [-2]
    assert [await t for t in waiting] == [[0], [2], [4], [6], [8]]
    assert model.batches == [[-1], [0, 1, 2, 3, 4]]
    await batcher.close()


async def test_batches_group_queued_items_by_length_and_always_take_the_oldest() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=3, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    lengths = [50, 5, 100, 6, 101, 7, 102, 51, 52]
    tasks = [asyncio.create_task(batcher.submit([length], [length])) for length in lengths]
    await asyncio.sleep(0.05)
    assert model.gate is not None
    model.gate.set()
    await first
    await asyncio.gather(*tasks)
    batches = [sorted(b) for b in model.batches[1:]]
    # The oldest (50) leads the first batch with its closest neighbours; then the oldest left (5), ...
    assert batches == [[50, 51, 52], [5, 6, 7], [100, 101, 102]]
    # No padding at all in this queue, where FIFO batches of 3 would pad ([50, 5, 100] etc.).
    fifo_waste = sum(3 * max(lengths[i : i + 3]) - sum(lengths[i : i + 3]) for i in range(0, 9, 3))
    grouped_waste = sum(3 * max(b) - sum(b) for b in batches)
    assert grouped_waste < fifo_waste / 10
    await batcher.close()


async def test_a_batch_stays_small_rather_than_pad_short_texts_to_long_ones() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=6, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    lengths = [5, 100, 6, 5, 101, 6]
    tasks = [asyncio.create_task(batcher.submit([length], [length])) for length in lengths]
    await asyncio.sleep(0.05)
    assert model.gate is not None
    model.gate.set()
    await first
    await asyncio.gather(*tasks)
    # One batch of 6 would pad four short texts to 101 tokens; two batches cost one more forward pass only.
    assert [sorted(b) for b in model.batches[1:]] == [[5, 5, 6, 6], [100, 101]]
    assert batcher.stats.padded_tokens == 2 + 1  # [5, 5, 6, 6] and [100, 101]
    await batcher.close()


async def test_a_full_queue_refuses_the_whole_request_with_resource_exhausted() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=2, max_delay_s=0.0, max_queue_size=4))
    first = await _hold_worker(batcher, model)
    queued = asyncio.create_task(batcher.submit([1, 2, 3], [1, 1, 1]))
    await asyncio.sleep(0.02)
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        await batcher.submit([4, 5], [1, 1])
    # Nothing of the refused request was queued.
    assert batcher.queued == 3
    assert model.gate is not None
    model.gate.set()
    await first
    assert await queued == [2, 4, 6]
    assert all(4 not in b and 5 not in b for b in model.batches)
    await batcher.close()


async def test_an_expired_request_is_dropped_before_its_batch_runs() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([7], [1], deadline=time.monotonic() + 0.1)
    # Answered at its deadline, not when the running batch ends.
    assert time.monotonic() - started < 1.0
    assert batcher.queued == 0
    assert model.gate is not None
    model.gate.set()
    await first
    await asyncio.sleep(0.05)
    assert all(7 not in b for b in model.batches), "an expired item must never reach the model"
    await batcher.close()


async def test_no_late_answer_when_the_deadline_passes_while_the_batch_runs() -> None:
    model = Model()
    model.gate = threading.Event()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue_size=64))
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([3], [1], deadline=time.monotonic() + 0.1)
    assert time.monotonic() - started < 1.0
    assert model.batches == [[3]]  # it was running
    model.gate.set()
    # The batcher survives: the next request is answered.
    model.gate = None
    assert await batcher.submit([4], [1]) == [8]
    await batcher.close()


async def test_a_deadline_already_past_is_refused_without_queueing() -> None:
    batcher = DynamicBatcher(Model(), BatchPolicy())
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([1], [1], deadline=time.monotonic() - 0.01)
    assert batcher.queued == 0
    await batcher.close()


async def test_cancelled_callers_leave_the_queue_and_never_reach_the_model() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    cancelled = asyncio.create_task(batcher.submit([10, 11], [1, 1]))
    kept = asyncio.create_task(batcher.submit([12], [1]))
    await asyncio.sleep(0.02)
    assert batcher.queued == 3
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert batcher.queued == 1
    assert model.gate is not None
    model.gate.set()
    await first
    assert await kept == [24]
    assert all(10 not in b and 11 not in b for b in model.batches)
    await batcher.close()


async def test_cancelling_during_a_running_batch_leaves_the_others_answered() -> None:
    model = Model()
    model.gate = threading.Event()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.02, max_queue_size=64))
    a = asyncio.create_task(batcher.submit([1], [1]))
    b = asyncio.create_task(batcher.submit([2], [1]))
    assert await asyncio.to_thread(model.entered.wait, 5)
    a.cancel()
    model.gate.set()
    assert await b == [4]
    assert a.cancelled()
    await batcher.close()


async def test_inference_runs_off_the_event_loop_on_one_worker_thread() -> None:
    model = Model(sleep_s=0.3)
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=4, max_delay_s=0.0), name="m1")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    await batcher.submit([1], [1])
    ticking.cancel()
    # 0.3 s of blocking model work: the loop kept turning the whole time.
    assert ticks >= 15
    assert model.threads == {next(iter(model.threads))}
    assert next(iter(model.threads)).startswith("infer-m1")
    assert threading.current_thread().name not in model.threads
    await batcher.close()


async def test_several_workers_run_batches_side_by_side_on_their_own_threads() -> None:
    model = Model()
    model.gate = threading.Event()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=2, max_delay_s=0.0), name="m2", workers=2)
    first = [asyncio.create_task(batcher.submit([i], [1])) for i in (1, 2)]
    await wait_until(lambda: len(model.batches) == 1)
    second = [asyncio.create_task(batcher.submit([i], [1])) for i in (3, 4)]
    # The second batch starts while the first one still runs; a third waits for a free worker.
    await wait_until(lambda: len(model.batches) == 2)
    third = asyncio.create_task(batcher.submit([5], [1]))
    await asyncio.sleep(0.05)
    assert len(model.batches) == 2 and batcher.queued == 1
    model.gate.set()
    assert [await t for t in first + second] == [[2], [4], [6], [8]]
    assert await third == [10]
    assert len(model.threads) == 2
    await batcher.drain()
    assert not batcher.busy
    await batcher.close()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_failing_batch_fails_its_callers_and_the_batcher_recovers() -> None:
    model = Model()
    model.fail = RuntimeError("CUDA out of memory")
    batcher = DynamicBatcher(model, BatchPolicy(max_delay_s=0.0))
    with pytest.raises(RuntimeError, match="out of memory"):
        await batcher.submit([1, 2], [1, 1])
    model.fail = None
    assert await batcher.submit([3], [1]) == [6]
    await batcher.close()


async def test_close_fails_queued_requests_and_refuses_new_ones() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    queued = asyncio.create_task(batcher.submit([5], [1]))
    await asyncio.sleep(0.02)
    await batcher.close()
    with pytest.raises(UnavailableError):
        await queued
    with pytest.raises(UnavailableError):
        await first
    with pytest.raises(UnavailableError):
        await batcher.submit([6], [1])
    assert model.gate is not None
    model.gate.set()


async def test_a_new_policy_applies_to_the_next_batch() -> None:
    model = Model()
    batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue_size=64))
    first = await _hold_worker(batcher, model)
    tasks = [asyncio.create_task(batcher.submit([i], [1])) for i in range(6)]
    await asyncio.sleep(0.02)
    batcher.policy = BatchPolicy(max_batch_size=2, max_delay_s=0.0, max_queue_size=64)
    assert model.gate is not None
    model.gate.set()
    await first
    await asyncio.gather(*tasks)
    assert [len(b) for b in model.batches[1:]] == [2, 2, 2]
    await batcher.close()


async def test_a_batch_alone_runs_on_its_own_thread_holding_every_slot() -> None:
    """Light load: a batch that finds nothing running and nothing queued runs on the alone thread (set up once),
    and what arrives meanwhile waits for it rather than sharing the cores with it."""
    model = Model()
    setups: list[str] = []
    batcher = DynamicBatcher(
        model,
        BatchPolicy(max_batch_size=4, max_delay_s=0.0),
        name="m3",
        workers=2,
        alone_thread_setup=lambda: setups.append(threading.current_thread().name),
    )
    held = await _hold_worker(batcher, model)
    assert model.threads == {setups[0]} and setups[0].startswith("infer-m3-alone")
    waiting = asyncio.create_task(batcher.submit([7], [1]))
    await asyncio.sleep(0.05)
    assert len(model.batches) == 1 and batcher.queued == 1, "the second slot is held by the batch running alone"
    model.gate.set()
    assert await held == [-2] and await waiting == [14]
    # The second batch found nothing else either: alone again, on the same thread, set up only once.
    assert batcher.stats.alone == 2 and len(setups) == 1 and model.threads == {setups[0]}
    await batcher.close()


async def test_under_load_batches_run_side_by_side_on_the_workers_not_alone() -> None:
    model = Model()
    both_running = threading.Barrier(2, timeout=5)

    def model_needing_a_peer(items: list[int]) -> Sequence[int]:
        both_running.wait()  # breaks (and fails the batch) unless another batch runs at the same time
        return model(items)

    batcher = _one_item_batches_on_two_workers(model_needing_a_peer, "m4")
    # Two requests at once: the first batch sees the second queued, so neither runs alone.
    assert await asyncio.gather(batcher.submit([1], [1]), batcher.submit([2], [1])) == [[2], [4]]
    assert batcher.stats.alone == 0
    assert len(model.threads) == 2 and all(not name.startswith("infer-m4-alone") for name in model.threads)
    await batcher.close()


async def test_one_worker_has_no_alone_thread() -> None:
    model = Model()
    setups: list[int] = []
    batcher = DynamicBatcher(
        model, BatchPolicy(max_batch_size=4, max_delay_s=0.0), name="m5", alone_thread_setup=lambda: setups.append(1)
    )
    assert await batcher.submit([1], [1]) == [2]
    assert setups == [] and batcher.stats.alone == 0
    await batcher.close()


async def test_batches_stop_going_alone_while_calls_overlap_and_go_alone_again_when_they_stop() -> None:
    """Two callers at a time would wait for each other's batch alone: while batches keep overlapping other work,
    a batch that momentarily finds nothing else does not go alone; once the overlap fades, batches go alone again."""
    model = Model()
    batcher = _one_item_batches_on_two_workers(model, "m6")
    for i in range(6):  # two calls at a time: every batch finishes with the other one running
        assert await asyncio.gather(batcher.submit([i], [1]), batcher.submit([i + 100], [1])) == [
            [2 * i],
            [2 * i + 200],
        ]
    assert batcher.stats.alone == 0
    alone_after: list[int] = []
    for i in range(8):  # one call at a time now
        assert await batcher.submit([i], [1]) == [2 * i]
        alone_after.append(batcher.stats.alone)
    assert alone_after[0] == 0, "right after the overlapping calls, a lone call still runs on a worker"
    assert alone_after[-1] > alone_after[-2] > 0, "once calls stop overlapping, each batch goes alone"
    await batcher.close()


def _one_item_batches_on_two_workers(run: Callable[[list[int]], Sequence[int]], name: str) -> DynamicBatcher[int, int]:
    """Batches of one item, two workers, and an alone thread (set up by doing nothing)."""
    return DynamicBatcher(
        run, BatchPolicy(max_batch_size=1, max_delay_s=0.0), name=name, workers=2, alone_thread_setup=lambda: None
    )
