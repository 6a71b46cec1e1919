"""Load generator: N concurrent streaming requests against a running server, with latency stats."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc


@dataclass
class LoadResult:
    requests: int
    tokens: int
    wall_s: float
    ttft_s: list[float]
    tpot_s: list[float]
    errors: int
    first_error: str = ""  # repr of the first request's error, for the bench's message

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    def row(self) -> dict:
        return {
            "tok/s": round(self.tokens_per_s, 1),
            "ttft p50 ms": round(self.pct(self.ttft_s, 0.5) * 1000, 1),
            "ttft p99 ms": round(self.pct(self.ttft_s, 0.99) * 1000, 1),
            "tpot p50 ms": round(self.pct(self.tpot_s, 0.5) * 1000, 1),
            "tpot p99 ms": round(self.pct(self.tpot_s, 0.99) * 1000, 1),
            "errors": self.errors,
        }


TokenStream = Callable[[int], AsyncIterator[int]]
"""Opens request i's stream and yields the number of new tokens in each chunk as it arrives."""


class RequestTimeout(TimeoutError):
    """A request of a load had no complete answer within its time limit (the load was ended)."""


async def run_streams(open_stream: TokenStream, n_requests: int, concurrency: int,
                      errors: tuple[type[BaseException], ...], timeout: float | None = None) -> LoadResult:
    """Run requests 0..n-1 through `open_stream` with `concurrency` in flight; any server (gRPC, HTTP).

    A request whose stream raises one of `errors` counts as an error and its tokens are dropped.
    TTFT is measured to the first chunk carrying a token, TPOT over the tokens after it.
    `timeout`: the most seconds one request may take from its start (not its wait for a turn); past
    it the whole load ends with RequestTimeout, the other requests cancelled: a stuck server is an
    error, never a hang.
    """
    out = {"tokens": 0, "ttft": [], "tpot": [], "errors": 0, "first_error": ""}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            first, n = None, 0
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    async for k in open_stream(i):
                        if k and first is None:
                            first = time.perf_counter()
                        n += k
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise RequestTimeout(f"request {i} of {n_requests} ({concurrency} in flight) not complete within "
                                     f"{timeout:g} s ({n} tokens so far)") from None
            except errors as e:
                out["errors"] += 1
                out["first_error"] = out["first_error"] or f"request {i}: {e!r}"
                return
            end = time.perf_counter()
            out["tokens"] += n
            if first is not None:
                out["ttft"].append(first - t0)
                if n > 1:
                    out["tpot"].append((end - first) / (n - 1))

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(n_requests)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    wall = time.perf_counter() - t0
    return LoadResult(n_requests, out["tokens"], wall, out["ttft"], out["tpot"], out["errors"], out["first_error"])


def grpc_request(prompt: str | list[int], adapter: str, max_new: int) -> pb.GenerateRequest:
    """Greedy request for exactly `max_new` tokens (EOS ignored); `prompt` is text or token ids;
    `adapter` is an adapter id, "" for the base model, or a weighted LoRA mix "a=1,b=0.5"."""
    req = pb.GenerateRequest(params=pb.SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    if "=" in adapter:
        for part in adapter.split(","):
            name, weight = part.split("=")
            req.adapters.append(pb.AdapterWeight(adapter_id=name, weight=float(weight)))
    else:
        req.adapter_id = adapter
    return req


async def run_load(target: str, prompts: list[str] | list[list[int]], adapters: list[str], max_new: int,
                   concurrency: int, timeout: float | None = None, engine_app: str | None = None,
                   lookaside: bool = False) -> LoadResult:
    """Send len(prompts) requests (request i uses adapters[i % len]) with `concurrency` in flight.
    `timeout`: see run_streams (None: a request past the 600 s gRPC deadline counts as an error).
    `engine_app`: a cluster's engine application, called directly (clients' ``engine_app`` option).
    `lookaside`: each stream leased from a cluster and sent to the replica it names, through the
    python client's ``lookaside`` option (its per-chunk conversion included)."""
    if lookaside:
        return await run_lookaside_load(target, prompts, adapters, max_new, concurrency, timeout, engine_app)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        return await run_grpc_load(stub, prompts, adapters, max_new, concurrency, timeout, engine_app)


async def run_grpc_load(stub: pb_grpc.GenerationServiceStub, prompts: list[str] | list[list[int]],
                        adapters: list[str], max_new: int, concurrency: int,
                        timeout: float | None = None, engine_app: str | None = None) -> LoadResult:
    """:func:`run_load` over an existing channel's `stub` (a client kept across loads)."""
    from clients._common import engine_metadata

    async def stream(i: int) -> AsyncIterator[int]:
        req = grpc_request(prompts[i], adapters[i % len(adapters)], max_new)
        async for chunk in stub.GenerateStream(req, timeout=600 if timeout is None else timeout + 30,
                                               metadata=engine_metadata(engine_app, req) or None):
            yield len(chunk.token_ids)

    return await run_streams(stream, len(prompts), concurrency, (grpc.RpcError,), timeout)


async def run_lookaside_load(target: str, prompts: list[str] | list[list[int]], adapters: list[str], max_new: int,
                             concurrency: int, timeout: float | None = None,
                             engine_app: str | None = None) -> LoadResult:
    """:func:`run_load` with ``lookaside``, as the python clients do it (clients' ``lookaside`` option):
    each stream opens a RoutingService.Lease (routed by its adapter), then streams from the replica's
    own server with the lease's id; raw stubs, as the other paths, so the client's work per chunk is
    the same on every path."""
    from clients._common import LEASE_METADATA, engine_metadata, lease_request

    deadline = 600 if timeout is None else timeout + 30
    replicas: dict[str, tuple[grpc.aio.Channel, pb_grpc.GenerationServiceStub]] = {}
    leases: set = set()
    async with grpc.aio.insecure_channel(target) as channel:
        routing = pb_grpc.RoutingServiceStub(channel)

        async def stream(i: int) -> AsyncIterator[int]:
            req = grpc_request(prompts[i], adapters[i % len(adapters)], max_new)
            lease = routing.Lease(lease_request(req), timeout=deadline, metadata=engine_metadata(engine_app, req) or None)
            answer = await lease.read()
            if answer is grpc.aio.EOF:  # (counted as the stream's error)
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "lease ended without an address")
            leases.add(lease)  # held until the replica ends it (a dropped call would cancel it)
            lease.add_done_callback(leases.discard)
            if answer.address not in replicas:
                replica_channel = grpc.aio.insecure_channel(answer.address)
                replicas[answer.address] = (replica_channel, pb_grpc.GenerationServiceStub(replica_channel))
            stub = replicas[answer.address][1]
            async for chunk in stub.GenerateStream(req, timeout=deadline, metadata=((LEASE_METADATA, answer.lease_id),)):
                yield len(chunk.token_ids)

        try:
            return await run_streams(stream, len(prompts), concurrency, (grpc.RpcError,), timeout)
        finally:
            if leases:
                await asyncio.wait([asyncio.ensure_future(lease.code()) for lease in leases], timeout=1.0)
            for replica_channel, _ in replicas.values():
                await replica_channel.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
