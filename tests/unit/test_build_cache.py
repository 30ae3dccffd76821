"""tests/support/build_cache.py: a slow, deterministic build reused for the same inputs, redone for new ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import build_cache
from tests.support.build_cache import cached_build, files_digest


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(build_cache, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_a_build_runs_once_per_key_and_a_failed_one_leaves_nothing(cache: Path) -> None:
    builds: list[str] = []

    def build(label: str) -> Callable[[Path], None]:
        def run(directory: Path) -> None:
            builds.append(label)
            (directory / "model.txt").write_text(label)

        return run

    first = cached_build("thing", {"code": "a"}, build("a"))
    assert cached_build("thing", {"code": "a"}, build("again")) == first
    other = cached_build("thing", {"code": "b"}, build("b"))
    assert builds == ["a", "b"] and other != first
    assert (first / "model.txt").read_text() == "a" and (other / "model.txt").read_text() == "b"

    def broken(directory: Path) -> None:
        (directory / "half.txt").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cached_build("thing", {"code": "c"}, broken)
    assert sorted(p.name for p in (cache / "thing").iterdir()) == sorted([first.name, other.name])


def test_the_digest_follows_contents_and_relative_names_not_where_the_checkout_is(tmp_path: Path) -> None:
    for clone in ("one", "two"):
        (tmp_path / clone / "code" / "pkg").mkdir(parents=True)
        (tmp_path / clone / "code" / "pkg" / "m.py").write_text("x = 1\n")
        (tmp_path / clone / "code" / "notes.md").write_text("ignored")
    assert files_digest([tmp_path / "one" / "code"]) == files_digest([tmp_path / "two" / "code"])
    (tmp_path / "two" / "code" / "notes.md").write_text("changed, but not a .py file")
    assert files_digest([tmp_path / "one" / "code"]) == files_digest([tmp_path / "two" / "code"])
    (tmp_path / "two" / "code" / "pkg" / "m.py").write_text("x = 2\n")
    assert files_digest([tmp_path / "one" / "code"]) != files_digest([tmp_path / "two" / "code"])


def test_only_the_most_recently_used_builds_are_kept(cache: Path) -> None:
    import os
    import time

    made = [cached_build("thing", {"code": str(i)}, lambda d: None) for i in range(build_cache.KEEP)]
    for age, path in enumerate(reversed(made)):  # the first made is the oldest
        os.utime(path, (time.time() - 100 * (age + 1),) * 2)
    assert cached_build("thing", {"code": "0"}, lambda d: None) == made[0]  # a reuse makes it the newest
    newest = cached_build("thing", {"code": "new"}, lambda d: None)
    kept = {p for p in (cache / "thing").iterdir()}
    assert len(kept) == build_cache.KEEP and newest in kept and made[0] in kept and made[1] not in kept
