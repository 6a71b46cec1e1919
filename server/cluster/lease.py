"""Lookaside leases: a generation sent straight to an engine replica's own gRPC server, counted by Serve.

RoutingService.Lease (:meth:`server.cluster.replica.EngineReplica.Lease`) is routed by Serve like any
call with the adapter's id, answers the replica's own address and a lease id, and stays open; the
client sends its Generate/GenerateStream to that address with ``adapterserve-lease: <id>`` metadata.
:class:`LeaseInterceptor` (on the replica's in-process server) claims the lease when that call
starts and releases it when the call ends however it ends (answered, failed, cancelled), and the
lease call then ends OK: Serve counts the generation as an ongoing request on the replica for as
long as it runs (its load-aware routing, autoscaling), while no token crosses Ray. A lease that no
call claims within :data:`CLAIM_S` ends by itself; so does every lease when the replica closes.

Thread domain: the replica's event loop (the lease generator, and the in-process gRPC server).
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

LEASE_METADATA = "adapterserve-lease"  # the metadata a lookaside generation names its lease by (the clients' too)
CLAIM_S = 30.0  # a lease no generation claims within this ends


class _Lease:
    __slots__ = ("claimed", "released")

    def __init__(self) -> None:
        self.claimed = asyncio.Event()
        self.released = asyncio.Event()


class Leases:
    """The open leases of one replica, by id."""

    def __init__(self, closed: asyncio.Event):
        self._open: dict[str, _Lease] = {}
        self._closed = closed  # set when the replica closes: every lease ends

    def __len__(self) -> int:
        return len(self._open)

    def open(self) -> str:
        """A new lease's id (128 random bits: only its holder can claim or release it)."""
        lease_id = secrets.token_hex(16)
        self._open[lease_id] = _Lease()
        return lease_id

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
        """Forget the lease (a later claim of its id is ignored)."""
        self._open.pop(lease_id, None)

    def claim(self, lease_id: str) -> bool:
        """A generation naming `lease_id` started; False for an unknown (or ended) lease."""
        lease = self._open.get(lease_id)
        if lease is None:
            return False
        lease.claimed.set()
        return True

    def release(self, lease_id: str) -> None:
        """The generation naming `lease_id` ended."""
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


class LeaseInterceptor(grpc.aio.ServerInterceptor):
    """On a replica's own gRPC server: a call with ``adapterserve-lease`` metadata claims that lease
    when it starts and releases it when it ends (answered, failed or cancelled)."""

    def __init__(self, leases: Leases):
        self.leases = leases

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        lease_id = next((v for k, v in handler_call_details.invocation_metadata or () if k == LEASE_METADATA), None)
        if handler is None or not isinstance(lease_id, str) or not self.leases.claim(lease_id):
            return handler
        return _releasing(handler, lambda: self.leases.release(lease_id))


def _releasing(handler: grpc.RpcMethodHandler, release: Callable[[], None]) -> grpc.RpcMethodHandler:
    """`handler` calling `release` once its call ended, however it ended. Like the servicer methods it
    wraps, the wrapper of an async-generator method is an async generator (grpc.aio dispatches on the
    kind); request-streaming methods (reflection's) are not generations: released at once."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming:
        release()
        return handler
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if handler.response_streaming and not inspect.iscoroutinefunction(behavior):
        async def stream(request, context) -> AsyncIterator:
            responses = behavior(request, context)
            try:
                async for message in responses:
                    yield message
            finally:
                try:
                    await responses.aclose()  # a cancelled call: the generation's own cleanup first
                finally:
                    release()

        return grpc.unary_stream_rpc_method_handler(stream, **kw)

    async def unary(request, context):  # (also a stream written with context.write)
        try:
            return await behavior(request, context)
        finally:
            release()

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(unary, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
