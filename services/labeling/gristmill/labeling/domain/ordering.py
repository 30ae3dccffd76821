"""Pseudo-random task order that is stable per annotator and computable inside an SQL ORDER BY.

Each item gets a random ``shuffle_key`` in [0, P) when it is stored. An annotator's order is the order
of ``(shuffle_key * multiplier + offset) mod P`` with P prime and (multiplier, offset) derived from the
project and annotator ids: an affine map modulo a prime is a bijection, so every annotator sees every
item, in an order of their own, that stays the same across calls and restarts. Plain integer
arithmetic (products below 2**62) works the same in SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from gristmill.labeling.domain.model import Project, TaskOrdering

PRIME = 2_147_483_647  # 2**31 - 1


# Shuffle keys need to be unpredictable across installations, not secret: a fast generator seeded from
# the OS is enough (an import draws one per item).
_RANDOM = random.Random(os.urandom(16))


def new_shuffle_key() -> int:
    return _RANDOM.randrange(PRIME)


def annotator_permutation(project_id: str, annotator_id: str) -> tuple[int, int]:
    """(multiplier, offset) of this annotator's order in this project; multiplier is never 0."""
    digest = hashlib.sha256(f"{project_id}\x00{annotator_id}".encode()).digest()
    multiplier = int.from_bytes(digest[:8], "big") % (PRIME - 1) + 1
    offset = int.from_bytes(digest[8:16], "big") % PRIME
    return multiplier, offset


def order_key(shuffle_key: int, multiplier: int, offset: int) -> int:
    """The same value the SQL ORDER BY computes (for tests and in-memory stores)."""
    return (shuffle_key * multiplier + offset) % PRIME


@dataclass(frozen=True)
class OfferRule:
    """Which items an annotator may be offered and in what order; the store turns it into one query.

    An item is offerable while its annotations plus open leases stay below ``annotations_per_item``, it is
    not RESOLVED, and this annotator has not annotated, skipped or leased it. ``RANDOM`` orders by
    ``order_key(shuffle_key, multiplier, offset)`` (then sequence number), ``UNCERTAINTY_FIRST`` by the
    latest prediction's top probability (items without one last), ``SEQUENTIAL`` by import order.
    """

    annotations_per_item: int
    ordering: TaskOrdering
    multiplier: int = 1
    offset: int = 0
    modulus: int = PRIME

    @classmethod
    def for_annotator(cls, project: Project, annotator_id: str) -> OfferRule:
        settings = project.settings
        if settings.task_ordering is not TaskOrdering.RANDOM:
            return cls(settings.annotations_per_item, settings.task_ordering)
        multiplier, offset = annotator_permutation(project.project_id, annotator_id)
        return cls(settings.annotations_per_item, settings.task_ordering, multiplier, offset)
