"""asyncio Python client for an adapterserve server: the same API as
:class:`clients.client.AdapterServeClient`, with ``async`` methods.

>>> async with AsyncAdapterServeClient("127.0.0.1:50051") as client:
...     results = await asyncio.gather(*(client.generate("Hi", adapter=a) for a in ["a", "b"]))
...     async for chunk in client.stream("Tell me a story"):
...         print(chunk.text, end="", flush=True)

Create the client inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
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

_DEFAULT = object()


class AsyncAdapterServeClient:
    """asyncio client; arguments as for :class:`clients.client.AdapterServeClient`.

    Many requests may be in flight at once on its one channel (``asyncio.gather``).
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
        self._channel = (grpc.aio.insecure_channel(target, options=opts) if creds is None
                         else grpc.aio.secure_channel(target, creds, options=opts))
        self._gen = pb_grpc.GenerationServiceStub(self._channel)
        self._routing = pb_grpc.RoutingServiceStub(self._channel)
        self._replicas: dict[str, tuple[grpc.aio.Channel, pb_grpc.GenerationServiceStub]] = {}  # lookaside
        self._leases: set[Any] = set()  # open lease calls
        self._closed = False
        self._adapters = pb_grpc.AdapterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ plumbing

    async def close(self) -> None:
        """Close the channel (and lookaside replicas' channels); in-flight calls are cancelled (leases
        of finished generations get up to LEASE_END_S to end first)."""
        self._closed = True
        if self._leases:
            await asyncio.wait([asyncio.ensure_future(lease.code()) for lease in self._leases], timeout=LEASE_END_S)
        replicas, self._replicas = list(self._replicas.values()), {}
        for channel, _ in replicas:
            await channel.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncAdapterServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is _DEFAULT else timeout

    async def _call(self, method: Callable[..., Any], request: Any, timeout: Any, idempotent: bool,
              routing: tuple[tuple[str, str], ...] = (), retries: int | None = None) -> Any:
        """One unary call; `routing`: extra metadata; `retries`: at most this many (else self.retries)."""
        timeout = self._timeout(timeout)
        limit = self.retries if retries is None else retries
        metadata = (*self._metadata, *routing)
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as e:
                if idempotent and e.code() in RETRYABLE_CODES and attempt < limit:
                    delay = backoff_delay(attempt)
                    if deadline is None or time.monotonic() + delay < deadline:
                        await asyncio.sleep(delay)
                        attempt += 1
                        continue
                raise from_rpc_error(e) from e

    # ------------------------------------------------------------------ generation

    async def generate(
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
        """Generate a completion and return it whole; see ``AdapterServeClient.generate``."""
        req = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, adapter=adapter,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs, request_id=request_id)
        if self.lookaside:
            return GenerationResult.from_proto(await self._leased_generate(req, self._timeout(timeout)))
        return GenerationResult.from_proto(await self._call(
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
    ) -> AsyncIterator[StreamChunk]:
        """Yield :class:`~clients.types.StreamChunk` objects: ``async for chunk in client.stream(...)``.

        Not a coroutine: call it without ``await``. See ``AdapterServeClient.stream``;
        leaving the loop early cancels the request on the server.
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

    async def _lease(self, req: pb.GenerateRequest, timeout: float | None) -> tuple[Any, pb_grpc.GenerationServiceStub, tuple]:
        """Open a lease for `req`: (the open lease call, the generation stub of the replica it names, the
        generation's metadata naming the lease). The replica ends the lease when that generation ends."""
        lease = self._routing.Lease(lease_request(req), timeout=timeout,
                                    metadata=(*self._metadata, *engine_metadata(self.engine_app, req)))
        try:
            answer = await lease.read()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        try:
            address, naming = leased_replica(None if answer is grpc.aio.EOF else answer, self.target)
            replica = self._replica(address)
        except BaseException:  # (no usable address, or the client was closed meanwhile)
            lease.cancel()
            raise
        # Held until the replica ends it (when the generation ends): a dropped call object would cancel it.
        self._leases.add(lease)
        lease.add_done_callback(self._leases.discard)
        return lease, replica, (*self._metadata, naming)

    def _replica(self, address: str) -> pb_grpc.GenerationServiceStub:
        """The generation stub of a replica's own server (one plaintext channel per address, kept until close)."""
        if self._closed:
            raise ValueError("the client is closed")
        if address not in self._replicas:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._replicas[address] = (channel, pb_grpc.GenerationServiceStub(channel))
        return self._replicas[address][1]

    async def _leased_generate(self, req: pb.GenerateRequest, timeout: float | None) -> pb.GenerateResponse:
        """Generate on the replica a lease names; once more on a new lease if that replica is UNAVAILABLE."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(2):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            lease, replica, metadata = await self._lease(req, remaining)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await replica.Generate(req, timeout=remaining, metadata=metadata)
            except grpc.RpcError as e:
                lease.cancel()  # the replica may never have seen the call: end its lease here
                if attempt or e.code() not in RETRYABLE_CODES:
                    raise from_rpc_error(e) from e
            except BaseException:  # (a cancelled task)
                lease.cancel()
                raise
        raise AssertionError("unreachable")

    async def _leased_chunks(self, req: pb.GenerateRequest, timeout: float | None) -> AsyncIterator[StreamChunk]:
        deadline = None if timeout is None else time.monotonic() + timeout
        lease, replica, metadata = await self._lease(req, timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        call = None
        try:
            call = replica.GenerateStream(req, timeout=remaining, metadata=metadata)
            async for message in call:
                yield StreamChunk.from_proto(message)
        except grpc.RpcError as e:
            lease.cancel()  # the replica may never have seen the call: end its lease here
            raise from_rpc_error(e) from e
        except BaseException:  # (a cancelled task, GeneratorExit)
            lease.cancel()
            raise
        finally:
            if call is not None:
                call.cancel()  # no-op once the stream has finished

    @staticmethod
    async def _chunks(call: Any) -> AsyncIterator[StreamChunk]:
        try:
            async for message in call:
                yield StreamChunk.from_proto(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()  # no-op once the stream has finished

    async def model_info(self, *, timeout: Any = _DEFAULT) -> ModelInfo:
        """The served base model and the server's limits."""
        resp = await self._call(self._gen.GetModelInfo, pb.GetModelInfoRequest(), timeout, True)
        return ModelInfo.from_proto(resp)

    # ------------------------------------------------------------------ adapters

    async def register_adapter(
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
        """Register a PEFT adapter folder; see ``AdapterServeClient.register_adapter``."""
        req = build_register_request(adapter_id, path, local_dir, merge, pin, replace)
        return AdapterInfo.from_proto(await self._call(self._adapters.RegisterAdapter, req, timeout, False))

    async def unregister_adapter(self, adapter_id: str, *, timeout: Any = _DEFAULT) -> str:
        """Unregister an adapter (in-flight requests finish). Returns its id."""
        req = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        return (await self._call(self._adapters.UnregisterAdapter, req, timeout, False)).adapter_id

    async def list_adapters(self, *, timeout: Any = _DEFAULT) -> list[AdapterInfo]:
        """Every registered adapter."""
        resp = await self._call(self._adapters.ListAdapters, pb.ListAdaptersRequest(), timeout, True)
        return [AdapterInfo.from_proto(a) for a in resp.adapters]

    async def get_adapter(self, adapter_id: str, *, timeout: Any = _DEFAULT) -> AdapterInfo:
        """One adapter's description; NotFoundError when it is not registered."""
        req = pb.GetAdapterRequest(adapter_id=adapter_id)
        return AdapterInfo.from_proto(await self._call(self._adapters.GetAdapter, req, timeout, True))

    # ------------------------------------------------------------------ health

    async def health(self, service: str = "", *, timeout: Any = _DEFAULT) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", ... (no token needed)."""
        req = health_pb2.HealthCheckRequest(service=service)
        resp = await self._call(self._health.Check, req, timeout, True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_ready(self, timeout: float = 30.0, interval: float = 0.2) -> None:
        """Wait until health says SERVING; UnavailableError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        status = "unreachable"
        while True:
            try:
                status = await self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if status == "SERVING":
                    return
            except (UnavailableError, DeadlineExceededError):
                status = "unreachable"
            if time.monotonic() + interval > deadline:
                raise UnavailableError(f"{self.target} not SERVING after {timeout:g}s (last: {status})")
            await asyncio.sleep(interval)
