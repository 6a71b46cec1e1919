"""One local Ray cluster per test module: tiny random Llama, 2 engine replicas x 2 adapter slots.

Ray starts once per module (dashboard off, a small object store, its workers' logs kept out of the
test output); the same adapter folders serve the single server the answers are compared with.
"""

from __future__ import annotations

import socket

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from tests.peft_reference import make_peft_adapter

KINDS = ["lora", "dora", "ia3", "ln", "prompt", "ptuning", "prefix"]
AFFINITY_ADAPTERS = [f"hot{i}" for i in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_adapter_root(tmp_path_factory, tiny_model_factory):
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("cluster-adapters")
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / kind, kind, seed=20 + i)
    for i, name in enumerate(AFFINITY_ADAPTERS):
        make_peft_adapter(base, root / name, "lora", seed=40 + i)
    return root


class RunningCluster:
    """A started cluster plus blocking stubs to its gRPC proxy and its HTTP base URL."""

    def __init__(self, cluster, cfg):
        self.cluster = cluster
        self.cfg = cfg
        self.target = f"127.0.0.1:{cfg.port}"
        self.http = f"http://127.0.0.1:{cfg.http_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.gen = pb_grpc.GenerationServiceStub(self.channel)
        self.adapters = pb_grpc.AdapterServiceStub(self.channel)


@pytest.fixture(scope="module")
def cluster(tiny_llama, cluster_adapter_root):
    from server.cluster.config import ClusterConfig
    from server.cluster.deploy import Cluster

    cfg = ClusterConfig(model=str(tiny_llama), adapter_root=str(cluster_adapter_root), port=free_port(),
                        http_port=free_port(), replicas=2, max_adapters_per_replica=2, threads=1,
                        kv_cache_tokens=2048, max_batch_size=8, grace_seconds=2.0, log_level="WARNING")
    cfg.validate()
    running = Cluster(cfg, ray_init={"num_cpus": 4, "object_store_memory": 100 * 1024**2,
                                     "log_to_driver": False}).start()
    try:
        yield RunningCluster(running, cfg)
    finally:
        running.stop()
