"""One local Ray cluster per test module: tiny random Llama, 2 engine replicas x 2 adapter slots.

The cluster is `python -m server.cluster` itself, run as a subprocess (it starts its own Ray: dashboard
off, a small object store; its output goes to a log file, shown when it fails to start); the tests
join that Ray as a second driver to inspect and kill replicas. The same adapter folders serve the
single server the answers are compared with.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


SERVING_LINE = re.compile(r"adapterserve cluster serving: .* Ray (\S+)")
START_TIMEOUT_S = 480.0


class RunningCluster:
    """A `python -m server.cluster` process plus blocking stubs to its gRPC proxy and its HTTP base URL."""

    def __init__(self, proc: subprocess.Popen, cfg, log: Path, ray_address: str):
        self.proc = proc
        self.cfg = cfg
        self.log = log
        self.ray_address = ray_address
        self.target = f"127.0.0.1:{cfg.port}"
        self.http = f"http://127.0.0.1:{cfg.http_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.gen = pb_grpc.GenerationServiceStub(self.channel)
        self.adapters = pb_grpc.AdapterServiceStub(self.channel)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_cluster_process(argv: list[str], log: Path, attempts: int = 2) -> tuple[subprocess.Popen, str]:
    """Run `python -m server.cluster argv` until it prints that it serves; (process, its Ray address).

    A second attempt when the first exits during start-up (Ray gives its dashboard agent a fixed
    15 s to report and its raylet 30 s to register, which a starved shared host can miss); all
    attempts together within START_TIMEOUT_S, under pytest-timeout's 600 s. Whatever ends the wait
    (timeout, pytest-timeout's exception, Ctrl-C), the process tree goes with it."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]  # the project as this process imports it
    # RAY_AUTH_MODE: a Ray started where ~/.ray/auth_token exists turns token auth on, which the tests'
    # own driver (auth off) could not join; loopback only, so off.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    end = time.monotonic() + START_TIMEOUT_S
    proc = None
    try:
        for _attempt in range(attempts):
            with open(log, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "server.cluster", *argv], stdout=out,
                                        stderr=subprocess.STDOUT, env=env)
            while time.monotonic() < end:
                found = SERVING_LINE.search(log.read_text(errors="replace"))
                if found:
                    return proc, found.group(1)
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
            kill_tree(proc)
            if time.monotonic() >= end:
                break
    except BaseException:
        if proc is not None:
            kill_tree(proc)
        raise
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    pytest.fail(f"python -m server.cluster did not serve within {START_TIMEOUT_S:g} s:\n{tail}")


def run_cluster(tiny_llama, adapter_root, tmp_path_factory, *extra: str):
    """Start `python -m server.cluster` (2 replicas x 2 adapter slots, plus `extra` flags), join its Ray;
    yields the RunningCluster, then SIGTERM (or SIGKILL of the tree) at teardown."""
    import ray

    from server.cluster.config import parse_cluster_config

    argv = ["--model", str(tiny_llama), "--adapter-root", str(adapter_root), "--port", str(free_port()),
            "--http-port", str(free_port()), "--metrics-port", "0", "--replicas", "2",
            "--max-adapters-per-replica", "2", "--replica-cpus", "0.5", "--threads", "1",
            "--kv-cache-tokens", "2048", "--max-batch-size", "8", "--drain-seconds", "0.5",
            "--grace-seconds", "30", "--object-store-bytes", str(100 * 1024**2), "--log-level", "WARNING", *extra]
    cfg = parse_cluster_config(argv, env={})
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    proc, address = start_cluster_process(argv, log)
    running = RunningCluster(proc, cfg, log, address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")  # the tests' view of Serve
        # Job ids restart at 01000000 in every cluster, so Serve's cached controller client of an earlier
        # module's cluster looks current to serve.status() ("Can't find actor ..."): forget it.
        from ray.serve import context as serve_context

        serve_context._set_global_client(None)
        yield running
    finally:
        running.channel.close()
        if ray.is_initialized():
            ray.shutdown()  # before the cluster's Ray goes: a driver that loses it exits its process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                kill_tree(proc)


@pytest.fixture(scope="module")
def cluster(tiny_llama, cluster_adapter_root, tmp_path_factory):
    yield from run_cluster(tiny_llama, cluster_adapter_root, tmp_path_factory)


@pytest.fixture(scope="module")
def single(tiny_llama, cluster_adapter_root):
    """The single server on the same model and adapter store (every kind registered by path, others loaded
    on first use as the replicas do)."""
    from adapterserve.v1 import adapterserve_pb2 as pb
    from tests.serving import start_server_fixture

    gen = start_server_fixture()
    start = next(gen)
    running = start(tiny_llama, adapter_root=str(cluster_adapter_root), kv_cache_tokens=2048, max_batch_size=8,
                    lazy_adapters=True)  # as every replica runs
    for kind in KINDS:
        running.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=kind, path=kind), timeout=60)
    yield running
    for _ in gen:
        pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it (a cluster that did not stop leaves no Ray behind)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
