"""Map internal exceptions to gRPC status codes (never a catch-all INTERNAL for user errors)."""

from __future__ import annotations

import grpc

from server.adapters.entry import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterPreconditionError,
    InvalidMixError,
)
from server.adapters.formats import AdapterFormatError, AdapterPathError
from server.adapters.store import AdapterStoreError
from server.engine.engine import EngineUnavailableError
from server.engine.scheduler import QueueFullError


class InvalidRequestError(ValueError):
    """INVALID_ARGUMENT; the message starts with the offending field's name."""


_MAPPING: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidMixError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterPathError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterStoreError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status for a known error type, or None (a bug: reported as INTERNAL by the caller)."""
    for kind, code in _MAPPING:
        if isinstance(exc, kind):
            return code
    return None


def error_message(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, LookupError) and exc.args else str(exc)
    return str(msg)
