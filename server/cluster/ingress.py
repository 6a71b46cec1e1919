"""The ingress deployment: the cluster's front door for both APIs; no model, no adapter state.

Hops: Serve's gRPC proxy calls the method named like the RPC (``Generate``, ``GenerateStream``, ...)
with the request's raw bytes (:mod:`server.cluster.rpc`); Serve's HTTP proxy hands OpenAI requests
to the FastAPI routes below. Either way the ingress checks the token (gRPC; HTTP's is checked by
the replica's own app), reads the adapter id (``adapter_id``, or the first part of a weighted mix;
HTTP: ``model``, ``base:adapter`` or ``adapters``), and calls the engine deployment with
``multiplexed_model_id=<adapter id>``: Serve's router prefers a replica that holds the adapter.

Statuses: a replica's own status passes through unchanged (RpcStatus, or its HTTP response). A
replica lost mid-call is UNAVAILABLE (a unary Generate is retried once first); a stream already
under way then ends with UNAVAILABLE, never silently. Health is SERVING while at least one replica
serves. Thread domain: the ingress replica's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from adapterserve.v1 import adapterserve_pb2 as pb
from server.api.http.errors import OpenAIError
from server.cluster.asgi import request_scope
from server.cluster.config import ENGINE, ClusterConfig, engine_app_name
from server.cluster.door import GENERATE, GENERATE_STREAM, LEASE, FrontDoor, adapter_of, parse
from server.cluster.metrics import merge_replica_metrics
from server.cluster.rpc import RawMessage, RpcStatus

log = logging.getLogger("adapterserve.cluster")

HEALTH_TIMEOUT_S = 5.0
HEALTH_CACHE_S = 0.5
WATCH_INTERVAL_S = 1.0
SERVICE_NAMES = ("", "adapterserve.v1.GenerationService", "adapterserve.v1.AdapterService")
LOST = (RayActorError, DeploymentUnavailableError)


def _lost_message(e: BaseException) -> str:
    return f"replica unavailable ({type(e).__name__}); retry"


class Ingress(FrontDoor):
    """Ray Serve ingress: gRPC methods (called by the gRPC proxy) + the FastAPI routes (HTTP proxy)."""

    def __init__(self, cfg: ClusterConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self._engine: DeploymentHandle | None = None
        self._health: tuple[float, bool] = (0.0, False)
        self._model_name: str | None = None

    @property
    def engine(self) -> DeploymentHandle:
        """The engine deployment: the ingress of an application of its own (server.cluster.deploy),
        looked up at first use (Serve checks that it exists; a RayService deploys both at once)."""
        if self._engine is None:
            self._engine = serve.get_deployment_handle(ENGINE, app_name=engine_app_name(self.cfg))
        return self._engine

    # ------------------------------------------------------------------ routing, health
    def _routed(self, adapter_id: str, *, stream: bool = False) -> DeploymentHandle:
        return self.engine.options(multiplexed_model_id=adapter_id, stream=stream)

    async def serving(self) -> bool:
        """True when at least one replica serves (asked at most every HEALTH_CACHE_S), unless draining."""
        if self._draining:
            return False
        checked, ok = self._health
        if time.monotonic() - checked < HEALTH_CACHE_S:
            return ok
        try:
            answers = await self.engine.broadcast("serving").results_async(timeout_s=HEALTH_TIMEOUT_S,
                                                                            return_exceptions=True)
        except Exception as e:  # timed out, or Serve marked the deployment unavailable (no replica)
            log.info("health: no replica answered (%s)", type(e).__name__)
            answers = []
        ok = any(a is True for a in answers)
        self._health = (time.monotonic(), ok)
        return ok

    # ------------------------------------------------------------------ GenerationService
    async def Generate(self, data: bytes, grpc_context=None) -> RawMessage:  # the RPC's name: Serve's gRPC proxy calls the method named like it
        request = self._enter(GENERATE, data, grpc_context)
        try:
            for attempt in range(2):  # a replica lost mid-call: generation has no side effect, retry once
                try:
                    return RawMessage(await self._routed(adapter_of(request)).generate.remote(data))
                except LOST as e:
                    if attempt:
                        raise RpcStatus.of(grpc.StatusCode.UNAVAILABLE, _lost_message(e)) from None
                    log.warning("Generate: %s; retrying on another replica", _lost_message(e))
            raise AssertionError("unreachable")
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        except BackPressureError as e:
            raise self._fail(grpc_context, RpcStatus.of(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))) from None
        finally:
            self._done()

    async def GenerateStream(self, data: bytes, grpc_context=None) -> AsyncIterator[RawMessage]:
        request = self._enter(GENERATE_STREAM, data, grpc_context)
        async for chunk in self._relay_stream(grpc_context, adapter_of(request), "generate_stream", data):
            yield chunk

    async def Lease(self, data: bytes, grpc_context=None) -> AsyncIterator[RawMessage]:
        """RoutingService.Lease of a client that names no application: relayed to the replica Serve
        routes the adapter to (the lease then holds this relay open too)."""
        request = self._enter(LEASE, data, grpc_context, pb.LeaseRequest)
        async for chunk in self._relay_stream(grpc_context, request.adapter_id, "lease", data):
            yield chunk

    async def _relay_stream(self, grpc_context, adapter_id: str, method: str, data: bytes) -> AsyncIterator[RawMessage]:
        """A streaming engine method's chunks, routed by `adapter_id`; a failure ends the stream with
        its status (a lost replica: UNAVAILABLE naming the chunks sent). Counts the call out at the end."""
        sent = 0
        try:
            async for chunk in getattr(self._routed(adapter_id, stream=True), method).remote(data):
                sent += 1
                yield RawMessage(chunk)
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        except LOST as e:
            raise self._fail(grpc_context, RpcStatus.of(
                grpc.StatusCode.UNAVAILABLE, f"{_lost_message(e)} after {sent} chunk(s)")) from None
        except BackPressureError as e:
            raise self._fail(grpc_context, RpcStatus.of(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))) from None
        finally:
            self._done()

    async def GetModelInfo(self, data: bytes, grpc_context=None) -> RawMessage:
        return await self._unary("/adapterserve.v1.GenerationService/GetModelInfo", grpc_context,
                                 lambda: self.engine.model_info.remote())

    # ------------------------------------------------------------------ AdapterService
    async def ListAdapters(self, data: bytes, grpc_context=None) -> RawMessage:
        """The adapters the replicas hold (each id once: the replicas' union)."""
        async def union() -> bytes:
            merged: dict[str, pb.Adapter] = {}
            for answer in await self._every_replica("ListAdapters", data):
                for a in pb.ListAdaptersResponse.FromString(answer).adapters:
                    merged.setdefault(a.adapter_id, a)
            return pb.ListAdaptersResponse(adapters=[merged[k] for k in sorted(merged)]).SerializeToString()

        return await self._unary("/adapterserve.v1.AdapterService/ListAdapters", grpc_context, union)

    async def GetAdapter(self, data: bytes, grpc_context=None) -> RawMessage:
        """The adapter as a replica holding it reports it; NOT_FOUND when none holds it."""
        async def first() -> bytes:
            answers = await self._every_replica("GetAdapter", data, keep_errors=True)
            found = [a for a in answers if isinstance(a, bytes)]
            if found:
                return found[0]
            raise next((a for a in answers if isinstance(a, RpcStatus)),
                       RpcStatus.of(grpc.StatusCode.UNAVAILABLE, "no replica answered"))

        return await self._unary("/adapterserve.v1.AdapterService/GetAdapter", grpc_context, first)

    async def _every_replica(self, method: str, data: bytes, keep_errors: bool = False) -> list:
        answers = await self.engine.broadcast("adapters", method, data).results_async(
            timeout_s=HEALTH_TIMEOUT_S * 6, return_exceptions=True)
        return [a for a in answers if isinstance(a, bytes) or (keep_errors and isinstance(a, RpcStatus))]

    async def RegisterAdapter(self, data: bytes, grpc_context=None) -> RawMessage:
        return await self._unary("/adapterserve.v1.AdapterService/RegisterAdapter", grpc_context,
                                 lambda: self.engine.admin.remote("RegisterAdapter", data))

    async def UnregisterAdapter(self, data: bytes, grpc_context=None) -> RawMessage:
        return await self._unary("/adapterserve.v1.AdapterService/UnregisterAdapter", grpc_context,
                                 lambda: self.engine.admin.remote("UnregisterAdapter", data))

    async def _unary(self, method: str, grpc_context, call) -> RawMessage:
        try:
            self._authorize(method, grpc_context)
            self._admit()
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        try:
            return RawMessage(await call())
        except LOST as e:
            raise self._fail(grpc_context, RpcStatus.of(grpc.StatusCode.UNAVAILABLE, _lost_message(e))) from None
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        finally:
            self._done()

    # ------------------------------------------------------------------ grpc.health.v1.Health
    async def Check(self, data: bytes, grpc_context=None) -> health_pb2.HealthCheckResponse:
        try:
            return health_pb2.HealthCheckResponse(status=await self._health_status(data))
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None

    async def Watch(self, data: bytes, grpc_context=None) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        try:
            while True:
                status = await self._health_status(data)
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
                await asyncio.sleep(WATCH_INTERVAL_S)
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None

    async def List(self, data: bytes, grpc_context=None) -> health_pb2.HealthListResponse:
        status = health_pb2.HealthCheckResponse(status=await self._health_status(b""))
        return health_pb2.HealthListResponse(statuses={name: status for name in SERVICE_NAMES})

    async def _health_status(self, data: bytes) -> int:
        request = parse(health_pb2.HealthCheckRequest, data)
        if request.service not in SERVICE_NAMES:
            raise RpcStatus.of(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        serving = await self.serving()
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    # ------------------------------------------------------------------ OpenAI HTTP API
    async def http_health(self) -> Response:
        if await self.serving():
            return Response("SERVING", media_type="text/plain")
        return Response("NOT_SERVING", status_code=503, media_type="text/plain")

    async def http_metrics(self) -> Response:
        answers = await self.engine.broadcast("metrics_text").results_async(timeout_s=HEALTH_TIMEOUT_S,
                                                                             return_exceptions=True)
        texts = [a for a in answers if isinstance(a, tuple)]
        return Response(merge_replica_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    async def http_forward(self, request: Request) -> Response:
        """Every other route: the replica's OpenAI app answers (auth, validation, errors included)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.cfg.max_message_bytes:
            return _openai_error(413, f"request body: {int(length)} bytes exceed the limit of "
                                      f"{self.cfg.max_message_bytes} (--max-message-bytes)")
        try:
            self._admit()
        except RpcStatus as e:
            return _openai_error(503, e.details)
        relaying = False
        try:
            body = await request.body()
            adapter_id = await self._http_adapter(request, body)
            handle = self.engine.options(multiplexed_model_id=adapter_id, stream=True)
            stream = handle.http.remote(request_scope(request), body)
            try:
                status, headers = await stream.__anext__()
            except RpcStatus as e:
                return _openai_error(503 if e.code == grpc.StatusCode.UNAVAILABLE else 500, e.details)
            except LOST as e:
                return _openai_error(503, _lost_message(e))
            except BackPressureError as e:
                return _openai_error(429, str(e))
            relaying = True
            return StreamingResponse(_relay(stream, self._done), status_code=status,
                                     headers={k: v for k, v in headers if k.lower() != "content-length"})
        finally:
            if not relaying:
                self._done()

    async def _http_adapter(self, request: Request, body: bytes) -> str:
        """The adapter id of an OpenAI completion body: ``model`` (or ``base:adapter``), else the
        first of ``adapters``; "" for the base model or anything unparsable (the replica's app answers)."""
        if request.method != "POST" or not request.url.path.endswith(("/chat/completions", "/completions")):
            return ""
        try:
            doc = json.loads(body)
        except ValueError:
            return ""
        if not isinstance(doc, dict):
            return ""
        model = doc.get("model")
        base = await self._base_name()
        if isinstance(model, str) and model not in ("", base):
            prefix, sep, adapter = model.rpartition(":")
            return adapter if sep and prefix == base else model
        mix = doc.get("adapters")
        if isinstance(mix, list) and mix and isinstance(mix[0], dict) and isinstance(mix[0].get("adapter_id"), str):
            return mix[0]["adapter_id"]
        return ""

    async def _base_name(self) -> str:
        if self._model_name is None:
            self._model_name = pb.ModelInfo.FromString(await self.engine.model_info.remote()).name
        return self._model_name


async def _relay(stream, done: Callable[[], None]) -> AsyncIterator[bytes]:
    """The replica's body chunks; a replica lost mid-stream ends the stream with an SSE error event.
    `done` counts the request out when the body ended."""
    try:
        async for chunk in stream:
            yield chunk
    except (*LOST, RpcStatus) as e:
        message = e.details if isinstance(e, RpcStatus) else _lost_message(e)
        yield b"data: " + json.dumps(OpenAIError(503, message).body()).encode() + b"\n\n"
    finally:
        done()


def _openai_error(status: int, message: str) -> JSONResponse:
    return OpenAIError(status, message).response()


def _http_app() -> FastAPI:
    """The ingress's FastAPI app: /health, /metrics, and everything else relayed to a replica.

    Built per deployment (never a module attribute: Serve pickles the app with the class, and a
    module attribute would arrive in the replica process as a fresh, unbound import)."""
    app = FastAPI(title="adapterserve cluster", docs_url=None, redoc_url=None, openapi_url=None)

    def ingress() -> Ingress:
        return serve.get_replica_context().servable_object

    @app.get("/health")
    async def health() -> Response:
        return await ingress().http_health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return await ingress().http_metrics()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(request: Request) -> Response:
        return await ingress().http_forward(request)

    return app


def ingress_class() -> type:
    """The Ingress class serving the FastAPI app (serve.ingress), ready for serve.deployment."""
    return serve.ingress(_http_app())(Ingress)
