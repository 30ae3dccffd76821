"""Work done once across the ranks (``ml.ranks``): two worker processes on a gloo process group, as Ray Train starts
them. Each chunk is computed on one rank, every rank gets every result in order, and a teacher's outputs over two
ranks are what one process computes."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

import torch

from gristmill.training.devtools import LABELS, sentiment_rows
from gristmill.training.ml import distillation as D
from gristmill.training.ml.ranks import each_chunk_once
from gristmill.training.tasks import training_task
from gristmill.training.tasks.text_classification import LabelledText

WORLD = 2
TIMEOUT_S = 120


def _examples() -> list[LabelledText]:
    # 150 examples: three teacher batches of 64, 64 and 22, so the ranks get unequal shares.
    return [LabelledText(t, LABELS.index(label)) for t, label in sentiment_rows(150, 5)]


def _worker(rank: int, port: int, model: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    computed: list[int] = []

    def compute(chunk: int) -> dict[str, Any]:
        computed.append(chunk)
        return {"chunk": chunk, "square": chunk * chunk}

    results = each_chunk_once(7, compute, rank=rank, world_size=WORLD)
    task = training_task("text-classification")
    outputs = D.teacher_outputs(
        Path(model), task, _examples(), LABELS, max_length=32, device=torch.device("cpu"), rank=rank, world_size=WORLD
    )
    torch.save({"logits": outputs.logits, "hidden": outputs.hidden}, Path(out, f"teacher-{rank}.pt"))
    Path(out, f"chunks-{rank}.json").write_text(json.dumps({"computed": computed, "results": results}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_compute_each_chunk_once_and_get_the_teacher_outputs_one_process_gets(
    tiny_model: Path, tmp_path: Path
) -> None:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "gristmill.training.ml.distillation"])
    port = _free_port()
    procs = [context.Process(target=_worker, args=(r, port, str(tiny_model), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]

    chunks = [json.loads((tmp_path / f"chunks-{r}.json").read_text()) for r in range(WORLD)]
    assert chunks[0]["computed"] == [0, 2, 4, 6] and chunks[1]["computed"] == [1, 3, 5]
    expected = [{"chunk": i, "square": i * i} for i in range(7)]
    assert chunks[0]["results"] == chunks[1]["results"] == expected

    alone = D.teacher_outputs(
        tiny_model, training_task("text-classification"), _examples(), LABELS, max_length=32, device=torch.device("cpu")
    )
    for rank in range(WORLD):
        shared = torch.load(tmp_path / f"teacher-{rank}.pt")
        assert shared["logits"].shape == (150, 2)
        assert torch.allclose(shared["logits"], alone.logits, atol=1e-5)
        assert torch.allclose(shared["hidden"], alone.hidden, atol=1e-5)


def test_one_rank_computes_every_chunk_in_order() -> None:
    assert each_chunk_once(4, lambda i: i + 10) == [10, 11, 12, 13]
    assert each_chunk_once(0, lambda i: i) == []
