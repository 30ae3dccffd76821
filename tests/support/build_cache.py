"""What a test builds slowly and always the same way from files in the checkout, kept outside the clone.

A model a test trains only to have one (the served sentiment model: ~90 CPU-s of a ``make test`` on two cores) is
built once per distinct input and reused by later runs and clones, as the Makefile caches wheels and Kafka's jars
(``$GRISTMILL_CACHE``, ``~/.cache/gristmill`` by default). The key is the SHA-256 of every input: the files named
(each source file of the code that builds it, the data, the base model's weights), the versions of the libraries
that compute it, and the build's own parameters. Any change to any of them builds again, so a cached directory is
what the same code would build now; a run that changes the training code still trains.

A build goes to a temporary directory beside its final place and is renamed there when complete: an interrupted
build leaves nothing a later run would take, and of two runs building at once the second's rename loses and its
copy is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gristmill.core.base_models import content_sha256
from gristmill.core.storage.base import sha256_file

CACHE = Path(os.environ.get("GRISTMILL_CACHE", Path.home() / ".cache" / "gristmill")) / "test-builds"
KEY_FILE = "build-key.json"
# Builds kept per name, the most recently used: every change to the code they depend on makes a new one (~90 MB
# for the sentiment model), and a cache that only grows would fill the disk over a few hundred commits.
KEEP = 3


def files_digest(paths: Iterable[Path], *, suffixes: tuple[str, ...] = (".py",)) -> str:
    """One SHA-256 over the files named and the files with ``suffixes`` under the directories named, each by its
    name below what was named (not its absolute path: another clone of the same commit has the same digest)."""
    found: dict[str, str] = {}
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()):
                found[f"{path.name}/{file.relative_to(path)}"] = sha256_file(file)
        else:
            found[path.name] = sha256_file(path)
    return content_sha256(found)


def cached_build(name: str, key: Mapping[str, str], build: Callable[[Path], None]) -> Path:
    """The directory ``build(directory)`` fills for ``key``: built now if no earlier run built it for this key."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:32]
    final = CACHE / name / digest
    if (final / KEY_FILE).is_file():
        os.utime(final)  # used now: the last to be evicted
        return final
    partial = CACHE / name / f".{digest}.{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        build(partial)
        (partial / KEY_FILE).write_text(json.dumps(dict(key), indent=1, sort_keys=True))
        try:
            partial.rename(final)
        except OSError:  # another run finished the same build first
            if not (final / KEY_FILE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _evict(CACHE / name, keep=final)
    return final


def _evict(folder: Path, *, keep: Path) -> None:
    """Remove all but the ``KEEP`` most recently used complete builds in ``folder`` (never ``keep``)."""
    builds = sorted(
        (p for p in folder.iterdir() if (p / KEY_FILE).is_file() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
