"""The step loop: one thread admits waiting requests and advances every running sequence each step
(continuous batching: requests join and leave at any step).

Data path of one request through this file: ``submit`` -> waiting queue -> ``_admit`` (adapter slot,
KV pages: reused prefix-cache pages + fresh ones, prefix KV) -> ``_forward`` (repeated: prompt
chunks, then one token per step) -> ``_finish`` (pages released, adapter released, FinishEvent).

**One mechanism for every row.** A running request knows its tokens (prompt + generated) and how
many KV entries are computed (``cached``, adapter prefix included). Each step gives a row a span
(``start = cached``, ``n`` new entries): a prompt chunk, the one decode token, or the recompute of
prompt + generated tokens after a preemption. A row whose span reaches its last known token samples
the next one. ``_prefill`` and ``_decode`` are no longer twins: both are ``_forward``.

**Chunked prefill, one batch of chunks per step.** A step runs at most one prefill forward (rows of
at most ``--max-prefill-tokens`` entries, rows x longest chunk within that budget, oldest first) and
then one decode forward of every row waiting for its next token. The two are separate forwards
because the model takes padded [B, S] batches: a 512-entry chunk in the decode forward would pad
every decode row to 512 too. So a long prompt delays running streams by one chunk per step instead
of its whole prefill (vLLM and SGLang mix both in one ragged forward; padding makes that a loss here).

**Pages on demand, preemption by recompute.** Admission gives a request pages for the entries it
knows now; a decode row takes a page when its next entry crosses a page boundary. When none is
free, the most recently admitted running request is preempted: its pages are released (full ones
stay in the prefix cache), it goes back to the head of the queue and recomputes its tokens when
re-admitted. Its sampler RNG, text and emitted tokens live on the request, so its output and stream
are those of an unpreempted run. ``--kv-allocation reserve`` keeps the older policy (prompt +
max_new_tokens reserved at admission, never preempted) as a measured baseline.

**Prefix cache** (``server.engine.prefix_cache``): full pages keyed by adapter + tokens, reused at
admission for a request's leading blocks; see that module for what the key holds.

**n samples of one prompt, prefilled once (forks).** A request submitted with ``forks`` (the other
samples of its prompt, e.g. OpenAI's ``n``) is admitted with them as one group: pages for its prompt
plus, per fork, its own pages past the prompt's full ones (the copy of the last partial page;
everything after the full ones with ``reserve``). When its prompt is computed, ``_fork`` starts each
fork from that KV: the full pages are shared (reference-counted, never written again) and the partial
one is copied (copy-on-write), and every sample draws its first token from the same logits with its
own RNG: the same tokens as separate seeded requests, for one prefill. This is by design, not by the
prefix cache (which only holds full pages and may be off).


Threads of the process, and what each may touch:

- **event loop** (the main thread under ``python -m server``; ``adapterserve-grpc`` in tests): gRPC
  servicers, health, signals. Validates requests, takes and gives back adapter references
  (``AdapterCatalog``, lock-protected), ``Engine.submit`` (a lock-protected queue), ``Request.cancel``.
  Never model work, device tensors or engine state.
- **default executor workers** (``run_in_executor``): adapter registration (file reading and
  parsing, then ``AdapterCatalog.register``, which waits on an engine command), preloads. Like every
  pool of the server they are :class:`~server.model.omp.TeamlessExecutor` workers: a job's parallel
  torch ops leave no OpenMP pool behind, so the engine thread's team is the process's only one
  (two teams on two cores throttle both: 31 instead of 20 ms per token at one stream).
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
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from server.engine.commands import CommandQueue
from server.engine.detokenizer import finish_reason, take_text
from server.engine.kv_pages import PagePool
from server.engine.prefix_cache import PrefixCache, block_key, root_key
from server.engine.request import ErrorEvent, FinishEvent, FinishReason, Request, TokenEvent
from server.engine.sampler import sample
from server.engine.scheduler import WaitingQueue
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
                 max_batch_size: int, max_queue: int, max_prefill_tokens: int, prefix_cache: bool = True,
                 kv_allocation: str = "on-demand", metrics: ServerMetrics | None = None, watchdog_seconds: float = 0.0):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.adapters = adapters  # residency: engine thread only
        self.releaser = releaser  # the catalog's reference counts
        self.commands = commands
        self.metrics = metrics
        num_pages = max(1, kv_cache_tokens // page_size)
        self.prefix_cache = PrefixCache() if prefix_cache else None
        self.allocator = PagePool(num_pages, page_size, self.prefix_cache)
        self.reserve = kv_allocation == "reserve"
        # Admission keeps this many pages free for the running rows' growth (no admit-then-preempt churn).
        self.growth_pages = max(1, num_pages // 64)
        self._admissions = itertools.count(1)
        self.cache = PagedKVCache(runtime.args, num_pages, page_size, runtime.dtype, runtime.device)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting = WaitingQueue(max_queue, commands.wakeup)
        self.running: list[Request] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.prefill_tokens = 0  # KV entries computed by prefill forwards (prompt chunks, recomputes)
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
        EngineUnavailableError once the engine is closed or failed.

        ``request.forks``: other samples of the same prompt and adapter (at most --max-batch-size in
        all), started from this request's computed prompt. A group that could not fit the KV cache
        even alone is queued as separate requests instead (each prefills its own prompt)."""
        if self.failed is not None:
            raise EngineUnavailableError(f"engine failed: {self.failed}")
        if self._closed is not None:
            raise EngineUnavailableError(self._closed)
        if 1 + len(request.forks) > self.max_batch_size:
            raise ValueError(f"{1 + len(request.forks)} samples exceed --max-batch-size {self.max_batch_size}")
        group = [request]
        if request.forks and self._group_pages(request) > self.allocator.num_pages:
            group, request.forks = [request, *request.forks], []
        self.waiting.put(*group)
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
        for r in [x for w in waiting for x in (w, *w.forks)]:
            if not r.finished:
                r.finished = True
                if r.adapter is not None:
                    self.releaser.release(r.adapter)
                r.emit(ErrorEvent("UNAVAILABLE", message))
        for r in [x for w in list(self.running) for x in (w, *w.forks)]:
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
        if self.running:
            self._step()  # each forward is guarded on its own
        self._report()
        return admitted

    def _guarded(self, forward: Callable[[list[tuple[Request, int]], str], None], rows: list[tuple[Request, int]],
                 phase: str) -> None:
        try:
            forward(rows, phase)
        except Exception as e:  # a broken step fails its rows, never the server
            log.exception("engine step failed")
            for r, _ in rows:
                if not r.finished:
                    self._fail(r, "INTERNAL", f"engine step failed: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        waiting = self.waiting.snapshot()
        cancelled = [r for r in waiting if r.cancelled.is_set()]
        self.waiting.remove(cancelled)
        for r in cancelled + [r for r in self.running if r.cancelled.is_set()]:
            self._finish(r, FinishReason.CANCELLED)  # its forks that go on are handed over (_hand_over)
        for r in waiting + self.running:  # forks cancelled while their prompt is still being computed
            if r.forks and not r.finished:
                for f in [f for f in r.forks if f.cancelled.is_set()]:
                    r.forks.remove(f)
                    self._finish(f, FinishReason.CANCELLED)

    def _admit(self) -> list[Request]:
        """Move waiting requests into the batch while KV pages, batch rows and adapter slots allow.

        FIFO on memory: when the head does not fit, later requests do not overtake it (a preempted
        request is put back at the head, so it is re-admitted first)."""
        admitted: list[Request] = []
        room = self.max_batch_size - sum(1 + len(r.forks) for r in self.running)  # forks join at their fork
        for r in self.waiting.snapshot():
            if room < 1 + len(r.forks):
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
            if not self._take_pages(r):
                if r.adapter is not None:
                    self.adapters.deactivate(r.adapter)
                break
            now = time.perf_counter()
            first = r.admitted_at is None
            if first:
                r.admitted_at = now
                if hit is not None and self.metrics is not None:
                    self.metrics.adapter_cache(hit)  # once per request
            wait = now - r.waiting_since
            r.queue_s += wait
            r.waiting_since = None
            r.admit_order = next(self._admissions)
            if self.metrics is not None:
                self.metrics.observe_queue_wait(wait)  # once per admission: preempted waits count too
            try:
                self._write_prefix(r)
            except Exception as e:  # fail this request alone; its pages and adapter are released
                log.exception("writing the adapter prefix failed")
                self.waiting.remove([r])
                self.running.append(r)  # so _release also deactivates the adapter
                self._fail(r, "INTERNAL", f"adapter prefix could not be written: {type(e).__name__}: {e}")
                continue
            self._publish(r)
            admitted.append(r)
            room -= 1 + len(r.forks)
        self.waiting.remove(admitted)
        self.running.extend(admitted)
        return admitted

    def _take_pages(self, r: Request) -> bool:
        """Give `r` pages for every KV entry it knows of (all it may ever need with --kv-allocation
        reserve), reusing the prefix cache's pages for its leading full blocks. False: no room now."""
        pool, size = self.allocator, self.allocator.page_size
        known = r.prefix_len + r.num_tokens  # KV entries to hold now (prefix + prompt + generated so far)
        r.block_keys, r.published = [], 0
        r.namespace = self.adapters.kv_namespace(r.adapter)
        hits: list[int] = []
        if self.prefix_cache is not None:  # at least the last token is computed (its logits are needed)
            hits = self.prefix_cache.match(self._block_keys(r, (known - 1) // size))
        needed = pool.pages_for(r.total_tokens_needed if self.reserve else known) - len(hits)
        own = [self._fork_own_pages(f, known) for f in r.forks]
        pool.share(hits)
        floor = self.growth_pages if self.running and not self.reserve else 0
        total = needed + sum(own)
        fresh = pool.allocate(total) if pool.available - total >= floor else None
        if fresh is None:
            pool.release(hits)
            return False
        r.pages = hits + fresh[:needed]
        at = needed
        for f, n in zip(r.forks, own, strict=True):  # held by each fork until _fork
            f.pages, at = fresh[at:at + n], at + n
        r.cached = len(hits) * size
        if self.metrics is not None:
            reused = max(0, r.cached - r.prefix_len)
            self.metrics.prefix_cache_lookup(r.adapter.adapter_id if r.adapter is not None else "",
                                             reused, r.num_tokens - reused)
        return True

    def _fork_own_pages(self, f: Request, known: int) -> int:
        """Pages fork `f` needs of its own when it starts from a prompt of `known` entries: past the
        shared full pages, the copy of the partial one (on demand) or every page it may need (reserve)."""
        pool = self.allocator
        return pool.pages_for(known + (f.sampling.max_new_tokens if self.reserve else 0)) - known // pool.page_size

    def _group_pages(self, r: Request) -> int:
        """Pages `r` and its forks take at admission (an estimate made at submission, before a prefix-cache hit)."""
        known = (r.adapter.num_virtual_tokens if r.adapter is not None else 0) + r.num_tokens
        mine = known + (r.sampling.max_new_tokens if self.reserve else 0)
        return self.allocator.pages_for(mine) + sum(self._fork_own_pages(f, known) for f in r.forks)

    def _block_keys(self, r: Request, n: int) -> list[bytes]:
        """Prefix-cache keys of r's first `n` full blocks (extends r.block_keys as needed)."""
        size = self.allocator.page_size
        while len(r.block_keys) < n:
            b = len(r.block_keys)
            parent = r.block_keys[-1] if r.block_keys else root_key(r.namespace)
            lo = max(0, b * size - r.prefix_len)  # the block's real tokens; virtual entries are in the namespace
            hi = max(lo, (b + 1) * size - r.prefix_len)
            r.block_keys.append(block_key(parent, r.tokens(lo, hi)))
        return r.block_keys[:n]

    def _publish(self, r: Request) -> None:
        """Offer r's newly completed full pages to the prefix cache."""
        if self.prefix_cache is None:
            return
        full = r.cached // self.allocator.page_size
        for b, key in enumerate(self._block_keys(r, full)[r.published:], start=r.published):
            self.prefix_cache.publish(key, r.pages[b])
        r.published = max(r.published, full)

    def _write_prefix(self, r: Request) -> None:
        """Write the adapter's virtual-token K/V entries that the prefix cache did not provide."""
        prefix = self.adapters.prefix_kv(r.adapter) if r.adapter is not None else None
        if prefix is None:
            r.prefix_len = 0
            return
        keys, values = prefix  # [L, H_kv, n, D] each
        n = keys.shape[2]
        if n != r.prefix_len:
            raise RuntimeError(f"pages were reserved for {r.prefix_len} prefix entries, the adapter has {n}")
        if r.cached >= n:
            return  # every virtual entry came from the prefix cache
        dev = self.runtime.device
        table = torch.tensor([r.pages], device=dev)
        index = torch.arange(r.cached, n, device=dev)
        slots = self.cache.slots(table, index[None])[0]
        self.cache.write_prefix(keys[:, :, r.cached:], values[:, :, r.cached:], slots)
        r.cached = n

    def _block_tables(self, batch: list[Request]) -> torch.Tensor:
        width = max(len(r.pages) for r in batch)
        rows = [r.pages + [r.pages[0]] * (width - len(r.pages)) for r in batch]
        return to_device(rows, self.runtime.device)  # [B, P]

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        """Grow decode rows by a page where needed (preempting), run one prefill chunk batch, then one decode."""
        decode = [r for r in self.running if r.prefix_len + r.num_tokens - r.cached == 1]
        self._grow(decode)
        prefill = self._prefill_rows()
        if prefill:
            self._guarded(self._forward, prefill, "prefill")
            self._drop_cancelled()  # cancelled during the prefill forward: freed before the decode one
        decode = [(r, 1) for r in decode if r in self.running and not r.finished]
        if decode:
            self._guarded(self._forward, decode, "decode")

    def _grow(self, rows: list[Request]) -> None:
        """Allocate the page each decode row's next entry needs; when none is left, preempt the most
        recently admitted running request (possibly the row itself) until it fits. The oldest request
        always fits alone (admission refuses any that could not), so some row always progresses."""
        pool = self.allocator
        for r in sorted(rows, key=lambda x: x.admit_order):
            while r in self.running and pool.pages_for(r.cached + 1) > len(r.pages):
                page = pool.allocate(1)
                if page is not None:
                    r.pages += page
                else:
                    self._preempt(max(self.running, key=lambda x: x.admit_order))

    def _preempt(self, r: Request) -> None:
        """Free r's pages and put it back at the head of the queue; it recomputes prompt + output later
        (its sampler RNG, text and emitted tokens stay, so its output and stream are unchanged)."""
        self.running.remove(r)
        self.allocator.release(r.pages)  # its full pages stay in the prefix cache: recompute may reuse them
        for f in r.forks:  # taken again with r's at its re-admission
            self.allocator.release(f.pages)
        r.cached = 0
        if r.adapter is not None:
            self.adapters.deactivate(r.adapter)
        r.preemptions += 1
        r.waiting_since = time.perf_counter()
        self.waiting.put_front(r)
        if self.metrics is not None:
            self.metrics.preempted()

    def _prefill_rows(self) -> list[tuple[Request, int]]:
        """Rows with more than one entry to compute, oldest first, each a chunk of at most
        --max-prefill-tokens, while rows x longest chunk stays within --max-prefill-tokens."""
        rows: list[tuple[Request, int]] = []
        longest = 0
        for r in sorted(self.running, key=lambda x: x.admit_order):
            pending = r.prefix_len + r.num_tokens - r.cached
            if pending <= 1:
                continue
            n = min(pending, self.max_prefill_tokens)
            if rows and max(longest, n) * (len(rows) + 1) > self.max_prefill_tokens:
                break
            rows.append((r, n))
            longest = max(longest, n)
        return rows

    def _forward(self, rows: list[tuple[Request, int]], phase: str) -> None:
        """One forward over rows that each add n entries at their `cached` index: prefill chunks,
        decode tokens and recompute after preemption alike. Rows that reach their last known token
        sample the next one."""
        rows = sorted(rows, key=lambda x: _lora_slot(x[0]))  # rows grouped by adapter slot (batched LoRA)
        batch = [r for r, _ in rows]
        t0 = time.perf_counter()
        dev = self.runtime.device
        width = max(n for _, n in rows)
        ids = []
        for r, n in rows:
            first = r.cached - r.prefix_len
            ids.append(r.tokens(first, first + n) + [0] * (width - n))
        step = StepInput(
            start=to_device([r.cached for r in batch], dev),
            lengths=to_device([n for _, n in rows], dev),
            block_tables=self._block_tables(batch),
            input_ids=to_device(ids, dev),  # [B, S]
            lora=self.adapters.lora_delta([r.adapter for r in batch]),
        )
        logits = self.runtime.forward(step, self.cache)  # [B, V]
        done = []
        for i, (r, n) in enumerate(rows):
            r.cached += n
            self._publish(r)
            if r.cached == r.prefix_len + r.num_tokens:
                done.append(i)
        if done:
            sampled, picks = [batch[i] for i in done], list(done)
            for i in done:
                if batch[i].forks:  # its prompt is computed: its other samples start from it, same logits
                    forks = self._fork(batch[i])
                    sampled += forks
                    picks += [i] * len(forks)
            self._sample_and_emit(sampled, logits[picks] if picks != list(range(len(batch))) else logits)
        if phase == "decode":
            self.steps += 1
        else:
            self.prefill_tokens += sum(n for _, n in rows)
        if self.metrics is not None:
            self.metrics.observe_step(phase, len(batch), time.perf_counter() - t0)

    def _fork(self, r: Request) -> list[Request]:
        """Start r's forks from its computed prompt: each shares r's full pages and copies the partial
        one into its own page (reserved at r's admission). A fork cancelled meanwhile ends here; one
        whose adapter state differs from r's (replaced or re-merged since) goes back to the queue and
        computes its own prompt."""
        forks, r.forks = r.forks, []
        size = self.allocator.page_size
        full = r.cached // size
        started: list[Request] = []
        now = time.perf_counter()
        for f in forks:
            if f.cancelled.is_set():
                self._finish(f, FinishReason.CANCELLED)
                continue
            try:
                hit = self.adapters.activate(f.adapter) if f.adapter is not None else None
            except RequestRefused as e:
                self._fail(f, e.code, e.message)
                continue
            partial = r.cached % size != 0
            if ((f.adapter is not None and hit is None) or self.adapters.kv_namespace(f.adapter) != r.namespace
                    or (partial and not f.pages)):
                if hit is not None:
                    self.adapters.deactivate(f.adapter)
                self.allocator.release(f.pages)
                self.waiting.put_front(f)
                continue
            if partial:
                self.cache.copy_page(r.pages[full], f.pages[0])
            self.allocator.share(r.pages[:full])
            f.pages = r.pages[:full] + f.pages
            f.prefix_len, f.cached, f.namespace = r.prefix_len, r.cached, r.namespace
            f.block_keys, f.published = list(r.block_keys), r.published
            wait = now - f.waiting_since
            f.admitted_at, f.queue_s, f.waiting_since = now, f.queue_s + wait, None
            f.admit_order = next(self._admissions)
            if self.metrics is not None:
                self.metrics.observe_queue_wait(wait)
                if hit is not None:
                    self.metrics.adapter_cache(hit)
            started.append(f)
        self.running.extend(started)
        return started

    def _hand_over(self, r: Request) -> None:
        """r ended before its prompt was computed: its live forks go on without it, the first leading the rest."""
        forks, r.forks = r.forks, []
        live = []
        for f in forks:
            self.allocator.release(f.pages)
            if f.cancelled.is_set():
                self._finish(f, FinishReason.CANCELLED)
            else:
                live.append(f)
        if live:
            live[0].forks = live[1:]
            self.waiting.put_front(live[0])

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
        tokens, infos = sample(logits, batch, self.tokenizer.eos_token_ids, use_kernel=self.runtime.use_kernels)
        now = time.perf_counter()
        for r, tok, info in zip(batch, tokens, infos, strict=True):
            if r.first_token_at is None:
                r.first_token_at = now
            r.output_ids.append(tok)
            reason = finish_reason(r, tok, self.tokenizer)
            r.emit(TokenEvent(take_text(r, reason is not None), [tok], [info] if info is not None else []))
            if reason is not None:
                self._finish(r, reason)

    def _finish(self, r: Request, reason: FinishReason) -> None:
        if r.finished:
            return
        r.finished = True
        self._release(r)
        if r.forks:  # cancelled before its prompt was computed
            self._hand_over(r)
        now = time.perf_counter()
        if reason == FinishReason.CANCELLED:
            r.emit(ErrorEvent(r.cancel_reason, "request cancelled" if r.cancel_reason == "CANCELLED"
                              else "deadline exceeded"))
            return
        r.emit(FinishEvent(
            reason=reason, prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.output_ids),
            queue_s=r.queue_s,
            ttft_s=None if r.first_token_at is None else r.first_token_at - r.submitted_at,
            total_s=now - r.submitted_at,
        ))

    def _fail(self, r: Request, code: str, message: str) -> None:
        """r (and its forks: the same prompt and adapter meet the same fate) fail with `code`."""
        if r.finished:
            return
        r.finished = True
        self._release(r)
        forks, r.forks = r.forks, []
        for f in forks:
            self._fail(f, code, message)
        r.emit(ErrorEvent(code, message))

    def _release(self, r: Request) -> None:
        was_running = r in self.running
        if was_running:
            self.running.remove(r)
        if r.waiting_since is not None:  # ended while waiting (never admitted, or preempted)
            r.queue_s += time.perf_counter() - r.waiting_since
            r.waiting_since = None
        self.allocator.release(r.pages)
        if r.adapter is not None:
            if was_running:
                self.adapters.deactivate(r.adapter)
            self.releaser.release(r.adapter)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self.running), len(self.waiting))
            self.metrics.set_kv_usage(self.allocator.usage())
            self.metrics.set_prefix_cache_pages(len(self.prefix_cache) if self.prefix_cache is not None else 0)


def _lora_slot(r: Request) -> int:
    """Sort key that puts rows of the same LoRA slot next to each other (cheaper batched LoRA)."""
    slot = None if r.adapter is None else r.adapter.slot
    return -1 if slot is None else slot
