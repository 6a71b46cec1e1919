"""KV cache benchmarks: each runs two server configurations on the same load in one run and reports ratios.

    python -m bench.kv_cache shared-prompt  # prefix cache on vs off: 32 chats, 4 LoRA adapters, 1 000-token system prompt
    python -m bench.kv_cache long-prompt    # chunked vs one-piece prefill: a 6 000-token prompt joins 16 streams
    python -m bench.kv_cache memory         # on-demand pages + preemption vs up-front reservation, 4 096 KV tokens

Each server is a `python -m server` subprocess on the default model, started one after the other
(never both at once: they would share the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from bench.load import markdown_table
from bench.server_process import ServerProcess

SYSTEM_SENTENCES = [
    "You are a careful assistant for a company that sells garden tools.",
    "Answer politely, cite the relevant policy, and never invent prices or delivery dates.",
    "Returns are accepted within thirty days with a receipt; opened seed packets cannot be returned.",
    "Shipping is free above fifty euros; express delivery costs nine euros and takes two working days.",
    "Warranty claims need the serial number printed under the handle of every powered tool.",
]
USER_TURNS = ["Can I return a rake I bought last week?", "How much is express shipping?",
              "My hedge trimmer stopped working, what do I need for a claim?", "Do you ship seeds abroad?",
              "Is delivery free for a 60 euro order?", "Can I return opened tulip bulbs?",
              "What is your warranty period?", "How fast is express delivery?"]
SHORT_QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 12 times 12?",
                   "Who wrote Hamlet?", "What is the boiling point of water in Celsius?", "Name a planet.",
                   "What does a bee make?", "How many legs does a spider have?"]
# memory bench: questions whose greedy answers on the default model stop at EOS after 8-103 tokens (p50 ~70)
EXPLAIN_QUESTIONS = ["Why is the sky blue?", "How do bees make honey?", "Why do leaves change colour in autumn?",
                     "How does a bicycle stay upright?", "Why does ice float on water?", "How do plants make food?",
                     "What causes the seasons on Earth?", "How does a refrigerator keep food cold?"]


@dataclass
class Stream:
    """One streamed request: token arrival times and ids."""

    t0: float = 0.0
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.times[0] - self.t0


async def stream(stub, req: pb.GenerateRequest, out: Stream) -> Stream:
    out.t0 = time.perf_counter()
    try:
        async for chunk in stub.GenerateStream(req, timeout=1800):
            now = time.perf_counter()
            for t in chunk.token_ids:
                out.times.append(now)
                out.tokens.append(t)
    except grpc.RpcError as e:
        out.error = f"{e.code().name}: {e.details()}"
    return out


def chat(system: str, user: str, adapter: str, max_new: int, ignore_eos: bool = True) -> pb.GenerateRequest:
    msgs = [pb.ChatMessage(role="system", content=system)] if system else []
    msgs.append(pb.ChatMessage(role="user", content=user))
    return pb.GenerateRequest(adapter_id=adapter, messages=pb.ChatMessages(messages=msgs),
                              params=pb.SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def serve(args, *flags: str) -> ServerProcess:
    return ServerProcess("--model", args.model, "--log-level", "WARNING", *flags, threads=os.cpu_count() or 1)


async def run_all(target: str, reqs: list[pb.GenerateRequest]) -> tuple[list[Stream], float]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        t0 = time.perf_counter()
        done = await asyncio.gather(*(stream(stub, r, Stream()) for r in reqs))
        return list(done), time.perf_counter() - t0


# ------------------------------------------------------------------ shared system prompt
def shared_prompt(args) -> None:
    from transformers import AutoTokenizer

    from bench.adapters import build_adapters
    from server.model.loader import resolve_model_folder

    _, folder = resolve_model_folder(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    system, i = "", 0
    while len(tok.encode(system)) < args.system_tokens:
        system += SYSTEM_SENTENCES[i % len(SYSTEM_SENTENCES)] + f" (rule {i}) "
        i += 1
    root = Path(tempfile.mkdtemp(prefix="adapterserve-kv-"))
    adapters = build_adapters(folder, root, args.adapters, 0, 0, 16)
    reqs = [chat(system, USER_TURNS[i % len(USER_TURNS)] + f" (ticket {i})", adapters[i % len(adapters)],
                 args.max_new_tokens) for i in range(args.requests)]
    warm = [chat(system, "Hello.", a, 1) for a in adapters]  # one earlier chat per adapter: the steady state
    rows, outputs = [], {}
    for mode in ("off", "on"):
        srv = serve(args, "--adapter-root", str(root), "--prefix-cache", mode, "--max-batch-size", str(args.requests))
        try:
            with grpc.insecure_channel(srv.target) as ch:
                for a in adapters:
                    pb_grpc.AdapterServiceStub(ch).RegisterAdapter(
                        pb.RegisterAdapterRequest(adapter_id=a, path=a), timeout=120)
            asyncio.run(run_all(srv.target, warm))
            done, wall = asyncio.run(run_all(srv.target, reqs))
        finally:
            srv.stop()
        outputs[mode] = [s.tokens for s in done]
        tokens = sum(len(s.tokens) for s in done)
        rows.append({"prefix cache": mode, "tok/s": round(tokens / wall, 1),
                     "ttft p50 ms": round(pct([s.ttft for s in done], 0.5) * 1000),
                     "ttft p99 ms": round(pct([s.ttft for s in done], 0.99) * 1000),
                     "wall s": round(wall, 1), "errors": sum(bool(s.error) for s in done)})
    off, on = rows
    print(markdown_table(rows))
    print(f"\nprompt {len(tok.encode(system))} system tokens; TTFT p50 off/on = "
          f"{off['ttft p50 ms'] / on['ttft p50 ms']:.1f}x lower, throughput on/off = {on['tok/s'] / off['tok/s']:.1f}x; "
          f"outputs identical: {outputs['on'] == outputs['off']}")


# ------------------------------------------------------------------ long prompt arriving
def long_prompt(args) -> None:
    from transformers import AutoTokenizer

    from server.model.loader import resolve_model_folder

    _, folder = resolve_model_folder(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    words = " ".join(f"item {i} is stored on shelf {i % 97}." for i in range(args.long_tokens))
    long_ids = tok.encode(words)[:args.long_tokens]
    rows = []
    for label, chunk in (("one piece", args.long_tokens + 64), ("chunked", args.chunk)):
        # the one-piece baseline runs one long step on purpose: no watchdog on either run
        srv = serve(args, "--max-prefill-tokens", str(chunk), "--prefix-cache", "off", "--watchdog-seconds", "0")
        try:
            gaps, long_ttft = asyncio.run(_long_prompt_once(srv.target, long_ids, args))
        finally:
            srv.stop()
        rows.append({"prefill": label, "--max-prefill-tokens": chunk, "stream gap p50 ms": round(pct(gaps, 0.5) * 1000),
                     "stream gap p99 ms": round(pct(gaps, 0.99) * 1000),
                     "stream gap max ms": round(max(gaps) * 1000), "long TTFT s": round(long_ttft, 2)})
    whole, chunked = rows
    print(markdown_table(rows))
    print(f"\n{len(long_ids)}-token prompt joining {args.streams} streams: p99 gap one-piece/chunked = "
          f"{whole['stream gap p99 ms'] / chunked['stream gap p99 ms']:.1f}x lower with chunking; "
          f"long request TTFT chunked/one-piece = {chunked['long TTFT s'] / whole['long TTFT s']:.2f}x")


async def _long_prompt_once(target: str, long_ids: list[int], args) -> tuple[list[float], float]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        streams = [Stream() for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream(stub, chat("", SHORT_QUESTIONS[i % 8], "", args.stream_tokens), s))
                 for i, s in enumerate(streams)]
        while min(len(s.times) for s in streams) < 8:  # every stream is decoding
            await asyncio.sleep(0.05)
        long_req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=long_ids),
                                      params=pb.SamplingParams(max_new_tokens=4, ignore_eos=True))
        long = await stream(stub, long_req, Stream())
        await asyncio.gather(*tasks)
    failed = [s.error for s in [long, *streams] if s.error]
    if failed or not long.times:
        raise SystemExit(f"long-prompt run failed: {failed[0] if failed else 'the long request got no token'}")
    start, end = long.t0, long.times[0] if long.times else time.perf_counter()
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False) if b > start and a < end]
    return gaps, long.ttft


# ------------------------------------------------------------------ memory pressure
def memory(args) -> None:
    reqs = [chat("Answer in two or three sentences.", EXPLAIN_QUESTIONS[i % 8] + f" (question {i})", "",
                 args.max_new_tokens, ignore_eos=False) for i in range(args.requests)]
    rows, outputs = [], {}
    for mode in ("reserve", "on-demand"):
        srv = serve(args, "--kv-cache-tokens", str(args.kv_cache_tokens), "--kv-allocation", mode,
                    "--max-batch-size", str(args.requests), "--prefix-cache", "off", "--metrics-port", "0")
        try:
            done, wall = asyncio.run(run_all(srv.target, reqs))
        finally:
            srv.stop()
        outputs[mode] = [s.tokens for s in done]
        lengths = sorted(len(s.tokens) for s in done)
        rows.append({"allocation": mode, "tok/s": round(sum(lengths) / wall, 1), "wall s": round(wall, 1),
                     "ttft p50 ms": round(pct([s.ttft for s in done], 0.5) * 1000),
                     "output tokens p10/p50/p90": f"{pct(lengths, 0.1)}/{pct(lengths, 0.5)}/{pct(lengths, 0.9)}",
                     "errors": sum(bool(s.error) for s in done)})
    reserve, demand = rows
    print(markdown_table(rows))
    print(f"\nthroughput on-demand/reserve = {demand['tok/s'] / reserve['tok/s']:.1f}x; "
          f"outputs identical: {outputs['reserve'] == outputs['on-demand']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["shared-prompt", "long-prompt", "memory"])
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=None, help="shared-prompt: 32, memory: 64")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="shared-prompt: 64, memory: 512")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=160)
    ap.add_argument("--long-tokens", type=int, default=6000)
    ap.add_argument("--chunk", type=int, default=512, help="long-prompt: --max-prefill-tokens of the chunked run")
    ap.add_argument("--kv-cache-tokens", type=int, default=4096)
    args = ap.parse_args()
    defaults = {"shared-prompt": (32, 64), "long-prompt": (0, 0), "memory": (64, 512)}[args.bench]
    args.requests = args.requests or defaults[0]
    args.max_new_tokens = args.max_new_tokens or defaults[1]
    {"shared-prompt": shared_prompt, "long-prompt": long_prompt, "memory": memory}[args.bench](args)


if __name__ == "__main__":
    main()
