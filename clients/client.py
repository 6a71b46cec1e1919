"""Synchronous Python client for an adapterserve server.

>>> from clients import AdapterServeClient
>>> with AdapterServeClient("127.0.0.1:50051", token="secret") as client:
...     print(client.generate("Say hi", adapter="support-bot", max_new_tokens=32).text)
...     for chunk in client.stream("Tell me a story", max_new_tokens=64):
...         print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from clients._common import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    LEASE_END_S,
    LOOKASIDE_PLAINTEXT,
    RETRYABLE_CODES,
    AdapterChoice,
    PathOrBytes,
    backoff_delay,
    build_generate_request,
    build_register_request,
    call_metadata,
    channel_credentials,
    engine_metadata,
    lease_request,
    leased_replica,
)
from clients.errors import DeadlineExceededError, UnavailableError, from_rpc_error
from clients.types import AdapterInfo, GenerationResult, ModelInfo, StreamChunk

T = TypeVar("T")
_DEFAULT = object()


class AdapterServeClient:
    """Blocking client: one gRPC channel, shared by every call; safe to use from many threads.

    Args:
        target: ``host:port`` of the server (any gRPC target string works, e.g. ``unix:/path``).
        token: bearer token sent as ``authorization: Bearer <token>`` (use the admin token
            for register/unregister when the server has ``--admin-token``).
        tls_ca: PEM CA bundle (path or bytes) that signed the server certificate; enables TLS.
        tls_cert, tls_key: client certificate and key (path or bytes) for mutual TLS.
        timeout: default deadline of every call in seconds (None = no deadline); a
            stream's deadline covers the whole stream.
        retries: how many times idempotent calls (list/get adapter, model_info, health) are
            retried on UNAVAILABLE, with exponential backoff within the deadline.
            generate, stream, register and unregister are never retried.
        tls: use TLS with the system roots even without ``tls_ca``.
        options: extra gRPC channel options.
        engine_app: against an adapterserve cluster (``python -m server.cluster``), its engine
            application (``<app-name>-engine``, by default ``adapterserve-engine``): generate and
            stream then go from Serve's gRPC proxy straight to the engine replica holding the
            adapter, one hop fewer than through the ingress (docs/scale-out.md); generate is then
            retried once on UNAVAILABLE (a replica lost mid-call), as the ingress does. Other
            calls are unchanged. None: every call as to a single server.
        lookaside: against an adapterserve cluster, generate and stream first open a lease
            (RoutingService.Lease; through ``engine_app`` when given, else through the ingress):
            the cluster picks the replica holding the adapter and answers the address of that
            replica's own gRPC server, and the generation is sent there, its tokens coming
            straight from the replica (no Ray hop per token; docs/scale-out.md, "Lookaside").
            The lease stays open until the generation ends. The replica's address must be
            reachable from this client (``--replica-host``); generate is retried once, on a new
            lease, when the replica answers UNAVAILABLE.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        tls_ca: PathOrBytes = None,
        tls_cert: PathOrBytes = None,
        tls_key: PathOrBytes = None,
        timeout: float | None = 60.0,
        retries: int = 3,
        *,
        tls: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        engine_app: str | None = None,
        lookaside: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self._metadata = call_metadata(token)
        self.engine_app = engine_app
        self.lookaside = lookaside
        creds = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        if lookaside and creds is not None:
            raise ValueError(LOOKASIDE_PLAINTEXT)
        opts = self._options = [*CHANNEL_OPTIONS, *options]
        self._channel = (grpc.insecure_channel(target, options=opts) if creds is None
                         else grpc.secure_channel(target, creds, options=opts))
        self._gen = pb_grpc.GenerationServiceStub(self._channel)
        self._routing = pb_grpc.RoutingServiceStub(self._channel)
        self._replicas: dict[str, tuple[grpc.Channel, pb_grpc.GenerationServiceStub]] = {}  # lookaside
        self._replicas_lock = threading.Lock()
        self._closed = False
        self._leases: set[Any] = set()  # open lease calls (set.add/discard: atomic under the GIL)
        self._adapters = pb_grpc.AdapterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the channel (and lookaside replicas' channels); in-flight calls are cancelled (leases
        of finished generations get up to LEASE_END_S to end first)."""
        end = time.monotonic() + LEASE_END_S
        while self._leases and time.monotonic() < end:
            time.sleep(0.01)
        with self._replicas_lock:
            replicas, self._replicas, self._closed = list(self._replicas.values()), {}, True
        for channel, _ in replicas:
            channel.close()
        self._channel.close()

    def __enter__(self) -> AdapterServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is _DEFAULT else timeout

    def _call(self, method: Callable[..., T], request: Any, timeout: Any, idempotent: bool,
              routing: tuple[tuple[str, str], ...] = (), retries: int | None = None) -> T:
        """One unary call; `routing`: extra metadata; `retries`: at most this many (else self.retries)."""
        timeout = self._timeout(timeout)
        limit = self.retries if retries is None else retries
        metadata = (*self._metadata, *routing)
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as e:
                if idempotent and e.code() in RETRYABLE_CODES and attempt < limit:
                    delay = backoff_delay(attempt)
                    if deadline is None or time.monotonic() + delay < deadline:
                        time.sleep(delay)
                        attempt += 1
                        continue
                raise from_rpc_error(e) from e

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Any] | None = None,
        token_ids: Sequence[int] | None = None,
        adapter: AdapterChoice = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        request_id: str | None = None,
        timeout: Any = _DEFAULT,
    ) -> GenerationResult:
        """Generate a completion and return it whole.

        Give exactly one of ``prompt`` (raw text), ``messages`` (chat turns as
        ``{"role": ..., "content": ...}`` dicts, rendered with the model's chat template) or
        ``token_ids``. ``adapter`` is a registered adapter id (None = the base model), or a weighted
        mix of LoRA adapters: ``{"a": 0.5, "b": -1.0}``.
        Sampling arguments left as None take the server's defaults (greedy,
        ``--default-max-new-tokens``). ``top_logprobs`` (0..20) alternatives per token imply
        ``logprobs``. Raises an :class:`~clients.errors.AdapterServeError` subclass on failure.
        """
        req = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter=adapter,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs, request_id=request_id)
        if self.lookaside:
            return GenerationResult.from_proto(self._leased_generate(req, self._timeout(timeout)))
        return GenerationResult.from_proto(self._call(
            self._gen.Generate, req, timeout, bool(self.engine_app), engine_metadata(self.engine_app, req), retries=1))

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Any] | None = None,
        token_ids: Sequence[int] | None = None,
        adapter: AdapterChoice = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        request_id: str | None = None,
        timeout: Any = _DEFAULT,
    ) -> Iterator[StreamChunk]:
        """Generate a completion and yield it as :class:`~clients.types.StreamChunk` objects.

        Same arguments as :meth:`generate`. Each chunk's ``text`` is the new text since the
        previous chunk; the last chunk has ``finish_reason`` and ``usage`` set
        (``clients.types.collect(chunks)`` joins them into a GenerationResult). Leaving the
        loop early (``break``, an exception, closing the iterator) cancels the request on the
        server. Errors, including ones after the first chunk, raise typed exceptions.
        """
        req = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter=adapter,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs, request_id=request_id)
        if self.lookaside:
            return self._leased_chunks(req, self._timeout(timeout))
        call = self._gen.GenerateStream(req, timeout=self._timeout(timeout),
                                        metadata=(*self._metadata, *engine_metadata(self.engine_app, req)))
        return self._chunks(call)

    # ------------------------------------------------------------------ lookaside (cluster)

    def _lease(self, req: pb.GenerateRequest, timeout: float | None) -> tuple[Any, pb_grpc.GenerationServiceStub, tuple]:
        """Open a lease for `req`: (the open lease call, the generation stub of the replica it names, the
        generation's metadata naming the lease). The replica ends the lease when that generation ends."""
        lease = self._routing.Lease(lease_request(req), timeout=timeout,
                                    metadata=(*self._metadata, *engine_metadata(self.engine_app, req)))
        try:
            answer = next(lease, None)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        try:
            address, naming = leased_replica(answer, self.target)
            replica = self._replica(address)
        except BaseException:  # (no usable address, or the client was closed meanwhile)
            lease.cancel()
            raise
        # Held until the replica ends it (when the generation ends): a dropped call object would cancel it.
        self._leases.add(lease)
        lease.add_done_callback(self._leases.discard)
        return lease, replica, (*self._metadata, naming)

    def _replica(self, address: str) -> pb_grpc.GenerationServiceStub:
        """The generation stub of a replica's own server (one plaintext channel per address, kept until
        close: the cluster's replicas serve plaintext, as its proxies do)."""
        with self._replicas_lock:
            if self._closed:
                raise ValueError("the client is closed")
            if address not in self._replicas:
                channel = grpc.insecure_channel(address, options=self._options)
                self._replicas[address] = (channel, pb_grpc.GenerationServiceStub(channel))
            return self._replicas[address][1]

    def _leased_generate(self, req: pb.GenerateRequest, timeout: float | None) -> pb.GenerateResponse:
        """Generate on the replica a lease names; once more on a new lease if that replica is UNAVAILABLE."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(2):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            lease, replica, metadata = self._lease(req, remaining)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return replica.Generate(req, timeout=remaining, metadata=metadata)
            except grpc.RpcError as e:
                lease.cancel()  # the replica may never have seen the call: end its lease here
                if attempt or e.code() not in RETRYABLE_CODES:
                    raise from_rpc_error(e) from e
            except BaseException:
                lease.cancel()
                raise
        raise AssertionError("unreachable")

    def _leased_chunks(self, req: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        deadline = None if timeout is None else time.monotonic() + timeout
        lease, replica, metadata = self._lease(req, timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        call = None
        try:
            call = replica.GenerateStream(req, timeout=remaining, metadata=metadata)
            for message in call:
                yield StreamChunk.from_proto(message)
        except grpc.RpcError as e:
            lease.cancel()  # the replica may never have seen the call: end its lease here
            raise from_rpc_error(e) from e
        except BaseException:  # (GeneratorExit included: a released call ends the lease on the replica too)
            lease.cancel()
            raise
        finally:
            if call is not None:
                call.cancel()  # no-op once the stream has finished

    @staticmethod
    def _chunks(call: Any) -> Iterator[StreamChunk]:
        try:
            for message in call:
                yield StreamChunk.from_proto(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()  # no-op once the stream has finished

    def model_info(self, *, timeout: Any = _DEFAULT) -> ModelInfo:
        """The served base model and the server's limits."""
        return ModelInfo.from_proto(self._call(self._gen.GetModelInfo, pb.GetModelInfoRequest(), timeout, True))

    # ------------------------------------------------------------------ adapters

    def register_adapter(
        self,
        adapter_id: str,
        path: str | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        merge: bool = False,
        pin: bool = False,
        replace: bool = False,
        *,
        timeout: Any = _DEFAULT,
    ) -> AdapterInfo:
        """Register a PEFT adapter folder and return its description.

        ``path`` is a folder on the server, relative to its ``--adapter-root``; ``local_dir``
        is a folder here whose ``adapter_config.json`` and ``adapter_model.safetensors`` are
        uploaded inline. ``merge`` folds a LoRA into the base weights, ``pin`` keeps it
        resident, ``replace`` swaps out an adapter registered under the same id (otherwise
        that is AlreadyExistsError). Needs the admin token when the server sets one.
        """
        req = build_register_request(adapter_id, path, local_dir, merge, pin, replace)
        return AdapterInfo.from_proto(self._call(self._adapters.RegisterAdapter, req, timeout, False))

    def unregister_adapter(self, adapter_id: str, *, timeout: Any = _DEFAULT) -> str:
        """Unregister an adapter: new requests are refused, in-flight ones finish. Returns its id."""
        req = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        return self._call(self._adapters.UnregisterAdapter, req, timeout, False).adapter_id

    def list_adapters(self, *, timeout: Any = _DEFAULT) -> list[AdapterInfo]:
        """Every registered adapter."""
        resp = self._call(self._adapters.ListAdapters, pb.ListAdaptersRequest(), timeout, True)
        return [AdapterInfo.from_proto(a) for a in resp.adapters]

    def get_adapter(self, adapter_id: str, *, timeout: Any = _DEFAULT) -> AdapterInfo:
        """One adapter's description; NotFoundError when it is not registered."""
        req = pb.GetAdapterRequest(adapter_id=adapter_id)
        return AdapterInfo.from_proto(self._call(self._adapters.GetAdapter, req, timeout, True))

    # ------------------------------------------------------------------ health

    def health(self, service: str = "", *, timeout: Any = _DEFAULT) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", ... (no token needed)."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.2) -> None:
        """Block until health says SERVING; UnavailableError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        status = "unreachable"
        while True:
            try:
                status = self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if status == "SERVING":
                    return
            except (UnavailableError, DeadlineExceededError):
                status = "unreachable"
            if time.monotonic() + interval > deadline:
                raise UnavailableError(f"{self.target} not SERVING after {timeout:g}s (last: {status})")
            time.sleep(interval)
