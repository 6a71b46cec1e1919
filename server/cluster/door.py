"""What the cluster does per gRPC call at whichever deployment Serve's gRPC proxy calls first.

Two deployments are called by the proxy (:mod:`server.cluster.deploy`): the ingress (every method,
and Generate/GenerateStream of clients that do not name the engine application) and the engine
replicas themselves (Generate/GenerateStream of clients that send ``application: <app>-engine``
and ``multiplexed_model_id: <adapter id>``: one Ray hop fewer). :class:`FrontDoor` is the
per-call work both do, so either path answers alike:

* the bearer token, with the single server's rule (:class:`server.api.security.TokenAuthInterceptor`);
* shutdown: ``drain`` (the cluster's health NOT_SERVING, requests still served), then ``close``
  (new calls UNAVAILABLE, as the single server answers during ``--grace-seconds``) while the
  calls already in flight, counted here, finish;
* malformed request bytes: INVALID_ARGUMENT naming the message, as the single server's interceptor;
* a status to return: set on Serve's gRPC context (the proxy reads the code and details from it).

Thread domain: the event loop of the deployment's replica (Serve runs every method there).
"""

from __future__ import annotations

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from server.api.malformed import Malformed
from server.api.security import TokenAuthInterceptor
from server.cluster.config import ClusterConfig
from server.cluster.rpc import RpcStatus

GENERATE = "/adapterserve.v1.GenerationService/Generate"
GENERATE_STREAM = "/adapterserve.v1.GenerationService/GenerateStream"
LEASE = "/adapterserve.v1.RoutingService/Lease"


def adapter_of(request: pb.GenerateRequest) -> str:
    """The id a request is routed by: its adapter, or the first adapter of a weighted mix."""
    if request.adapter_id:
        return request.adapter_id
    return request.adapters[0].adapter_id if len(request.adapters) else ""


def parse(message_type, data: bytes):
    """Parse a request; INVALID_ARGUMENT for malformed bytes, as the single server answers."""
    try:
        return message_type.FromString(data)
    except Exception as e:  # (DecodeError, UnicodeDecodeError, ...: whatever the parser raises)
        bad = Malformed(message_type.DESCRIPTOR.full_name, type(e).__name__)
        raise RpcStatus.of(grpc.StatusCode.INVALID_ARGUMENT, bad.describe()) from None


class FrontDoor:
    """Token check, admission and in-flight count of the gRPC calls the proxy hands a deployment."""

    def __init__(self, cfg: ClusterConfig):
        auth, admin = cfg.resolved_auth_token(), cfg.resolved_admin_token()
        self.auth = TokenAuthInterceptor(auth, admin) if auth or admin else None
        self._draining = False  # shutdown phase 1: health NOT_SERVING, requests still served
        self._closing = False  # phase 2: new requests UNAVAILABLE, in-flight ones finish
        self._in_flight = 0  # requests (streams: until their last chunk went out) being answered

    def _authorize(self, method: str, grpc_context) -> None:
        if self.auth is None:
            return
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        denial = self.auth.check(method, metadata)
        if denial is not None:
            raise RpcStatus.of(*denial)

    @staticmethod
    def _fail(grpc_context, e: RpcStatus) -> RpcStatus:
        """Set the status Serve's proxy sends (it reads the context of the raised call)."""
        if grpc_context is not None:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.details)
        return e

    # ------------------------------------------------------------------ shutdown (server.cluster.deploy.Cluster.stop)
    async def drain(self) -> None:
        """Phase 1: health NOT_SERVING from now on, requests still served (load balancers route elsewhere)."""
        self._draining = True

    async def close(self) -> int:
        """Phase 2: new requests answered UNAVAILABLE from now on; returns the requests still in flight."""
        self._draining = self._closing = True
        return self._in_flight

    async def in_flight(self) -> int:
        return self._in_flight

    def _enter(self, method: str, data: bytes, grpc_context, message_type=pb.GenerateRequest):
        """Token, parse and admission of a Generate/GenerateStream/Lease call (the caller counts it out
        with _done); a refusal is raised with its status set on the context."""
        try:
            self._authorize(method, grpc_context)
            request = parse(message_type, data)
            self._admit()
        except RpcStatus as e:
            raise self._fail(grpc_context, e) from None
        return request

    def _admit(self) -> None:
        """Count a request in (the caller counts it out with _done); UNAVAILABLE once closing, as the
        single server answers during its --grace-seconds."""
        if self._closing:
            raise RpcStatus.of(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        self._in_flight += 1

    def _done(self) -> None:
        self._in_flight -= 1
