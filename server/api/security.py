"""Access control for the gRPC server: bearer tokens and TLS.

Two independent layers, both configured from :class:`server.config.ServerConfig`:

* **Tokens** (:func:`server_interceptors`). With ``--auth-token`` every RPC except the
  health and reflection services needs the metadata ``authorization: Bearer <token>``;
  a missing or wrong token gets UNAUTHENTICATED. With ``--admin-token`` the mutating
  AdapterService RPCs (RegisterAdapter, UnregisterAdapter) need the admin token: the
  plain token there gets PERMISSION_DENIED. The admin token is accepted wherever the
  plain token is. Tokens are compared in constant time.
* **Transport** (:func:`add_listen_port`). Plaintext, TLS with ``--tls-cert``/``--tls-key``,
  or mutual TLS when ``--tls-client-ca`` is also given (clients must present a
  certificate signed by that CA).

Denied calls never reach the servicer: the interceptor swaps the method's handler for one
that aborts with the status, of the same kind (unary or streaming) as the original.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.config import ServerConfig

log = logging.getLogger(__name__)

#: Method prefixes reachable without a token (load balancers and grpcurl need them).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: Methods that need the admin token when ``--admin-token`` is set.
ADMIN_METHODS = frozenset({
    "/adapterserve.v1.AdapterService/RegisterAdapter",
    "/adapterserve.v1.AdapterService/UnregisterAdapter",
})


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in gRPC metadata, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison; False when either side is empty."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call; see the module docstring for the rules."""

    def __init__(self, auth_token: str = "", admin_token: str = "") -> None:
        if not auth_token and not admin_token:
            raise ValueError("TokenAuthInterceptor needs an auth token, an admin token or both")
        self._auth = auth_token
        self._admin = admin_token

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the (status, message) to abort it with."""
        if method.startswith(PUBLIC_PREFIXES):
            return None
        admin_call = f"{_short(method)}" if method in ADMIN_METHODS else None
        return token_denial(bearer_token(metadata), self._auth, self._admin, admin_call)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on, or replace its handler by one that aborts with the denial."""
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return handler
        denial = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if denial is None:
            return handler
        return _aborting_handler(handler, *denial)


def token_denial(token: str | None, auth: str, admin: str,
                 admin_call: str | None = None) -> tuple[grpc.StatusCode, str] | None:
    """The one token rule of every API: None when allowed, else (status, message).

    ``admin_call`` names the operation when it is an admin one (it then needs the admin token
    when one is configured); the admin token is accepted wherever the plain one is.
    """
    is_admin = _same(token, admin)
    is_user = is_admin or _same(token, auth)
    if admin and admin_call is not None:
        if is_admin:
            return None
        if is_user:
            return grpc.StatusCode.PERMISSION_DENIED, f"{admin_call} requires the admin token"
        return grpc.StatusCode.UNAUTHENTICATED, _missing_or_invalid(token, "admin token")
    if not auth or is_user:
        return None
    return grpc.StatusCode.UNAUTHENTICATED, _missing_or_invalid(token, "token")


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _missing_or_invalid(token: str | None, what: str) -> str:
    if token is None:
        return f"missing credentials: send metadata 'authorization: Bearer <{what}>'"
    return f"invalid {what}"


def _aborting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same streaming kind as ``handler`` that aborts with ``code``."""

    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


def server_interceptors(cfg: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors the gRPC server must be built with (empty when no token is configured).

    Raises :class:`server.config.ConfigError` when a token file cannot be read.
    """
    auth, admin = cfg.resolved_auth_token(), cfg.resolved_admin_token()
    if not auth and not admin:
        return []
    if auth and admin and hmac.compare_digest(auth.encode(), admin.encode()):
        log.warning("--admin-token equals --auth-token: every client can register adapters")
    return [TokenAuthInterceptor(auth, admin)]


def _read(path: str, flag: str) -> bytes:
    from server.config import ConfigError

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"--{flag}: cannot read {path}: {e}") from e


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from ``--tls-cert``/``--tls-key`` (+ ``--tls-client-ca``), or None for plaintext."""
    if not cfg.tls_cert:
        return None
    cert, key = _read(cfg.tls_cert, "tls-cert"), _read(cfg.tls_key, "tls-key")
    client_ca = _read(cfg.tls_client_ca, "tls-client-ca") if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_listen_port(server: grpc.aio.Server, address: str, cfg: ServerConfig) -> int:
    """Bind ``address`` ("host:port", port 0 = any free port) with the configured transport.

    Returns the bound port; raises RuntimeError when the address cannot be bound.
    """
    creds = server_credentials(cfg)
    if creds is None:
        if (cfg.auth_token or cfg.auth_token_file or cfg.admin_token or cfg.admin_token_file) \
                and not _is_loopback(address):
            log.warning("auth tokens are sent in plaintext on %s: set --tls-cert and --tls-key", address)
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, creds)
    if not port:  # older grpcio returned 0 instead of raising
        raise RuntimeError(f"cannot listen on {address}")
    log.info("gRPC listening on %s (%s)", address,
             "plaintext" if creds is None else "mutual TLS" if cfg.tls_client_ca else "TLS")
    return port
