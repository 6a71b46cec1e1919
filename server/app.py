"""Wire config -> model -> engine -> adapters -> gRPC + metrics, and run it.

`ServerApp(cfg).start()` runs the whole server on a background thread (tests, benchmarks);
`serve(cfg)` runs it in the foreground with SIGTERM/SIGINT handling (python -m server).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from importlib import metadata

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.adapters.catalog import AdapterCatalog
from server.adapters.formats import AdapterLimits
from server.adapters.lazy import LazyAdapters
from server.adapters.residency import Residency
from server.adapters.store import AdapterStore
from server.api.adapters import AdapterServicer
from server.api.core import GenerationCore
from server.api.generation import GenerationServicer
from server.api.http.app import HttpContext, build_app
from server.api.http.server import HttpServer
from server.api.malformed import MalformedMessageInterceptor
from server.api.security import add_listen_port, server_interceptors
from server.api.validation import MAX_TOP_LOGPROBS, Limits
from server.config import ServerConfig
from server.engine.commands import CommandQueue
from server.engine.engine import Engine
from server.metrics import ServerMetrics
from server.model.cpu_features import KernelReport, detect, kernel_report
from server.model.loader import LoadedModel, load_model
from server.model.omp import TeamlessExecutor, release_team

log = logging.getLogger("adapterserve")

SERVICE_NAMES = ("adapterserve.v1.GenerationService", "adapterserve.v1.AdapterService")


def _version() -> str:
    try:
        return metadata.version("adapterserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ServerApp:
    """One server: model, engine thread, adapter manager, gRPC server, metrics listener."""

    def __init__(self, cfg: ServerConfig, model: LoadedModel | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = ()):
        """`interceptors`: extra gRPC interceptors, after the token check (server.cluster's lease release)."""
        self.cfg = cfg
        self._extra_interceptors = tuple(interceptors)
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        # The engine thread re-takes the GIL after every torch op; a short switch interval keeps
        # the gRPC thread from holding it for the default 5 ms while a step waits.
        sys.setswitchinterval(0.0005)
        self.model = model or load_model(cfg.model, cfg.device, cfg.dtype, cfg.cache_dir or None, cfg.matmul,
                                         cfg.kernels, cfg.cuda_graphs)
        args = self.model.args
        self.max_context = min(cfg.max_context or args.max_position_embeddings, args.max_position_embeddings)
        self.metrics = ServerMetrics(cfg.metrics_max_adapter_labels, build_info={
            "version": _version(), "model": self.model.name, "device": cfg.device, "dtype": cfg.dtype})
        commands = CommandQueue()  # the only way from other threads to the engine thread's device state
        self.residency = Residency(self.model.runtime, max_resident=cfg.max_resident_adapters,
                                   memory_bytes=cfg.adapter_memory_bytes, metrics=self.metrics,
                                   lora_threads=cfg.lora_threads)
        self.adapters = AdapterCatalog(self.residency, commands, metrics=self.metrics)
        self.engine = Engine(
            self.model.runtime, self.model.tokenizer, self.residency, self.adapters, commands,
            kv_cache_tokens=cfg.kv_cache_tokens, page_size=cfg.kv_page_tokens, max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue, max_prefill_tokens=cfg.max_prefill_tokens, prefix_cache=cfg.prefix_cache == "on",
            kv_allocation=cfg.kv_allocation, metrics=self.metrics, watchdog_seconds=cfg.watchdog_seconds)
        runtime = self.model.runtime
        self.kernels: KernelReport = kernel_report(cfg.device, runtime.dtype, self.engine.cache.k[0].dtype,
                                                   runtime.use_onednn, runtime.use_kernels, cfg.matmul, detect(),
                                                   runtime.use_cpu_kernels)
        log.info(self.kernels.log_line())
        if self.kernels.note:
            log.warning("--dtype %s: %s", cfg.dtype, self.kernels.note)
        self.adapter_limits = AdapterLimits(max_lora_rank=cfg.max_lora_rank, max_virtual_tokens=cfg.max_virtual_tokens,
                                            max_bottleneck_width=cfg.max_bottleneck_width)
        self.store = AdapterStore(cfg.adapter_root, args, self.adapter_limits)
        self.lazy = LazyAdapters(self.adapters, self.store) if cfg.lazy_adapters else None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HttpServer | None = None
        self.core: GenerationCore | None = None
        self.generation_servicer: GenerationServicer | None = None  # set once serving (server.cluster calls them)
        self.adapter_servicer: AdapterServicer | None = None
        self._serving = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        release_team()  # this thread built the model and the KV cache; decoding is the engine thread's (model/omp.py)

    # ------------------------------------------------------------------ building
    def model_info(self) -> pb.ModelInfo:
        a, c = self.model.args, self.cfg
        return pb.ModelInfo(
            name=self.model.name, architecture=a.architecture, vocab_size=self.model.tokenizer.vocab_size,
            max_context=self.max_context, dtype=c.dtype, device=c.device, num_layers=a.num_layers,
            hidden_size=a.hidden_size, version=_version(), kernels=pb.Kernels(**dataclasses.asdict(self.kernels)),
            limits=pb.Limits(
                max_context_tokens=self.max_context, kv_cache_tokens=self.engine.kv_capacity_tokens,
                max_batch_size=c.max_batch_size, max_queue=c.max_queue, default_max_new_tokens=c.default_max_new_tokens,
                max_top_logprobs=MAX_TOP_LOGPROBS, max_lora_rank=c.max_lora_rank,
                max_virtual_tokens=c.max_virtual_tokens, max_resident_adapters=c.max_resident_adapters,
                max_adapters_per_request=c.max_adapters_per_request, prefix_cache=c.prefix_cache == "on",
                max_prefill_tokens=c.max_prefill_tokens),
        )

    def _preload(self, servicer: AdapterServicer) -> None:
        for item in self.cfg.preload:
            adapter_id, path = item.split("=", 1)
            servicer.register_blocking(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path))

    async def _serve(self) -> None:
        cfg = self.cfg
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes)]
        # Auth first (a denied call is never parsed), then malformed messages -> INVALID_ARGUMENT.
        interceptors = [*server_interceptors(cfg), *self._extra_interceptors, MalformedMessageInterceptor()]
        server = grpc.aio.server(interceptors=interceptors, options=opts)
        limits = Limits(max_context=self.max_context, kv_capacity_tokens=self.engine.kv_capacity_tokens,
                        default_max_new_tokens=cfg.default_max_new_tokens, vocab_size=self.model.tokenizer.vocab_size,
                        max_adapters_per_request=cfg.max_adapters_per_request)
        self.core = GenerationCore(self.engine, self.adapters, self.model.tokenizer, limits, self.metrics, self.lazy)
        self.generation_servicer = GenerationServicer(self.core, self.model_info())
        pb_grpc.add_GenerationServiceServicer_to_server(self.generation_servicer, server)
        adapter_servicer = self.adapter_servicer = AdapterServicer(self.adapters, self.model.args, cfg.adapter_root,
                                                                   self.adapter_limits)
        pb_grpc.add_AdapterServiceServicer_to_server(adapter_servicer, server)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
        self.port = add_listen_port(server, f"{cfg.host}:{cfg.port}", cfg)
        loop = asyncio.get_running_loop()
        # Adapter loads and preloads run torch ops in executor workers: each gives back the OpenMP
        # pool it made, so the engine thread's team stays the only one (server/model/omp.py).
        loop.set_default_executor(TeamlessExecutor(thread_name_prefix="adapterserve-worker"))
        self.engine.on_failure.append(lambda reason: asyncio.run_coroutine_threadsafe(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), loop))
        self.engine.start()
        await loop.run_in_executor(None, self._preload, adapter_servicer)
        await server.start()
        if cfg.http_port:
            self._http = HttpServer(build_app(self.http_context()), cfg)
            self.http_port = await self._http.start()
        if cfg.metrics_port:
            self.metrics_port = self.metrics.start_http(cfg.metrics_host, cfg.metrics_port)
        if self.engine.failed is None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self._stopped = asyncio.Event()
        log.info("serving %s on %s:%d (HTTP on :%s, metrics on :%s)", self.model.name, cfg.host, self.port,
                 self.http_port, self.metrics_port)
        release_team()  # the event loop's thread, if it ran torch ops while starting
        self._ready.set()
        await self._stopped.wait()

    def http_context(self) -> HttpContext:
        """What the OpenAI HTTP API serves (once serving): the HTTP server's app, or server.cluster's in-process one."""
        cfg = self.cfg
        return HttpContext(
            core=self.core, adapter_service=self.adapter_servicer, model_name=self.model.name,
            auth_token=cfg.resolved_auth_token(), admin_token=cfg.resolved_admin_token(),
            registry=self.metrics.registry, serving=self.serving, max_body_bytes=cfg.max_message_bytes)

    async def start_in_loop(self, timeout: float = 120.0) -> asyncio.Task:
        """Serve on the running event loop (a host's, e.g. a Ray Serve replica's); return once serving.

        The returned task ends after :meth:`shutdown`; it raises what a failed start raised."""
        task = asyncio.create_task(self._serve())
        end = asyncio.get_running_loop().time() + timeout
        while not self._ready.is_set():
            if task.done():
                task.result()  # startup failed: raise its error
            if asyncio.get_running_loop().time() > end:
                task.cancel()
                raise TimeoutError(f"server did not start within {timeout:g} s")
            await asyncio.sleep(0.01)
        return task

    async def _set_health(self, status: int) -> None:
        """The health both APIs report (gRPC health service and HTTP /health)."""
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        if self._health is not None:
            for name in ("", *SERVICE_NAMES):
                await self._health.set(name, status)

    async def shutdown(self, grace: float | None = None, drain: float | None = None) -> None:
        """Stop in three phases (what SIGTERM runs, with --drain-seconds and --grace-seconds):

        1. health NOT_SERVING at once, new gRPC requests still accepted for `drain` seconds, so load
           balancers see the status and route elsewhere;
        2. new requests answered UNAVAILABLE; in-flight ones may finish for `grace` seconds;
        3. those still running are answered UNAVAILABLE (and logged so), then the servers stop.
        """
        grace = self.cfg.grace_seconds if grace is None else grace
        drain = self.cfg.drain_seconds if drain is None else drain
        loop = asyncio.get_running_loop()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain > 0:
            log.info("NOT_SERVING; still accepting new requests for %.1f s (--drain-seconds)", drain)
            await asyncio.sleep(drain)
        self.engine.close("server is shutting down")
        end = loop.time() + grace
        while self.engine.num_active() and loop.time() < end:
            await asyncio.sleep(0.02)
        if self.engine.num_active():
            try:
                cut = await asyncio.wait_for(asyncio.wrap_future(self.engine.fail_all(
                    "UNAVAILABLE", f"server shutting down: not finished within --grace-seconds {grace:g}")), 5)
                log.warning("%d request(s) cut at the end of --grace-seconds (UNAVAILABLE)", cut)
            except Exception as e:  # the engine thread is gone or stuck: the servers' stop below cancels them
                log.error("could not cut the remaining requests: %s", e or type(e).__name__)
        if self.core is not None:  # let every handler send its status and write its log line
            await self.core.wait_idle(5.0)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        stops = [self._server.stop(1.0)] if self._server is not None else []
        if self._http is not None:
            stops.append(self._http.stop(1.0))
        await asyncio.gather(*stops)
        self.engine.stop()
        if self.lazy is not None:
            self.lazy.close()
        self.metrics.stop_http()
        if self._stopped is not None:
            self._stopped.set()

    def serving(self) -> bool:
        """The health state both APIs report: True while SERVING, False before start and once draining."""
        return self._serving

    # ------------------------------------------------------------------ running
    def start(self, timeout: float = 120.0) -> ServerApp:
        """Run on a background thread; return once the gRPC port accepts requests."""
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve())
            except BaseException as e:  # surfaced to start()'s caller
                self._error = e
                self._ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="adapterserve-grpc", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float = 5.0, drain: float = 0.0) -> None:
        """Shut down from another thread (tests, benchmarks): no drain period by default."""
        if self._loop is None or self._loop.is_closed():
            return
        if self._stopped is None or not self._stopped.is_set():  # not shut down already (e.g. by SIGTERM's path)
            fut = asyncio.run_coroutine_threadsafe(self.shutdown(grace, drain), self._loop)
            end = time.monotonic() + drain + grace + 60
            # A shutdown already under way may end the loop before it runs this one: the thread ending counts too.
            while not fut.done() and self._thread is not None and self._thread.is_alive():
                if time.monotonic() > end:
                    raise TimeoutError(f"server did not stop within {drain + grace + 60:g} s")
                time.sleep(0.02)
            if fut.done():
                fut.result()
            else:
                fut.cancel()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def target(self) -> str:
        return f"{self.cfg.host}:{self.port}"


def serve(cfg: ServerConfig) -> int:
    """Foreground server for `python -m server`; returns the exit code (0 after a clean SIGTERM)."""
    app = ServerApp(cfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.create_task(app._serve())
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if serving in done:
            serving.result()  # startup failed: raise
            return
        log.info("signal received: NOT_SERVING; drain %.1f s, then in-flight requests get %.1f s (grace)",
                 cfg.drain_seconds, cfg.grace_seconds)
        await app.shutdown()
        await serving
        log.info("stopped")

    asyncio.run(main())
    return 0
