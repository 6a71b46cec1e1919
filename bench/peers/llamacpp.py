"""adapterserve vs llama.cpp's ``llama-server`` on the same weights, the same load, alternating rounds.

    bash bench/peers/build_llamacpp.sh /work/peer-bin        # once: the peer, outside the repo (~7 min)
    python -m bench.peers.llamacpp --llama-server /work/peer-bin/llama-server --repeats 5

The served model's safetensors (``--model default``: the converted cache under ~/.cache/adapterserve)
become a GGUF once, with llama.cpp's own convert_hf_to_gguf.py: F32 (every tensor identical to what
adapterserve serves), or F16 with ``--precision bf16``, which runs adapterserve with
``--dtype bfloat16``. Both servers get the same thread count. Each round runs one load on one server
while the other is stopped (SIGSTOP; SIGCONT before its own round), so they never share cores, and
the order alternates between rounds. Loads: 1, 16 and 64 concurrent streams of greedy generations of
exactly 64 tokens (EOS ignored; llama.cpp: ``n_predict`` + ``ignore_eos``) over bench.serving's chat
prompts (~37 tokens; llama.cpp gets the same token ids); then 32 streams over 8 rank-16 LoRA adapters
on every linear layer (PEFT format; for llama.cpp converted by convert_lora_to_gguf.py, loaded with
``--lora`` each, every request naming its own with ``"lora": [{"id": i, "scale": 1}]``).
llama.cpp runs as a user would start it: default F16 KV cache, flash attention auto, continuous
batching, one unified KV buffer with a slot per stream. Every load must return exactly its tokens on
both servers, and no request may take over ``--request-timeout`` seconds: a stuck or crawling server
stops the run with StuckServer naming it and the phase (on a busy host llama.cpp's spinning threads
crawl: SPIN_HINT), never a hang.

Builds nothing: without a llama-server binary (``--llama-server``, or ``llama-server`` on PATH) and
the llama.cpp tree holding its converters (found above the binary, or ``--llama-cpp``), it says how
to get them and exits 2. Thread domain: the main thread only (asyncio loops run per load).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadResult, markdown_table, run_load, run_streams
from bench.server_process import ServerProcess, free_port

# Same-run targets of issue 17 (adapterserve / llama.cpp), per workload.
TARGETS = {"1": 1.0, "16": 1.15, "64": 1.25, "lora": 3.0}
GGUF_TYPE = {"fp32": "f32", "bf16": "f16"}  # --precision -> llama.cpp outtype
OUR_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


# Why a stuck llama-server is most likely a busy host (measured: bench/README.md, llama.cpp peer).
SPIN_HINT = ("llama.cpp's threads spin-wait for each other at every op of the graph, so when other processes "
             "hold the cores, -t 2 runs ~100x slower (0.17 tok/s against 2.5 with -t 1 at nice 15 under load 10): "
             "run on a quiet host, or raise --request-timeout")


class PeerError(RuntimeError):
    """llama-server answered a stream with an error event."""


class StuckServer(TimeoutError):
    """A server gave no complete answer within --request-timeout; names the server and the phase."""


@dataclass(frozen=True)
class Workload:
    """One row of the table: `streams` concurrent, `requests` per round, over LoRA adapters or the base."""

    name: str
    streams: int
    requests: int
    adapters: int = 0  # 0 = base model

    @property
    def label(self) -> str:
        return f"{self.streams} over {self.adapters} LoRA" if self.adapters else str(self.streams)


def workloads(streams: Iterable[int], min_requests: int, lora_streams: int, adapters: int) -> list[Workload]:
    """Base rows (each round sends max(streams, min_requests) requests), then the LoRA row if any."""
    rows = [Workload(str(s), s, max(s, min_requests)) for s in streams]
    if lora_streams and adapters:
        rows.append(Workload("lora", lora_streams, max(lora_streams, min_requests), adapters))
    return rows


# ---------------------------------------------------------------------------- llama-server protocol (pure)
def completion_body(prompt_ids: list[int], max_new: int, lora_id: int | None = None, stream: bool = True) -> dict:
    """llama-server /completion request: greedy, exactly `max_new` new tokens, the prompt as token ids."""
    body = {"prompt": prompt_ids, "n_predict": max_new, "ignore_eos": True, "temperature": 0.0,
            "stream": stream, "return_tokens": True, "cache_prompt": True}
    if lora_id is not None:
        body["lora"] = [{"id": lora_id, "scale": 1.0}]
    return body


def parse_sse(line: str) -> dict | None:
    """One server-sent-events line -> its JSON event; None for blank lines, comments and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


def event_tokens(event: dict, counted: int) -> int:
    """New tokens an event carries, given `counted` so far: its ``tokens``, or on the final event
    (``stop``) whatever ``tokens_predicted`` says was generated beyond what the stream showed."""
    if "error" in event:
        raise PeerError(str(event["error"]))
    n = len(event.get("tokens") or [])
    if event.get("stop"):
        n = max(n, int(event.get("tokens_predicted", 0)) - counted)
    return n


def server_command(binary: Path, gguf: Path, port: int, threads: int, slots: int, ctx_per_slot: int,
                   loras: Sequence[Path] = (), kv_unified: bool = False) -> list[str]:
    """llama-server's command line: `threads` for decode and prompt alike, `slots` parallel sequences,
    by default each with its own KV stream (``--no-kv-unified``: with one unified buffer a decode step's
    attention spans every slot's cells, and 64 streams ran 2.2x slower than 16 instead of faster; at 16
    streams and with LoRA the unified buffer was the faster one: ``kv_unified``); LoRA adapters loaded
    but applied only to requests that name them."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
           "--kv-unified" if kv_unified else "--no-kv-unified", "--no-webui"]
    for path in loras:
        cmd += ["--lora", str(path)]
    if loras:
        cmd.append("--lora-init-without-apply")
    return cmd


def first_divergence(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def result_rows(tok_s: dict[str, dict[str, list[float]]], workloads_: list[Workload], peer: str) -> list[dict]:
    """The issue's table: per workload, medians of adapterserve's and the peer's tok/s over the rounds,
    their ratio and the target. `tok_s[workload name][system]` lists one figure per round."""
    rows = []
    for w in workloads_:
        ours, theirs = (statistics.median(tok_s[w.name][s]) for s in ("adapterserve", "llama.cpp"))
        ratio = ours / theirs
        target = TARGETS.get(w.name)
        rows.append({"concurrent streams": w.label, "adapterserve": f"{ours:.1f} tok/s", peer: f"{theirs:.1f} tok/s",
                     "ratio": f"{ratio:.2f}×",
                     "target": "" if target is None else f"≥ {target:g}× {'met' if ratio >= target else 'not met'}"})
    return rows


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid` so far, from /proc ({} without it)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields[11:13]: utime, stime
        except OSError:  # the thread ended meanwhile
            continue
        out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def busy_threads(before: dict[int, float], after: dict[int, float], wall_s: float, floor: float = 0.05) -> list[int]:
    """The CPU share (%) of each thread busy more than `floor` of `wall_s` between two thread_cpu
    snapshots, largest first: how many threads a server really computed with during a round."""
    shares = ((cpu - before.get(tid, 0.0)) / wall_s for tid, cpu in after.items())
    return sorted((round(100 * x) for x in shares if x > floor), reverse=True)


async def completion_stream(client, body: dict) -> AsyncIterator[int]:
    """POST `body` to /completion on `client` (an httpx2.AsyncClient) and yield the new tokens of each event."""
    async with client.stream("POST", "/completion", json=body) as resp:
        resp.raise_for_status()
        counted = 0
        async for line in resp.aiter_lines():
            event = parse_sse(line)
            if event is not None:
                n = event_tokens(event, counted)
                counted += n
                yield n


# ---------------------------------------------------------------------------- finding and converting
def find_llamacpp_tree(binary: Path, explicit: Path | None = None) -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py: `explicit`, or a folder above the binary."""
    candidates = [explicit] if explicit else list(Path(binary).resolve().parents)
    for folder in candidates:
        if folder is not None and (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    return None


def _run_converter(tree: Path, script: str, args: list[str]) -> None:
    """Run one of llama.cpp's converters with this Python and the tree's own gguf-py first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(tree / script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{tail}")


def convert_model(tree: Path, folder: Path, outtype: str, cache: Path) -> Path:
    """The model folder as a GGUF of `outtype` (f32/f16), converted once into `cache`."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
    out = cache / f"{folder.name}-{key}-{outtype}.gguf"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        _run_converter(tree, "convert_hf_to_gguf.py", [str(folder), "--outtype", outtype, "--outfile", str(tmp)])
        tmp.rename(out)
    return out


def convert_lora(tree: Path, adapter: Path, base: Path, outtype: str) -> Path:
    """A PEFT LoRA folder as a llama.cpp LoRA GGUF beside it."""
    out = adapter / f"lora-{outtype}.gguf"
    _run_converter(tree, "convert_lora_to_gguf.py",
                   [str(adapter), "--base", str(base), "--outtype", outtype, "--outfile", str(out)])
    return out


# ---------------------------------------------------------------------------- the two contenders
class Contender:
    """A server process under test: SIGSTOP / SIGCONT so only the measured one runs, and its name in errors."""

    name: str
    proc: subprocess.Popen
    where: str = ""  # address and log, for messages
    request_timeout: float = 300  # seconds one request may take (--request-timeout)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def describe(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"{self.name} (pid {self.proc.pid}, {state}{', ' + self.where if self.where else ''})"


@contextmanager
def phase(server: Contender, what: str, timeout: float) -> Iterator[None]:
    """Turn a timeout of `server` during `what` (its greedy check, warm-up, a round) into StuckServer."""
    try:
        yield
    except TimeoutError as e:
        hint = f"; {SPIN_HINT}" if isinstance(server, LlamaServer) else ""
        raise StuckServer(f"{server.describe()} stuck in {what}: no complete answer within {timeout:g} s "
                          f"({e}){hint}") from e


class LlamaServer(Contender):
    """A llama-server process on a free port, ready when /health answers 200."""

    name = "llama.cpp"

    def __init__(self, cmd: list[str], log_path: Path, timeout: float = 300, request_timeout: float = 300):
        import httpx2

        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.where = f"{self.url}, log {log_path}"
        self.request_timeout = request_timeout
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"llama-server not ready within {timeout:g} s; see {log_path}")

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    async def load(self, prompts: list[list[int]], loras: list[int | None], max_new: int, concurrency: int,
                   requests: int) -> LoadResult:
        """bench.load.run_streams over /completion streams (request i: prompt i, LoRA i mod len)."""
        import httpx2

        # A connection per request: llama-server closes a kept-alive connection after a few requests, and a
        # request sent on it just then fails with "Server disconnected without sending a response" (seen
        # 1 in ~12 requests at one stream). A local TCP connect is ~0.1 ms against 1.4 s per request.
        limits = httpx2.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
        # httpx's own timeouts past run_streams' deadline, so that one ends a stuck load (not an error count)
        timeout = httpx2.Timeout(self.request_timeout + 30)
        async with httpx2.AsyncClient(base_url=self.url, timeout=timeout, limits=limits) as client:
            def stream(i: int) -> AsyncIterator[int]:
                return completion_stream(client, completion_body(prompts[i % len(prompts)], max_new,
                                                                 loras[i % len(loras)]))

            return await run_streams(stream, requests, concurrency, (httpx2.HTTPError, PeerError),
                                     self.request_timeout)

    def greedy(self, prompt: list[int], max_new: int, lora: int | None = None) -> list[int]:
        import httpx2

        try:
            resp = httpx2.post(self.url + "/completion", json=completion_body(prompt, max_new, lora, stream=False),
                               timeout=self.request_timeout)
        except httpx2.TimeoutException as e:
            raise TimeoutError(str(e) or type(e).__name__) from e
        resp.raise_for_status()
        return list(resp.json()["tokens"])


class Ours(Contender):
    """adapterserve (`python -m server`) through bench.server_process and bench.load's gRPC load."""

    name = "adapterserve"

    def __init__(self, *args: str, threads: int, request_timeout: float = 300):
        self.server = ServerProcess(*args, threads=threads)
        self.proc = self.server.proc
        self.where = f"gRPC {self.server.target}"
        self.request_timeout = request_timeout

    def stop(self) -> None:
        self.resume()
        self.server.stop()

    async def load(self, prompts: list[list[int]], adapters: list[str], max_new: int, concurrency: int,
                   requests: int) -> LoadResult:
        return await run_load(self.server.target, [prompts[i % len(prompts)] for i in range(requests)],
                              adapters, max_new, concurrency, self.request_timeout)

    def greedy(self, prompt: list[int], max_new: int, adapter: str = "") -> list[int]:
        import grpc

        from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
        from bench.load import grpc_request

        with grpc.insecure_channel(self.server.target) as ch:
            try:
                resp = pb_grpc.GenerationServiceStub(ch).Generate(grpc_request(prompt, adapter, max_new),
                                                                  timeout=self.request_timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(e.details()) from e
                raise
        return list(resp.token_ids)


def alternate(ours: Ours, peer: LlamaServer, rows: list[Workload], repeats: int, prompts: list[list[int]],
              names: list[str], max_new: int, tok_s: dict[str, dict[str, list[float]]],
              busy: dict[str, dict[str, list[int]]]) -> None:
    """`repeats` rounds; in each, every workload on both servers (order alternating), the idle one stopped.
    Appends each round's tok/s to `tok_s[workload][system]`; `busy[workload][system]`: the last round's
    busy threads (busy_threads)."""
    ours.pause()
    peer.pause()
    for r in range(repeats):
        for k, w in enumerate(rows):
            ours_adapters = names[:w.adapters] or [""]
            peer_loras: list[int | None] = list(range(w.adapters)) or [None]
            runs: list[tuple[Contender, list]] = [(ours, ours_adapters), (peer, peer_loras)]
            for server, adapters in runs if (r + k) % 2 == 0 else runs[::-1]:
                what = f"round {r + 1}, {w.label} streams"
                for attempt in (1, 2):  # a load with a failed request runs once more, then stops the bench
                    server.resume()
                    try:
                        before, t0 = thread_cpu(server.proc.pid), time.perf_counter()
                        with phase(server, what, server.request_timeout):
                            res = asyncio.run(server.load(prompts, adapters, max_new, w.streams, w.requests))
                        threads = busy_threads(before, thread_cpu(server.proc.pid), time.perf_counter() - t0)
                    finally:
                        server.pause()
                    if not res.errors and res.tokens == w.requests * max_new:
                        break
                    failure = (f"{server.describe()} in {what}: {res.errors} errors ({res.first_error}), "
                               f"{res.tokens} tokens (expected {w.requests * max_new})")
                    if attempt == 2:
                        raise RuntimeError(failure)
                    print(f"{failure}; running this load again", flush=True)
                tok_s.setdefault(w.name, {}).setdefault(server.name, []).append(res.tokens_per_s)
                busy.setdefault(w.name, {})[server.name] = threads
                print(f"round {r + 1} {w.label:>14}: {server.name:>12} {res.tokens_per_s:6.1f} tok/s ({res.tokens} "
                      f"tokens in {res.wall_s:.1f} s; threads busy, % CPU: {threads})", flush=True)
    ours.resume()
    peer.resume()


def greedy_check(server: Contender, prompt: list[int], max_new: int, adapter: str | int | None,
                 label: str) -> tuple[list[int], float]:
    """One greedy request of exactly `max_new` tokens on `server` (both running, neither measured):
    its tokens and seconds."""
    t0 = time.perf_counter()
    with phase(server, f"the greedy check ({label})", server.request_timeout):
        out = server.greedy(prompt, max_new, adapter)
    seconds = time.perf_counter() - t0
    print(f"greedy check {label}: {server.name} {len(out)} tokens in {seconds:.1f} s", flush=True)
    if len(out) != max_new:
        raise RuntimeError(f"{server.describe()} gave {len(out)} tokens in the greedy check ({label}), not {max_new}")
    return out, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", type=Path, default=None, help="llama-server binary (default: on PATH)")
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="llama.cpp source tree with the converters (default: a folder above the binary)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--precision", choices=list(GGUF_TYPE), default="fp32",
                    help="fp32: float32 vs an F32 GGUF; bf16: --dtype bfloat16 vs an F16 GGUF")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server")
    ap.add_argument("--llama-kv", choices=["per-slot", "unified"], default="per-slot",
                    help="llama-server's KV layout (--no-kv-unified / --kv-unified): which is faster depends "
                         "on the row; run both and take llama.cpp's better one per row")
    ap.add_argument("--streams", default="1,16,64", help="concurrent streams of the base-model rows")
    ap.add_argument("--min-requests", type=int, default=4, help="requests per round at least (1 stream: sequential)")
    ap.add_argument("--lora-streams", type=int, default=32, help="streams of the LoRA row (0 = no LoRA row)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (medians reported)")
    ap.add_argument("--request-timeout", type=float, default=300,
                    help="seconds one request may take on either server before the run stops with an error naming "
                         "the server and the phase (a quiet host needs under 30)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="convert the model and the LoRA adapters (cached) and stop; needs only --llama-cpp TREE")
    args = ap.parse_args()

    load_start = os.getloadavg()[0]  # before anything of ours runs: the rest of the host
    binary = args.llama_server or (Path(p) if (p := shutil.which("llama-server")) else None)
    tree = find_llamacpp_tree(binary, args.llama_cpp) if binary else args.llama_cpp
    if tree is not None and not (tree / "convert_hf_to_gguf.py").is_file():
        tree = None
    if tree is None or (not args.prepare_only and (binary is None or not binary.exists())):
        print("no llama.cpp peer: pass --llama-server PATH (and --llama-cpp TREE if the converters are not in a "
              "folder above it); `bash bench/peers/build_llamacpp.sh DEST` builds both (bench/README.md)",
              file=sys.stderr)
        return 2

    from transformers import AutoTokenizer

    from bench.adapters import build_adapters, register
    from bench.serving import chat_prompts
    from server.model.default_model import default_cache_dir
    from server.model.loader import resolve_model_folder

    _, folder = resolve_model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    streams = [int(s) for s in args.streams.split(",") if s]
    rows = workloads(streams, args.min_requests, args.lora_streams, args.adapters)
    slots = max(w.streams for w in rows)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in chat_prompts(tokenizer, 16)]
    ctx_per_slot = max(map(len, prompts)) + args.max_new_tokens + 64
    outtype = GGUF_TYPE[args.precision]
    t0 = time.time()
    cache = default_cache_dir() / "peers" / "llamacpp"
    gguf = convert_model(tree, folder, outtype, cache)
    # The adapters are deterministic (seeded), so they and their GGUFs are made once per model/rank/count.
    root = cache / f"{gguf.name.rsplit('-', 1)[0]}-lora-r{args.rank}-x{args.adapters}"
    names = [f"lora-{i}" for i in range(args.adapters)] if rows[-1].adapters else []
    if names and not (root / f"converted-{outtype}").is_file():
        if not (root / "built").is_file():
            shutil.rmtree(root, ignore_errors=True)
            build_adapters(folder, root, args.adapters, 0, 0, args.rank)
            (root / "built").write_text("")
        for n in names:
            convert_lora(tree, root / n, folder, outtype)
        (root / f"converted-{outtype}").write_text("")
    loras = [root / n / f"lora-{outtype}.gguf" for n in names]
    work = Path(tempfile.mkdtemp(prefix="adapterserve-peer-"))
    print(f"converted in {time.time() - t0:.0f} s: {gguf.name}, {len(loras)} LoRA in {root}; logs in {work}",
          flush=True)
    if args.prepare_only:
        return 0

    # Ctrl-C, and SIGTERM (or SIGINT under nohup, which ignores it), unwind through the `finally`s
    # below that stop both servers instead of leaving them running (or stopped) behind.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tok_s: dict[str, dict[str, list[float]]] = {}
    busy: dict[str, dict[str, list[int]]] = {}
    agreement: dict[str, int] = {}
    texts: dict[str, tuple[str, str]] = {}
    timeout = args.request_timeout
    ours = Ours("--model", args.model, "--dtype", OUR_DTYPE[args.precision], "--max-batch-size", str(slots),
                "--adapter-root", str(root), "--max-resident-adapters", str(args.adapters + 4),
                "--watchdog-seconds", "0", "--log-level", "WARNING", threads=args.threads, request_timeout=timeout)
    try:
        for n in names:
            register(ours.server.target, n, n)
        phases = [([w for w in rows if not w.adapters], []), ([w for w in rows if w.adapters], loras)]
        for phase_rows, phase_loras in phases:
            if not phase_rows:
                continue
            peer = LlamaServer(server_command(binary, gguf, free_port(), args.threads, slots, ctx_per_slot,
                                              phase_loras, args.llama_kv == "unified"),
                               work / "llama-server.log", request_timeout=timeout)
            try:
                adapter = names[0] if phase_loras else ""
                label = adapter or "base"
                ours_out, ours_s = greedy_check(ours, prompts[0], args.max_new_tokens, adapter, label)
                peer_out, peer_s = greedy_check(peer, prompts[0], args.max_new_tokens, 0 if phase_loras else None,
                                                label)
                if peer_s > 5 * ours_s:
                    print(f"warning: llama.cpp took {peer_s / ours_s:.0f}x adapterserve's time for the same greedy "
                          f"request: the host is busy? {SPIN_HINT}", flush=True)
                agreement[label] = first_divergence(ours_out, peer_out)
                texts[label] = (tokenizer.decode(ours_out), tokenizer.decode(peer_out))
                warm = ((ours, names[:len(phase_loras)] or [""]), (peer, list(range(len(phase_loras))) or [None]))
                for server, adapters in warm:  # every adapter once, 4 tokens, all slots
                    with phase(server, f"the warm-up ({label})", timeout):
                        asyncio.run(server.load(prompts, adapters, 4, slots, slots))
                alternate(ours, peer, phase_rows, args.repeats, prompts, names, args.max_new_tokens, tok_s, busy)
            finally:
                peer.stop()
    finally:
        ours.stop()

    load_end = os.getloadavg()[0]
    peer_name = f"llama.cpp {outtype.upper()}"
    print(f"\nadapterserve --dtype {OUR_DTYPE[args.precision]} vs llama-server ({gguf.name}, F16 KV, "
          f"{args.llama_kv} KV), "
          f"{args.threads} threads each, greedy, {args.max_new_tokens} forced new tokens, chat prompts of "
          f"{statistics.mean(map(len, prompts)):.0f} tokens, medians of {args.repeats} alternating rounds; "
          f"1-min load average {load_start:.1f} at start, {load_end:.1f} at end"
          + (" (host busy: figures indicative)" if load_start > 1.0 or load_end > args.threads + 1.5 else "") + "\n")
    print(markdown_table(result_rows(tok_s, rows, peer_name)))
    print("\ngreedy tokens identical before the first difference (of "
          f"{args.max_new_tokens}): " + ", ".join(f"{k} {v}" for k, v in agreement.items()))
    for label, (a, b) in texts.items():
        print(f"greedy {label}, adapterserve: {a[:160]!r}\ngreedy {label}, llama.cpp:    {b[:160]!r}")
    print("threads busy over 5% of the last round (% CPU): " + "; ".join(
        f"{w}: " + ", ".join(f"{s} {v}" for s, v in d.items()) for w, d in busy.items()))
    print(json.dumps({"per_round_tok_s": {w: {s: [round(x, 1) for x in v] for s, v in d.items()}
                                          for w, d in tok_s.items()}, "agreement": agreement,
                      "busy_threads": busy}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
