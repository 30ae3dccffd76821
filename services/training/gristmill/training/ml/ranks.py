"""Work every rank needs the result of, done once across the ranks: each rank computes a share of the chunks and
they exchange results, so a job on N workers pays 1/N of it instead of all of it on every rank.

Used for what a job computes before training from another model (a teacher's outputs, paraphrases). The chunks
are fixed by the data, not by the number of workers, and each is computed the same way wherever it runs, so the
result does not depend on how many workers the job has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def each_chunk_once(count: int, compute: Callable[[int], T], *, rank: int = 0, world_size: int = 1) -> list[T]:
    """``[compute(0), ..., compute(count - 1)]`` on every rank, each chunk computed on one rank only (chunk ``i`` on
    rank ``i % world_size``). Every rank must call it, with the same ``count``: it is a collective. Results travel
    pickled, so ``compute`` should return CPU tensors or plain data."""
    if world_size <= 1:
        return [compute(i) for i in range(count)]
    import torch.distributed as dist

    mine = {i: compute(i) for i in range(rank, count, world_size)}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    merged: dict[int, T] = {}
    for part in gathered:
        merged.update(part)
    return [merged[i] for i in range(count)]
