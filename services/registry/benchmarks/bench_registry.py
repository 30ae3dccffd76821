"""Registry latencies over real gRPC on one machine (in-process platform: SQLite file, local-disk objects).

    .venv/bin/python services/registry/benchmarks/bench_registry.py [--versions 30] [--moves 200] [--mb 4]

Measures RegisterModelVersion(wait_for_verification) with a ``--mb`` MB weights file (read, checksummed,
copied, manifest + card written), SetAlias (lock, compare, history row, outbox event), and
GetDownloadManifest by alias (what serving calls). Prints p50/p95/max per call and calls per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.manifests import FileEntry, ModelManifest
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings

SIG = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[-1])],
    outputs=[common_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2])],
)


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - start)
    return out


def report(name: str, seconds: list[float]) -> None:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    print(
        f"{name:<28} n={len(seconds):<4} p50={statistics.median(ordered) * 1000:7.1f} ms  "
        f"p95={p95 * 1000:7.1f} ms  max={ordered[-1] * 1000:7.1f} ms  {len(seconds) / sum(seconds):7.1f}/s"
    )


async def main(versions: int, moves: int, megabytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(
            RegistrySettings(data_dir=Path(tmp), grpc_port=0),
            Infrastructure(kafka=KafkaSettings(), s3=S3Settings()),
            embedded_security("registry"),
        )
        objects = app.host.platform.objects
        weights = os.urandom(megabytes * 1024 * 1024)
        manifests = []
        for i in range(versions):
            w = objects.put_bytes(f"jobs/j{i}/model.safetensors", weights[:-1] + bytes([i % 256]))
            c = objects.put_bytes(f"jobs/j{i}/config.json", b"{}")
            m = ModelManifest(
                files={
                    n: FileEntry(x.key, x.sha256, x.size) for n, x in (("model.safetensors", w), ("config.json", c))
                },
                task_type="TASK_TYPE_TEXT_CLASSIFICATION",
                label_map=["a", "b"],
                signature={},
                lineage={},
            )
            ref = m.put(objects, f"jobs/j{i}")
            manifests.append(common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes))
        port = await app.host.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RegistryServiceStub(channel)

                async def register(i: int) -> Any:
                    return await stub.RegisterModelVersion(
                        pb.RegisterModelVersionRequest(
                            registered_model_name="bench",
                            create_model_if_missing=True,
                            source_prefix=f"jobs/j{i}",
                            manifest=manifests[i],
                            signature=SIG,
                            wait_for_verification=True,
                        )
                    )

                async def move(i: int) -> Any:
                    return await stub.SetAlias(
                        pb.SetAliasRequest(registered_model_name="bench", alias="production", version=i % versions + 1)
                    )

                async def download(i: int) -> Any:
                    return await stub.GetDownloadManifest(
                        pb.GetDownloadManifestRequest(
                            registered_model_name="bench", selector=common_pb2.ModelVersionSelector(alias="production")
                        )
                    )

                report(f"RegisterModelVersion {megabytes} MB", await timed(versions, register))
                report("SetAlias (move)", await timed(moves, move))
                report("GetDownloadManifest(alias)", await timed(moves, download))
        finally:
            await app.host.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=30)
    parser.add_argument("--moves", type=int, default=200)
    parser.add_argument("--mb", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.versions, args.moves, args.mb))
