"""The engine deployment: one :class:`server.app.ServerApp` per Ray Serve replica, multiplexed by adapter id.

Each replica runs today's server unchanged (model, engine thread, catalog, residency, the shared
generation core) on the replica's own event loop, and answers with the single server's handlers
called in process: the gRPC servicers (with a :class:`CallContext`) and the OpenAI FastAPI app (one
ASGI call per request, :mod:`server.cluster.asgi`). Statuses, messages and outputs are therefore
the single server's.

Adapters: ``@serve.multiplexed`` keeps at most ``--max-adapters-per-replica`` adapter ids per
replica (LRU) and tells Serve's router which replica holds which; on a miss it registers
``<adapter-root>/<id>`` from the adapter store, and when it drops an id it unregisters it here
(in-flight requests finish first). The engine's residency limit is the same number.
:meth:`EngineReplica.evict` (called on every replica by adapter admin) drops an id at once, so no
replica serves an adapter's old weights after a replace or unregister returns.

Direct gRPC (one hop fewer): the engine deployment is the ingress of a Serve application of its own
(``<app>-engine``), so Serve's gRPC proxy calls :meth:`EngineReplica.Generate` /
:meth:`EngineReplica.GenerateStream` itself for clients that send ``application: <app>-engine`` and
``multiplexed_model_id: <adapter id>`` metadata, routing by the adapter id as the ingress's handle
does. What the ingress does per call (token, shutdown admission, in-flight count, malformed bytes)
the replica then does itself (:class:`server.cluster.door.FrontDoor`); a replica lost mid-call is
UNAVAILABLE from the proxy (:mod:`server.cluster.proxy_hooks`), and the python client retries a
unary Generate once, as the ingress does.

Lookaside (no Ray hop per token): :meth:`EngineReplica.Lease` (RoutingService, routed to this replica
by the adapter id as above) makes the adapter resident through the multiplexer and answers the
address of this replica's own gRPC server (``--replica-host``, the in-process server's port) with a
lease id; the client sends its Generate/GenerateStream there naming the lease, which stays open
until that call ends, so Serve counts the request on this replica for its routing and autoscaling
(:mod:`server.cluster.lease`: one lease, one generation, for the leased adapter; that port refuses
adapter admin). The generation itself is the single server's, on its own gRPC server, with the
same token.

Thread domain: the replica's user-code event loop (Serve runs every method there, the
constructor included); blocking work goes to worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator

import grpc
from ray import serve

from adapterserve.v1 import adapterserve_pb2 as pb
from server.adapters.catalog import AdapterNotFoundError
from server.api.http.app import build_app
from server.app import ServerApp
from server.cluster.admin import ClusterAdapterService, broadcast_evict
from server.cluster.asgi import call_asgi
from server.cluster.config import ClusterConfig, bracketed
from server.cluster.door import GENERATE, GENERATE_STREAM, LEASE, FrontDoor, adapter_of
from server.cluster.lease import Leases, ReplicaPortInterceptor
from server.cluster.rpc import CallContext, RawMessage, RpcStatus

log = logging.getLogger("adapterserve.cluster")

MULTIPLEX_ATTR = "__serve_multiplex_wrapper"  # where @serve.multiplexed keeps its LRU (ray.serve.api)


def advertised_address(host: str, port: int) -> str:
    """``host:port`` lookaside clients dial for a server listening on ``host``: a wildcard address is
    answered as this node's IP (Ray's view of it), an IPv6 literal in brackets."""
    if host in ("0.0.0.0", "::", "[::]"):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{bracketed(host)}:{port}"


class HeldAdapter:
    """What the multiplexer holds for one adapter id on this replica; dropping it unregisters the id.

    Serve's multiplexer calls ``__del__`` when its LRU drops the id (on a worker thread), then Python
    may call it again at collection: only the first call acts, and only on the entry it loaded.
    """

    def __init__(self, replica: EngineReplica, adapter_id: str, key: int | None):
        self.replica = replica
        self.adapter_id = adapter_id
        self.key = key  # the catalog entry this replica loaded (None: the load failed, nothing to drop)
        self._dropped = threading.Event()

    def drop(self) -> None:
        if self._dropped.is_set():
            return
        self._dropped.set()
        if self.key is not None:
            self.replica.unregister_if_current(self.adapter_id, self.key)

    def __del__(self) -> None:
        self.drop()


class EngineReplica(FrontDoor):
    """The engine deployment's class (server.cluster.deploy wraps it in ``serve.deployment``)."""

    async def __init__(self, cfg: ClusterConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self._closed = asyncio.Event()  # set by close(): leases end, their generations run on
        self.leases = Leases(self._closed)
        self.app = ServerApp(cfg.replica_config(), interceptors=[ReplicaPortInterceptor(self.leases, self._use_adapter)])
        self._server_task = await self.app.start_in_loop()
        context = serve.get_replica_context()
        self.admin_service = ClusterAdapterService(
            self.app.adapters, self.app.store, broadcast_evict(context.app_name, context.deployment),
            model_args=self.app.model.args, adapter_root=cfg.adapter_root, limits=self.app.adapter_limits)
        self.http_app = build_app(dataclasses.replace(self.app.http_context(), adapter_service=self.admin_service))
        self.replica_id = context.replica_id.unique_id
        self.address = advertised_address(cfg.replica_host, self.app.port)
        self._admin_lock = threading.Lock()  # this replica's loads and unloads, one at a time
        self._evictions: dict[str, int] = {}  # id -> evictions seen (a load racing an eviction reloads)

        async def load(adapter_id: str) -> HeldAdapter:
            return await asyncio.get_running_loop().run_in_executor(None, self._load, adapter_id)

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load)
        log.info("replica %s serving %s (%d adapters at most)", self.replica_id, self.app.model.name,
                 cfg.max_adapters_per_replica)

    # ------------------------------------------------------------------ adapters
    async def _use_adapter(self, adapter_id: str) -> None:
        """Make the request's adapter id (if any) registered here before its handler runs, through
        the multiplexer (its LRU, and what it tells Serve's routers this replica holds).

        A failed load is not an error here: the handler then answers exactly as the single server
        would for that id (NOT_FOUND, INVALID_ARGUMENT naming the field)."""
        if not adapter_id:
            return
        try:
            await self._multiplexed(adapter_id)
        except Exception as e:  # (the handler reports it with the single server's status)
            log.debug("adapter %s not loaded on replica %s: %s", adapter_id, self.replica_id, e)

    def _load(self, adapter_id: str) -> HeldAdapter:
        """Register ``<adapter-root>/<id>`` from the adapter store (worker thread; the server's single-flight
        --lazy-adapters load); load again when an eviction raced the load (what it read may be old)."""
        for _ in range(3):
            seen = self._evictions.get(adapter_id, 0)
            with self._admin_lock:
                entry = self.app.lazy.load(adapter_id)
            if self._evictions.get(adapter_id, 0) == seen:
                return HeldAdapter(self, adapter_id, entry.key)
            self.unregister_if_current(adapter_id, entry.key)  # evicted while loading: what was read may be old
        raise RpcStatus.of(grpc.StatusCode.UNAVAILABLE, f"adapter {adapter_id!r} kept changing while it loaded; retry")

    def unregister_if_current(self, adapter_id: str, key: int) -> None:
        """Unregister `adapter_id` if the catalog still holds the entry `key` (blocking: worker thread)."""
        with self._admin_lock:
            try:
                if self.app.adapters.get(adapter_id).key != key:
                    return
                self.app.adapters.unregister(adapter_id)
            except AdapterNotFoundError:
                pass

    async def evict(self, adapter_id: str) -> bool:
        """Drop `adapter_id` from this replica now (admin: replace, unregister); True when it was held.
        Requests already running finish on the weights they started with; the next one reloads."""
        self._evictions[adapter_id] = self._evictions.get(adapter_id, 0) + 1
        wrapper = getattr(self._multiplexed, MULTIPLEX_ATTR, None)
        held = wrapper.models.pop(adapter_id, None) if wrapper is not None else None
        if wrapper is not None:
            wrapper._push_multiplexed_replica_info = True  # tell the router at its next push (0.1 s)
        loop = asyncio.get_running_loop()
        if isinstance(held, HeldAdapter):
            await loop.run_in_executor(None, held.drop)
        try:
            entry = self.app.adapters.get(adapter_id)
        except AdapterNotFoundError:
            return held is not None
        await loop.run_in_executor(None, self.unregister_if_current, adapter_id, entry.key)
        return True

    # ------------------------------------------------------------------ gRPC from the ingress
    async def generate(self, data: bytes, timeout_s: float | None = None) -> bytes:
        """GenerationService.Generate on this replica: the single server's servicer, in process."""
        return await self._generate(pb.GenerateRequest.FromString(data), timeout_s)

    async def generate_stream(self, data: bytes, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """GenerationService.GenerateStream on this replica; a failure raises RpcStatus after the chunks sent."""
        async for chunk in self._generate_stream(pb.GenerateRequest.FromString(data), timeout_s):
            yield chunk

    async def _generate(self, request: pb.GenerateRequest, timeout_s: float | None) -> bytes:
        await self._use_adapter(adapter_of(request))
        response = await self.app.generation_servicer.Generate(request, CallContext(timeout_s))
        return response.SerializeToString()

    async def _generate_stream(self, request: pb.GenerateRequest, timeout_s: float | None) -> AsyncIterator[bytes]:
        await self._use_adapter(adapter_of(request))
        stream = self.app.generation_servicer.GenerateStream(request, CallContext(timeout_s))
        try:
            async for chunk in stream:
                yield chunk.SerializeToString()
        finally:
            await stream.aclose()  # cancels the engine request when the caller went away

    # ------------------------------------------------------------------ gRPC from Serve's proxy (direct)
    async def Generate(self, data: bytes, grpc_context=None) -> RawMessage:  # the RPC's name: the proxy calls it
        """GenerationService.Generate called by the gRPC proxy itself (the ``<app>-engine`` application)."""
        request = self._enter(GENERATE, data, grpc_context)
        try:
            return RawMessage(await self._generate(request, None))
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        finally:
            self._done()

    async def GenerateStream(self, data: bytes, grpc_context=None) -> AsyncIterator[RawMessage]:
        """GenerationService.GenerateStream called by the gRPC proxy itself; a failure after chunks
        ends the stream with the single server's status."""
        request = self._enter(GENERATE_STREAM, data, grpc_context)
        try:
            async for chunk in self._generate_stream(request, None):
                yield RawMessage(chunk)
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        finally:
            self._done()

    # ------------------------------------------------------------------ lookaside (RoutingService)
    async def Lease(self, data: bytes, grpc_context=None) -> AsyncIterator[RawMessage]:
        """RoutingService.Lease: the adapter made resident here, then this replica's own address and a
        lease id; the call stays open until the generation naming the lease ends (server.cluster.lease)."""
        request = self._enter(LEASE, data, grpc_context, pb.LeaseRequest)
        try:
            async for answer in self._leased(request.adapter_id):
                yield RawMessage(answer)
        finally:
            self._done()

    async def lease(self, data: bytes) -> AsyncIterator[bytes]:
        """RoutingService.Lease relayed by the ingress (clients that name no application)."""
        async for answer in self._leased(pb.LeaseRequest.FromString(data).adapter_id):
            yield answer

    async def _leased(self, adapter_id: str) -> AsyncIterator[bytes]:
        await self._use_adapter(adapter_id)
        lease_id = self.leases.open(adapter_id)
        try:
            yield pb.LeaseResponse(address=self.address, replica=self.replica_id, lease_id=lease_id).SerializeToString()
            await self.leases.hold(lease_id)
        finally:
            self.leases.end(lease_id)

    async def close(self) -> int:
        """Shutdown phase 2 (server.cluster.deploy.Cluster.stop): new calls UNAVAILABLE on every path,
        the direct port's included; leases end; returns the calls and generations still running."""
        await super().close()
        self._closed.set()
        self.app.engine.close("server is shutting down")
        return await self.in_flight()

    async def in_flight(self) -> int:
        return self._in_flight + self.app.engine.num_active()

    async def model_info(self) -> bytes:
        return self.app.model_info().SerializeToString()

    async def admin(self, method: str, data: bytes) -> bytes:
        """RegisterAdapter / UnregisterAdapter for the cluster: the store, then every replica (server.cluster.admin)."""
        request_type = {"RegisterAdapter": pb.RegisterAdapterRequest,
                        "UnregisterAdapter": pb.UnregisterAdapterRequest}[method]
        response = await getattr(self.admin_service, method)(request_type.FromString(data), CallContext())
        return response.SerializeToString()

    async def adapters(self, method: str, data: bytes) -> bytes:
        """An AdapterService read (ListAdapters, GetAdapter) on this replica's catalog."""
        servicer = self.app.adapter_servicer
        request = {"ListAdapters": pb.ListAdaptersRequest, "GetAdapter": pb.GetAdapterRequest}[method].FromString(data)
        response = await getattr(servicer, method)(request, CallContext())
        return response.SerializeToString()

    # ------------------------------------------------------------------ HTTP
    async def http(self, scope: dict, body: bytes) -> AsyncIterator[object]:
        """One OpenAI API request through the single server's FastAPI app in process: yields
        (status, headers), then the body's chunks (a stream's events as they come)."""
        await self._use_adapter(serve.get_multiplexed_model_id())
        async for item in call_asgi(self.http_app, scope, body):
            yield item

    # ------------------------------------------------------------------ health, metrics
    async def serving(self) -> bool:
        """True while this replica's server reports SERVING (its engine alive, not shutting down)."""
        return self.app.serving() and self.app.engine.failed is None

    async def metrics_text(self) -> tuple[str, bytes]:
        """(replica id, this replica's adapterserve_* families in Prometheus text format)."""
        from prometheus_client import generate_latest

        return self.replica_id, generate_latest(self.app.metrics.registry)

    def check_health(self) -> None:
        """Serve's health probe: a failed engine makes Serve replace this replica."""
        if self.app.engine.failed is not None:
            raise RuntimeError(f"engine failed: {self.app.engine.failed}")

    async def __del__(self) -> None:  # Serve calls it when it stops the replica
        try:
            await self.app.shutdown(grace=self.cfg.grace_seconds, drain=0.0)
        except Exception as e:  # (shutting down anyway)
            log.warning("replica %s shutdown: %s", getattr(self, "replica_id", "?"), e)

