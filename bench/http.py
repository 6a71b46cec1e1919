"""HTTP (OpenAI API, `openai` async client) vs gRPC: the same load on the same server in the same run.

    python -m bench.http --requests 32 --max-new-tokens 64 --adapters 8 --repeats 5

32 concurrent streams x 64 tokens over 8 rank-16 LoRA adapters (every linear layer): each round
runs the gRPC load and the HTTP load back to back (the order alternates between rounds), so the
host's drift hits both alike. Each API keeps one client for the whole run, warmed up before the
rounds (one gRPC channel; one `openai.AsyncOpenAI`, whose connection pool then holds a kept-alive
connection per stream), as an application holds its client: the rounds measure serving, not
connection set-up. Reports medians of tok/s and TTFT p50 at the client, the server's own mean
TTFT per API (``adapterserve_api_time_to_first_token_seconds``, read from its /metrics), and the
HTTP / gRPC ratios (targets: throughput >= 0.95x, TTFT p50 within 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from bench.adapters import build_adapters, register
from bench.load import LoadResult, markdown_table, run_grpc_load, run_streams
from bench.server_process import ServerProcess, free_port
from bench.serving import chat_prompts


async def run_openai_load(client, prompts: list[str], adapters: list[str], max_new: int,
                          concurrency: int) -> LoadResult:
    """The gRPC load of bench.load.run_load (the same loop: ``run_streams``), through the official openai
    async `client` (streaming completions, request i with model = adapters[i % len])."""
    import openai

    async def stream(i: int) -> AsyncIterator[int]:
        chunks = await client.completions.create(
            model=adapters[i % len(adapters)], prompt=prompts[i], max_tokens=max_new, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        counted = 0
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason is None:  # one token per chunk
                counted += 1
                yield 1
            if chunk.usage is not None:  # the exact count (the difference is 0 unless chunks were merged)
                yield chunk.usage.completion_tokens - counted

    return await run_streams(stream, len(prompts), concurrency, (openai.APIError,))


def server_ttft(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of the server's time-to-first-token histogram per API, from its /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^adapterserve_api_time_to_first_token_seconds_(sum|count)\{[^}]*api="(\w+)"[^}]*\} (\S+)$',
                         text, re.M):
        out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] += float(m.group(3))
    return {api: (v[0], v[1]) for api, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (medians reported)")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from server.model.loader import resolve_model_folder

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    _, folder = resolve_model_folder(args.model)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(folder), args.requests)
    root = Path(tempfile.mkdtemp(prefix="adapterserve-bench-http-"))
    names = build_adapters(folder, root, args.adapters, 0, 0, args.rank)
    http_port = free_port()
    server = ServerProcess("--model", args.model, "--adapter-root", str(root), "--max-batch-size",
                           str(args.requests), "--max-resident-adapters", str(args.adapters + 4),
                           "--http-port", str(http_port), "--log-level", "WARNING", threads=threads)
    base_url = f"http://127.0.0.1:{http_port}/v1"
    runs: dict[str, list[LoadResult]] = {"grpc": [], "http": []}
    server_ms: dict[str, list[float]] = {"grpc": [], "http": []}  # the server's mean TTFT per round
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"

    async def rounds() -> None:
        import openai

        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            loads = {"grpc": lambda n: run_grpc_load(stub, prompts, names, n, len(prompts)),
                     "http": lambda n: run_openai_load(client, prompts, names, n, len(prompts))}
            try:
                for load in loads.values():  # warm-up: every adapter resident, every connection open
                    await load(4)
                for r in range(args.repeats):
                    for name in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                        before = server_ttft(metrics_url).get(name, (0.0, 0.0))
                        result = await loads[name](args.max_new_tokens)
                        after = server_ttft(metrics_url)[name]
                        assert result.errors == 0, (name, result.errors)
                        runs[name].append(result)
                        server_ms[name].append((after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1000)
            finally:
                await client.close()

    try:
        for n in names:
            register(server.target, n, n)
        asyncio.run(rounds())
    finally:
        server.stop()

    med = {name: {"tok/s": statistics.median(r.tokens_per_s for r in rs),
                  "ttft p50 ms": statistics.median(r.pct(r.ttft_s, 0.5) for r in rs) * 1000,
                  "tpot p50 ms": statistics.median(r.pct(r.tpot_s, 0.5) for r in rs) * 1000,
                  "server ttft mean ms": statistics.median(server_ms[name])}
           for name, rs in runs.items()}
    rows = [{"api": name, **{k: round(v, 1) for k, v in m.items()}} for name, m in med.items()]
    print(f"\n{args.requests} concurrent streams x {args.max_new_tokens} tokens over {args.adapters} rank-{args.rank} "
          f"LoRA adapters, model={args.model}, torch threads={threads}, medians of {args.repeats} rounds\n")
    print(markdown_table(rows))
    tput = med["http"]["tok/s"] / med["grpc"]["tok/s"]
    ttft = med["http"]["ttft p50 ms"] / med["grpc"]["ttft p50 ms"]
    print(f"\nHTTP / gRPC: throughput {tput:.3f}x (target >= 0.95), TTFT p50 {ttft:.3f}x (target <= 1.10)")
    server_ratio = med["http"]["server ttft mean ms"] / med["grpc"]["server ttft mean ms"]
    print(f"server-side mean TTFT HTTP / gRPC: {server_ratio:.3f}x (the rest of the client's TTFT is the client's own work)")
    print(json.dumps({"throughput_ratio": round(tput, 3), "ttft_p50_ratio": round(ttft, 3),
                      "server_ttft_ratio": round(server_ratio, 3),
                      "per_round_tok_s": {k: [round(r.tokens_per_s, 1) for r in v] for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
