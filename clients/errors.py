"""Typed exceptions for gRPC errors.

Every failed call raises an :class:`AdapterServeError` subclass chosen by the gRPC status
code; ``str(err)`` is ``"<CODE>: <server message>"``, ``err.message`` the server's message
alone and ``err.code`` the :class:`grpc.StatusCode`.

>>> try:
...     client.generate("hi", adapter="nope")
... except NotFoundError as e:
...     print(e.message)
"""

from __future__ import annotations

import grpc


class AdapterServeError(Exception):
    """Base class: a call failed with a gRPC status other than OK."""

    #: The status this class stands for (the base class covers every code without its own class).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = code or self.default_code
        self.message: str = message
        super().__init__(f"{self.code.name}: {message}" if message else self.code.name)


class InvalidArgumentError(AdapterServeError):
    """INVALID_ARGUMENT: the request was malformed; the message names the field."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(AdapterServeError):
    """NOT_FOUND: e.g. an adapter id that is not registered."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(AdapterServeError):
    """ALREADY_EXISTS: an adapter with that id is registered (pass ``replace=True``)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(AdapterServeError):
    """FAILED_PRECONDITION: the server is not in a state to do this (e.g. draining)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(AdapterServeError):
    """RESOURCE_EXHAUSTED: the queue or a memory budget is full; retry later."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(AdapterServeError):
    """UNAUTHENTICATED: no token or a wrong token."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(AdapterServeError):
    """PERMISSION_DENIED: the token is valid but not allowed to do this (needs the admin token)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(AdapterServeError):
    """DEADLINE_EXCEEDED: the call did not finish within its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(AdapterServeError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


class CancelledError(AdapterServeError):
    """CANCELLED: the call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class InternalError(AdapterServeError):
    """INTERNAL: a server bug; the message says what failed."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[AdapterServeError]] = {
    cls.default_code: cls
    for cls in (InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError,
                ResourceExhaustedError, UnauthenticatedError, PermissionDeniedError,
                DeadlineExceededError, UnavailableError, CancelledError, InternalError)
}


def error_class(code: grpc.StatusCode) -> type[AdapterServeError]:
    """The exception class raised for ``code``."""
    return _BY_CODE.get(code, AdapterServeError)


def from_rpc_error(err: grpc.RpcError) -> AdapterServeError:
    """Convert a :class:`grpc.RpcError` (sync or aio) into the matching typed exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    code = code or grpc.StatusCode.UNKNOWN
    return error_class(code)(details or "", code)
