"""The step loop: one thread admits waiting requests, prefills them, and decodes every running
sequence together, one token per step (continuous batching: requests join and leave at any step).

Data path of one request through this file: ``submit`` -> waiting queue -> ``_admit`` (KV pages,
adapter slot, prefix KV) -> ``_prefill`` -> ``_decode`` (repeated) -> ``_finish`` (pages freed,
adapter released, FinishEvent emitted).

Threads of the process, and what each may touch:

- **event loop** (the main thread under ``python -m server``; ``adapterserve-grpc`` in tests): gRPC
  servicers, health, signals. Validates requests, takes and gives back adapter references
  (``AdapterCatalog``, lock-protected), ``Engine.submit`` (a lock-protected queue), ``Request.cancel``.
  Never model work, device tensors or engine state.
- **default executor workers** (``run_in_executor``): adapter registration (file reading and
  parsing, then ``AdapterCatalog.register``, which waits on an engine command), preloads.
- **engine thread** (``adapterserve-engine``, this file): the only one that touches the model, the
  KV cache, the running batch and adapter residency (slots, LRU, merges, prefix KV). Other threads
  reach it only through ``Engine.call`` / ``CommandQueue`` and the waiting queue. It hands events
  back through each request's ``emit`` (thread-safe, non-blocking).
- **watchdog** (``adapterserve-watchdog``): reads the engine's heartbeat; when the engine thread
  died or a step hangs past ``--watchdog-seconds`` it marks the engine failed (health NOT_SERVING,
  new requests UNAVAILABLE) and fails waiting requests. It never touches device state.
- **metrics HTTP** (prometheus_client's server thread): reads metric values only.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from server.engine.commands import CommandQueue
from server.engine.request import ErrorEvent, FinishEvent, FinishReason, Request, TokenEvent
from server.engine.sampler import sample
from server.engine.scheduler import PageAllocator, WaitingQueue
from server.metrics import ServerMetrics
from server.model.llama import PagedKVCache, StepInput
from server.model.tokenizer import Tokenizer
from server.model.transfer import to_device
from server.ports import AdapterReleaser, AdapterResidency, ModelRuntime, RequestRefused

T = TypeVar("T")

log = logging.getLogger("adapterserve.engine")


class EngineUnavailableError(Exception):
    """UNAVAILABLE: the engine takes no new requests (shutting down, or failed: see the message)."""


class Engine:
    """Owns the KV cache and the running batch; all model work happens on its thread."""

    def __init__(self, runtime: ModelRuntime, tokenizer: Tokenizer, adapters: AdapterResidency,
                 releaser: AdapterReleaser, commands: CommandQueue, *, kv_cache_tokens: int, page_size: int,
                 max_batch_size: int, max_queue: int, max_prefill_tokens: int, metrics: ServerMetrics | None = None,
                 watchdog_seconds: float = 0.0):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.adapters = adapters  # residency: engine thread only
        self.releaser = releaser  # the catalog's reference counts
        self.commands = commands
        self.metrics = metrics
        num_pages = max(1, kv_cache_tokens // page_size)
        self.allocator = PageAllocator(num_pages, page_size)
        self.cache = PagedKVCache(runtime.args, num_pages, page_size, runtime.dtype, runtime.device)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting = WaitingQueue(max_queue, commands.wakeup)
        self.running: list[Request] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.watchdog_seconds = watchdog_seconds  # 0 = no limit on one iteration
        self._iteration_started: float | None = None  # monotonic start of the running iteration, None when idle
        self._closed: str | None = None  # why new requests are refused (shutdown)
        self.failed: str | None = None  # why the engine stopped serving (thread died, step hung)
        self.on_failure: list[Callable[[str], None]] = []  # called once, from the failing thread

    # ------------------------------------------------------------------ public, any thread
    @property
    def kv_capacity_tokens(self) -> int:
        return self.allocator.num_pages * self.allocator.page_size

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="adapterserve-engine", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="adapterserve-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.waiting.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self, reason: str) -> None:
        """Refuse new requests with UNAVAILABLE from now on; queued and running ones go on."""
        self._closed = reason

    def submit(self, request: Request) -> None:
        """Queue a validated request; raises QueueFullError when --max-queue is reached and
        EngineUnavailableError once the engine is closed or failed."""
        if self.failed is not None:
            raise EngineUnavailableError(f"engine failed: {self.failed}")
        if self._closed is not None:
            raise EngineUnavailableError(self._closed)
        self.waiting.put(request)
        if self.failed is not None:  # failed meanwhile: don't leave it parked
            self._fail_parked()

    def fail_all(self, code: str, message: str) -> concurrent.futures.Future[int]:
        """Answer every waiting and running request with `code` (on the engine thread); the future gives how many."""
        def cut() -> int:
            batch = self.running + self.waiting.snapshot()
            self.waiting.remove(batch)
            for r in batch:
                self._fail(r, code, message)
            return len(batch)

        return self.call(cut)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the engine thread between steps (adapter installs, merges, frees)."""
        return self.commands.call(fn)

    def num_active(self) -> int:
        return len(self.running) + len(self.waiting)

    # ------------------------------------------------------------------ failure (engine or watchdog thread)
    def _watch(self) -> None:
        """Watchdog thread: mark the engine failed when its thread died or one iteration hangs."""
        limit = self.watchdog_seconds
        while not self._stop.wait(min(0.5, limit / 4) if limit > 0 else 0.5):
            if self._thread is not None and not self._thread.is_alive():
                self._set_failed("the engine thread died")
                return
            started = self._iteration_started
            if limit > 0 and started is not None and time.monotonic() - started > limit:
                self._set_failed(f"an engine step has run for more than --watchdog-seconds {limit:g}")
                self._fail_parked()
                return

    def _set_failed(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        log.error("engine failed: %s; refusing requests (UNAVAILABLE)", reason)
        for callback in self.on_failure:
            try:
                callback(reason)
            except Exception:
                log.exception("engine failure callback failed")

    def _fail_parked(self) -> None:
        """Watchdog thread, the engine thread being stuck: answer every request now instead of leaving it parked.

        Waiting requests are taken off the queue and finished here (they hold no pages); running ones
        are only told (their pages and adapters are released by the engine thread if it ever returns).
        """
        message = f"engine failed: {self.failed}"
        waiting = self.waiting.snapshot()
        self.waiting.remove(waiting)
        for r in waiting:
            if not r.finished:
                r.finished = True
                if r.adapter is not None:
                    self.releaser.release(r.adapter)
                r.emit(ErrorEvent("UNAVAILABLE", message))
        for r in list(self.running):
            r.emit(ErrorEvent("UNAVAILABLE", message))

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set() and self.failed is None:
                self._iteration_started = time.monotonic()
                try:
                    admitted = self._iteration()
                except Exception:  # a bug here must not stop the engine thread (and hang every client)
                    log.exception("engine iteration failed")
                    admitted = []
                self._iteration_started = None
                if not self.running and not admitted:
                    self.waiting.wakeup.wait(0.05)
                    self.waiting.wakeup.clear()
        except BaseException as e:
            log.exception("engine thread died")
            self._set_failed(f"the engine thread died: {type(e).__name__}: {e}")
            raise
        finally:
            message = "server is shutting down" if self.failed is None else f"engine failed: {self.failed}"
            for r in self.running + self.waiting.snapshot():
                self._fail(r, "UNAVAILABLE", message)
            self.commands.fail_pending(EngineUnavailableError(message))

    def _iteration(self) -> list[Request]:
        """One scheduling round: commands, cancellations, admission, prefill, one decode step."""
        self.commands.run_pending()
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)  # each chunk is guarded on its own
        if self.running:
            self._guarded(self._decode, list(self.running))
        self._report()
        return admitted

    def _guarded(self, step: Callable[[list[Request]], None], batch: list[Request]) -> None:
        try:
            step(batch)
        except Exception as e:  # a broken step fails its rows, never the server
            log.exception("engine step failed")
            for r in batch:
                if not r.finished:
                    self._fail(r, "INTERNAL", f"engine step failed: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        cancelled = [r for r in self.waiting.snapshot() if r.cancelled.is_set()]
        self.waiting.remove(cancelled)
        for r in cancelled + [r for r in self.running if r.cancelled.is_set()]:
            self._finish(r, FinishReason.CANCELLED)

    def _admit(self) -> list[Request]:
        """Move waiting requests into the batch while KV pages, batch rows and adapter slots allow."""
        admitted: list[Request] = []
        room = self.max_batch_size - len(self.running)
        for r in self.waiting.snapshot():
            if room <= 0:
                break
            try:
                hit = self.adapters.activate(r.adapter) if r.adapter is not None else None
            except RequestRefused as e:  # it could never be scheduled: answer now, never park it
                self.waiting.remove([r])
                self._fail(r, e.code, e.message)
                continue
            except Exception as e:  # e.g. a device allocation failing: this request fails, others go on
                log.exception("adapter activation failed")
                self.waiting.remove([r])
                self._fail(r, "INTERNAL", f"adapter could not be loaded: {type(e).__name__}: {e}")
                continue
            if r.adapter is not None and hit is None:
                continue  # every adapter slot is busy with running requests: wait, don't fail
            r.prefix_len = r.adapter.num_virtual_tokens if r.adapter is not None else 0
            pages = self.allocator.allocate(self.allocator.pages_for(r.total_tokens_needed))
            if pages is None:
                if r.adapter is not None:
                    self.adapters.deactivate(r.adapter)
                break  # FIFO on memory: later requests don't overtake a big one forever
            r.pages = pages
            r.admitted_at = time.perf_counter()
            if hit is not None and self.metrics is not None:
                self.metrics.adapter_cache(hit)  # once per admitted request
            try:
                self._write_prefix(r)
            except Exception as e:  # fail this request alone; its pages and adapter are released
                log.exception("writing the adapter prefix failed")
                self.waiting.remove([r])
                self.running.append(r)  # so _release also deactivates the adapter
                self._fail(r, "INTERNAL", f"adapter prefix could not be written: {type(e).__name__}: {e}")
                continue
            admitted.append(r)
            room -= 1
        self.waiting.remove(admitted)
        self.running.extend(admitted)
        if self.metrics is not None:
            for r in admitted:
                self.metrics.observe_queue_wait(r.admitted_at - r.submitted_at)
        return admitted

    def _write_prefix(self, r: Request) -> None:
        prefix = self.adapters.prefix_kv(r.adapter) if r.adapter is not None else None
        r.cached = 0
        if prefix is None:
            r.prefix_len = 0
            return
        keys, values = prefix  # [L, H_kv, n, D] each
        n = keys.shape[2]
        if n != r.prefix_len:
            raise RuntimeError(f"pages were reserved for {r.prefix_len} prefix entries, the adapter has {n}")
        table = torch.tensor([r.pages], device=self.runtime.device)
        slots = self.cache.slots(table, torch.arange(n, device=self.runtime.device)[None])[0]
        self.cache.write_prefix(keys, values, slots)
        r.prefix_len = r.cached = n

    def _block_tables(self, batch: list[Request]) -> torch.Tensor:
        width = max(len(r.pages) for r in batch)
        rows = [r.pages + [r.pages[0]] * (width - len(r.pages)) for r in batch]
        return to_device(rows, self.runtime.device)  # [B, P]

    def _prefill(self, admitted: list[Request]) -> None:
        # Split into chunks whose padded size fits --max-prefill-tokens (at least one request each).
        admitted = sorted(admitted, key=lambda r: len(r.prompt_ids))
        chunk: list[Request] = []
        for r in admitted:
            longest = max([len(x.prompt_ids) for x in chunk] + [len(r.prompt_ids)])
            if chunk and longest * (len(chunk) + 1) > self.max_prefill_tokens:
                self._guarded(self._prefill_chunk, chunk)
                chunk = []
            chunk.append(r)
        if chunk:
            self._guarded(self._prefill_chunk, chunk)

    def _prefill_chunk(self, batch: list[Request]) -> None:
        batch = sorted(batch, key=_lora_slot)  # rows grouped by adapter slot, as in _decode
        t0 = time.perf_counter()
        dev = self.runtime.device
        seq = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros((len(batch), seq), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        step = StepInput(
            start=torch.tensor([r.cached for r in batch], device=dev),
            lengths=torch.tensor([len(r.prompt_ids) for r in batch], device=dev),
            block_tables=self._block_tables(batch),
            input_ids=ids.to(dev),
            lora=self.adapters.lora_delta([r.adapter for r in batch]),
        )
        logits = self.runtime.forward(step, self.cache)  # [B, V]
        for r in batch:
            r.cached += len(r.prompt_ids)
        self._sample_and_emit(batch, logits)
        if self.metrics is not None:
            self.metrics.observe_step("prefill", len(batch), time.perf_counter() - t0)

    def _decode(self, batch: list[Request]) -> None:
        batch = sorted((r for r in batch if not r.finished), key=_lora_slot)  # rows grouped by adapter slot
        if not batch:
            return
        t0 = time.perf_counter()
        dev = self.runtime.device
        step = StepInput(
            start=to_device([r.cached for r in batch], dev),
            lengths=torch.ones(len(batch), dtype=torch.long, device=dev),
            block_tables=self._block_tables(batch),
            input_ids=to_device([[r.output_ids[-1]] for r in batch], dev),
            lora=self.adapters.lora_delta([r.adapter for r in batch]),
        )
        logits = self.runtime.forward(step, self.cache)  # [B, V]
        for r in batch:
            r.cached += 1
        self._sample_and_emit(batch, logits)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step("decode", len(batch), time.perf_counter() - t0)

    def _sample_and_emit(self, batch: list[Request], logits: torch.Tensor) -> None:
        finite = torch.isfinite(logits).all(dim=-1)  # [B]
        if not bool(finite.all()):  # such a row fails alone; the others are sampled as usual
            keep = finite.tolist()
            for r, ok in zip(batch, keep, strict=True):
                if not ok:
                    log.warning("request %s: non-finite logits (adapter %s)", r.request_id,
                                None if r.adapter is None else r.adapter.adapter_id)
                    self._fail(r, "INTERNAL", "the model's output (logits) for this request turned non-finite "
                               "(NaN or inf): its adapter holds weights that overflow; other requests are unaffected")
            batch = [r for r, ok in zip(batch, keep, strict=True) if ok]
            logits = logits[finite]
            if not batch:
                return
        tokens, infos = sample(logits, batch)
        now = time.perf_counter()
        for r, tok, info in zip(batch, tokens, infos, strict=True):
            if r.first_token_at is None:
                r.first_token_at = now
            r.output_ids.append(tok)
            reason = None
            if tok in self.tokenizer.eos_token_ids and not r.sampling.ignore_eos:
                reason = FinishReason.EOS
            delta_reason = self._detokenize(r)
            reason = delta_reason or reason
            if reason is None and len(r.output_ids) >= r.sampling.max_new_tokens:
                reason = FinishReason.LENGTH
            end = len(r.text) if reason is not None else len(r.text) - _held_back(r.text, r.sampling.stop)
            text, r.sent_chars = r.text[r.sent_chars:end], max(r.sent_chars, end)
            r.emit(TokenEvent(text, [tok], [info] if info is not None else []))
            if reason is not None:
                self._finish(r, reason)

    def _detokenize(self, r: Request) -> FinishReason | None:
        """Append newly complete text to r.text; cut at a stop string and return STOP if one matched."""
        ids = r.output_ids
        prefix_text = self.tokenizer.decode(ids[r.prefix_offset:r.read_offset])
        new_text = self.tokenizer.decode(ids[r.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        old_len = len(r.text)
        r.text += new_text[len(prefix_text):]
        r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        for s in r.sampling.stop:
            pos = r.text.find(s, max(0, old_len - len(s) + 1))
            if pos >= 0:
                r.text = r.text[:pos]
                return FinishReason.STOP
        return None

    def _finish(self, r: Request, reason: FinishReason) -> None:
        if r.finished:
            return
        r.finished = True
        self._release(r)
        now = time.perf_counter()
        admitted = r.admitted_at if r.admitted_at is not None else now
        if reason == FinishReason.CANCELLED:
            r.emit(ErrorEvent(r.cancel_reason, "request cancelled" if r.cancel_reason == "CANCELLED"
                              else "deadline exceeded"))
            return
        r.emit(FinishEvent(
            reason=reason, prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.output_ids),
            queue_s=admitted - r.submitted_at,
            ttft_s=None if r.first_token_at is None else r.first_token_at - r.submitted_at,
            total_s=now - r.submitted_at,
        ))

    def _fail(self, r: Request, code: str, message: str) -> None:
        if r.finished:
            return
        r.finished = True
        self._release(r)
        r.emit(ErrorEvent(code, message))

    def _release(self, r: Request) -> None:
        was_running = r in self.running
        if was_running:
            self.running.remove(r)
        self.allocator.free(r.pages)
        if r.adapter is not None:
            if was_running:
                self.adapters.deactivate(r.adapter)
            self.releaser.release(r.adapter)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self.running), len(self.waiting))
            self.metrics.set_kv_usage(self.allocator.usage())


def _lora_slot(r: Request) -> int:
    """Sort key that puts rows of the same LoRA slot next to each other (cheaper batched LoRA)."""
    slot = None if r.adapter is None else r.adapter.slot
    return -1 if slot is None else slot


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if s.startswith(text[-n:]):
                held = n
                break
    return held
