"""Python clients for adapterserve: :class:`AdapterServeClient` (blocking) and
:class:`AsyncAdapterServeClient` (asyncio), their result types and typed errors.
The ``adapterserve`` command-line tool lives in :mod:`clients.cli`.
"""

from clients.aio_client import AsyncAdapterServeClient
from clients.client import AdapterServeClient
from clients.errors import (
    AdapterServeError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from clients.types import (
    AdapterInfo,
    GenerationResult,
    Kernels,
    Limits,
    ModelInfo,
    StreamChunk,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
    collect,
)

__all__ = [
    "AdapterServeClient", "AsyncAdapterServeClient",
    "AdapterInfo", "GenerationResult", "Kernels", "Limits", "ModelInfo", "StreamChunk", "Timings",
    "TokenLogprob", "TopLogprob", "Usage", "collect",
    "AdapterServeError", "AlreadyExistsError", "CancelledError", "DeadlineExceededError",
    "FailedPreconditionError", "InternalError", "InvalidArgumentError", "NotFoundError",
    "PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError",
]
