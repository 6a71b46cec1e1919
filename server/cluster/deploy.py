"""Start (or join) Ray, start Serve's proxies, deploy the application; and stop it all cleanly.

``Cluster(cfg).start()`` is what ``python -m server.cluster`` and the tests run: Ray per
``--address`` (a local instance has its dashboard off), Serve's HTTP proxy on
``--http-host:--http-port`` and gRPC proxy on ``--port`` with the adapterserve services
(:func:`server.cluster.rpc.add_services`), then two applications: ``<--app-name>-engine``, whose
ingress is the engine deployment (``--replicas`` or autoscaling between ``--min-replicas`` and
``--max-replicas``), and ``<--app-name>``, the ingress deployment (HTTP on ``/``, and every gRPC call
that names no application), which calls the engine application's deployment by name. A gRPC
client that sends ``application: <app>-engine`` with ``multiplexed_model_id: <adapter id>`` has its
Generate/GenerateStream routed by Serve's proxy straight to an engine replica (one hop fewer).
Thread domain: the caller's thread (Serve's client API is synchronous here).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from server.cluster.config import ENGINE, ClusterConfig, engine_app_name, parse_cluster_config
from server.cluster.ingress import ingress_class
from server.cluster.replica import EngineReplica
from server.cluster.rpc import servicer_function

log = logging.getLogger("adapterserve.cluster")

INGRESS = "Ingress"
INGRESS_ANSWER_S = 10.0


#: Ray Serve settings for every process of the application (this process's environment overrides them).
#: - A proxy on a busy host can take longer than Serve's 5 s readiness check to start; three misses
#:   and Serve kills it and ``serve.start`` fails.
#: - Serve's throughput-optimized mode: user code on the replica's main event loop (no thread hop
#:   per request and per streamed item), request logs buffered and not copied to
#:   stderr (they stay in Ray's session log folder), the garbage collector frozen after start. Every
#:   streamed token crosses two Serve hops, and on a small host their per-item cost is CPU the engine
#:   loses (bench/README.md, same run: 1.13x the throughput of Serve's defaults, 0.64x vs 0.57x of
#:   the single server at load 5-6). Its two transport changes stay off: direct ingress (replicas listening on ports of their
#:   own instead of the proxies on --port / --http-port) and gRPC between deployments (no faster
#:   here, and replica loss must keep surfacing as Ray's actor errors the ingress maps to UNAVAILABLE);
#:   handles keep their router on a loop of its own (adapter admin calls them from worker threads).
SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
}
#: The same mode for Serve's controller and proxies, which read the Ray processes' own environment
#: (not the application's runtime env): set for a Ray this process starts (``--address local``), this
#: process's environment winning. The proxies' router then runs on their main loop too.
RAY_PROCESS_ENV_DEFAULTS = {k: v for k, v in SERVE_ENV_DEFAULTS.items() if k != "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"}


def _runtime_env() -> dict[str, Any]:
    """Workers import the project as this process does (its sys.path) and read its ADAPTERSERVE_* settings."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    env.update({k: os.environ.get(k, v) for k, v in SERVE_ENV_DEFAULTS.items()})
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
        **shutdown_options(cfg, margin_s=5.0),
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.replicas
    return opts


def shutdown_options(cfg: ClusterConfig, margin_s: float) -> dict[str, float]:
    """A deleted deployment's replicas let in-flight requests run for --grace-seconds (+ margin) before
    Serve stops them; an idle replica stops at the next check (every 0.2 s, Serve's default is 2 s)."""
    return {"graceful_shutdown_timeout_s": cfg.grace_seconds + margin_s, "graceful_shutdown_wait_loop_s": 0.2}


def build_engine_application(cfg: ClusterConfig) -> serve.Application:
    """The ``<app>-engine`` application: the engine deployment as its own ingress (direct gRPC)."""
    return serve.deployment(**engine_options(cfg))(EngineReplica).bind(cfg)


def engine_route_prefix(cfg: ClusterConfig) -> str:
    """The engine application's HTTP route (Serve gives every gRPC-reachable application one; HTTP
    clients use ``/`` and the ingress)."""
    return "/" + engine_app_name(cfg)


def build_application(cfg: ClusterConfig) -> serve.Application:
    """The ``<app>`` application: the ingress (HTTP routes + gRPC methods), calling the engine by name."""
    ingress = serve.deployment(name=INGRESS, num_replicas=cfg.ingress_replicas,
                               max_ongoing_requests=max(1024, 4 * (cfg.max_batch_size + cfg.max_queue)),
                               ray_actor_options={"num_cpus": 0},
                               # outlives the engine's grace: the streams it relays end first
                               **shutdown_options(cfg, margin_s=10.0))(ingress_class())
    return ingress.bind(cfg)


def _config_of(args: dict[str, Any] | None) -> ClusterConfig:
    argv: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    return parse_cluster_config(argv)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder of the ingress application (``import_path:
    server.cluster.deploy:app_builder`` in a Serve config or a KubeRay RayService, see
    deploy/rayservice.yaml): ``args`` are flags without the dashes (``{"model": "default",
    "replicas": 2}``), over ADAPTERSERVE_* variables and the defaults."""
    return build_application(_config_of(args))


def engine_app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder of the engine application (``<app>-engine``, route
    ``/<app>-engine``), with the same ``args`` as :func:`app_builder`."""
    return build_engine_application(_config_of(args))


class Cluster:
    """One adapterserve application on Ray Serve (start it, get its ports, stop it)."""

    def __init__(self, cfg: ClusterConfig, ray_init: dict[str, Any] | None = None):
        self.cfg = cfg
        self.ray_init = dict(ray_init or {})
        self._own_ray = False
        self._serve_started = False
        self._deployed = False

    def start(self) -> Cluster:
        """Connect to Ray, start Serve and deploy; return once every replica serves."""
        self.connect()
        self.deploy()
        return self

    def connect(self) -> None:
        """Start (``--address local``) or join Ray. Note: ``ray.init`` replaces this process's SIGTERM
        handler (with ``sys.exit``, plus Ray core's fatal-signal report): install yours after this."""
        cfg = self.cfg
        if ray.is_initialized():
            return
        kw: dict[str, Any] = {"runtime_env": _runtime_env(), "logging_level": logging.WARNING, **self.ray_init}
        if cfg.address == "local":
            for key, value in RAY_PROCESS_ENV_DEFAULTS.items():  # inherited by the Ray processes started below
                os.environ.setdefault(key, value)
            kw.setdefault("include_dashboard", False)
            if cfg.object_store_bytes:
                kw.setdefault("object_store_memory", cfg.object_store_bytes)
        self._own_ray = cfg.address == "local"
        ray.init(address=cfg.address, **kw)

    @property
    def ray_address(self) -> str:
        """The GCS address of the Ray cluster (``ray.init(address=...)`` joins it)."""
        return ray.get_runtime_context().gcs_address

    def deploy(self, stop: threading.Event | None = None) -> None:
        """Start Serve's proxies and deploy the application; return once it runs (or `stop` is set)."""
        cfg = self.cfg
        serve.start(
            http_options=HTTPOptions(host=cfg.http_host, port=cfg.http_port),
            grpc_options=gRPCOptions(port=cfg.port, grpc_servicer_functions=[servicer_function(cfg.app_name)]),
        )
        self._serve_started = True
        self._deployed = True
        serve.run(build_engine_application(cfg), name=engine_app_name(cfg), route_prefix=engine_route_prefix(cfg),
                  blocking=False)
        self.wait_ready(engine_app_name(cfg), stop=stop)  # the ingress looks the engine up by name
        if stop is None or not stop.is_set():
            serve.run(build_application(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
            self.wait_ready(cfg.app_name, stop=stop)
        log.info("cluster %s: gRPC on :%d, HTTP on %s:%d", cfg.app_name, cfg.port, cfg.http_host, cfg.http_port)

    def wait_ready(self, app_name: str, timeout_s: float = 600.0, stop: threading.Event | None = None) -> None:
        """Block until application `app_name` is RUNNING (every replica started); raise if it failed."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            app = serve.status().applications.get(app_name)
            status = getattr(app, "status", None)
            if status == "RUNNING":
                return
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"cluster deploy of {app_name} failed: {app.message}")
            time.sleep(0.5)
        if stop is None or not stop.is_set():
            raise TimeoutError(f"cluster application {app_name} not running within {timeout_s:g} s")

    def engine_handle(self) -> serve.handle.DeploymentHandle:
        return serve.get_deployment_handle(ENGINE, app_name=engine_app_name(self.cfg))

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop what :meth:`start` started, in the single server's phases (SIGTERM runs this):

        1. ``drain_s`` > 0: health NOT_SERVING on every ingress replica while requests are still served;
        2. new requests answered UNAVAILABLE (by the ingress, and by the engine replicas for direct
           calls); in-flight ones (streams included) may finish for ``--grace-seconds``;
        3. the applications are deleted, the ingress first (what still runs is cut: UNAVAILABLE, each
           replica shuts its server down), Serve stops (controller and proxies), and Ray when this
           process started it.
        """
        try:
            if self._deployed:
                self._quiesce(drain_s)
                for app in (self.cfg.app_name, engine_app_name(self.cfg)):
                    serve.delete(app)
        finally:
            self._deployed = False
            try:
                if self._serve_started:
                    serve.shutdown()
            finally:
                self._serve_started = False
                if self._own_ray and ray.is_initialized():
                    ray.shutdown()
                self._own_ray = False

    def _quiesce(self, drain_s: float) -> None:
        """Phases 1 and 2 of :meth:`stop`, on every ingress and engine replica (each counts the calls
        the gRPC proxy handed it; best effort: the delete follows anyway)."""
        doors = [(INGRESS, self.cfg.app_name), (ENGINE, engine_app_name(self.cfg))]

        def ask(method: str) -> list:
            answers: list = []
            for deployment, app in doors:
                try:
                    handle = serve.get_deployment_handle(deployment, app_name=app)
                    answers += handle.broadcast(method).results(timeout_s=INGRESS_ANSWER_S, return_exceptions=True)
                except Exception as e:  # (not deployed, or no replica answered)
                    log.warning("shutdown: %s did not answer %s (%s)", deployment, method, type(e).__name__)
            return answers

        if drain_s > 0:
            ask("drain")
            log.info("NOT_SERVING; still serving new requests for %.1f s (--drain-seconds)", drain_s)
            time.sleep(drain_s)
        end = time.monotonic() + self.cfg.grace_seconds
        running = sum(n for n in ask("close") if isinstance(n, int))
        if running:
            log.info("%d request(s) in flight: waiting up to %.1f s (--grace-seconds)", running, self.cfg.grace_seconds)
        while running and time.monotonic() < end:
            time.sleep(0.1)
            running = sum(n for n in ask("in_flight") if isinstance(n, int))
        if running:
            log.warning("%d request(s) still running after --grace-seconds: cut (UNAVAILABLE)", running)
