"""Lookaside leases: a generation sent straight to an engine replica's own gRPC server, counted by Serve.

RoutingService.Lease (:meth:`server.cluster.replica.EngineReplica.Lease`) is routed by Serve like any
call with the adapter's id, answers the replica's own address and a lease id, and stays open; the
client sends its Generate/GenerateStream to that address with ``adapterserve-lease: <id>`` metadata.
:class:`ReplicaPortInterceptor` (on the replica's in-process server) admits a generation only under
a lease that is open and not yet used, for the adapter the lease was taken for; it claims the lease
when the call's handler starts, makes the adapter resident through the replica's multiplexer (as
every other path does), and releases the lease when the call ends however it ends (answered,
failed, cancelled). The lease call then ends OK: Serve counts the generation as an ongoing request
on the replica for as long as it runs (its load-aware routing, autoscaling), while no token crosses
Ray. A lease no generation claims within :data:`CLAIM_S` ends by itself; so does every lease when
the replica closes. Adapter admin is the cluster's (store, every replica): the replica's port
refuses AdapterService calls.

Thread domain: the replica's event loop (the lease generator, and the in-process gRPC server).
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from server.cluster.door import adapter_of

LEASE_METADATA = "adapterserve-lease"  # the metadata a lookaside generation names its lease by (the clients' too)
CLAIM_S = 30.0  # a lease no generation claims within this ends
GENERATION_METHODS = ("/adapterserve.v1.GenerationService/Generate", "/adapterserve.v1.GenerationService/GenerateStream")
ADMIN_SERVICE = "/adapterserve.v1.AdapterService/"


class _Lease:
    __slots__ = ("adapter_id", "claimed", "released")

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id  # what the lease was routed by and made resident
        self.claimed = asyncio.Event()
        self.released = asyncio.Event()


class Leases:
    """The open leases of one replica, by id."""

    def __init__(self, closed: asyncio.Event):
        self._open: dict[str, _Lease] = {}
        self._closed = closed  # set when the replica closes: every lease ends

    def open(self, adapter_id: str = "") -> str:
        """A new lease for `adapter_id` ("" = the base model); its id has 128 random bits."""
        lease_id = secrets.token_hex(16)
        self._open[lease_id] = _Lease(adapter_id)
        return lease_id

    def adapter_of(self, lease_id: str) -> str | None:
        """The adapter an open, unclaimed lease was taken for; None when no such lease is open."""
        lease = self._open.get(lease_id)
        return None if lease is None or lease.claimed.is_set() else lease.adapter_id

    async def hold(self, lease_id: str, claim_s: float = CLAIM_S) -> None:
        """Return when the lease's generation ended, no generation claimed it within `claim_s`, or the
        replica closed (the caller then ends the lease)."""
        lease = self._open[lease_id]
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            if await _until(lease.claimed, closed, claim_s):
                await _until(lease.released, closed, None)
        finally:
            closed.cancel()

    def end(self, lease_id: str) -> None:
        """Forget the lease (a later claim of its id fails)."""
        self._open.pop(lease_id, None)

    def claim(self, lease_id: str) -> bool:
        """A generation naming `lease_id` starts: True once per open lease, False after (or for an
        unknown or ended lease): one lease, one generation."""
        lease = self._open.get(lease_id)
        if lease is None or lease.claimed.is_set():
            return False
        lease.claimed.set()
        return True

    def release(self, lease_id: str) -> None:
        """The generation that claimed `lease_id` ended."""
        lease = self._open.get(lease_id)
        if lease is not None:
            lease.released.set()


async def _until(event: asyncio.Event, closed: asyncio.Future, timeout: float | None) -> bool:
    """Wait for `event`, at most until `closed` is done or `timeout` passed; True when it is set."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return event.is_set()


class ReplicaPortInterceptor(grpc.aio.ServerInterceptor):
    """On a replica's own gRPC server (after the token check): generations only under an open,
    unused lease for their adapter (claimed when the handler starts, released when the call ends);
    AdapterService refused (adapter admin goes through the cluster); health and reflection pass.

    `use_adapter` makes an adapter resident through the replica's multiplexer before a generation runs.
    """

    def __init__(self, leases: Leases, use_adapter: Callable[[str], Awaitable[None]]):
        self.leases = leases
        self.use_adapter = use_adapter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method.startswith(ADMIN_SERVICE):
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED,
                             "adapter admin goes through the cluster (RegisterAdapter/UnregisterAdapter on its "
                             "--port): a replica's own port serves leased generations only")
        if method not in GENERATION_METHODS:
            return handler
        lease_id = next((v for k, v in handler_call_details.invocation_metadata or () if k == LEASE_METADATA), None)
        if not isinstance(lease_id, str) or self.leases.adapter_of(lease_id) is None:
            return _refusing(handler, grpc.StatusCode.FAILED_PRECONDITION,
                             f"{LEASE_METADATA}: a replica's own port serves generations under an open lease "
                             "only (RoutingService.Lease through the cluster; one lease, one generation)")
        return _leased(handler, self.leases, lease_id, self.use_adapter)


async def _abort_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    await context.abort(code, details)


def _same_kind(handler: grpc.RpcMethodHandler, unary: Callable, stream: Callable) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind (unary or server-streaming response) running `unary` or `stream`
    (an async generator function); request-streaming handlers (not generations) are returned as they are."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming:
        return handler
    if not handler.response_streaming:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if inspect.iscoroutinefunction(handler.unary_stream):  # (a stream written with context.write)
        return grpc.unary_stream_rpc_method_handler(unary, **kw)
    return grpc.unary_stream_rpc_method_handler(stream, **kw)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await _abort_with(context, code, details)

    async def stream(request, context) -> AsyncIterator:
        await _abort_with(context, code, details)
        yield  # (never reached: an async generator, as grpc.aio dispatches on the kind)

    return _same_kind(handler, unary, stream)


def _leased(handler: grpc.RpcMethodHandler, leases: Leases, lease_id: str,
            use_adapter: Callable[[str], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """`handler` under the lease `lease_id`: claimed when it starts (once: a second generation on the
    lease, or one for another adapter, is refused), the adapter made resident, released at the end."""
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

    async def admit(request, context) -> str:
        """Check and claim the lease (nothing awaited after the claim); the lease's adapter."""
        adapter = leases.adapter_of(lease_id)
        if adapter is None:
            await _abort_with(context, grpc.StatusCode.FAILED_PRECONDITION,
                              f"{LEASE_METADATA}: the lease ended or already served a generation")
        wanted = adapter_of(request) if isinstance(request, pb.GenerateRequest) else adapter
        if wanted != adapter:
            await _abort_with(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"adapter_id: the lease was taken for {adapter!r}, the request names {wanted!r}")
        if not leases.claim(lease_id):
            await _abort_with(context, grpc.StatusCode.FAILED_PRECONDITION,
                              f"{LEASE_METADATA}: the lease ended or already served a generation")
        return adapter

    async def unary(request, context):
        adapter = await admit(request, context)
        try:
            await use_adapter(adapter)
            return await behavior(request, context)
        finally:
            leases.release(lease_id)

    async def stream(request, context) -> AsyncIterator:
        adapter = await admit(request, context)
        try:
            await use_adapter(adapter)
            responses = behavior(request, context)
            try:
                async for message in responses:
                    yield message
            finally:
                await responses.aclose()  # a cancelled call: the generation's own cleanup first
        finally:
            leases.release(lease_id)

    return _same_kind(handler, unary, stream)
