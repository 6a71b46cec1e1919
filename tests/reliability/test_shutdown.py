"""Shutdown and engine failure: nothing is left parked and every request gets exactly one status.

SIGTERM: health NOT_SERVING at once (observable on new connections), new requests still accepted for
--drain-seconds, then refused UNAVAILABLE; in-flight ones finish within --grace-seconds, those cut
then are answered UNAVAILABLE and logged with that same status; exit 0. An engine thread that dies
or a step that hangs past --watchdog-seconds turns health NOT_SERVING and fails requests fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from bench.server_process import free_port
from server.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _health(target: str) -> int:
    """Status from a fresh channel (a load balancer's probe opens new connections)."""
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _short(target: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.GenerationServiceStub(ch).Generate(
                pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=2)), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def _wait_until(pred, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slow_llama(tiny_model_factory):
    """The tiny llama with a long context, so a request can outlast a short grace period."""
    return tiny_model_factory("llama", max_position_embeddings=4096)


def test_sigterm_under_load_drains_then_refuses_then_cuts_with_one_status(slow_llama):
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "ADAPTERSERVE_PORT": str(port), "ADAPTERSERVE_METRICS_PORT": "0",
           "ADAPTERSERVE_DRAIN_SECONDS": "2", "ADAPTERSERVE_GRACE_SECONDS": "1", "ADAPTERSERVE_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(slow_llama)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        _wait_until(lambda: _probe(target) == SERVING or proc.poll() is not None, "the server to serve", 120)
        assert proc.poll() is None, "".join(lines)
        channel = grpc.insecure_channel(target)
        gen = pb_grpc.GenerationServiceStub(channel)
        # Under load: long streams that cannot finish within the grace period, and short ones.
        streams = [gen.GenerateStream(pb.GenerateRequest(
            prompt=f"story {i}", request_id=f"long-{i}",
            params=pb.SamplingParams(max_new_tokens=3500, ignore_eos=True))) for i in range(6)]
        for s in streams:
            next(s)
        proc.send_signal(signal.SIGTERM)
        _wait_until(lambda: _probe(target) == NOT_SERVING, "NOT_SERVING on a new connection", 10)
        assert _short(target) == grpc.StatusCode.OK  # still accepted during --drain-seconds
        _wait_until(lambda: _short(target) == grpc.StatusCode.UNAVAILABLE, "new requests refused", 30)
        codes = {}
        for i, s in enumerate(streams):
            try:
                for _ in s:
                    pass
                codes[f"long-{i}"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                codes[f"long-{i}"] = e.code()
                assert e.code() != grpc.StatusCode.UNAVAILABLE or "grace" in e.details()
        assert proc.wait(60) == 0
        reader.join(10)
        assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, codes  # cut at the end of the grace period
        logged = {}
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "request finished" and rec.get("request_id", "").startswith("long-"):
                logged[rec["request_id"]] = rec["status"]
        assert logged == {rid: code.name for rid, code in codes.items()}  # answered and logged alike
    finally:
        if proc.poll() is None:
            proc.kill()


def _probe(target: str) -> int | None:
    try:
        return _health(target)
    except grpc.RpcError:
        return None


def test_a_hung_step_turns_health_not_serving_and_fails_requests_fast(start_server, tiny_llama):
    srv = start_server(tiny_llama, watchdog_seconds=1.0)
    assert _health(srv.app.target) == SERVING
    stream = srv.gen.GenerateStream(pb.GenerateRequest(prompt="a", params=pb.SamplingParams(max_new_tokens=200,
                                                                                             ignore_eos=True)))
    next(stream)
    release = threading.Event()
    srv.app.engine.call(lambda: release.wait(60))  # the engine thread hangs inside one iteration
    waiting = srv.gen.Generate.future(pb.GenerateRequest(prompt="b", params=pb.SamplingParams(max_new_tokens=2)))
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "--watchdog-seconds" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            waiting.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _health(srv.app.target) == NOT_SERVING
        assert _short(srv.app.target) == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated death
def test_a_dead_engine_thread_turns_health_not_serving_and_refuses(start_server, tiny_llama, monkeypatch):
    srv = start_server(tiny_llama)

    def die(self):
        raise SystemExit("simulated engine thread death")

    monkeypatch.setattr(Engine, "_iteration", die)
    srv.app.engine.waiting.wakeup.set()
    _wait_until(lambda: srv.app.engine.failed is not None, "the engine to be marked failed", 30)
    assert "died" in srv.app.engine.failed
    _wait_until(lambda: _health(srv.app.target) == NOT_SERVING, "NOT_SERVING", 10)
    assert _short(srv.app.target) == grpc.StatusCode.UNAVAILABLE
