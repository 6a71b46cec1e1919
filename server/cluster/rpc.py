"""gRPC glue between Serve's gRPC proxy, the ingress and the replicas' in-process servicers.

* :func:`add_services` is what Serve's proxy imports (``grpc_servicer_functions``): it registers
  adapterserve.v1's three services and grpc.health.v1.Health with the proxy, each method taking the
  request's raw bytes, so the ingress parses them itself (a malformed message gets
  INVALID_ARGUMENT, as the single server's interceptor gives, instead of the proxy's own error);
  and it makes calls without ``application`` metadata go to the ingress application
  (:mod:`server.cluster.proxy_hooks`). :func:`servicer_function` names it for an ``--app-name``.
* :class:`RpcStatus` carries a gRPC status from a replica to the ingress (a picklable exception).
* :class:`CallContext` is the ``context`` the single server's servicers get when a replica calls
  them in process: ``abort`` raises RpcStatus.

Thread domain: the event loop of whichever process uses them (proxy, ingress or replica).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2

from adapterserve.v1 import adapterserve_pb2 as pb


class RpcStatus(Exception):
    """A call's final non-OK status (code name, details), raised across Ray calls."""

    def __init__(self, code: str, details: str):
        super().__init__(code, details)
        self.code_name = code
        self.details = details

    @property
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code_name]

    @classmethod
    def of(cls, code: grpc.StatusCode, details: str) -> RpcStatus:
        return cls(code.name, details)


class CallContext:
    """The subset of grpc.aio.ServicerContext the server's servicers use (abort, time_remaining)."""

    def __init__(self, timeout_s: float | None = None):
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RpcStatus.of(code, details)


class RawMessage:
    """Already serialized response bytes, handed to Serve's proxy as is (it calls SerializeToString)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # protobuf's method name
        return self.data


#: The services the cluster serves through Serve's gRPC proxy.
SERVICES: tuple[tuple[FileDescriptor, str], ...] = (
    (pb.DESCRIPTOR, "adapterserve.v1.GenerationService"),
    (pb.DESCRIPTOR, "adapterserve.v1.AdapterService"),
    (pb.DESCRIPTOR, "adapterserve.v1.RoutingService"),
    (health_pb2.DESCRIPTOR, "grpc.health.v1.Health"),
)


def _raw_handler(server_streaming: bool) -> grpc.RpcMethodHandler:
    def never(*_args):  # Serve's proxy replaces the behaviour; only the kind and serializers count
        raise NotImplementedError

    if server_streaming:
        return grpc.unary_stream_rpc_method_handler(never)  # no (de)serializers: raw bytes both ways
    return grpc.unary_unary_rpc_method_handler(never)


DEFAULT_APP = "adapterserve"  # --app-name's default
_FOR_APP = "add_services_for_app="


def servicer_function(app_name: str) -> str:
    """The ``grpc_servicer_functions`` entry for the cluster whose ingress application is `app_name`
    (``server.cluster.rpc.add_services`` for the default name)."""
    if app_name == DEFAULT_APP:
        return f"{__name__}.add_services"
    return f"{__name__}:{_FOR_APP}{app_name}"


def __getattr__(name: str) -> Callable[[object, grpc.Server], None]:
    """``server.cluster.rpc:add_services_for_app=NAME``: add_services with NAME as the default application."""
    if name.startswith(_FOR_APP) and len(name) > len(_FOR_APP):
        return functools.partial(add_services, default_app=name[len(_FOR_APP):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_services(servicer: object, server: grpc.Server, default_app: str = DEFAULT_APP) -> None:
    """Register every method of :data:`SERVICES` on Serve's gRPC proxy with raw-bytes requests.

    Serve calls this with its own server and a placeholder servicer (its proxy routes each method
    to the named application's ingress deployment's method of the same name; `default_app` when
    the call names none, and a lost replica is UNAVAILABLE: :mod:`server.cluster.proxy_hooks`)."""
    from server.cluster.proxy_hooks import default_application, replica_loss_is_unavailable

    default_application(server, default_app)
    replica_loss_is_unavailable()
    for file, name in SERVICES:
        service = file.pool.FindServiceByName(name)
        handlers = {m.name: _raw_handler(m.server_streaming) for m in service.methods}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        add_registered = getattr(server, "add_registered_method_handlers", None)
        if add_registered is not None:
            add_registered(name, handlers)
