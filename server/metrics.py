"""Prometheus metrics for one server: a private registry, the ``adapterserve_*`` families, /metrics.

Every layer reports into one :class:`ServerMetrics`; the API, the engine thread and the adapter
manager call its methods directly. All methods are thread-safe (prometheus_client metrics lock
internally; the adapter-label table has its own lock) and cheap (a dict lookup and a float add),
so they may be called from the event loop as well as from the engine thread.

Each instance owns its :class:`~prometheus_client.CollectorRegistry` (never the process-global
one), so several servers can live in one test process. ``start_http`` serves it on its own
listener: Prometheus text format 0.0.4 by default, OpenMetrics 1.0 when the scraper's
``Accept`` header asks for ``application/openmetrics-text`` (prometheus_client's
``choose_encoder`` does that negotiation; the tests check it over HTTP).

Label values are bounded: ``adapter`` takes at most ``max_adapter_labels`` distinct ids (later
ones become ``_other``; the base model is ``_base``), ``status`` is a gRPC code name, ``type`` is
one of the adapter types (ADAPTER_TYPES), ``phase`` is ``prefill`` or ``decode``, ``api`` is ``grpc`` or ``http``. An out-of-set value for a
fixed set raises ``ValueError`` -- that is a caller bug, surfaced in tests rather than turned
into an unbounded label.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server

PREFIX = "adapterserve_"
BASE_LABEL = "_base"
OTHER_LABEL = "_other"

ADAPTER_TYPES = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning", "dora", "ia3", "ln_tuning", "bottleneck")
PHASES = ("prefill", "decode")
APIS = ("grpc", "http")
GRPC_STATUS_NAMES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
BUILD_INFO_KEYS = ("version", "model", "device", "dtype")

# Buckets (seconds). End-to-end and first-token latency span a cached 5 ms answer on a tiny model
# to a two-minute generation on a loaded CPU; per-token time spans a GPU decode step to a slow CPU.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def status_name(status: Any) -> str:
    """Return the gRPC code name for ``status`` (a name like ``"OK"`` or a ``grpc.StatusCode``).

    Raises ``ValueError`` for anything that is not one of the 17 gRPC code names.
    """
    name = getattr(status, "name", status)
    if not isinstance(name, str) or name.upper() not in GRPC_STATUS_NAMES:
        raise ValueError(f"status must be a gRPC code name, got {status!r}")
    return name.upper()


def adapter_type_name(adapter_type: Any) -> str:
    """Return the lower-case adapter type (``"lora"``, ...) for a name or an enum with ``.name``."""
    name = getattr(adapter_type, "name", adapter_type)
    if not isinstance(name, str) or name.lower() not in ADAPTER_TYPES:
        raise ValueError(f"adapter type must be one of {ADAPTER_TYPES}, got {adapter_type!r}")
    return name.lower()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("adapterserve")
    except Exception:  # not installed (e.g. run from a bare checkout)
        return "unknown"


class ServerMetrics:
    """All ``adapterserve_*`` metric families of one server, on a private registry.

    Args:
        max_adapter_labels: how many distinct adapter ids keep their own ``adapter`` label
            value; later ids are counted under ``_other``. 0 puts every adapter under ``_other``.
        build_info: labels of ``adapterserve_build_info`` (keys ``version``, ``model``,
            ``device``, ``dtype``); a missing key reads ``unknown`` (``version`` defaults to the
            installed package version).
    """

    def __init__(self, max_adapter_labels: int = 100, build_info: Mapping[str, str] | None = None) -> None:
        if max_adapter_labels < 0:
            raise ValueError(f"max_adapter_labels must be >= 0, got {max_adapter_labels}")
        info = dict(build_info or {})
        unknown = set(info) - set(BUILD_INFO_KEYS)
        if unknown:
            raise ValueError(f"build_info keys must be among {BUILD_INFO_KEYS}, got {sorted(unknown)}")
        info.setdefault("version", _package_version())

        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self._merged: str | None = None
        self._merged_lock = threading.Lock()
        self._http: tuple[Any, threading.Thread] | None = None
        self._http_lock = threading.Lock()

        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        p = PREFIX

        # -- requests
        self.requests = Counter(
            p + "requests_total",
            "Finished requests by adapter and gRPC status code.",
            ["adapter", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "End-to-end time of successful requests (status OK), from arrival to the last token.",
            ["adapter"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["adapter"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Mean time between generated tokens after the first, one observation per request.",
            ["adapter"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            p + "api_requests_total",
            "Finished requests by API (grpc, http) and gRPC status code (also counted in requests_total).",
            ["api", "status"],
            registry=r,
        )
        self.api_ttft = Histogram(
            p + "api_time_to_first_token_seconds",
            "Time from arrival to the first generated token, by API (grpc, http).",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        for api in APIS:
            self.api_ttft.labels(api=api)
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time a request waited for admission; one observation per admission (a preempted request's "
            "wait to re-admission is observed again).",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens_total", "Prompt tokens of finished requests.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            p + "generation_tokens_total",
            "Tokens generated for finished requests (partial output included).",
            ["adapter"],
            registry=r,
        )
        # -- engine
        self.running = Gauge(p + "running_requests", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge(p + "waiting_requests", "Requests waiting for admission.", registry=r)
        self.batch_size = Histogram(
            p + "batch_size", "Sequences per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            p + "step_duration_seconds",
            "Duration of one engine step by phase.",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._steps = {phase: self.step_duration.labels(phase=phase) for phase in PHASES}
        self.kv_usage = Gauge(
            p + "kv_cache_usage_ratio", "Fraction of the KV cache budget in use (0..1).", registry=r
        )
        self.preemptions = Counter(
            p + "preemptions_total", "Running sequences preempted to free KV cache.", registry=r
        )
        self.prefix_cache_tokens = Counter(
            p + "prefix_cache_tokens_total",
            "Known tokens of admitted requests by adapter: reused from the prefix cache (hit) or computed "
            "(miss). A request re-admitted after a preemption counts again.",
            ["adapter", "result"],
            registry=r,
        )
        self.prefix_cache_pages = Gauge(
            p + "prefix_cache_pages", "KV pages the prefix cache holds (in use or idle).", registry=r
        )
        # -- adapters
        self.adapters_registered = Gauge(
            p + "adapters_registered", "Registered adapters by type.", ["type"], registry=r
        )
        self.adapters_resident = Gauge(
            p + "adapters_resident", "Adapters resident on the compute device by type.", ["type"], registry=r
        )
        self.adapter_loads = Counter(
            p + "adapter_loads_total",
            "Adapter loads by type and result (ok, error).",
            ["type", "result"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            p + "adapter_load_seconds",
            "Time to load an adapter, by type.",
            ["type"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            p + "adapter_evictions_total", "Adapters evicted from device slots.", registry=r
        )
        self.adapter_cache_hits = Counter(
            p + "adapter_cache_hits_total", "Requests whose adapter was already resident.", registry=r
        )
        self.adapter_cache_misses = Counter(
            p + "adapter_cache_misses_total", "Requests whose adapter had to be made resident.", registry=r
        )
        self.merged_adapter = Gauge(
            p + "merged_adapter_info",
            "1 for the adapter folded into the base weights.",
            ["adapter"],
            registry=r,
        )
        for t in ADAPTER_TYPES:  # every fixed-set series exists from the start, at 0
            self.adapters_registered.labels(type=t).set(0)
            self.adapters_resident.labels(type=t).set(0)
            self.adapter_load_seconds.labels(type=t)
            for result in ("ok", "error"):
                self.adapter_loads.labels(type=t, result=result)
        # -- build
        self.build_info = Gauge(
            p + "build_info",
            "Build and runtime facts; the value is always 1.",
            list(BUILD_INFO_KEYS),
            registry=r,
        )
        self.build_info.labels(**{k: str(info.get(k, "unknown")) for k in BUILD_INFO_KEYS}).set(1)

    # ------------------------------------------------------------------ labels
    def adapter_label(self, adapter_id: str) -> str:
        """Return the ``adapter`` label value for ``adapter_id``.

        ``""`` (the base model) is ``_base``; the first ``max_adapter_labels`` distinct ids keep
        their own name for the life of this object; every later id is ``_other``.
        """
        if not adapter_id:
            return BASE_LABEL
        if adapter_id in (BASE_LABEL, OTHER_LABEL):  # reserved: an adapter named like them takes no slot
            return OTHER_LABEL
        with self._labels_lock:
            if adapter_id in self._labels:
                return adapter_id
            if len(self._labels) < self.max_adapter_labels:
                self._labels.add(adapter_id)
                return adapter_id
        return OTHER_LABEL

    # ---------------------------------------------------------------- requests
    def request_finished(
        self,
        adapter_id: str,
        status: Any,
        prompt_tokens: int,
        completion_tokens: int,
        total_s: float,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        api: str = "grpc",
    ) -> None:
        """Record one finished request, whatever its outcome. Call exactly once per request.

        ``api`` (``grpc`` or ``http``) labels ``api_requests_total`` and the per-API TTFT.

        ``status`` is the gRPC code name (or a ``grpc.StatusCode``). Always counted:
        ``requests_total{adapter,status}`` +1, prompt tokens, generated tokens (partial output of
        a cancelled or timed-out request included; 0 for requests rejected before the engine).
        ``request_duration_seconds`` observes ``total_s`` only for status OK; TTFT and TPOT are
        observed whenever given (not None), whatever the status.
        """
        code = status_name(status)
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        adapter = self.adapter_label(adapter_id)
        self.api_requests.labels(api=api, status=code).inc()
        self.requests.labels(adapter=adapter, status=code).inc()
        self.prompt_tokens.labels(adapter=adapter).inc(prompt_tokens)
        self.generation_tokens.labels(adapter=adapter).inc(completion_tokens)
        if code == "OK":
            self.request_duration.labels(adapter=adapter).observe(total_s)
        if ttft_s is not None:
            self.ttft.labels(adapter=adapter).observe(ttft_s)
            self.api_ttft.labels(api=api).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(adapter=adapter).observe(tpot_s)

    def observe_queue_wait(self, seconds: float) -> None:
        """Observe one wait for admission to the running batch (first admission or after a preemption)."""
        self.queue_wait.observe(seconds)

    # ------------------------------------------------------------------ engine
    def set_queue_depth(self, running: int, waiting: int) -> None:
        """Set the number of running sequences and of requests waiting for admission."""
        self.running.set(running)
        self.waiting.set(waiting)

    def observe_step(self, phase: str, batch_size: int, seconds: float) -> None:
        """Observe one engine step: ``phase`` ``"prefill"`` or ``"decode"``, sequences in it, duration."""
        step = self._steps.get(phase)
        if step is None:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        step.observe(seconds)
        self.batch_size.observe(batch_size)

    def set_kv_usage(self, ratio: float) -> None:
        """Set the fraction (0..1) of the KV cache budget in use."""
        self.kv_usage.set(ratio)

    def preempted(self) -> None:
        """Count one running sequence preempted to free KV cache."""
        self.preemptions.inc()

    def prefix_cache_lookup(self, adapter_id: str, hits: int, misses: int) -> None:
        """Count one admission's tokens reused from the prefix cache (hits) and to compute (misses)."""
        adapter = self.adapter_label(adapter_id)
        self.prefix_cache_tokens.labels(adapter=adapter, result="hit").inc(hits)
        self.prefix_cache_tokens.labels(adapter=adapter, result="miss").inc(misses)

    def set_prefix_cache_pages(self, pages: int) -> None:
        """Set the number of KV pages the prefix cache holds."""
        self.prefix_cache_pages.set(pages)

    # ---------------------------------------------------------------- adapters
    def set_adapter_counts(self, registered: Mapping[str, int] | None = None,
                           resident: Mapping[str, int] | None = None) -> None:
        """Set registered and/or resident adapter counts per type; types missing from a mapping read 0.

        The catalog reports registered counts, the residency (engine thread) resident ones."""
        for gauge, counts in ((self.adapters_registered, registered), (self.adapters_resident, resident)):
            if counts is None:
                continue
            values = dict.fromkeys(ADAPTER_TYPES, 0)
            for key, n in counts.items():
                values[adapter_type_name(key)] = n
            for t, n in values.items():
                gauge.labels(type=t).set(n)

    def adapter_loaded(self, adapter_type: str, ok: bool, seconds: float) -> None:
        """Record one adapter load attempt: ``adapter_loads_total{type,result}`` and its duration."""
        t = adapter_type_name(adapter_type)
        self.adapter_loads.labels(type=t, result="ok" if ok else "error").inc()
        self.adapter_load_seconds.labels(type=t).observe(seconds)

    def adapter_evicted(self) -> None:
        """Count one adapter evicted from its device slot."""
        self.adapter_evictions.inc()

    def adapter_cache(self, hit: bool) -> None:
        """Count one adapter residency lookup: hit (already resident) or miss."""
        (self.adapter_cache_hits if hit else self.adapter_cache_misses).inc()

    def set_merged_adapter(self, adapter_id: str | None) -> None:
        """Mark ``adapter_id`` as the merged adapter (None or ``""``: none merged); drops the old series.

        The label is the raw adapter id: at most one series exists, so it needs no bound.
        """
        with self._merged_lock:
            if self._merged is not None:
                self.merged_adapter.remove(self._merged)
            self._merged = adapter_id or None
            if self._merged is not None:
                self.merged_adapter.labels(adapter=self._merged).set(1)

    # -------------------------------------------------------------------- http
    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` for this registry on its own thread; return the bound port (0 = any free)."""
        with self._http_lock:
            if self._http is not None:
                raise RuntimeError("metrics HTTP listener already started")
            server, thread = start_http_server(port, addr=host, registry=self.registry)
            self._http = (server, thread)
            return int(server.server_port)

    def stop_http(self) -> None:
        """Stop the ``/metrics`` listener and close its socket; a no-op when it is not running."""
        with self._http_lock:
            if self._http is None:
                return
            server, thread = self._http
            self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    @property
    def http_port(self) -> int | None:
        """The port ``/metrics`` is served on, or None when the listener is not running."""
        http = self._http
        return int(http[0].server_port) if http else None
