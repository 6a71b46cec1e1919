"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
/health, /metrics and adapter admin, on the same engine and the same validated path as gRPC.

Hops of a completion: the pydantic body -> ``convert`` (one GenerateRequest per choice) ->
``GenerationCore.start`` for each choice (validation, adapter, submit; errors before anything is
sent become an OpenAI error body) -> ``_merged_events`` (the choices' events in arrival order,
cancelled when the client disconnects) -> JSON or server-sent events ending with ``[DONE]``.
Thread domain: the event loop; adapter admin runs in worker threads, as over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from adapterserve.v1 import adapterserve_pb2 as pb
from server.api.core import Generation, GenerationCore, GenerationError
from server.api.http import convert
from server.api.http.admin import admin_router
from server.api.http.errors import OpenAIError
from server.api.http.schemas import ChatCompletionRequest, CompletionRequest
from server.api.security import token_denial
from server.engine.request import FinishEvent, TokenEvent

log = logging.getLogger("adapterserve.http")
GENERATIONS = "adapterserve.generations"  # ASGI scope key: the engine requests this HTTP request started


@dataclass
class HttpContext:
    """What the HTTP API needs from the server (built by server.app)."""

    core: GenerationCore
    adapter_service: object  # server.api.adapters.AdapterServicer (register_blocking, manager)
    model_name: str
    auth_token: str
    admin_token: str
    registry: object  # the prometheus CollectorRegistry of the server's metrics
    serving: Callable[[], bool]  # the health state gRPC's health service reports
    max_body_bytes: int
    created: int = 0


class HttpApp:
    """The ASGI entry: counts requests in flight (the drain waits for them) and answers 413 with an
    OpenAI body for a declared Content-Length over the limit (FastAPI's max_body_size still guards
    chunked bodies)."""

    def __init__(self, app: FastAPI, limit: int):
        self.app, self.limit = app, limit
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                err = OpenAIError(413, f"request body: {int(value)} bytes exceed the limit of {self.limit} "
                                       "(--max-message-bytes)")
                await err.response()(scope, receive, send)
                return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)  # returns once the response (a whole stream) is sent
        finally:
            self.in_flight -= 1
            for g in scope.get(GENERATIONS, ()):  # a stream that never started (client gone): stop its requests
                g.cancel()  # a no-op for finished ones


def build_app(ctx: HttpContext) -> HttpApp:
    """The FastAPI application serving ``ctx``."""
    app = FastAPI(title="adapterserve", docs_url=None, redoc_url=None, max_body_size=ctx.max_body_bytes)
    app.state.ctx = ctx
    ctx.created = ctx.created or int(time.time())
    _error_handlers(app)

    def user(request: Request) -> None:
        _authorize(ctx, request, None)

    app.include_router(admin_router(ctx, lambda request, what: _authorize(ctx, request, what)),
                       dependencies=[Depends(user)])

    @app.get("/health")
    async def health() -> Response:
        if ctx.serving():
            return PlainTextResponse("SERVING")
        return PlainTextResponse("NOT_SERVING", status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(user)])
    async def models() -> dict:
        base = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "adapterserve",
                "root": ctx.model_name, "parent": None}
        data = [base] + [
            {"id": e.adapter_id, "object": "model", "created": int(e.registered_at), "owned_by": "adapterserve",
             "root": e.adapter_id, "parent": ctx.model_name}
            for e in ctx.adapter_service.manager.list() if not e.draining]
        if ctx.core.lazy is not None:  # --lazy-adapters: the store's ids not loaded yet can be asked for too
            listed = {m["id"] for m in data}
            stored = await asyncio.get_running_loop().run_in_executor(None, ctx.core.lazy.store.list_ids)
            data += [{"id": i, "object": "model", "created": ctx.created, "owned_by": "adapterserve", "root": i,
                      "parent": ctx.model_name} for i in stored if i not in listed]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=[Depends(user)])
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        model, adapter = _resolve_model(ctx, body.model)
        rid = "chatcmpl-" + uuid.uuid4().hex
        return await _complete(ctx, request, convert.chat_requests(body, adapter, rid), body.n, body, model, rid,
                               chat=True)

    @app.post("/v1/completions", dependencies=[Depends(user)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model, adapter = _resolve_model(ctx, body.model)
        rid = "cmpl-" + uuid.uuid4().hex
        return await _complete(ctx, request, convert.completion_requests(body, adapter, rid), body.n, body, model,
                               rid, chat=False)

    return HttpApp(app, ctx.max_body_bytes)


# ---------------------------------------------------------------------------------- helpers
def _authorize(ctx: HttpContext, request: Request, admin_call: str | None) -> None:
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    denial = token_denial(token, ctx.auth_token, ctx.admin_token, admin_call)
    if denial is not None:
        raise OpenAIError.from_status(*denial)


def _resolve_model(ctx: HttpContext, model: str) -> tuple[str, str]:
    """(model id to report, adapter id or "" for the base): "", the base id, an adapter id or base:adapter."""
    if model in ("", ctx.model_name):
        return ctx.model_name, ""
    base, sep, adapter = model.rpartition(":")
    name = adapter if sep and base == ctx.model_name else model
    try:
        ctx.adapter_service.manager.get(name)
    except LookupError:
        if ctx.core.lazy is not None:  # --lazy-adapters: the core loads it from the store, or answers 404
            return model, name
        raise OpenAIError(404, f"model: {model!r} is neither the base model {ctx.model_name!r} nor a registered "
                               "adapter (GET /v1/models lists them)", param="model", code="model_not_found") from None
    return model, name


async def _start_all(ctx: HttpContext, requests: list[pb.GenerateRequest], n: int) -> list[Generation]:
    """Start every choice (choice p*n + j is sample j of prompt p: each prompt's n samples go in together,
    so its prompt is prefilled once); on the first failure cancel those started and raise its OpenAI error.

    Shutdown follows gRPC's phases (``ServerApp.shutdown``): while draining, /health answers 503 but
    completions are still accepted; once the engine closes, the core refuses them (UNAVAILABLE: 503).
    """
    gens: list[Generation] = []
    try:
        for p in range(0, len(requests), n):
            gens += await ctx.core.start_samples(requests[p:p + n], api="http")
    except GenerationError as e:
        for g in gens:
            g.cancel()
        raise _error(e) from None
    return gens


def _error(e: GenerationError) -> OpenAIError:
    """The OpenAI error for a core failure, its field renamed to the body's (max_new_tokens -> max_tokens)."""
    if e.code.name == "NOT_FOUND":  # the adapter went away between the lookup and the start
        return OpenAIError(404, e.message, param="model", code="model_not_found")
    param, message = convert.openai_field(e.message)
    return OpenAIError.from_status(e.code, message, param=param)


async def _merged_events(gens: list[Generation], request: Request) -> AsyncIterator[tuple[int, object]]:
    """(choice index, TokenEvent | FinishEvent | GenerationError) in arrival order.

    A watcher waits for the client's disconnect (uvicorn reports it when the socket closes, whether
    or not anything is being sent) and cancels every choice's engine request right there, without
    waiting for this generator's consumer to be scheduled: the engine frees their KV pages before
    its next forward (tests/http/test_openai_errors.py counts the steps).
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for ev in g.events():
                queue.put_nowait((i, ev))
        except GenerationError as e:
            queue.put_nowait((i, e))

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for g in gens:  # a no-op for finished ones
            g.cancel()
        queue.put_nowait((-1, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    watcher = asyncio.create_task(watch_disconnect())
    try:
        finished = 0
        while finished < len(gens):
            i, ev = await queue.get()
            if i < 0:
                return  # the client went away: `finally` cancels every choice
            if not isinstance(ev, TokenEvent):
                finished += 1
            yield i, ev
            if isinstance(ev, GenerationError):
                return
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()
        for g in gens:
            g.cancel()


async def _complete(ctx: HttpContext, request: Request, requests: list[pb.GenerateRequest], n: int, body,
                    model: str, rid: str, *, chat: bool) -> Response:
    gens = await _start_all(ctx, requests, n)
    request.scope[GENERATIONS] = gens
    shape = _Shape(ctx, model, rid, chat, len(requests), n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(shape, _merged_events(gens, request), include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async with aclosing(_merged_events(gens, request)) as events:
        async for i, ev in events:
            if isinstance(ev, GenerationError):
                raise _error(ev)
            shape.add(i, ev)
    return JSONResponse(await shape.response())


async def _sse(shape: _Shape, events, include_usage: bool) -> AsyncIterator[bytes]:
    async with aclosing(events):
        if shape.chat:
            for i in range(shape.choices):
                yield _event(shape.chunk(i, {"role": "assistant", "content": ""}, None, include_usage))
        async for i, ev in events:
            if isinstance(ev, GenerationError):
                yield _event(_error(ev).body())  # the openai client raises APIError on an `error` event
                return
            yield _event(await shape.stream_chunk(i, ev, include_usage))
    if include_usage:
        yield _event({**shape.chunk_head(), "choices": [], "usage": shape.usage()})
    yield format_sse_event(data_str="[DONE]")


def _event(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, separators=(",", ":")))


class _Shape:
    """Builds one response in the chat or legacy completion shape from the choices' events.

    Logprob token texts (a detokenization per token and alternative) are named on the core's text
    pool, never on the event loop, as gRPC's are; the TokenEvents' text comes detokenized from the
    engine thread.
    """

    def __init__(self, ctx: HttpContext, model: str, rid: str, chat: bool, choices: int, n: int):
        self.token_text = ctx.core.tokenizer.token_text
        self.text_pool = ctx.core.text_pool
        self.model, self.rid, self.chat, self.choices, self.n = model, rid, chat, choices, n
        self.created = int(time.time())
        self.text = [""] * choices
        self.logprobs: list[list] = [[] for _ in range(choices)]
        self.want_logprobs = [False] * choices
        self.finish: list[FinishEvent | None] = [None] * choices

    def add(self, i: int, ev: object) -> None:
        if isinstance(ev, TokenEvent):
            self.text[i] += ev.text
            self.logprobs[i].extend(ev.logprobs)
            self.want_logprobs[i] = self.want_logprobs[i] or bool(ev.logprobs)
        else:
            self.finish[i] = ev

    def usage(self) -> dict:
        # the prompt counts once per prompt (not once per sample), as OpenAI counts it with n > 1
        prompt = sum(f.prompt_tokens for k, f in enumerate(self.finish) if f is not None and k % self.n == 0)
        completion = sum(f.completion_tokens for f in self.finish if f is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk_head(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, i: int, items: list, offset: int = 0) -> dict | None:
        if not items and not self.want_logprobs[i]:
            return None
        if self.chat:
            return {"content": convert.chat_logprobs(items, self.token_text), "refusal": None}
        return convert.completion_logprobs(items, self.token_text, offset)

    def chunk(self, i: int, delta: dict, finish: str | None, include_usage: bool, logprobs=None) -> dict:
        if self.chat:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}
        out = {**self.chunk_head(), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    async def stream_chunk(self, i: int, ev: object, include_usage: bool) -> dict:
        offset = len(self.text[i])
        self.add(i, ev)
        if isinstance(ev, TokenEvent):
            lp = await self._off_loop(self._logprobs, i, ev.logprobs, offset) if ev.logprobs else None
            return self.chunk(i, {"content": ev.text}, None, include_usage, lp)
        return self.chunk(i, {}, convert.finish_reason(ev), include_usage)

    def _all_logprobs(self) -> list[dict | None]:
        return [self._logprobs(i, self.logprobs[i]) for i in range(self.choices)]

    async def response(self) -> dict:
        lps = await self._off_loop(self._all_logprobs) if any(self.want_logprobs) else [None] * self.choices
        choices = []
        for i in range(self.choices):
            lp = lps[i]
            finish = convert.finish_reason(self.finish[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i],
                                                        "refusal": None},
                                "logprobs": lp, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": self.text[i], "logprobs": lp, "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return OpenAIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        log.exception("HTTP request failed")
        return OpenAIError(500, f"internal error: {type(exc).__name__}").response()
