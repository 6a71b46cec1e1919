"""The adapter catalog: which ids exist, who holds them, which are draining.

Registered (metadata + weights on the host) is not the same as resident (weights in a device slot,
see server.adapters.residency). Requests hold a reference from submission to finish; unregister
stops new references at once, lets held ones finish, then frees.

Threads: every method here may be called from any thread (gRPC handlers, their worker threads, the
engine thread for `release`); the catalog's own state is guarded by one lock. It never touches
device state itself: installs and frees are sent to the engine thread through `EngineCommands`
and done there by the `Residency`.
"""

from __future__ import annotations

import itertools
import threading
import time

from server.adapters.entry import (
    MERGEABLE,
    AdapterCapacityError,
    AdapterEntry,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterPreconditionError,
    AdapterState,
    InvalidMixError,
)
from server.adapters.formats import AdapterKind, AdapterSpec
from server.adapters.mix import AdapterMix
from server.adapters.residency import Residency
from server.metrics import ServerMetrics
from server.ports import EngineCommands

__all__ = ["AdapterCapacityError", "AdapterCatalog", "AdapterEntry", "AdapterExistsError", "AdapterNotFoundError",
           "AdapterPreconditionError", "AdapterState"]


class AdapterCatalog:
    """Ids, references and draining state of every registered adapter (any thread)."""

    def __init__(self, residency: Residency, commands: EngineCommands, metrics: ServerMetrics | None = None):
        self.residency = residency
        self.commands = commands
        self.metrics = metrics
        self._by_id: dict[str, AdapterEntry] = {}
        self._all: dict[int, AdapterEntry] = {}  # every entry not yet freed, draining ones included
        self._lock = threading.Lock()  # guards the maps and every entry's refs / draining
        self._admin_lock = threading.Lock()  # serializes register / unregister
        self._keys = itertools.count(1)

    def register(self, adapter_id: str, spec: AdapterSpec, *, merge: bool = False, pin: bool = False,
                 replace: bool = False, timeout: float = 120.0, version: str = "") -> AdapterEntry:
        """Install an adapter; returns when it can serve the very next request. `version`: the adapter
        store's version of `spec` (server.adapters.store), kept on the entry to tell when it is stale."""
        if merge and spec.kind not in MERGEABLE:
            raise AdapterPreconditionError(
                f"merge: only {', '.join(k.value for k in MERGEABLE)} adapters can be merged, not {spec.kind.value}")
        with self._admin_lock:  # one registration at a time: check-then-install stays atomic
            with self._lock:
                old = self._by_id.get(adapter_id)
                if old is not None and not replace:
                    raise AdapterExistsError(
                        f"adapter_id {adapter_id!r} is already registered (set replace to swap it)")
                entry = AdapterEntry(adapter_id, spec, next(self._keys), pinned=pin, merge_requested=merge,
                                     version=version)
            t0 = time.perf_counter()
            try:
                self.commands.call(lambda: self.residency.install(entry, old)).result(timeout)
            except Exception:
                if self.metrics is not None:
                    self.metrics.adapter_loaded(spec.kind.value.lower(), False, time.perf_counter() - t0)
                raise
            entry.load_ms = (time.perf_counter() - t0) * 1000
            with self._lock:
                if old is not None:
                    old.draining = True
                    self._by_id.pop(adapter_id, None)
                self._by_id[adapter_id] = entry
                self._all[entry.key] = entry
                free_old = old is not None and old.refs == 0
            if free_old:
                self._free(old)
        if self.metrics is not None:
            self.metrics.adapter_loaded(spec.kind.value.lower(), True, entry.load_ms / 1000)
        self._report()
        return entry

    def unregister(self, adapter_id: str) -> AdapterEntry:
        """Refuse new requests at once; free when the in-flight ones finish."""
        with self._admin_lock:
            with self._lock:
                entry = self._by_id.pop(adapter_id, None)
                if entry is None:
                    raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
                entry.draining = True
                idle = entry.refs == 0
            if idle:
                self._free(entry).result(60)
        self._report()
        return entry

    def evict(self, adapter_id: str) -> bool:
        """Unregister `adapter_id` if it is registered (False if not): new requests stop at once, running
        ones finish, then it is freed from memory and its device slot. Blocks (an engine round trip):
        call from a worker thread, e.g. ``await asyncio.to_thread(catalog.evict, id)``. With
        ``--lazy-adapters`` the next request for it loads the store's current version."""
        try:
            self.unregister(adapter_id)
        except AdapterNotFoundError:
            return False
        return True

    def acquire(self, adapter_id: str) -> AdapterEntry:
        """Take a reference for a new request; NOT_FOUND for unknown or draining ids."""
        with self._lock:
            entry = self._by_id.get(adapter_id)
            if entry is None:
                raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
            entry.refs += 1
            return entry

    def acquire_mix(self, parts: list[tuple[str, float]]) -> AdapterMix:
        """References to every LoRA adapter of a weighted mix, or to none: NOT_FOUND for an unknown id,
        InvalidMixError (naming ``adapters[i]``) for a non-LoRA or merged one."""
        taken: list[tuple[AdapterEntry, float]] = []
        try:
            for i, (adapter_id, weight) in enumerate(parts):
                entry = self.acquire(adapter_id)
                taken.append((entry, weight))
                if entry.kind != AdapterKind.LORA:
                    raise InvalidMixError(f"adapters[{i}].adapter_id: {adapter_id!r} is a {entry.kind.value} adapter; "
                                          "only LORA adapters can be mixed")
                if entry.merge_requested:
                    raise InvalidMixError(f"adapters[{i}].adapter_id: {adapter_id!r} is merged into the base weights; "
                                          "a merged adapter cannot be mixed")
        except Exception:
            for entry, _ in taken:
                self.release(entry)
            raise
        return AdapterMix(tuple(taken))

    def release(self, entry: AdapterEntry | AdapterMix) -> None:
        """A request holding `entry` ended (any outcome, any thread); the last one of a draining entry frees it."""
        if isinstance(entry, AdapterMix):
            for part, _ in entry.parts:
                self.release(part)
            return
        with self._lock:
            entry.refs -= 1
            free_now = entry.draining and entry.refs == 0
        if free_now:
            self._free(entry)  # runs on the engine thread between steps; nobody waits for it

    def get(self, adapter_id: str) -> AdapterEntry:
        with self._lock:
            entry = self._by_id.get(adapter_id)
            if entry is None:
                raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
            return entry

    def list(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._all.values(), key=lambda e: (e.adapter_id, e.key))

    def _free(self, entry: AdapterEntry):
        def free() -> None:
            self.residency.free(entry)
            with self._lock:
                self._all.pop(entry.key, None)
            self._report()

        return self.commands.call(free)

    def _report(self) -> None:
        if self.metrics is None:
            return
        registered: dict[str, int] = {}
        with self._lock:
            for e in self._by_id.values():
                registered[e.kind.value.lower()] = registered.get(e.kind.value.lower(), 0) + 1
        self.metrics.set_adapter_counts(registered=registered)
