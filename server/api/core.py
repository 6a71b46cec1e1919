"""Protocol-neutral generation: the one validated path both gRPC and HTTP requests take.

Hops of one request, all in this file: ``GenerationCore.start`` acquires the adapter, tokenizes,
validates the sampling settings (``server.api.validation``: one set of rules and limits) and
submits to the engine; ``Generation.events`` relays the engine's events until the FinishEvent,
enforcing the deadline and turning a client's cancel into an engine cancel; ``Generation.close``
records metrics and the one log line per request, exactly once whatever the outcome.

Failures raise :class:`GenerationError` carrying a canonical status (``grpc.StatusCode``: the
shared vocabulary of metrics, logs and both APIs); gRPC aborts with it, HTTP maps it to an
OpenAI error body. Thread domain: the asyncio event loop only (the engine's events are handed
over by an :class:`EventPump`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from adapterserve.v1 import adapterserve_pb2 as pb
from server.adapters.catalog import AdapterCatalog
from server.adapters.lazy import LazyAdapters
from server.api.errors import error_message, status_for
from server.api.validation import Limits, adapter_mix, prompt_ids, sampling
from server.engine.engine import Engine
from server.engine.request import ErrorEvent, FinishEvent, Request, TokenEvent
from server.metrics import OTHER_LABEL, ServerMetrics
from server.model.omp import TeamlessExecutor
from server.model.tokenizer import Tokenizer
from server.request_log import log_request

APIS = ("grpc", "http")

# A client's own deadline fires a little before ours (transit, timeout rounding): its cancel that
# close to our deadline is the deadline, not a user cancel.
DEADLINE_SLACK_S = 0.1


log = logging.getLogger("adapterserve.api")

class GenerationError(Exception):
    """A request failed; ``code`` is its canonical status, ``message`` names the field when it is bad input."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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


class Outcome:
    """What the request log and metrics need, filled in as the request progresses."""

    def __init__(self, request_id: str, adapter_id: str, api: str):
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.metrics_adapter = adapter_id  # the id metrics are labelled with
        self.api = api
        self.status = "OK"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish: FinishEvent | None = None
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.request: Request | None = None
        self.error = ""


class Generation:
    """One submitted request: iterate :meth:`events` for TokenEvents then one FinishEvent."""

    def __init__(self, core: GenerationCore, req: Request, queue: asyncio.Queue, outcome: Outcome,
                 stop_at: float | None):
        self.core = core
        self.request = req
        self.outcome = outcome
        self._queue = queue
        self._stop_at = stop_at
        self._closed = False
        core.active += 1

    @property
    def request_id(self) -> str:
        return self.outcome.request_id

    async def events(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        """TokenEvents then one FinishEvent; raises GenerationError on a failure or the deadline."""
        o = self.outcome
        try:
            while True:
                timeout = None if self._stop_at is None else max(0.0, self._stop_at - time.monotonic())
                try:
                    event = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    self.request.cancel("DEADLINE_EXCEEDED")
                    raise GenerationError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
                if isinstance(event, ErrorEvent):
                    raise GenerationError(getattr(grpc.StatusCode, event.code), event.message)
                if isinstance(event, TokenEvent):
                    o.completion_tokens += len(event.token_ids)
                    if o.first_token_s is None:
                        o.first_token_s = time.perf_counter() - o.started
                else:
                    o.finish = event
                yield event
                if isinstance(event, FinishEvent):
                    return
        except GenerationError as e:
            o.status, o.error = e.code.name, e.message
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or went away
            o.status = self._cancel_status()
            raise
        finally:
            self.close()

    def cancel(self) -> None:
        """The client went away: stop the engine request (its KV pages are freed at the next step)."""
        if self.outcome.finish is None and self.outcome.status == "OK":
            self.outcome.status = self._cancel_status()
        self.close()

    def close(self) -> None:
        """Cancel the engine request if it is still running; record metrics and the log line (once)."""
        if self._closed:
            return
        self._closed = True
        o = self.outcome
        if o.finish is None:
            if o.status == "OK":
                o.status = "CANCELLED"
            self.request.cancel(o.status if o.status in ("CANCELLED", "DEADLINE_EXCEEDED") else "CANCELLED")
        self.core.record(o)
        self.core.finished_one()

    def _cancel_status(self) -> str:
        """DEADLINE_EXCEEDED when the call's deadline has (about) passed, else CANCELLED.

        gRPC also cancels the handler at the deadline, racing our own deadline timer.
        """
        near = self._stop_at is not None and time.monotonic() >= self._stop_at - DEADLINE_SLACK_S
        return "DEADLINE_EXCEEDED" if near else "CANCELLED"


class GenerationCore:
    """Validates, submits and records generation requests for every API (event loop only)."""

    def __init__(self, engine: Engine, adapters: AdapterCatalog, tokenizer: Tokenizer, limits: Limits,
                 metrics: ServerMetrics | None = None, lazy: LazyAdapters | None = None):
        self.engine = engine
        self.adapters = adapters
        self.lazy = lazy  # --lazy-adapters: unregistered ids are loaded from the adapter store on first use
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self._event_pump: EventPump | None = None
        # Tokenizing a prompt (a 30k-character one takes tens of ms) and naming logprob tokens run here,
        # never on the event loop: other streams' messages and health checks go on meanwhile. Its own
        # pool, so adapter registrations waiting in the default executor never hold up tokenization.
        self.text_pool = TeamlessExecutor(2, thread_name_prefix="adapterserve-text")
        self.active = 0  # started generations not yet recorded
        self._idle: asyncio.Event | None = None

    def finished_one(self) -> None:
        self.active -= 1
        if not self.active and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        """Return once every started generation has sent its status and logged it, or after `timeout` (shutdown)."""
        if self.active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%d request(s) still being handled at shutdown", self.active)

    def _pump(self) -> EventPump:
        loop = asyncio.get_running_loop()
        if self._event_pump is None or self._event_pump.loop is not loop:
            self._event_pump = EventPump(loop)
        return self._event_pump

    async def start(self, request: pb.GenerateRequest, *, api: str,
                    timeout_s: float | None = None) -> Generation:
        """Validate and submit ``request``; raises GenerationError (already recorded) when it cannot start."""
        [gen] = await self.start_samples([request], api=api, timeout_s=timeout_s)
        return gen

    async def start_samples(self, requests: list[pb.GenerateRequest], *, api: str,
                            timeout_s: float | None = None) -> list[Generation]:
        """Validate and submit samples of one prompt (requests equal but for seed and request_id, e.g.
        OpenAI's ``n``) so that the engine computes the prompt once: each group of at most
        --max-batch-size is submitted as one request with the others as its forks (``Engine.submit``).
        Each sample stays its own request for metrics and the log. Raises GenerationError when they
        cannot all start: every sample is recorded (those already submitted are cancelled)."""
        outcomes = [Outcome(r.request_id or uuid.uuid4().hex, r.adapter_id, api) for r in requests]
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in requests]
        pump = self._pump()
        reqs: list[Request] = []
        submitted = 0
        try:
            for request, outcome, queue in zip(requests, outcomes, queues, strict=True):
                req = await self._build(request, outcome)
                req.emit = functools.partial(pump.post, queue)  # before submission: the engine may emit at once
                reqs.append(req)
            group = max(1, self.engine.max_batch_size)
            for k in range(0, len(reqs), group):
                leader, *leader.forks = reqs[k:k + group]
                self._submit(leader)
                submitted = min(len(reqs), k + group)
        except BaseException as e:  # a GenerationError, or the caller went away while a prompt was tokenized
            for req in reqs[submitted:]:
                if req.adapter is not None:
                    self.adapters.release(req.adapter)
            for req in reqs[:submitted]:
                req.cancel()
            if isinstance(e, GenerationError):
                for i, outcome in enumerate(outcomes):
                    outcome.status, outcome.error = (("CANCELLED", "") if i < submitted else (e.code.name, e.message))
                    outcome.request = reqs[i] if i < submitted else None
                    self.record(outcome)
            raise
        stop_at = None if timeout_s is None else time.monotonic() + timeout_s
        gens = []
        for req, queue, outcome in zip(reqs, queues, outcomes, strict=True):
            outcome.request = req
            gens.append(Generation(self, req, queue, outcome, stop_at))
        return gens

    async def _build(self, request: pb.GenerateRequest, outcome: Outcome) -> Request:
        entry = None
        try:
            try:
                mix = adapter_mix(request, self.limits.max_adapters_per_request)
            except ValueError as e:
                raise GenerationError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            if mix:  # a weighted LoRA mix: every part acquired, or none
                await self._load_lazily([(f"adapters[{i}].adapter_id", a) for i, (a, _) in enumerate(mix)], outcome)
                try:
                    entry = self.adapters.acquire_mix(mix)
                except (LookupError, ValueError) as e:
                    outcome.metrics_adapter = OTHER_LABEL
                    raise GenerationError(status_for(e) or grpc.StatusCode.INVALID_ARGUMENT, error_message(e)) from e
                outcome.adapter_id = outcome.metrics_adapter = entry.adapter_id
            elif request.adapter_id:
                await self._load_lazily([("adapter_id", request.adapter_id)], outcome)
                try:
                    entry = self.adapters.acquire(request.adapter_id)
                except LookupError as e:
                    outcome.metrics_adapter = OTHER_LABEL  # unknown ids must not mint label values
                    raise GenerationError(grpc.StatusCode.NOT_FOUND, error_message(e)) from e
            prefix_len = entry.num_virtual_tokens if entry is not None else 0
            try:
                ids = await asyncio.get_running_loop().run_in_executor(
                    self.text_pool, prompt_ids, request, self.tokenizer, self.limits.vocab_size)
                outcome.prompt_tokens = len(ids)
                params = sampling(request, len(ids), prefix_len, self.limits)
            except ValueError as e:
                raise GenerationError(status_for(e) or grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
            # emit is replaced in start() before submission
            return Request(request_id=outcome.request_id, prompt_ids=ids, sampling=params,
                           emit=lambda ev: None, adapter=entry)
        except BaseException:  # GenerationError, or the caller went away while its prompt was tokenized
            if entry is not None:
                self.adapters.release(entry)
            raise

    async def _load_lazily(self, named: list[tuple[str, str]], outcome: Outcome) -> None:
        """With --lazy-adapters, register each (field, adapter id) not registered yet from the adapter store,
        off the event loop, one load per id however many requests wait for it (server.adapters.lazy).
        Raises GenerationError: NOT_FOUND when the store has no such folder, else the status RegisterAdapter
        would give, the message naming the request's field."""
        if self.lazy is None:
            return
        loads = []
        for field, adapter_id in named:
            try:
                loads.append((field, self.lazy.ensure(adapter_id)))
            except ValueError as e:  # an id the store cannot hold ('..', '/', ...)
                raise self._load_error(field, e, outcome) from e
        for field, load in loads:
            try:
                if load.done():  # registered already: no loop round trip
                    load.result()
                else:  # shield: a waiter that goes away must not cancel the load the others wait for
                    await asyncio.shield(asyncio.wrap_future(load))
            except Exception as e:
                raise self._load_error(field, e, outcome) from e

    @staticmethod
    def _load_error(field: str, e: Exception, outcome: Outcome) -> GenerationError:
        outcome.metrics_adapter = OTHER_LABEL  # ids that never loaded must not mint label values
        code = status_for(e)
        if code is None:
            log.error("loading an adapter from the store failed", exc_info=e)
            code = grpc.StatusCode.INTERNAL
        message = error_message(e)
        return GenerationError(code, message if code == grpc.StatusCode.NOT_FOUND else f"{field}: {message}")

    def _submit(self, req: Request) -> None:
        """Hand `req` (and its forks) to the engine; the caller releases their adapters on failure."""
        try:
            self.engine.submit(req)
        except Exception as e:
            code = status_for(e) or grpc.StatusCode.INTERNAL
            raise GenerationError(code, error_message(e)) from e

    def record(self, o: Outcome) -> None:
        """Metrics and one log line for a finished request; every latency is measured from its arrival."""
        total = time.perf_counter() - o.started
        f, r = o.finish, o.request
        ttft = o.first_token_s
        tpot = None
        if o.status == "OK" and ttft is not None and o.completion_tokens > 1:  # a full request's pace only
            tpot = (total - ttft) / (o.completion_tokens - 1)
        queue = None
        if r is not None and r.admitted_at is not None:
            queue = r.queue_s  # preempted time included
        if self.metrics is not None:
            self.metrics.request_finished(o.metrics_adapter, o.status, o.prompt_tokens, o.completion_tokens,
                                          total_s=total, ttft_s=ttft, tpot_s=tpot, api=o.api)
        log_request(o.request_id, o.adapter_id, o.status, o.prompt_tokens, o.completion_tokens,
                    queue_ms=None if queue is None else queue * 1000, ttft_ms=None if ttft is None else ttft * 1000,
                    total_ms=total * 1000, finish_reason=None if f is None else f.reason.value,
                    error=o.error or None, api=o.api)
