"""How replies ended, per version: a finished reply counts as succeeded, one that failed as failed, one its client
closed for neither; a flush publishes and resets the counts, and a failed flush loses none of them."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gristmill.core.errors import UnavailableError
from gristmill.serving.domain.generation import (
    FinishReason,
    Generation,
    GenerationChunk,
    GenerationRequest,
    GenerationStream,
)
from gristmill.serving.domain.outcomes import OutcomeCounter, OutcomeKey, Outcomes

KEY = OutcomeKey("default", "assistant", 2, "chat")


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.published: list[dict[OutcomeKey, Outcomes]] = []

    def publish_outcomes(self, counts: Mapping[OutcomeKey, Outcomes]) -> None:
        if self.fail:
            raise OSError("the database is away")
        self.published.append(dict(counts))


def test_flush_publishes_and_resets_and_a_failed_flush_keeps_the_counts() -> None:
    counter = OutcomeCounter()
    other = OutcomeKey("default", "assistant", 1, "chat")
    for failed in (False, False, True):
        counter.count(KEY, failed=failed)
    counter.count(other, failed=False)
    with pytest.raises(OSError):
        counter.flush(Recorder(fail=True))
    counter.count(KEY, failed=False)  # counted while the failed flush was out: added, not replaced
    recorder = Recorder()
    assert counter.flush(recorder) == 2
    assert recorder.published == [{KEY: Outcomes(3, 1), other: Outcomes(1, 0)}]
    assert counter.flush(recorder) == 0 and len(recorder.published) == 1


async def _ended(push: list[GenerationChunk | BaseException], *, close: bool = False) -> list[bool]:
    """Run a reply over ``push`` and count its outcome as the service's done hook does."""
    counter = OutcomeCounter()
    stream = GenerationStream(GenerationRequest("r", (1, 2), 4), lambda key: None)
    generation = Generation(stream, registered_model_name="assistant", version=2, on_done=lambda ok: None)

    def count(ok: bool) -> None:
        if ok or generation.error is not None:
            counter.count(KEY, failed=not ok)

    generation.add_done_hook(count)
    for item in push:
        stream.push(item)
    if close:
        await generation.__anext__()
        generation.close()
    else:
        try:
            async for _ in generation:
                pass
        except UnavailableError:
            pass
    recorder = Recorder()
    counter.flush(recorder)
    outcomes = recorder.published[0][KEY] if recorder.published else Outcomes()
    return [outcomes.succeeded == 1, outcomes.failed == 1]


async def test_a_finished_reply_succeeds_a_failed_one_fails_and_a_closed_one_counts_for_neither() -> None:
    finished = await _ended([GenerationChunk("hi", (5,)), GenerationChunk("", (6,), FinishReason.LENGTH)])
    failed = await _ended([GenerationChunk("hi", (5,)), UnavailableError("the model was unloaded")])
    closed = await _ended([GenerationChunk("hi", (5,))], close=True)
    assert (finished, failed, closed) == ([True, False], [False, True], [False, False])
