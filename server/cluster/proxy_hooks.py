"""Two adjustments of Ray Serve's gRPC proxy, made in the proxy process when it registers our services.

The cluster is two Serve applications (:mod:`server.cluster.deploy`): ``<app>`` (the ingress: HTTP,
admin, health, and Generate/GenerateStream relayed to the engine) and ``<app>-engine`` (the engine
deployment itself, which the proxy calls without the ingress hop when a client sends
``application: <app>-engine``). Serve's gRPC proxy answers NOT_FOUND to a call without
``application`` metadata once there is more than one application, and maps a replica lost
mid-call (``RayActorError``) to INTERNAL. So, from :func:`server.cluster.rpc.add_services`:

* :func:`default_application`: a call without ``application`` metadata goes to ``<app>``, the
  ingress: clients that know nothing of the engine application (grpcurl, other languages, the
  python client without ``engine_app``) are served exactly as before;
* :func:`replica_loss_is_unavailable`: a lost replica is UNAVAILABLE (retry), as the ingress
  answers it, on the direct path too.

Both reach into Serve's private proxy (``gRPCGenericServer.service_handler_factory``,
``ray.serve._private.proxy.get_grpc_response_status``, Ray 2.60); when either is missing the proxy
keeps Serve's own behaviour, with a warning in its log. Thread domain: the proxy's event loop.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger("adapterserve.cluster")

APPLICATION_KEY = "application"  # the metadata key Serve's gRPC proxy routes by


class _DefaultApplicationContext:
    """A grpc ServicerContext whose invocation metadata names `app` when the client named none."""

    __slots__ = ("_context", "_metadata")

    def __init__(self, context: Any, metadata: tuple):
        self._context = context
        self._metadata = metadata

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def __getattr__(self, name: str) -> Any:  # everything else is the call's own context
        return getattr(self._context, name)


def _with_application(context: Any, app: str) -> Any:
    metadata = tuple(context.invocation_metadata() or ())
    if any(key == APPLICATION_KEY for key, _ in metadata):
        return context
    return _DefaultApplicationContext(context, (*metadata, (APPLICATION_KEY, app)))


def default_application(server: Any, app: str) -> bool:
    """Make calls without ``application`` metadata go to `app`; call before registering services.
    False (nothing changed) when `server` is not Serve's gRPCGenericServer as Ray 2.60 has it."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        log.warning("Serve's gRPC proxy has no service_handler_factory: calls without 'application' "
                    "metadata get NOT_FOUND (send application: %s)", app)
        return False

    def make(*, service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if inspect.isasyncgenfunction(handler):
            async def stream(request: Any, context: Any):
                async for message in handler(request, _with_application(context, app)):
                    yield message
            return stream

        async def unary(request: Any, context: Any):
            return await handler(request, _with_application(context, app))
        return unary

    server.service_handler_factory = make
    return True


def replica_loss_is_unavailable() -> bool:
    """Map a replica lost mid-call (RayActorError) to UNAVAILABLE instead of Serve's INTERNAL."""
    try:
        from ray.exceptions import RayActorError
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError as e:
        log.warning("Serve's gRPC proxy internals moved (%s): a lost replica stays INTERNAL", e)
        return False
    original = getattr(proxy, "get_grpc_response_status", None)
    if original is None or getattr(original, "_adapterserve", False):
        return original is not None

    def status(exc: BaseException, request_timeout_s: float | None, request_id: str) -> ResponseStatus:
        if isinstance(exc, RayActorError):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True,
                                  message=f"replica unavailable ({type(exc).__name__}); retry")
        return original(exc, request_timeout_s, request_id)

    status._adapterserve = True  # type: ignore[attr-defined]  (installed once per proxy process)
    proxy.get_grpc_response_status = status
    return True
