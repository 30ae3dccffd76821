"""FSDP in the training loop (``resources.fsdp``, ``ml.sharding``): two worker processes on a gloo process group,
as Ray Train starts them, without Ray (the Ray path is a test in ``tests/integration/test_ray_training.py``).

Sharding changes where the weights live, not what is learned: an FSDP run must log the losses, reach the
validation and test scores and publish the adapter a DDP run does on the same batches. A run killed after a
checkpoint must resume from the gathered weights and optimizer state and end where an uninterrupted run ends."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.devtools import chat_rows
from gristmill.training.domain import spec as d
from gristmill.training.ml.loop import FINAL_CHECKPOINT_NAME, FaultInjection, ListSink, LoopConfig, LoopRunner
from services.training.tests.unit.test_chat_sft import _build_arguments, _loop_config, _resolver, _spec

WORLD = 2
TIMEOUT_S = 240


class SharedDirectorySession:
    """Checkpoints in one folder every rank reads (as Ray hands every worker the latest one); rank 0 writes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None = None) -> None:
        import shutil

        with (self.root / "reports.jsonl").open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), **metrics}) + "\n")
        if checkpoint_dir is not None:
            count = len([p for p in self.root.iterdir() if p.is_dir()])
            dest = self.root / (name or f"checkpoint_{count:06d}")
            shutil.copytree(checkpoint_dir, dest.with_suffix(".tmp"))
            dest.with_suffix(".tmp").rename(dest)

    def latest_checkpoint(self) -> Any:
        import contextlib

        found = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
        return contextlib.nullcontext(found[-1] if found else None)


def _worker(rank: int, port: int, config: LoopConfig, root: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    sink = ListSink()
    try:
        LoopRunner(replace(config, sink=sink), rank, WORLD, 0, SharedDirectorySession(Path(root))).run()
    finally:
        Path(out, f"records-{rank}.json").write_text(json.dumps(sink.records))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _context() -> Any:
    """Workers forked from a server that imported torch, transformers' Llama and PEFT once: spawning imported them
    anew in each of the six processes these tests start (~5 s each). Not ``fork``: this process's OpenMP threads
    would not survive it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "peft", "transformers.models.llama.modeling_llama", "gristmill.training.ml.loop", __name__]
    )
    return context


def _run(config: LoopConfig, root: Path, *, expect_exit: bool = False) -> list[dict[str, Any]]:
    """Both ranks in fresh processes; rank 0's progress records. ``expect_exit``: a fault ends rank 0; rank 1,
    then waiting in a collective for good, is stopped (Ray would restart the group)."""
    root.mkdir(parents=True, exist_ok=True)
    context = _context()
    port = _free_port()
    procs = [context.Process(target=_worker, args=(r, port, config, str(root), str(root))) for r in range(WORLD)]
    for p in procs:
        p.start()
    procs[0].join(TIMEOUT_S)
    for p in procs[1:]:
        p.join(5 if expect_exit else TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    if expect_exit:
        assert codes[0] == 1, codes
        return []
    assert codes == [0, 0], f"a worker failed: exit codes {codes}"
    records: list[dict[str, Any]] = json.loads((root / "records-0.json").read_text())
    return records


def _config(model: Path, *, fsdp: bool, method: d.Method = d.Method.LORA, **hyper: Any) -> LoopConfig:
    config = _loop_config(model, ListSink(), epochs=1, per_worker_batch_size=4, eval_every_steps=3, **hyper)
    # 65 validation conversations in chunks of 32: rank 0 evaluates two chunks, rank 1 one (and one more, discarded,
    # under FSDP, whose forward passes all-gather with rank 0's).
    examples = {"train": chat_rows(48, 1), "validation": chat_rows(65, 2), "test": chat_rows(6, 3)}
    config = replace(config, examples=examples)
    if method is d.Method.FULL:
        config = replace(config, method=method, lora=None, hyper=replace(config.hyper, learning_rate=2e-3))
    return replace(config, fsdp=fsdp)


def _losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["metrics"]["loss"] for r in records if r["type"] == "train"]


def _scores(records: list[dict[str, Any]], split: str) -> list[dict[str, float]]:
    return [r["metrics"] for r in records if r["type"] == "eval" and r["split"] == split]


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = root / FINAL_CHECKPOINT_NAME
    files = list(final.glob("adapter_model.safetensors")) or list(final.glob("model.safetensors"))
    assert files, f"no weights published in {sorted(p.name for p in final.iterdir())}"
    return load_file(str(files[0]))


def test_fsdp_learns_what_ddp_learns_on_the_same_batches(tiny_llama: Path, tmp_path: Path) -> None:
    ddp = _run(_config(tiny_llama, fsdp=False), tmp_path / "ddp")
    # With activation checkpointing as well (recomputing a sharded block's layers changes nothing either).
    sharded = _config(tiny_llama, fsdp=True)
    sharded = replace(sharded, hyper=replace(sharded.hyper, gradient_checkpointing=True))
    fsdp = _run(sharded, tmp_path / "fsdp")
    assert len(_losses(fsdp)) == len(_losses(ddp)) >= 2
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-4)
    assert _losses(fsdp)[-1] < _losses(fsdp)[0]
    for split in ("validation", "test"):
        assert len(_scores(fsdp, split)) == len(_scores(ddp, split)) >= 1
        for ours, theirs in zip(_scores(fsdp, split), _scores(ddp, split), strict=True):
            assert ours.keys() == theirs.keys()
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    started = next(r for r in fsdp if r["type"] == "started")
    assert started["world_size"] == WORLD
    published, expected = _final_weights(tmp_path / "fsdp"), _final_weights(tmp_path / "ddp")
    assert published.keys() == expected.keys() and published
    for name, value in expected.items():
        torch.testing.assert_close(published[name], value, rtol=1e-4, atol=1e-6)


def test_a_killed_fsdp_run_resumes_from_its_gathered_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    # Full fine-tuning (no dropout): a resumed run must end exactly where an uninterrupted one does, which needs
    # every shard's weights and AdamW moments back.
    whole = _run(_config(tiny_llama, fsdp=True, method=d.Method.FULL), tmp_path / "whole")
    marker = tmp_path / "killed"
    fault = FaultInjection(rank=0, at_step=4, marker=str(marker), settle_s=0.0)
    config = replace(_config(tiny_llama, fsdp=True, method=d.Method.FULL), fault=fault)
    _run(config, tmp_path / "resumed", expect_exit=True)
    assert marker.exists()
    checkpoints = sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name.startswith("checkpoint_"))
    assert checkpoints == ["checkpoint_000000"], checkpoints
    resumed = _run(config, tmp_path / "resumed")
    assert next(r for r in resumed if r["type"] == "started")["step"] == 3
    (test,), (expected_test,) = _scores(resumed, "test"), _scores(whole, "test")
    assert test == pytest.approx(expected_test, rel=1e-4, abs=1e-6)
    published, expected = _final_weights(tmp_path / "resumed"), _final_weights(tmp_path / "whole")
    for name, value in expected.items():
        torch.testing.assert_close(published[name], value, rtol=1e-4, atol=1e-5)


def test_fsdp_maps_from_the_proto_and_is_refused_where_it_cannot_shard(
    objects: ObjectStore, preference_version: Any, chat_version: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    two = d.build_resources(num_workers=2, fsdp=True)
    spec = d.build_spec(**_build_arguments(objective=d.Objective.SFT, resources=two))
    proto = convert.spec_to_proto(spec)
    assert proto.resources.fsdp and convert.spec_from_proto(proto) == spec
    assert d.flatten_hyper_parameters(spec)["fsdp"] == "true"

    with pytest.raises(InvalidArgumentError, match="spec.resources.fsdp shards the model over the workers") as one:
        d.build_resources(fsdp=True)
    assert one.value.details["field"] == "spec.resources.fsdp" and "num_workers >= 2 (got 1)" in one.value.message
    gpus = d.build_resources(num_workers=2, fsdp=True, use_gpu=True)
    qlora = d.build_lora(method=d.Method.QLORA, given=False)
    with pytest.raises(InvalidArgumentError, match="method qlora is not sharded") as method:
        d.build_spec(**_build_arguments(method=d.Method.QLORA, lora=qlora, resources=gpus, objective=d.Objective.SFT))
    assert method.value.details["field"] == "spec.resources.fsdp"
    for objective in (d.Objective.DPO, d.Objective.CLASSIFY):
        with pytest.raises(InvalidArgumentError, match=f"objective {objective.value} trains a whole copy per worker"):
            d.build_spec(**_build_arguments(objective=objective, resources=two))
    # Objective left to the dataset version: the resolver refuses a preference version (DPO) before any Ray work,
    # and takes a chat version (SFT).
    resolver = _resolver(objects, tmp_path)
    with pytest.raises(InvalidArgumentError, match="objective dpo trains a whole copy per worker") as implied:
        resolver.resolve(_spec(tiny_llama, preference_version(objects), resources=two))
    assert implied.value.details["field"] == "spec.resources.fsdp"
    resolved = resolver.resolve(_spec(tiny_llama, chat_version(objects), resources=two))
    assert resolved.spec.resources.fsdp and resolved.spec.objective is d.Objective.SFT
