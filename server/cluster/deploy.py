"""Start (or join) Ray, start Serve's proxies, deploy the application; and stop it all cleanly.

``Cluster(cfg).start()`` is what ``python -m server.cluster`` and the tests run: Ray per
``--address`` (a local instance has its dashboard off), Serve's HTTP proxy on
``--http-host:--http-port`` and gRPC proxy on ``--port`` with the adapterserve services
(:func:`server.cluster.rpc.add_services`), then the application: the engine deployment
(``--replicas`` or autoscaling between ``--min-replicas`` and ``--max-replicas``) behind the ingress.
Thread domain: the caller's thread (Serve's client API is synchronous here).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from server.cluster.config import ClusterConfig, parse_cluster_config
from server.cluster.ingress import ingress_class
from server.cluster.replica import EngineReplica

log = logging.getLogger("adapterserve.cluster")

ENGINE = "Engine"
INGRESS = "Ingress"
ADD_SERVICES = "server.cluster.rpc.add_services"


def _runtime_env() -> dict[str, Any]:
    """Workers import the project as this process does (its sys.path) and read its ADAPTERSERVE_* settings."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    return {"env_vars": env}


def engine_options(cfg: ClusterConfig) -> dict[str, Any]:
    """serve.deployment options of the engine deployment."""
    opts: dict[str, Any] = {
        "name": ENGINE,
        # The engine queues and batches itself: let Serve hand it everything its queue can take.
        "max_ongoing_requests": cfg.max_batch_size + cfg.max_queue,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        "health_check_period_s": 2.0,
        "health_check_timeout_s": max(30.0, cfg.watchdog_seconds),
        "graceful_shutdown_timeout_s": cfg.grace_seconds + 5,
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.replicas
    return opts


def build_application(cfg: ClusterConfig) -> serve.Application:
    """The Serve application: ingress (HTTP routes + gRPC methods) bound to the engine deployment."""
    engine = serve.deployment(**engine_options(cfg))(EngineReplica).bind(cfg)
    ingress = serve.deployment(name=INGRESS, num_replicas=cfg.ingress_replicas,
                               max_ongoing_requests=max(1024, 4 * (cfg.max_batch_size + cfg.max_queue)),
                               ray_actor_options={"num_cpus": 0})(ingress_class())
    return ingress.bind(engine, cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (``import_path: server.cluster.deploy:app_builder`` in a Serve config or a
    KubeRay RayService, see deploy/rayservice.yaml): ``args`` are flags without the dashes
    (``{"model": "default", "replicas": 2}``), over ADAPTERSERVE_* variables and the defaults."""
    argv: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    return build_application(parse_cluster_config(argv))


class Cluster:
    """One adapterserve application on Ray Serve (start it, get its ports, stop it)."""

    def __init__(self, cfg: ClusterConfig, ray_init: dict[str, Any] | None = None):
        self.cfg = cfg
        self.ray_init = dict(ray_init or {})
        self._own_ray = False

    def start(self) -> Cluster:
        """Connect to Ray, start Serve and deploy; return once every replica serves."""
        cfg = self.cfg
        if not ray.is_initialized():
            kw: dict[str, Any] = {"runtime_env": _runtime_env(), "logging_level": logging.WARNING,
                                  **self.ray_init}
            if cfg.address == "local":
                kw.setdefault("include_dashboard", False)
                if cfg.object_store_bytes:
                    kw.setdefault("object_store_memory", cfg.object_store_bytes)
                ray.init(**kw)
            else:
                ray.init(address=cfg.address, **kw)
            self._own_ray = True
        serve.start(
            http_options=HTTPOptions(host=cfg.http_host, port=cfg.http_port),
            grpc_options=gRPCOptions(port=cfg.port, grpc_servicer_functions=[ADD_SERVICES]),
        )
        serve.run(build_application(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
        self.wait_ready()
        log.info("cluster %s: gRPC on :%d, HTTP on %s:%d", cfg.app_name, cfg.port, cfg.http_host, cfg.http_port)
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until the application is RUNNING (every replica started); raise if it failed."""
        import time

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            app = serve.status().applications.get(self.cfg.app_name)
            status = getattr(app, "status", None)
            if status == "RUNNING":
                return
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"cluster deploy failed: {app.message}")
            time.sleep(0.5)
        raise TimeoutError(f"cluster not running within {timeout_s:g} s")

    def engine_handle(self) -> serve.handle.DeploymentHandle:
        return serve.get_deployment_handle(ENGINE, app_name=self.cfg.app_name)

    def stop(self) -> None:
        """Delete the application (replicas drain: grace), stop Serve, and Ray when this process started it."""
        try:
            serve.delete(self.cfg.app_name)
        finally:
            serve.shutdown()
            if self._own_ray:
                ray.shutdown()
