from __future__ import annotations

from collections import Counter
from pathlib import Path

from gristmill.cli.demo_data import generate, write_jsonl
from gristmill.core.pii import PiiMasker


def test_generator_is_deterministic_balanced_and_needs_some_cleaning(tmp_path: Path) -> None:
    items = list(generate(400, seed=3))
    assert items == list(generate(400, seed=3))
    assert items != list(generate(400, seed=4))
    assert Counter(i.label for i in items) == {"positive": 200, "negative": 200}
    texts = [i.text for i in items]
    assert len(set(texts)) < len(texts), "some exact duplicates for the import to drop"
    masked = sum(1 for t in texts if PiiMasker().mask(t)[1])
    assert 1 <= masked <= 40, "a few items carry contact details to mask"
    path = write_jsonl(tmp_path / "demo.jsonl", 10)
    assert len(path.read_text().splitlines()) == 10
