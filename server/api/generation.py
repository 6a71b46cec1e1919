"""GenerationService: validate, submit to the engine, relay its events as responses.

Every request ends in exactly one status, recorded in metrics and in one log line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.adapters.catalog import AdapterCatalog
from server.api.errors import error_message, status_for
from server.api.validation import Limits, prompt_ids, sampling
from server.engine.engine import Engine
from server.engine.request import ErrorEvent, FinishEvent, Request, TokenEvent
from server.metrics import OTHER_LABEL, ServerMetrics
from server.model.tokenizer import Tokenizer
from server.request_log import log_request

log = logging.getLogger("adapterserve.api")


class EventPump:
    """Hands engine events to the event loop with one wake-up per burst instead of one per event.

    The engine thread emits an event for every running request each step; waking the loop once
    and draining them all keeps the loop (and its GIL time) out of the engine thread's way.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event: object) -> None:
        """Called from the engine thread."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        for queue, event in items:
            queue.put_nowait(event)


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Outcome:
    """What the request log and metrics need, filled in as the request progresses."""

    def __init__(self, request_id: str, adapter_id: str):
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.metrics_adapter = adapter_id  # the id metrics are labelled with
        self.status = "OK"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish: FinishEvent | None = None
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.request: Request | None = None
        self.error = ""


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, engine: Engine, adapters: AdapterCatalog, tokenizer: Tokenizer, limits: Limits,
                 model_info: pb.ModelInfo, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_info = model_info
        self.metrics = metrics
        self._event_pump: EventPump | None = None

    def _pump(self) -> EventPump:
        loop = asyncio.get_running_loop()
        if self._event_pump is None or self._event_pump.loop is not loop:
            self._event_pump = EventPump(loop)
        return self._event_pump

    async def GetModelInfo(self, request, context):
        return self.model_info

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        out = pb.GenerateResponse(adapter_id=request.adapter_id)
        async for event, outcome in self._run(request, context):
            if isinstance(event, TokenEvent):
                out.text += event.text
                out.token_ids.extend(event.token_ids)
                out.logprobs.extend(self._logprobs(event))
            else:
                out.finish_reason = pb.FinishReason.Value(event.reason.value)
                out.usage.CopyFrom(pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))
                out.timings.CopyFrom(_timings(event))
                out.request_id = outcome.request_id
        return out

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        async for event, outcome in self._run(request, context):
            if isinstance(event, TokenEvent):
                yield pb.GenerateStreamResponse(
                    text=event.text, token_ids=event.token_ids, logprobs=self._logprobs(event),
                    request_id=outcome.request_id, adapter_id=request.adapter_id)
            else:
                yield pb.GenerateStreamResponse(
                    finish_reason=pb.FinishReason.Value(event.reason.value),
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                    timings=_timings(event), request_id=outcome.request_id, adapter_id=request.adapter_id)

    # ------------------------------------------------------------------ the request's life
    async def _run(self, request: pb.GenerateRequest, context):
        """Yield (event, outcome) pairs: TokenEvents then one FinishEvent; abort with a status otherwise."""
        outcome = _Outcome(request.request_id or uuid.uuid4().hex, request.adapter_id)
        req: Request | None = None
        stop_at: float | None = None
        try:
            req = self._build(request, outcome)
            queue: asyncio.Queue = asyncio.Queue()
            pump = self._pump()
            req.emit = lambda ev: pump.post(queue, ev)
            outcome.request = req
            self._submit(req)
            deadline = context.time_remaining()
            stop_at = None if deadline is None else time.monotonic() + deadline
            while True:
                timeout = None if stop_at is None else max(0.0, stop_at - time.monotonic())
                try:
                    event = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    req.cancel("DEADLINE_EXCEEDED")
                    raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
                if isinstance(event, ErrorEvent):
                    raise RequestFailed(getattr(grpc.StatusCode, event.code), event.message)
                if isinstance(event, TokenEvent):
                    outcome.completion_tokens += len(event.token_ids)
                    if outcome.first_token_s is None:
                        outcome.first_token_s = time.perf_counter() - outcome.started
                else:
                    outcome.finish = event
                yield event, outcome
                if isinstance(event, FinishEvent):
                    return
        except RequestFailed as e:
            outcome.status, outcome.error = e.code.name, e.message
            await context.abort(e.code, e.message)
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or went away
            outcome.status = _cancel_status(stop_at)
            if req is not None:
                req.cancel(outcome.status)
            raise
        finally:
            self._record(outcome)

    def _build(self, request: pb.GenerateRequest, outcome: _Outcome) -> Request:
        entry = None
        try:
            if request.adapter_id:
                try:
                    entry = self.adapters.acquire(request.adapter_id)
                except LookupError as e:
                    outcome.metrics_adapter = OTHER_LABEL  # unknown ids must not mint label values
                    raise RequestFailed(grpc.StatusCode.NOT_FOUND, error_message(e)) from e
            prefix_len = entry.spec.num_virtual_tokens if entry is not None else 0
            try:
                ids = prompt_ids(request, self.tokenizer, self.limits.vocab_size)
                outcome.prompt_tokens = len(ids)
                params = sampling(request, len(ids), prefix_len, self.limits)
            except ValueError as e:
                raise RequestFailed(status_for(e) or grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            return Request(request_id=outcome.request_id, prompt_ids=ids, sampling=params,
                           emit=lambda ev: None, adapter=entry)
        except RequestFailed:
            if entry is not None:
                self.adapters.release(entry)
            raise

    def _submit(self, req: Request) -> None:
        try:
            self.engine.submit(req)
        except Exception as e:
            if req.adapter is not None:
                self.adapters.release(req.adapter)
            code = status_for(e) or grpc.StatusCode.INTERNAL
            raise RequestFailed(code, error_message(e)) from e

    def _logprobs(self, event: TokenEvent) -> list[pb.TokenLogprob]:
        tok = self.tokenizer.token_text
        return [
            pb.TokenLogprob(token_id=lp.token_id, token=tok(lp.token_id), logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, token=tok(t), logprob=v) for t, v in lp.top])
            for lp in event.logprobs
        ]

    def _record(self, o: _Outcome) -> None:
        # Every latency here is measured from the start of the RPC, whatever the outcome.
        total = time.perf_counter() - o.started
        f, r = o.finish, o.request
        ttft = o.first_token_s
        tpot = None
        if o.status == "OK" and ttft is not None and o.completion_tokens > 1:  # a full request's pace only
            tpot = (total - ttft) / (o.completion_tokens - 1)
        queue = None
        if r is not None and r.admitted_at is not None:
            queue = r.admitted_at - r.submitted_at
        if self.metrics is not None:
            self.metrics.request_finished(o.metrics_adapter, o.status, o.prompt_tokens, o.completion_tokens,
                                          total_s=total, ttft_s=ttft, tpot_s=tpot)
        log_request(o.request_id, o.adapter_id, o.status, o.prompt_tokens, o.completion_tokens,
                    queue_ms=None if queue is None else queue * 1000, ttft_ms=None if ttft is None else ttft * 1000,
                    total_ms=total * 1000, finish_reason=None if f is None else f.reason.value,
                    error=o.error or None)


# A client's own deadline fires a little before ours (transit, timeout rounding): its cancel that
# close to our deadline is the deadline, not a user cancel.
DEADLINE_SLACK_S = 0.1


def _cancel_status(stop_at: float | None) -> str:
    """DEADLINE_EXCEEDED when the call's deadline has (about) passed, else CANCELLED.

    gRPC also cancels the handler at the deadline, racing the servicer's own deadline timer.
    """
    near = stop_at is not None and time.monotonic() >= stop_at - DEADLINE_SLACK_S
    return "DEADLINE_EXCEEDED" if near else "CANCELLED"


def _timings(ev: FinishEvent) -> pb.Timings:
    return pb.Timings(queue_ms=ev.queue_s * 1000, time_to_first_token_ms=(ev.ttft_s or 0.0) * 1000,
                      total_ms=ev.total_s * 1000)
