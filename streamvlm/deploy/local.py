"""A Ray cluster of several nodes on this machine, reachable only from it (127.0.0.1).

For tests, benchmarks and a single-machine fleet. Ray names a node by the machine's own address by
default, which exposes its ports beyond the machine; :func:`loopback_only` makes every Ray process
started afterwards (they inherit the environment) use 127.0.0.1 instead. Use it as::

    with LocalCluster(cpus=(2, 1)) as cluster:      # a head with 2 CPUs and a node with 1; ray.init is connected inside
        ...                                                     # cluster.nodes[1] is the second node
    # every Ray process of the cluster has stopped here
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["LocalCluster", "loopback_only"]

LOOPBACK = "127.0.0.1"


def loopback_only() -> None:
    """Make Ray started from this process bind and advertise 127.0.0.1 (call before the first ``ray.init``).

    Ray treats a machine that cannot join a cluster as loopback-only; this environment switch asks for
    that behaviour on every platform. Usage statistics are off too (nothing may leave the machine)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray already imported here read the switch at import: this driver must agree with its nodes
        constants.ENABLE_RAY_CLUSTER = False


class LocalCluster:
    """One Ray node on 127.0.0.1 per entry of ``cpus`` (its CPU count; the first is the head), no dashboard;
    the driver is connected while the context is open, and every Ray process stops on exit."""

    def __init__(self, cpus: Sequence[int] = (1, 1), **init_kwargs: Any) -> None:
        if not cpus or min(cpus) < 1:
            raise ValueError(f"a local cluster needs at least one node, each with at least one CPU (got {tuple(cpus)})")
        self.cpus = tuple(cpus)
        self.init_kwargs = {"logging_level": "ERROR", "log_to_driver": False, **init_kwargs}
        self.cluster: Any = None
        self.nodes: list[Any] = []

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head(self) -> Any:
        return self.cluster.head_node

    def add_node(self, cpus: int = 1) -> Any:
        """Start one more node with ``cpus`` CPUs and return its handle (``remove_node`` takes it away)."""
        node = self.cluster.add_node(num_cpus=cpus, node_ip_address=LOOPBACK)
        self.nodes.append(node)
        return node

    def remove_node(self, node: Any) -> None:
        self.cluster.remove_node(node)
        self.nodes.remove(node)

    def __enter__(self) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        loopback_only()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.cpus[0], "include_dashboard": False, "node_ip_address": LOOPBACK})
        self.nodes = [self.cluster.head_node]
        try:
            for cpus in self.cpus[1:]:
                self.add_node(cpus)
            ray.init(address=self.cluster.address, **self.init_kwargs)
        except BaseException:
            self.cluster.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            self.cluster.shutdown()
