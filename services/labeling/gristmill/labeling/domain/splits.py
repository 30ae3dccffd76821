"""Deterministic train/validation/test splits and the fingerprint that makes publishing idempotent."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.labeling.domain.model import Response, Split, SplitRatios, SplitStrategy

SPLITS = (Split.TRAIN, Split.VALIDATION, Split.TEST)
RATIO_TOLERANCE = 1e-6


@dataclass(frozen=True)
class DatasetItem:
    """An item with a consensus, as it goes into a dataset version."""

    item_id: str
    external_id: str
    text: str
    labels: tuple[str, ...]
    # Chat and preference items only: where the item came from (an import, feedback), every annotation's
    # response (oldest first) and a reviewer's resolution; the task type turns them into rows.
    source: str = ""
    responses: tuple[Response, ...] = ()
    resolved_response: Response | None = None


def validate_ratios(ratios: SplitRatios) -> SplitRatios:
    """The ratios, or 0.8/0.1/0.1 when all are zero; ``InvalidArgumentError`` when negative or not summing to 1."""
    values = {split: ratios.of(split) for split in SPLITS}
    if all(v == 0 for v in values.values()):
        return SplitRatios()
    for split, value in values.items():
        if value < 0 or not math.isfinite(value):
            raise InvalidArgumentError(f"ratios.{split.value} must be a non-negative number, got {value}")
    total = sum(values.values())
    if abs(total - 1.0) > RATIO_TOLERANCE:
        raise InvalidArgumentError(
            f"ratios must sum to 1 (train {values[Split.TRAIN]} + validation {values[Split.VALIDATION]} + "
            f"test {values[Split.TEST]} = {total})"
        )
    return ratios


def allocate(count: int, ratios: SplitRatios) -> dict[Split, int]:
    """Split ``count`` items by the largest-remainder method: each share is within 1 of count * ratio."""
    raw = {split: count * ratios.of(split) for split in SPLITS}
    result = {split: math.floor(value) for split, value in raw.items()}
    left = count - sum(result.values())
    # Ties go to the earlier split (train, then validation, then test), so the result is deterministic.
    by_remainder = sorted(SPLITS, key=lambda s: (-(raw[s] - result[s]), SPLITS.index(s)))
    for split in by_remainder[:left]:
        result[split] += 1
    return result


def split_items(
    items: Sequence[DatasetItem], *, ratios: SplitRatios, seed: int, strategy: SplitStrategy
) -> dict[Split, list[DatasetItem]]:
    """Assign every item to a split. Same items, labels, ratios, seed and strategy → same split.

    STRATIFIED splits each label (label combination for multi-label) separately, so each split's count per
    label is within 1 of its ratio. RANDOM shuffles everything once. A split with a non-zero ratio that
    would stay empty (tiny datasets) takes one item from the largest split.
    """
    nonzero = [split for split in SPLITS if ratios.of(split) > 0]
    if len(items) < len(nonzero):
        raise FailedPreconditionError(
            f"only {len(items)} item(s) have a consensus label, fewer than the {len(nonzero)} non-empty splits "
            "the ratios ask for; label more items or set a ratio to 0"
        )
    groups: dict[tuple[str, ...], list[DatasetItem]] = defaultdict(list)
    for item in sorted(items, key=lambda i: i.item_id):
        key = item.labels if strategy is SplitStrategy.STRATIFIED else ()
        groups[key].append(item)
    result: dict[Split, list[DatasetItem]] = {split: [] for split in SPLITS}
    for key in sorted(groups):
        members = groups[key]
        # A string seed is hashed with SHA-512 by `random`, so the order is stable across processes.
        random.Random(f"{seed}|{'|'.join(key)}").shuffle(members)
        start = 0
        for split, size in allocate(len(members), ratios).items():
            result[split].extend(members[start : start + size])
            start += size
    for split in nonzero:
        if not result[split]:
            donor = max(SPLITS, key=lambda s: (len(result[s]), -SPLITS.index(s)))
            result[split].append(result[donor].pop())
    return result


def fingerprint(
    items: Iterable[DatasetItem],
    *,
    ratios: SplitRatios,
    seed: int,
    strategy: SplitStrategy,
    schema_version: int,
    label_map: Sequence[str],
) -> str:
    """SHA-256 over the items (sorted by id), their labels and texts, and the split settings."""
    digest = hashlib.sha256()
    header = {
        "ratios": [ratios.train, ratios.validation, ratios.test],
        "seed": seed,
        "strategy": strategy.value,
        "schema_version": schema_version,
        "label_map": list(label_map),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item in sorted(items, key=lambda i: i.item_id):
        digest.update(b"\n")
        digest.update(json.dumps([item.item_id, item.text, list(item.labels)], ensure_ascii=False).encode())
    return digest.hexdigest()
