"""A remote checkpoint restored by several workers of one node: one download, never rewritten while read, removed
after the last reader (``ml.node_files.node_checkpoint``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gristmill.training.ml.node_files import node_checkpoint


@dataclass
class _FileSystem:
    type_name: str = "s3"


@dataclass
class _Checkpoint:
    """What ``node_checkpoint`` uses of a ``ray.train.Checkpoint``; counts and slows its downloads."""

    path: str = "bucket/runs/job-1/checkpoint_000002"
    filesystem: _FileSystem = field(default_factory=_FileSystem)
    delay_s: float = 0.0
    fail: bool = False
    downloads: int = 0

    def to_directory(self, path: str) -> str:
        self.downloads += 1
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"m" * 2048)
        time.sleep(self.delay_s)  # a partial download, for a while: other readers must not see it
        if self.fail:
            raise ConnectionError("the object store went away")
        (Path(path) / "optimizer.pt").write_bytes(b"o" * 4096)
        return path


def _complete(directory: Path) -> bool:
    return (directory / "optimizer.pt").read_bytes() == b"o" * 4096 and sorted(p.name for p in directory.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
    ]


def test_workers_reading_at_once_share_one_complete_download(tmp_path: Path) -> None:
    checkpoint = _Checkpoint(delay_s=0.3)
    seen: list[Path] = []
    release = threading.Event()

    def reader() -> None:
        with node_checkpoint(checkpoint, root=tmp_path) as directory:
            assert _complete(directory)
            seen.append(directory)
            release.wait(10)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 4 and len(set(seen)) == 1 and checkpoint.downloads == 1
    release.set()
    for thread in threads:
        thread.join(10)
    assert not seen[0].exists()  # the last reader out removed it
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_a_late_reader_never_downloads_over_files_being_read(tmp_path: Path) -> None:
    """ray-project/ray#48726: a reader arriving after the download had finished downloaded again into the same
    directory. Here the first reader's files stay as they were, and the second reads them."""
    checkpoint = _Checkpoint()
    with node_checkpoint(checkpoint, root=tmp_path) as first:
        before = (first / "optimizer.pt").stat()
        with node_checkpoint(checkpoint, root=tmp_path) as second:
            assert second == first and checkpoint.downloads == 1
            after = (first / "optimizer.pt").stat()
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert _complete(first)  # still there for the first reader
    assert not first.exists()
    # Another checkpoint is another download.
    with node_checkpoint(_Checkpoint(path="bucket/runs/job-1/checkpoint_000003"), root=tmp_path) as other:
        assert other != first and _complete(other)


def test_a_failed_download_leaves_nothing_a_reader_could_take_for_complete(tmp_path: Path) -> None:
    broken = _Checkpoint(fail=True)
    with pytest.raises(ConnectionError), node_checkpoint(broken, root=tmp_path):
        pass
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    retried = _Checkpoint()  # the same checkpoint, the store back
    with node_checkpoint(retried, root=tmp_path) as directory:
        assert retried.downloads == 1 and _complete(directory)


def test_a_reader_that_died_does_not_keep_the_download_forever(tmp_path: Path) -> None:
    checkpoint = _Checkpoint()
    with node_checkpoint(checkpoint, root=tmp_path) as directory:
        # A worker killed while reading leaves its reader file behind (its process id is gone).
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        readers = next(p for p in tmp_path.iterdir() if p.name.endswith(".readers"))
        (readers / f"{int(dead.stdout)}-deadbeef").touch()
        (readers / f"{os.getpid()}-cafebabe").touch()  # a live reader of this process: it keeps the download
    assert directory.exists()
    (readers / f"{os.getpid()}-cafebabe").unlink()
    with node_checkpoint(checkpoint, root=tmp_path):
        pass
    assert not directory.exists() and checkpoint.downloads == 1
