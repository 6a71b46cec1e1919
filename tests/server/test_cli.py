"""The server as a user runs it: flags and env, --help, SIGTERM drain, Dockerfile lint."""

from __future__ import annotations

import dataclasses
import os
import shutil
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
from server.config import ConfigError, ServerConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_help_documents_every_flag_and_its_env_variable():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    for f in dataclasses.fields(ServerConfig):
        assert f"--{f.name.replace('_', '-')}" in out
        assert f"ADAPTERSERVE_{f.name.upper()}" in out.replace("\n", "").replace(" ", "")


def test_boolean_flags_and_their_env_twins():
    assert parse_config([], env={}).lazy_adapters is False
    assert parse_config(["--lazy-adapters"], env={}).lazy_adapters is True
    assert parse_config([], env={"ADAPTERSERVE_LAZY_ADAPTERS": "true"}).lazy_adapters is True
    assert parse_config(["--no-lazy-adapters"], env={"ADAPTERSERVE_LAZY_ADAPTERS": "1"}).lazy_adapters is False


def test_flags_override_env_which_overrides_defaults():
    cfg = parse_config(["--port", "1234"], env={"ADAPTERSERVE_PORT": "999", "ADAPTERSERVE_MAX_QUEUE": "7",
                                                "ADAPTERSERVE_PRELOAD": "a=x b=y"})
    assert (cfg.port, cfg.max_queue, cfg.preload, cfg.kv_cache_tokens) == (1234, 7, ["a=x", "b=y"], 32768)


@pytest.mark.parametrize("argv,env,message", [
    (["--max-batch-size", "0"], {}, "--max-batch-size must be > 0"),
    (["--tls-cert", "a.pem"], {}, "--tls-cert and --tls-key"),
    (["--preload", "noequals"], {}, "--preload expects ID=PATH"),
    ([], {"ADAPTERSERVE_KV_CACHE_TOKENS": "lots"}, "ADAPTERSERVE_KV_CACHE_TOKENS: not a number"),
    ([], {"ADAPTERSERVE_DTYPE": "int3"}, "ADAPTERSERVE_DTYPE must be one of"),
    ([], {"ADAPTERSERVE_LAZY_ADAPTERS": "maybe"}, "ADAPTERSERVE_LAZY_ADAPTERS must be one of"),
])
def test_bad_config_is_refused_naming_the_flag(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, env=env)


def test_unsupported_model_exits_2_with_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path), "--metrics-port", "0",
                           "--http-port", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "unsupported architecture" in proc.stderr


def test_sigterm_goes_not_serving_drains_in_flight_and_exits_0(tiny_llama):
    port = free_port()
    env = {**os.environ, "ADAPTERSERVE_PORT": str(port), "ADAPTERSERVE_METRICS_PORT": "0",
           "ADAPTERSERVE_HTTP_PORT": "0", "ADAPTERSERVE_GRACE_SECONDS": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_llama)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        end = time.time() + 120
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                assert time.time() < end and proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        gen = pb_grpc.GenerationServiceStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        statuses = []

        def follow() -> None:
            try:
                statuses.extend(m.status for m in watch)
            except grpc.RpcError:
                pass  # the server went away: expected at the end

        threading.Thread(target=follow, daemon=True).start()
        # A long request in flight when SIGTERM arrives must still complete.
        req = pb.GenerateRequest(prompt="the quick brown fox", params=pb.SamplingParams(max_new_tokens=200,
                                                                                       ignore_eos=True))
        call = gen.GenerateStream(req)
        next(call)
        proc.send_signal(signal.SIGTERM)
        chunks = list(call)
        assert chunks[-1].finish_reason == pb.LENGTH and chunks[-1].usage.completion_tokens == 200
        assert proc.wait(60) == 0
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and 'ENTRYPOINT ["python", "-m", "server"]' in text


def test_readme_documents_every_flag():
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(ServerConfig) if f"`--{f.name.replace('_', '-')}`" not in readme]
    assert not missing, f"README lacks flags: {missing}"
