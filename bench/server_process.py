"""Start `python -m server` as a subprocess on free ports for benchmarks, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m <module>` (server, or server.cluster) on a free gRPC port; ready once health is SERVING."""

    def __init__(self, *args: str, threads: int = 0, module: str = "server", ready_timeout: float = 300,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", module, "--port", str(self.port), *args]
        if "--metrics-port" not in args:
            cmd += ["--metrics-port", "0"]
        if "--http-port" not in args:
            cmd += ["--http-port", "0"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.target = f"127.0.0.1:{self.port}"
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float = 300) -> None:
        end = time.time() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.time() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.3)
        raise TimeoutError("server did not become ready")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system, all its threads), from /proc."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def _tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def tree_cpu_seconds(self) -> float:
        """CPU time (user + system) the process and every live process under it have used so far: a
        cluster's Ray processes (GCS, raylet, controller, proxies, replicas) included."""
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # (gone meanwhile)
                pass
        return total

    def tree_cpu_by_process(self) -> dict[int, tuple[str, float]]:
        """pid -> (label, CPU seconds so far) of the process and every live process under it; the label
        is the process title (Ray's workers: ``ray::ServeReplica:<app>:<deployment>``, ``ray::ProxyActor``, ...)."""
        out: dict[int, tuple[str, float]] = {}
        for p in self._tree():
            try:
                t = p.cpu_times()
                cmd = p.cmdline()
                label = cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()
                out[p.pid] = (label, t.user + t.system)
            except Exception:  # (gone meanwhile)
                pass
        return out

    def pause(self) -> None:
        """SIGSTOP the process and every process under it (a cluster's Ray: GCS, raylet, workers), so
        a paused setup takes no CPU while another one is measured."""
        for p in self._tree():
            try:
                p.send_signal(signal.SIGSTOP)
            except Exception:  # (gone meanwhile)
                pass

    def resume(self, ready_timeout: float = 120) -> None:
        """SIGCONT what pause() stopped (children first), then wait until health is SERVING again."""
        for p in reversed(self._tree()):
            try:
                p.send_signal(signal.SIGCONT)
            except Exception:  # (gone meanwhile)
                pass
        self._wait_ready(ready_timeout)

    def stop(self, timeout: float = 120) -> int:
        for p in self._tree():  # a paused tree would never see the SIGTERM
            try:
                p.send_signal(signal.SIGCONT)
            except Exception:  # (gone meanwhile)
                pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a benchmark's figures must not be lost to a slow shutdown
            print(f"server pid {self.proc.pid} still running {timeout:g} s after SIGTERM: killed with its tree",
                  flush=True)
            for p in self._tree():
                try:
                    p.kill()
                except Exception:  # (gone meanwhile)
                    pass
            return self.proc.wait()
