"""OpenAI error bodies ``{"error": {"message", "type", "param", "code"}}`` and the status mapping.

Canonical statuses (gRPC code names, raised by the shared core and the adapter manager) map to
HTTP statuses here, once; nothing a client sent becomes a 500.
"""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
}


class OpenAIError(Exception):
    """An error answered as an OpenAI error body with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def from_status(cls, status: grpc.StatusCode, message: str, **kw) -> OpenAIError:
        """The error for a canonical status (500 only for server faults)."""
        return cls(HTTP_STATUS.get(status, 500), message, **kw)

    def body(self) -> dict:
        kind = ERROR_TYPE.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code or kind}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
