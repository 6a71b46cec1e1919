"""``--lazy-adapters``: a request naming an unregistered adapter id registers ``<adapter-root>/<id>`` first.

The load is what RegisterAdapter with ``path=<id>`` does (the same id rules, containment, format checks,
limits, metrics and residency: :meth:`AdapterStore.load` then :meth:`AdapterCatalog.register`), and once
registered the adapter is like any other (LRU residency, UnregisterAdapter; a later request loads it
again while its folder exists).

Single flight: concurrent first requests for one id share one load, a future per id while it runs.
Every waiter gets the load's result, or the same exception; the future is forgotten when it ends,
so a failed load does not poison the next attempt.

Threads: :meth:`LazyAdapters.ensure` may be called from any thread, the event loop included (it never
blocks: a lookup under the catalog's lock, then a hand-off). Loads run on this module's own worker
threads (file reading, parsing and the engine round trip block), so a burst of first uses can never
occupy the threads that RegisterAdapter and other tenants' work use.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from server.adapters.catalog import AdapterCatalog
from server.adapters.entry import AdapterEntry, AdapterExistsError, AdapterNotFoundError
from server.adapters.store import AdapterStore, check_store_id
from server.model.omp import TeamlessExecutor

__all__ = ["LazyAdapters"]

log = logging.getLogger("adapterserve.adapters")

LOAD_THREADS = 2  # parsing is mostly GIL-bound: more threads would only slow the engine thread


class LazyAdapters:
    """Registers adapters from an :class:`AdapterStore` on first use, one load per id at a time."""

    def __init__(self, catalog: AdapterCatalog, store: AdapterStore, threads: int = LOAD_THREADS):
        self.catalog = catalog
        self.store = store
        self.loads = 0  # store reads started (at most one per id at a time), for tests
        self._pool = TeamlessExecutor(threads, thread_name_prefix="adapterserve-lazy")
        self._inflight: dict[str, concurrent.futures.Future[AdapterEntry]] = {}
        self._lock = threading.Lock()

    def ensure(self, adapter_id: str) -> concurrent.futures.Future[AdapterEntry]:
        """A future of the registered entry for `adapter_id`: done at once when it is registered, else
        the one load of it in flight (started now if none is). Raises AdapterFormatError at once for an
        id the store cannot hold. The future fails with AdapterNotFoundError when the store has no such
        folder, or with the error RegisterAdapter would give."""
        with self._lock:
            running = self._inflight.get(adapter_id)
            if running is not None:
                return running
        try:
            done: concurrent.futures.Future[AdapterEntry] = concurrent.futures.Future()
            done.set_result(self.catalog.get(adapter_id))
            return done
        except AdapterNotFoundError:
            pass
        check_store_id(adapter_id)
        with self._lock:
            running = self._inflight.get(adapter_id)
            if running is None:
                running = self._pool.submit(self._load, adapter_id)
                self._inflight[adapter_id] = running
                running.add_done_callback(lambda _, i=adapter_id: self._forget(i))
            return running

    def load(self, adapter_id: str, timeout: float | None = None) -> AdapterEntry:
        """Blocking :meth:`ensure` (any thread but the event loop)."""
        return self.ensure(adapter_id).result(timeout)

    def stale(self, adapter_id: str) -> bool:
        """True when `adapter_id` is registered from the store and the store now holds another version
        (or none): what this process serves is not what the store holds. Blocking (file reads)."""
        try:
            entry = self.catalog.get(adapter_id)
        except AdapterNotFoundError:
            return False
        return bool(entry.version) and self.store.version(adapter_id) != entry.version

    def close(self) -> None:
        """Stop the load threads (loads in flight finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _forget(self, adapter_id: str) -> None:
        with self._lock:
            self._inflight.pop(adapter_id, None)

    def _load(self, adapter_id: str) -> AdapterEntry:
        try:
            return self.catalog.get(adapter_id)  # registered while this load waited for a thread
        except AdapterNotFoundError:
            pass
        with self._lock:
            self.loads += 1
        stored = self.store.load(adapter_id)
        try:
            entry = self.catalog.register(adapter_id, stored.spec, version=stored.version)
        except AdapterExistsError:  # RegisterAdapter got there first: serve that one
            return self.catalog.get(adapter_id)
        log.info("loaded adapter %s from the store on first use (%s, version %s) in %.1f ms", adapter_id,
                 stored.spec.kind.value, stored.version, entry.load_ms)
        return entry
