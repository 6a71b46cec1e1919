"""Malformed request messages answer INVALID_ARGUMENT, not UNKNOWN.

grpc.aio deserializes a request with the handler's ``request_deserializer`` before any servicer
code runs; when that raises (bad wire format, a string field holding invalid UTF-8, which proto3
forbids), grpc answers UNKNOWN. :class:`MalformedMessageInterceptor` wraps every handler so the
deserializer never raises: it returns a :class:`Malformed` marker instead, and the wrapped
behavior aborts such a call with INVALID_ARGUMENT naming the message type. Well-formed calls go
to the original behavior object untouched (the same coroutine or async generator, so cancellation
reaches the servicer exactly as before).

Thread: the gRPC event loop (deserializers run there too).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class Malformed:
    """Stands in for a request message that could not be parsed."""

    def __init__(self, message_type: str, reason: str):
        self.message_type = message_type
        self.reason = reason

    def describe(self) -> str:
        return (f"request: malformed {self.message_type} message ({self.reason}); string fields must hold "
                "valid UTF-8 and the bytes must follow the protobuf wire format")


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # pb.GenerateRequest for GenerateRequest.FromString
    message_type = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, UnicodeDecodeError, ...: whatever the parser raises
            return Malformed(message_type, type(e).__name__)

    return deserialize


async def _abort(context: grpc.aio.ServicerContext, bad: Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.describe())


def _unary_request(behavior: Callable, streaming_response: bool) -> Callable:
    # grpc.aio dispatches on inspect.iscoroutinefunction / isasyncgenfunction, so the wrappers
    # must be of the same kind as the servicer methods they wrap.
    if streaming_response and not inspect.iscoroutinefunction(behavior):  # an async generator
        async def stream(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, Malformed):
                await _abort(context, request)
            responses = behavior(request, context)
            try:
                async for response in responses:
                    yield response
            finally:  # a client cancel closes this generator: close the servicer's at once, not at GC
                await responses.aclose()

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:  # also streams via context.write
        if isinstance(request, Malformed):
            await _abort(context, request)
        return await behavior(request, context)

    return unary


def wrap_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, with a deserializer that cannot raise and a behavior that refuses Malformed.

    Request-streaming handlers (only reflection's here) are returned as they are.
    """
    if handler.request_streaming:
        return handler
    kw = {"request_deserializer": _safe(handler.request_deserializer),
          "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream, True), **kw)
    return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary, False), **kw)


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler with :func:`wrap_handler` (install it innermost, after auth)."""

    def __init__(self) -> None:
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:  # handlers are per method and long-lived
            cached = self._wrapped[id(handler)] = (handler, wrap_handler(handler))
        return cached[1]
