"""A real multi-node Ray cluster on this machine, on loopback: what the ray driver's test and bench run on.

Import this module before anything imports Ray: it makes Ray keep 127.0.0.1 as the nodes' address
(otherwise Ray rewrites it to the host's routable address, where nothing listens, and a driver
retries that for minutes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# A dead node is noticed in about 4 s instead of about 14 s with Ray's defaults.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
WORKER = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "resources": {"lsbackend": 2}}


@contextmanager
def local_cluster() -> Iterator[tuple[Any, dict[str, Any]]]:
    """A head that takes no backend, a worker with a (logical) GPU and one without; this process attached."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
    try:
        nodes = {"gpu": cluster.add_node(num_gpus=1, **WORKER), "cpu": cluster.add_node(**WORKER)}
        cluster.wait_for_nodes(timeout=60)
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        ray.init(address=cluster.address, namespace="lsbackend", log_to_driver=False)
        try:
            yield cluster, nodes
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def add_gpu_node(cluster: Any) -> Any:
    return cluster.add_node(num_gpus=1, **WORKER)
