"""Deterministic stratified splits and the publish fingerprint."""

from __future__ import annotations

import pytest

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.labeling.domain.model import Split, SplitRatios, SplitStrategy
from gristmill.labeling.domain.splits import DatasetItem, allocate, fingerprint, split_items, validate_ratios

RATIOS = SplitRatios(0.7, 0.2, 0.1)


def _items(counts: dict[str, int]) -> list[DatasetItem]:
    out = []
    for label, count in counts.items():
        out += [DatasetItem(f"{label}-{i:04d}", f"x{i}", f"text {label} {i}", (label,)) for i in range(count)]
    return out


def _ids(split: dict[Split, list[DatasetItem]]) -> dict[Split, list[str]]:
    return {s: [i.item_id for i in items] for s, items in split.items()}


def test_same_seed_same_split_whatever_the_input_order() -> None:
    items = _items({"neg": 37, "pos": 63})
    a = split_items(items, ratios=RATIOS, seed=7, strategy=SplitStrategy.STRATIFIED)
    b = split_items(list(reversed(items)), ratios=RATIOS, seed=7, strategy=SplitStrategy.STRATIFIED)
    assert _ids(a) == _ids(b)
    c = split_items(items, ratios=RATIOS, seed=8, strategy=SplitStrategy.STRATIFIED)
    assert _ids(a) != _ids(c)


@pytest.mark.parametrize("seed", [0, 1, 42])
@pytest.mark.parametrize("counts", [{"neg": 37, "pos": 63, "mixed": 5}, {"a": 1, "b": 2, "c": 1000}])
def test_per_label_counts_are_within_one_of_the_ratio(seed: int, counts: dict[str, int]) -> None:
    split = split_items(_items(counts), ratios=RATIOS, seed=seed, strategy=SplitStrategy.STRATIFIED)
    assert sum(len(v) for v in split.values()) == sum(counts.values())
    for label, total in counts.items():
        for part in (Split.TRAIN, Split.VALIDATION, Split.TEST):
            got = sum(1 for item in split[part] if item.labels == (label,))
            # Tiny labels may lend one item to an empty split; every other label is within 1.
            slack = 2 if total < 3 else 1
            assert abs(got - total * RATIOS.of(part)) < slack, (label, part, got)


def test_random_strategy_is_deterministic_too() -> None:
    items = _items({"neg": 10, "pos": 90})
    a = split_items(items, ratios=RATIOS, seed=3, strategy=SplitStrategy.RANDOM)
    b = split_items(items, ratios=RATIOS, seed=3, strategy=SplitStrategy.RANDOM)
    assert _ids(a) == _ids(b)
    assert [len(a[s]) for s in (Split.TRAIN, Split.VALIDATION, Split.TEST)] == [70, 20, 10]


def test_allocate_uses_the_largest_remainder() -> None:
    # 7 * (0.7, 0.2, 0.1) = 4.9, 1.4, 0.7 → floors 4, 1, 0; two left go to 0.9 (train) and 0.7 (test).
    assert allocate(7, RATIOS) == {Split.TRAIN: 5, Split.VALIDATION: 1, Split.TEST: 1}


def test_every_non_empty_split_gets_an_item_when_possible() -> None:
    split = split_items(_items({"a": 1, "b": 1, "c": 1}), ratios=RATIOS, seed=0, strategy=SplitStrategy.STRATIFIED)
    assert all(split[s] for s in (Split.TRAIN, Split.VALIDATION, Split.TEST))
    with pytest.raises(FailedPreconditionError, match="fewer than the 3 non-empty splits"):
        split_items(_items({"a": 2}), ratios=RATIOS, seed=0, strategy=SplitStrategy.STRATIFIED)


@pytest.mark.parametrize(
    ("ratios", "message"),
    [(SplitRatios(0.9, 0.2, -0.1), "non-negative"), (SplitRatios(0.5, 0.2, 0.2), "must sum to 1")],
)
def test_bad_ratios(ratios: SplitRatios, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        validate_ratios(ratios)


def test_all_zero_ratios_mean_the_default() -> None:
    assert validate_ratios(SplitRatios(0, 0, 0)) == SplitRatios(0.8, 0.1, 0.1)


def test_fingerprint_changes_with_labels_texts_and_settings_only() -> None:
    items = _items({"neg": 3, "pos": 3})
    kwargs = {
        "ratios": RATIOS,
        "seed": 1,
        "strategy": SplitStrategy.STRATIFIED,
        "schema_version": 1,
        "label_map": ("neg", "pos"),
    }
    base = fingerprint(items, **kwargs)  # type: ignore[arg-type]
    assert fingerprint(list(reversed(items)), **kwargs) == base  # type: ignore[arg-type]
    relabeled = [DatasetItem(items[0].item_id, items[0].external_id, items[0].text, ("pos",)), *items[1:]]
    assert fingerprint(relabeled, **kwargs) != base  # type: ignore[arg-type]
    assert fingerprint(items, **{**kwargs, "seed": 2}) != base  # type: ignore[arg-type]
