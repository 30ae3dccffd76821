"""Several nodes on one machine for the cluster tests: deploy/cluster/cluster.sh from Python.

Each node is a network namespace with its own address on a private bridge. A process started on a node
(``NodeCluster.spawn``) sees only that node's interfaces; ``kill`` takes every process of a node down at once, as
a machine that loses power would. Servers bind their node's address (``GRISTMILL_BIND_HOST``), so the test
process (in the host's namespace) reaches them over the bridge, and so do the other nodes.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "cluster" / "cluster.sh"
LOCAL = ROOT / "deploy" / "local"


@dataclass
class NodeCluster:
    """``nodes`` nodes named 1..N under ``run_dir`` (each node's servers keep their data in ``run_dir/nK``)."""

    nodes: int
    run_dir: Path
    name: str = "gm"
    subnet: str = "10.231.0"
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GRISTMILL_CLUSTER_NAME": self.name,
            "GRISTMILL_CLUSTER_SUBNET": self.subnet,
            "GRISTMILL_RUN_DIR": str(self.run_dir),
        }

    def ip(self, node: int) -> str:
        return f"{self.subnet}.{10 + node}"

    def up(self) -> NodeCluster:
        self._script("down")  # whatever an interrupted earlier run left
        self._script("up", str(self.nodes))
        return self

    def down(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        self._script("down")
        for proc in self._procs:
            proc.wait(timeout=10)

    def run(self, node: int, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300) -> str:
        """Run ``argv`` on ``node`` to its end; its output, or AssertionError with it when it fails."""
        result = subprocess.run(
            [str(SCRIPT), "exec", str(node), *argv],
            env=self.env | dict(env or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{' '.join(argv)} on node {node} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def spawn(
        self, node: int, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``node`` in the background, its output appended to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(SCRIPT), "exec", str(node), *argv],
                env=self.env | dict(env or {}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def kill(self, node: int) -> None:
        """SIGKILL every process of ``node`` (the node crashes; its address stays, answering nothing)."""
        self._script("kill", str(node))

    def pids(self, node: int) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", f"{self.name}-n{node}"], capture_output=True, text=True, check=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def _script(self, *args: str) -> None:
        result = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AssertionError(f"cluster.sh {' '.join(args)} failed: {result.stderr.strip() or result.stdout}")


def wait_port(address: str, timeout_s: float, what: str = "") -> None:
    """Until ``host:port`` accepts TCP connections, else AssertionError naming ``what``."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{what or address} did not accept connections within {timeout_s:.0f} s")


def start_s3(cluster: NodeCluster, node: int, port: int = 8343) -> str:
    """The S3 server (deploy/local/seaweedfs.sh, the local stack's) on ``node``; returns its endpoint.

    Not the local stack's ports (8333 and 9333-9335): SeaweedFS also serves gRPC on Unix sockets named by port
    only (``/tmp/seaweedfs-master-grpc-19333.sock``), which the network namespaces share. On the same ports as a
    running local stack, each server's components reached the other's (the node's filer wrote to the local
    stack's volume server) and the node's S3 server never became ready."""
    cluster.run(node, [str(LOCAL / "seaweedfs.sh"), "start"], env={"GRISTMILL_S3_PORT": str(port)}, timeout=240)
    return f"{cluster.ip(node)}:{port}"


def start_kafka_cluster(cluster: NodeCluster, nodes: Sequence[int], port: int = 9092, timeout_s: float = 240) -> str:
    """A Kafka cluster: one broker (deploy/local/kafka.sh in cluster mode) on each of ``nodes``, broker id = node
    number, every broker a voter of one controller quorum. The brokers start together (each answers only once a
    quorum has formed); returns the bootstrap string, every broker's ``host:port``, so that a client reaches the
    cluster while any one broker is down."""
    voters = ",".join(f"{k}@{cluster.ip(k)}:{port + 1}" for k in nodes)
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes)[:22].decode()
    with ThreadPoolExecutor(len(nodes)) as pool:
        starts = [
            pool.submit(
                cluster.run,
                k,
                [str(LOCAL / "kafka.sh"), "start"],
                env={
                    "GRISTMILL_KAFKA_PORT": str(port),
                    "GRISTMILL_KAFKA_NODE_ID": str(k),
                    "GRISTMILL_KAFKA_VOTERS": voters,
                    "GRISTMILL_KAFKA_CLUSTER_ID": cluster_id,
                    "GRISTMILL_KAFKA_START_TIMEOUT": str(int(timeout_s)),
                },
                timeout=timeout_s + 60,
            )
            for k in nodes
        ]
        for start in starts:
            start.result()
    return ",".join(f"{cluster.ip(k)}:{port}" for k in nodes)


def kafka_controller(cluster: NodeCluster, node: int) -> int | None:
    """The active controller of the KRaft quorum as ``node``'s broker last recorded it (its quorum-state file),
    or None when it has none on record."""
    state = cluster.run_dir / "cluster" / f"n{node}" / "data" / "kafka" / "__cluster_metadata-0" / "quorum-state"
    try:
        leader = json.loads(state.read_text()).get("leaderId", -1)
    except (OSError, ValueError):
        return None
    return int(leader) if leader is not None and int(leader) >= 0 else None
