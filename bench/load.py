"""Load generator: N concurrent streaming requests against a running server, with latency stats."""

from __future__ import annotations

import asyncio
import statistics
import time
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


async def _one(stub, prompt: str, adapter: str, max_new: int, out: dict) -> None:
    req = pb.GenerateRequest(prompt=prompt, params=pb.SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    if "=" in adapter:  # a weighted LoRA mix "a=1,b=0.5"
        for part in adapter.split(","):
            name, weight = part.split("=")
            req.adapters.append(pb.AdapterWeight(adapter_id=name, weight=float(weight)))
    else:
        req.adapter_id = adapter
    t0 = time.perf_counter()
    first = None
    n = 0
    try:
        async for chunk in stub.GenerateStream(req, timeout=600):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
            n += len(chunk.token_ids)
    except grpc.RpcError:
        out["errors"] += 1
        return
    end = time.perf_counter()
    out["tokens"] += n
    if first is not None:
        out["ttft"].append(first - t0)
        if n > 1:
            out["tpot"].append((end - first) / (n - 1))


async def run_load(target: str, prompts: list[str], adapters: list[str], max_new: int,
                   concurrency: int) -> LoadResult:
    """Send len(prompts) requests (request i uses adapters[i % len]) with `concurrency` in flight."""
    out = {"tokens": 0, "ttft": [], "tpot": [], "errors": 0}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        sem = asyncio.Semaphore(concurrency)

        async def guarded(i: int, p: str) -> None:
            async with sem:
                await _one(stub, p, adapters[i % len(adapters)], max_new, out)

        t0 = time.perf_counter()
        await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    return LoadResult(len(prompts), out["tokens"], wall, out["ttft"], out["tpot"], out["errors"])


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
