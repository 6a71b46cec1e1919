"""`python -m server.cluster`'s flags: the server's under the same names plus the cluster's own (no Ray needed)."""

from __future__ import annotations

import pytest

from server.cluster.__main__ import main
from server.cluster.config import parse_cluster_config
from server.config import ConfigError


def test_server_flags_keep_their_names_and_cluster_flags_add_up():
    cfg = parse_cluster_config(["--model", "m", "--port", "7000", "--http-port", "7001", "--replicas", "3",
                                "--max-adapters-per-replica", "5", "--kv-cache-tokens", "1024"],
                               env={"ADAPTERSERVE_ADDRESS": "auto", "ADAPTERSERVE_AUTH_TOKEN": "t"})
    assert (cfg.model, cfg.port, cfg.http_port, cfg.replicas, cfg.address) == ("m", 7000, 7001, 3, "auto")
    replica = cfg.replica_config()
    # Each replica: the same engine settings, residency = --max-adapters-per-replica, only loopback listeners.
    assert replica.kv_cache_tokens == 1024 and replica.max_resident_adapters == 5 and replica.auth_token == "t"
    assert (replica.host, replica.port, replica.http_port, replica.metrics_port) == ("127.0.0.1", 0, 0, 0)
    assert parse_cluster_config(["--replica-host", "::"], env={}).replica_config().host == "[::]"  # binds as [::]:0


@pytest.mark.parametrize("argv, flag", [
    (["--replicas", "0"], "--replicas"),
    (["--max-adapters-per-replica", "0"], "--max-adapters-per-replica"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas"),
    (["--min-replicas", "1"], "--min-replicas"),
    (["--address", "http://x"], "--address"),
    (["--tls-cert", "c", "--tls-key", "k"], "--tls-cert"),
    (["--preload", "a=b"], "--preload"),
    (["--app-name", "a:b"], "--app-name"),
    (["--replica-host", ""], "--replica-host"),
    (["--replica-host", "0.0.0.0 --evil"], "--replica-host"),
])
def test_bad_flags_are_refused_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_cluster_config(argv, env={})


def test_cli_exits_2_on_a_bad_flag(capsys):
    assert main(["--replicas", "0"]) == 2
    assert "--replicas" in capsys.readouterr().err


def test_rayservice_manifest_builds_the_application():
    """deploy/rayservice.yaml's Serve config: the engine application and the ingress application, each
    import path building its app from the same args; its gRPC servicer function is importable (what
    Serve's proxy imports)."""
    from pathlib import Path

    import yaml
    from ray.serve._private.utils import import_attr

    docs = list(yaml.safe_load_all((Path(__file__).parents[2] / "deploy" / "rayservice.yaml").read_text()))
    serve_config = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    apps = {a["name"]: a for a in serve_config["applications"]}
    assert [(name, a["import_path"], a["route_prefix"]) for name, a in apps.items()] == [
        ("adapterserve-engine", "server.cluster.deploy:engine_app_builder", "/adapterserve-engine"),
        ("adapterserve", "server.cluster.deploy:app_builder", "/")]
    assert apps["adapterserve"]["args"] == apps["adapterserve-engine"]["args"]
    for app in apps.values():
        built = import_attr(app["import_path"])(app["args"])
        assert type(built).__name__ == "Application"
    for fn in serve_config["grpc_options"]["grpc_servicer_functions"]:
        assert callable(import_attr(fn))
