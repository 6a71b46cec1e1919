"""An in-process stand-in for the adapterserve server, for client, CLI and auth tests.

It runs a real ``grpc.aio`` server on its own thread and event loop, built with the real
:func:`server.api.security.server_interceptors` and :func:`server.api.security.add_listen_port`,
so authentication and TLS are exercised for real; only the servicers are canned:

* text generation echoes: the completion of prompt ``P`` with adapter ``A`` is ``"A: P"``
  (``"base: P"`` without adapter), one token per character (id = ``ord(char)``), cut at
  ``max_new_tokens`` (finish "length") or at the first stop string (finish "stop"),
  else finish "eos"; streams send 4 characters per chunk, then a final chunk with no text
  carrying finish_reason/usage/timings;
* magic prompts: ``__slow__`` sleeps 5 s, ``__slow_stream__`` streams "first" then sleeps 5 s
  (cancellations of both are recorded in ``state.cancelled`` by request id), ``__unavailable__`` / ``__exhausted__`` fail with
  UNAVAILABLE / RESOURCE_EXHAUSTED, ``__midstream_error__`` streams one chunk then INTERNAL;
* adapters live in a dict; uploads are checked for JSON config and a safetensors header;
* ``fail_next[method] = n`` makes the next n calls of that method fail with UNAVAILABLE;
  ``calls[method]`` counts calls that reached the servicer (after authentication), ``metadata[method]``
  is the invocation metadata of the last one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import struct
import threading
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.api.security import add_listen_port, server_interceptors
from server.config import ServerConfig

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
PEFT_TYPES = {"LORA": pb.LORA, "PROMPT_TUNING": pb.PROMPT_TUNING, "P_TUNING": pb.P_TUNING,
              "PREFIX_TUNING": pb.PREFIX_TUNING}


class _State:
    def __init__(self, adapter_root: Path | None) -> None:
        self.adapters: dict[str, pb.Adapter] = {}
        self.uploads: dict[str, pb.AdapterFiles] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail_next: collections.Counter[str] = collections.Counter()
        self.ended_leases: set[str] = set()  # lease ids of generations that ended (their metadata named them)
        self.cancelled: list[str] = []
        self.metadata: dict[str, tuple] = {}  # method -> the invocation metadata of its last call
        self.adapter_root = adapter_root

    async def enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] += 1
        self.metadata[method] = tuple((m.key, m.value) for m in context.invocation_metadata() or ())
        self.ended_leases.update(v for k, v in self.metadata[method] if k == "adapterserve-lease")  # (instant)
        if self.fail_next[method] > 0:
            self.fail_next[method] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: injected outage")


def _prompt_text(req: pb.GenerateRequest) -> tuple[str, int]:
    """(text the fake echoes, prompt token count)."""
    kind = req.WhichOneof("input")
    if kind == "prompt":
        return req.prompt, len(req.prompt)
    if kind == "messages":
        msgs = req.messages.messages
        return (msgs[-1].content if msgs else ""), sum(len(m.content) for m in msgs)
    if kind == "prompt_token_ids":
        return "".join(chr(t) for t in req.prompt_token_ids.ids), len(req.prompt_token_ids.ids)
    return "", 0


class FakeGeneration(pb_grpc.GenerationServiceServicer):
    """Echoing GenerationService; see the module docstring."""

    def __init__(self, state: _State) -> None:
        self.s = state

    async def _complete(self, req: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        text, n_prompt = _prompt_text(req)
        if not text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        p = req.params
        if p.HasField("temperature") and p.temperature < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"temperature must be >= 0, got {p.temperature:g}")
        if req.top_logprobs > 20:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"top_logprobs must be in 0..20, got {req.top_logprobs}")
        if req.adapter_id and req.adapter_id not in self.s.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter '{req.adapter_id}' is not registered")
        if text == "__unavailable__":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if text == "__exhausted__":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full (max_queue=256)")
        if text == "__slow__":
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.s.cancelled.append(req.request_id)
                raise
        out = f"{req.adapter_id or 'base'}: {text}"
        finish = pb.EOS
        cut = min((i for i in (out.find(s) for s in p.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            out, finish = out[:cut], pb.STOP
        limit = p.max_new_tokens if p.HasField("max_new_tokens") else 256
        if len(out) > limit:
            out, finish = out[:limit], pb.LENGTH
        logprobs = []
        if req.return_logprobs:
            for c in out:
                top = [pb.TopLogprob(token_id=ord(c) + k, token=chr(ord(c) + k), logprob=-0.5 - k)
                       for k in range(req.top_logprobs)]
                logprobs.append(pb.TokenLogprob(token_id=ord(c), token=c, logprob=-0.5, top=top))
        return out, finish, n_prompt, logprobs

    async def Generate(self, request, context):
        await self.s.enter("Generate", context)
        out, finish, n_prompt, logprobs = await self._complete(request, context)
        return pb.GenerateResponse(
            text=out, token_ids=[ord(c) for c in out], finish_reason=finish,
            usage=pb.Usage(prompt_tokens=n_prompt, completion_tokens=len(out)), logprobs=logprobs,
            adapter_id=request.adapter_id, request_id=request.request_id or "fake-1",
            timings=pb.Timings(queue_ms=1.0, time_to_first_token_ms=2.0, total_ms=3.0))

    async def GenerateStream(self, request, context):
        await self.s.enter("GenerateStream", context)
        rid = request.request_id or "fake-1"
        magic = _prompt_text(request)[0]
        if magic == "__midstream_error__":
            yield pb.GenerateStreamResponse(text="partial", request_id=rid)
            await context.abort(grpc.StatusCode.INTERNAL, "engine step failed")
        if magic == "__slow_stream__":
            yield pb.GenerateStreamResponse(text="first", request_id=rid)
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                self.s.cancelled.append(rid)
                raise
        out, finish, n_prompt, logprobs = await self._complete(request, context)
        for i in range(0, len(out), 4):
            piece = out[i:i + 4]
            yield pb.GenerateStreamResponse(
                text=piece, token_ids=[ord(c) for c in piece], logprobs=logprobs[i:i + 4],
                request_id=rid, adapter_id=request.adapter_id)
            await asyncio.sleep(0)
        yield pb.GenerateStreamResponse(
            finish_reason=finish, usage=pb.Usage(prompt_tokens=n_prompt, completion_tokens=len(out)),
            timings=pb.Timings(queue_ms=1.0, time_to_first_token_ms=2.0, total_ms=3.0),
            request_id=rid, adapter_id=request.adapter_id)

    async def GetModelInfo(self, request, context):
        await self.s.enter("GetModelInfo", context)
        return pb.ModelInfo(
            name="fake-model", architecture="LlamaForCausalLM", vocab_size=49152, max_context=2048,
            dtype="float32", device="cpu", num_layers=2, hidden_size=64, version="0.1.0",
            limits=pb.Limits(max_context_tokens=2048, kv_cache_tokens=32768, max_batch_size=32,
                             max_queue=256, default_max_new_tokens=256, max_top_logprobs=20,
                             max_lora_rank=64, max_virtual_tokens=128, max_resident_adapters=16),
            kernels=pb.Kernels(matmul="onednn", dtype="float32", kv_dtype="float32", cpu_capability="AVX2",
                               cpu_features=["avx2", "fma"]))


def _check_safetensors(data: bytes) -> str | None:
    if len(data) < 8:
        return "adapter_model.safetensors: truncated"
    (n,) = struct.unpack("<Q", data[:8])
    try:
        json.loads(data[8:8 + n])
    except ValueError:
        return "adapter_model.safetensors: truncated or corrupt header"
    return None


class FakeAdapters(pb_grpc.AdapterServiceServicer):
    """In-memory AdapterService."""

    def __init__(self, state: _State) -> None:
        self.s = state

    async def RegisterAdapter(self, request, context):
        await self.s.enter("RegisterAdapter", context)
        aid = request.adapter_id
        if not ID_RE.match(aid) or aid in (".", ".."):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"adapter_id must be 1-128 chars of [A-Za-z0-9._-], got {aid!r}")
        if aid in self.s.adapters and not request.replace:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"adapter '{aid}' is already registered (set replace)")
        if request.WhichOneof("source") == "path":
            rel = Path(request.path)
            if rel.is_absolute() or ".." in rel.parts:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"path escapes --adapter-root: {rel}")
            folder = (self.s.adapter_root or Path("/nonexistent")) / rel
            if not (folder / "adapter_config.json").is_file():
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter folder at {rel}")
            files = pb.AdapterFiles(config_json=(folder / "adapter_config.json").read_bytes(),
                                    safetensors=(folder / "adapter_model.safetensors").read_bytes())
        elif request.WhichOneof("source") == "files":
            files = request.files
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give path or files")
        try:
            config = json.loads(files.config_json)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "adapter_config.json is not valid JSON")
        problem = _check_safetensors(files.safetensors)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        kind = PEFT_TYPES.get(config.get("peft_type", ""))
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unsupported peft_type {config.get('peft_type')!r}")
        merged = request.merge and kind == pb.LORA
        self.s.uploads[aid] = files
        self.s.adapters[aid] = adapter = pb.Adapter(
            adapter_id=aid, type=kind, rank=config.get("r", 0) if kind == pb.LORA else 0,
            num_virtual_tokens=config.get("num_virtual_tokens", 0) if kind != pb.LORA else 0,
            target_modules=sorted(config.get("target_modules") or []),
            size_bytes=len(files.safetensors), state=pb.MERGED if merged else pb.REGISTERED,
            pinned=request.pin, merged=merged, load_ms=1.5,
            base_model=config.get("base_model_name_or_path", ""))
        return adapter

    async def UnregisterAdapter(self, request, context):
        await self.s.enter("UnregisterAdapter", context)
        if self.s.adapters.pop(request.adapter_id, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter '{request.adapter_id}' is not registered")
        return pb.UnregisterAdapterResponse(adapter_id=request.adapter_id)

    async def ListAdapters(self, request, context):
        await self.s.enter("ListAdapters", context)
        return pb.ListAdaptersResponse(adapters=[self.s.adapters[k] for k in sorted(self.s.adapters)])

    async def GetAdapter(self, request, context):
        await self.s.enter("GetAdapter", context)
        adapter = self.s.adapters.get(request.adapter_id)
        if adapter is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter '{request.adapter_id}' is not registered")
        return adapter


class FakeRouting(pb_grpc.RoutingServiceServicer):
    """A cluster's lease, leasing this fake itself: answers its own address and a lease id, then stays
    open until a generation naming that id ended (``ended_leases``) or 5 s passed."""

    def __init__(self, state: _State, server: FakeServer) -> None:
        self.state = state
        self.server = server

    async def Lease(self, request, context):
        await self.state.enter("Lease", context)
        self.state.calls["lease:" + request.adapter_id] += 1
        lease_id = f"lease-{self.state.calls['Lease']}"
        yield pb.LeaseResponse(address=self.server.target, replica="fake", lease_id=lease_id)
        for _ in range(500):
            if lease_id in self.state.ended_leases:
                return
            await asyncio.sleep(0.01)


class FakeServer:
    """Start with ``FakeServer(cfg).start()``; ``.target`` to connect; ``.stop()`` when done."""

    def __init__(self, cfg: ServerConfig | None = None, host: str = "127.0.0.1",
                 adapter_root: Path | None = None) -> None:
        self.cfg = cfg or ServerConfig()
        self.host = host
        self.state = _State(adapter_root)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-adapterserve", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health: Any = None

    @property
    def target(self) -> str:
        """``host:port`` to connect to."""
        return f"{self.host}:{self.port}"

    @property
    def calls(self) -> collections.Counter[str]:
        """Calls per method that passed authentication."""
        return self.state.calls

    @property
    def metadata(self) -> dict[str, tuple]:
        """Method name -> the invocation metadata of its last call."""
        return self.state.metadata

    @property
    def fail_next(self) -> collections.Counter[str]:
        """Method name -> how many next calls fail with UNAVAILABLE."""
        return self.state.fail_next

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        server = grpc.aio.server(interceptors=server_interceptors(self.cfg))
        pb_grpc.add_GenerationServiceServicer_to_server(FakeGeneration(self.state), server)
        pb_grpc.add_AdapterServiceServicer_to_server(FakeAdapters(self.state), server)
        pb_grpc.add_RoutingServiceServicer_to_server(FakeRouting(self.state, self), server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([
            pb.DESCRIPTOR.services_by_name["GenerationService"].full_name,
            pb.DESCRIPTOR.services_by_name["AdapterService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ], server)
        self.port = add_listen_port(server, f"{self.host}:0", self.cfg)
        await server.start()
        self._server = server

    def start(self) -> FakeServer:
        """Start serving; returns self."""
        self._thread.start()
        self._run(self._start())
        return self

    def set_health(self, status: str) -> None:
        """Set the overall health status ("SERVING", "NOT_SERVING")."""
        value = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
        self._run(self._health.set("", value))

    def stop(self) -> None:
        """Stop the server and its thread."""
        if self._server is not None:
            self._run(self._server.stop(None))
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
