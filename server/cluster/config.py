"""``python -m server.cluster``'s configuration: every server flag that applies, plus the cluster's own.

Field ``foo_bar`` = flag ``--foo-bar`` = env ``ADAPTERSERVE_FOO_BAR``, as for the server
(:mod:`server.config`). The server flags keep their meaning per replica (``--kv-cache-tokens`` is
each replica's budget) or for the cluster's front door (``--port`` is the gRPC proxy's port,
``--http-port``/``--http-host`` the HTTP proxy's).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import ConfigError, ServerConfig, _opt, parse_config

PROG = "python -m server.cluster"
ENGINE = "Engine"  # the engine deployment's name
ENGINE_APP_SUFFIX = "-engine"


def bracketed(host: str) -> str:
    """`host` as it goes before ":port" (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def engine_app_name(cfg: ClusterConfig) -> str:
    """The Serve application whose ingress is the engine deployment (``<--app-name>-engine``): gRPC
    clients that name it in their ``application`` metadata reach the engine replicas without the
    ingress hop (docs/scale-out.md, "One hop fewer")."""
    return cfg.app_name + ENGINE_APP_SUFFIX


@dataclass
class ClusterConfig(ServerConfig):
    """Server flags + Ray Serve deployment flags (group "cluster")."""

    address: str = _opt("local", "Ray cluster to run on: local (start a Ray instance in this process), auto (join "
                        "the one `ray start` runs on this node) or ray://HOST:10001 (Ray client).", "cluster")
    replicas: int = _opt(2, "Engine replicas (fixed count; see --min-replicas/--max-replicas to autoscale).", "cluster")
    min_replicas: int = _opt(0, "Autoscaling lower bound (used with --max-replicas).", "cluster")
    max_replicas: int = _opt(0, "Autoscaling upper bound (0 = no autoscaling: --replicas replicas).", "cluster")
    target_ongoing_requests: float = _opt(16.0, "Autoscaling target: requests in flight per replica.", "cluster")
    max_adapters_per_replica: int = _opt(8, "Adapters one replica holds at once: @serve.multiplexed's "
                                         "max_num_models_per_replica (LRU) and the engine's --max-resident-adapters.",
                                         "cluster")
    replica_cpus: float = _opt(1.0, "CPUs Ray reserves for each engine replica.", "cluster")
    replica_gpus: float = _opt(0.0, "GPUs Ray reserves for each engine replica (0.5 = two replicas per GPU).",
                               "cluster")
    ingress_replicas: int = _opt(1, "Ingress replicas (request parsing and relaying; no model).", "cluster")
    app_name: str = _opt("adapterserve", "Ray Serve application name of the ingress (HTTP, every gRPC call "
                         "without `application` metadata); the engine's is <app-name>-engine.", "cluster")
    replica_host: str = _opt("127.0.0.1", "Address each engine replica's own gRPC server listens on, for "
                             "lookaside clients (RoutingService.Lease answers it; tokens then go straight from the "
                             "replica): 127.0.0.1 serves clients on the replica's node only; 0.0.0.0 (answered as "
                             "the node's IP) any client that reaches the node (docs/scale-out.md).", "cluster")
    object_store_bytes: int = _opt(0, "Object store size of a local Ray instance (0 = Ray's default).", "cluster")

    def validate(self) -> None:
        super().validate()
        for name in ["replicas", "max_adapters_per_replica", "ingress_replicas", "target_ongoing_requests"]:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ["min_replicas", "max_replicas", "replica_cpus", "replica_gpus", "object_store_bytes"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ConfigError(f"--min-replicas ({self.min_replicas}) exceeds --max-replicas ({self.max_replicas})")
        if self.min_replicas and not self.max_replicas:
            raise ConfigError("--min-replicas needs --max-replicas (autoscaling bounds)")
        if self.tls_cert or self.tls_client_ca:
            raise ConfigError("--tls-cert: Ray Serve's proxies serve plaintext; terminate TLS in front of the "
                              "cluster (a Kubernetes ingress or load balancer, see docs/scale-out.md)")
        if self.preload:
            raise ConfigError("--preload: in the cluster adapters come from the adapter store under --adapter-root "
                              "(copy them there, or RegisterAdapter through the cluster)")
        if not self.replica_host or any(c.isspace() for c in self.replica_host):
            raise ConfigError(f"--replica-host must be an address to listen on, got {self.replica_host!r}")
        if not self.app_name or ":" in self.app_name or "/" in self.app_name:
            raise ConfigError(f"--app-name must be non-empty without ':' or '/', got {self.app_name!r}")
        if self.address != "local" and self.address != "auto" and not self.address.startswith("ray://"):
            raise ConfigError(f"--address must be local, auto or ray://HOST:PORT, got {self.address!r}")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0

    def replica_config(self) -> ServerConfig:
        """The ServerConfig each replica's in-process server runs with: the same engine settings, its
        residency limit from --max-adapters-per-replica, adapters loaded from the store on first use
        (--lazy-adapters), its HTTP and metrics listeners closed (the proxies face the network); its
        gRPC server listens on a free port of --replica-host (lookaside clients' generations)."""
        values = {f: getattr(self, f) for f in ServerConfig.__dataclass_fields__}
        values.update(host=bracketed(self.replica_host), port=0, http_port=0, metrics_port=0, drain_seconds=0.0,
                      max_resident_adapters=self.max_adapters_per_replica, lazy_adapters=True)
        return ServerConfig(**values)


def parse_cluster_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> ClusterConfig:
    """Flags > ADAPTERSERVE_* environment > defaults; validated (ConfigError names the flag)."""
    return parse_config(argv, env, cls=ClusterConfig, prog=PROG)
