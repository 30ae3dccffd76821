"""Fixtures of the multi-node tests (``make cluster-test``): nodes in network namespaces, made and removed per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import NodeCluster


@pytest.fixture
def node_cluster(tmp_path: Path) -> Iterator[Callable[..., NodeCluster]]:
    """``node_cluster(n)``: n fresh nodes (deploy/cluster/cluster.sh) whose servers keep their data under the test's
    tmp_path; every node and process goes when the test ends. Nodes need root: without it the test fails (this
    suite is run on purpose, so a missing capability is an error, never a skip)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the cluster tests need root and iproute2 (network namespaces)")
    made: list[NodeCluster] = []

    def make(nodes: int, name: str = "gm", subnet: str = "10.231.0") -> NodeCluster:
        assert not made, "one cluster per test"
        cluster = NodeCluster(nodes, tmp_path, name=name, subnet=subnet)
        made.append(cluster)
        return cluster.up()

    yield make
    for cluster in made:
        cluster.down()
