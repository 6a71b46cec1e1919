"""Adapter registry and residency.

Registered (metadata + weights on the host) is not the same as resident (weights in a device
slot, ready for a batch). Requests hold a reference from submission to finish; unregister stops
new references at once, lets held ones finish, then frees. Resident adapters are evicted least
recently used first when room is needed; pinned, merged and running ones never are.

Threads: `register`/`unregister`/`acquire`/`list`/`get` are called from API threads; everything
that touches device tensors or model weights runs on the engine thread (via `engine.call`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from server.adapters.formats import AdapterKind, AdapterSpec, LoraWeights, PrefixWeights, PromptWeights
from server.adapters.lora_batch import GROUP_OF, LoraBatch, LoraSlots, MergedCorrection, pack_group
from server.model.llama import PagedKVCache, StepInput

log = logging.getLogger("adapterserve.adapters")


class AdapterState(str, Enum):
    REGISTERED = "REGISTERED"
    RESIDENT = "RESIDENT"
    MERGED = "MERGED"
    DRAINING = "DRAINING"


class AdapterNotFoundError(LookupError):
    """NOT_FOUND: no adapter with that id (or it is being unregistered)."""


class AdapterExistsError(Exception):
    """ALREADY_EXISTS: the id is taken and `replace` was not set."""


class AdapterPreconditionError(Exception):
    """FAILED_PRECONDITION: e.g. a second merged adapter, or merge on a non-LoRA adapter."""


class AdapterCapacityError(Exception):
    """RESOURCE_EXHAUSTED: a pinned adapter cannot get a device slot."""


@dataclass(eq=False)
class AdapterEntry:
    adapter_id: str
    spec: AdapterSpec
    key: int
    pinned: bool = False
    merge_requested: bool = False
    merged: bool = False
    draining: bool = False
    freed: bool = False
    refs: int = 0  # requests submitted and not finished
    running: int = 0  # requests currently in the batch
    slot: int | None = None  # LoRA device slot
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # device K/V [L, H_kv, n, D] when resident
    host_prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # host copy (prompt kinds)
    resident: bool = False
    load_ms: float = 0.0
    registered_at: float = field(default_factory=time.time)

    @property
    def kind(self) -> AdapterKind:
        return self.spec.kind

    @property
    def state(self) -> AdapterState:
        if self.draining:
            return AdapterState.DRAINING
        if self.merged:
            return AdapterState.MERGED
        return AdapterState.RESIDENT if self.resident else AdapterState.REGISTERED


class AdapterManager:
    """Owns every registered adapter, the LoRA slots and the merged-adapter state."""

    def __init__(self, runtime, engine_call, *, max_resident: int, memory_bytes: int, metrics=None,
                 lora_threads: int = 0):
        self.runtime = runtime
        self.call = engine_call  # fn -> Future, runs on the engine thread
        self.max_resident = max_resident
        self.memory_bytes = memory_bytes
        self.metrics = metrics
        self.slots = LoraSlots(runtime.args, max_resident, runtime.device, runtime.dtype, lora_threads)
        self._free_slots = list(range(max_resident))
        self._by_id: dict[str, AdapterEntry] = {}
        self._all: dict[int, AdapterEntry] = {}  # every entry not yet freed, draining ones included
        self._lock = threading.RLock()  # guards the id map and reference counts
        self._admin_lock = threading.Lock()  # serializes register / unregister
        self._keys = itertools.count(1)
        self._lru: collections.OrderedDict[int, AdapterEntry] = collections.OrderedDict()  # resident, oldest first
        self.merged_entry: AdapterEntry | None = None
        self._merged_backup: dict[tuple[int, str], torch.Tensor] = {}
        self._merged_modules: dict = {}

    # ------------------------------------------------------------------ API threads
    def register(self, adapter_id: str, spec: AdapterSpec, *, merge: bool = False, pin: bool = False,
                 replace: bool = False, timeout: float = 120.0) -> AdapterEntry:
        """Install an adapter; returns when it can serve the very next request."""
        if merge and spec.kind != AdapterKind.LORA:
            raise AdapterPreconditionError(f"merge: only LORA adapters can be merged, not {spec.kind.value}")
        with self._admin_lock:  # one registration at a time: check-then-install stays atomic
            return self._register(adapter_id, spec, merge, pin, replace, timeout)

    def _register(self, adapter_id: str, spec: AdapterSpec, merge: bool, pin: bool, replace: bool,
                  timeout: float) -> AdapterEntry:
        with self._lock:
            old = self._by_id.get(adapter_id)
            if old is not None and not replace:
                raise AdapterExistsError(f"adapter_id {adapter_id!r} is already registered (set replace to swap it)")
            if merge and self.merged_entry is not None and self.merged_entry is not old:
                raise AdapterPreconditionError(
                    f"merge: adapter {self.merged_entry.adapter_id!r} is already merged; one merged adapter at a time")
            entry = AdapterEntry(adapter_id, spec, next(self._keys), pinned=pin, merge_requested=merge)
        t0 = time.perf_counter()
        try:
            self.call(lambda: self._install(entry, old)).result(timeout)
        except Exception:
            if self.metrics is not None:
                self.metrics.adapter_loaded(spec.kind.value.lower(), False, time.perf_counter() - t0)
            raise
        entry.load_ms = (time.perf_counter() - t0) * 1000
        if self.metrics is not None:
            self.metrics.adapter_loaded(spec.kind.value.lower(), True, entry.load_ms / 1000)
        self._report()
        return entry

    def unregister(self, adapter_id: str) -> AdapterEntry:
        """Refuse new requests at once; free when the in-flight ones finish."""
        with self._admin_lock, self._lock:
            entry = self._by_id.pop(adapter_id, None)
            if entry is None:
                raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
            entry.draining = True
            idle = entry.refs == 0
        if idle:
            self.call(lambda: self._free(entry)).result(60)
        self._report()
        return entry

    def acquire(self, adapter_id: str) -> AdapterEntry:
        """Take a reference for a new request; NOT_FOUND for unknown or draining ids."""
        with self._lock:
            entry = self._by_id.get(adapter_id)
            if entry is None:
                raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
            entry.refs += 1
            return entry

    def get(self, adapter_id: str) -> AdapterEntry:
        with self._lock:
            entry = self._by_id.get(adapter_id)
            if entry is None:
                raise AdapterNotFoundError(f"adapter_id {adapter_id!r} is not registered")
            return entry

    def list(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._all.values(), key=lambda e: (e.adapter_id, e.key))

    # ------------------------------------------------------------------ engine thread
    def release(self, entry: AdapterEntry) -> None:
        """A request holding `entry` finished (any outcome)."""
        with self._lock:
            entry.refs -= 1
            free_now = entry.draining and entry.refs == 0
        if free_now:
            self._free(entry)
            self._report()

    def activate(self, entry: AdapterEntry) -> bool | None:
        """Make `entry` resident for a request joining the batch.

        Returns True if it already was (a cache hit), False if it was loaded now (a miss), and
        None if no slot can be freed at the moment (the request keeps waiting).
        """
        if entry.freed:
            return None
        was_resident = entry.resident or entry.merged
        if not self._make_resident(entry, count=True):
            return None
        entry.running += 1
        return was_resident

    def deactivate(self, entry: AdapterEntry) -> None:
        entry.running -= 1

    def prefix_kv(self, entry: AdapterEntry) -> tuple[torch.Tensor, torch.Tensor] | None:
        return entry.prefix

    def lora_delta(self, entries: list[AdapterEntry | None]) -> LoraBatch | None:
        row_slots = [e.slot if (e is not None and e.slot is not None) else -1 for e in entries]
        merged = None
        if self.merged_entry is not None:
            sign = [0.0 if e is self.merged_entry else -1.0 for e in entries]
            if any(sign):
                sign_t = torch.tensor(sign, dtype=self.runtime.dtype, device=self.runtime.device)
                merged = MergedCorrection(self._merged_modules, sign_t.view(-1, 1, 1))
        if merged is None and all(s < 0 for s in row_slots):
            return None
        return LoraBatch(self.slots, row_slots, merged)

    # ------------------------------------------------------------------ internals (engine thread)
    def _install(self, entry: AdapterEntry, old: AdapterEntry | None) -> None:
        if entry.kind in (AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING):
            entry.host_prefix = self._prompt_prefix(entry.spec.weights)
        elif entry.kind == AdapterKind.PREFIX_TUNING:
            w: PrefixWeights = entry.spec.weights
            entry.host_prefix = (w.keys, w.values)
        if entry.merge_requested:
            if old is not None and old is self.merged_entry:
                raise AdapterPreconditionError("merge: cannot replace the merged adapter in place; unregister it first")
            self._merge(entry)
        elif not self._make_resident(entry, count=False) and entry.pinned:
            raise AdapterCapacityError("pin: no device slot can be freed for a pinned adapter")
        with self._lock:
            if old is not None:
                old.draining = True
                if self._by_id.get(entry.adapter_id) is old:
                    self._by_id.pop(entry.adapter_id)
            self._by_id[entry.adapter_id] = entry
            self._all[entry.key] = entry
            free_old = old is not None and old.refs == 0
        if free_old:
            self._free(old)

    def _prompt_prefix(self, w: PromptWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the virtual tokens once (positions 0..n-1, causal among themselves) and keep their K/V."""
        emb = w.embeddings  # [n, hidden]
        n = emb.shape[0]
        cache = PagedKVCache(self.runtime.args, 1, n, self.runtime.dtype, self.runtime.device)
        dev = self.runtime.device
        step = StepInput(
            start=torch.zeros(1, dtype=torch.long, device=dev), lengths=torch.tensor([n], device=dev),
            block_tables=torch.zeros((1, 1), dtype=torch.long, device=dev),
            input_embeds=emb[None].to(dev),
            lora=self.lora_delta([None]),  # undoes a merged adapter, if any
        )
        self.runtime.forward(step, cache)
        k, v = cache.read(torch.arange(n, device=dev))  # [L, H_kv, n, D]
        return k.cpu(), v.cpu()

    def _resident_bytes(self) -> int:
        return sum(e.spec.size_bytes for e in self._lru.values())

    def _make_resident(self, entry: AdapterEntry, count: bool) -> bool:
        if entry.resident or entry.merged:
            if entry.key in self._lru:
                self._lru.move_to_end(entry.key)
            return True
        needs_slot = entry.kind == AdapterKind.LORA
        while (len(self._lru) >= self.max_resident
               or self._resident_bytes() + entry.spec.size_bytes > self.memory_bytes
               or (needs_slot and not self._free_slots)):
            victim = next((e for e in self._lru.values() if e.running == 0 and not e.pinned and not e.merged), None)
            if victim is None:
                return False
            self._evict(victim)
            if self.metrics is not None:
                self.metrics.adapter_evicted()
        t0 = time.perf_counter()
        if needs_slot:
            entry.slot = min(self._free_slots)
            self._free_slots.remove(entry.slot)
            self.slots.load(entry.slot, entry.spec.weights.modules)
        else:
            k, v = entry.host_prefix
            entry.prefix = (k.to(self.runtime.device, self.runtime.dtype), v.to(self.runtime.device, self.runtime.dtype))
        entry.resident = True
        self._lru[entry.key] = entry
        if count and self.metrics is not None:  # an on-demand load
            self.metrics.adapter_loaded(entry.kind.value.lower(), True, time.perf_counter() - t0)
        self._report()
        return True

    def _evict(self, entry: AdapterEntry) -> None:
        self._lru.pop(entry.key, None)
        if entry.slot is not None:
            self.slots.clear(entry.slot)
            self._free_slots.append(entry.slot)
            entry.slot = None
        entry.prefix = None
        entry.resident = False

    def _merge(self, entry: AdapterEntry) -> None:
        lw: LoraWeights = entry.spec.weights
        rt = self.runtime
        for (layer, name), m in lw.modules.items():
            weight, rows = self._fused_rows(layer, name)
            self._merged_backup[(layer, name)] = weight[rows].clone()
            delta = (m.b.double() @ m.a.double()) * m.scale  # [out, in]
            weight[rows] += delta.to(weight.dtype)
        for layer in {layer for layer, _ in lw.modules}:
            rt.refresh_layer(layer)
        rank = max(m.a.shape[0] for m in lw.modules.values())
        for layer, group in {(layer, GROUP_OF[name]) for layer, name in lw.modules}:
            self._merged_modules[(layer, group)] = pack_group(rt.args, group, lw.modules, layer, rank, rt.device,
                                                              rt.dtype)
        entry.merged = True
        self.merged_entry = entry
        self._lru[entry.key] = entry
        entry.resident = True
        if self.metrics is not None:
            self.metrics.set_merged_adapter(entry.adapter_id)

    def _unmerge(self, entry: AdapterEntry) -> None:
        for (layer, name), original in self._merged_backup.items():
            weight, rows = self._fused_rows(layer, name)
            weight[rows] = original  # bit-exact restore
        for layer in {layer for layer, _ in self._merged_backup}:
            self.runtime.refresh_layer(layer)
        self._merged_backup.clear()
        self._merged_modules = {}
        self.merged_entry = None
        entry.merged = False
        if self.metrics is not None:
            self.metrics.set_merged_adapter(None)

    def _fused_rows(self, layer: int, name: str) -> tuple[torch.Tensor, slice]:
        lw = self.runtime.w.layers[layer]
        if name in self.runtime.qkv_slices:
            return lw.wqkv, self.runtime.qkv_slices[name]
        if name in self.runtime.gate_up_slices:
            return lw.w_gate_up, self.runtime.gate_up_slices[name]
        return (lw.wo if name == "o_proj" else lw.w_down), slice(None)

    def _free(self, entry: AdapterEntry) -> None:
        if entry.freed:
            return
        if entry.merged:
            self._unmerge(entry)
        self._evict(entry)
        entry.freed = True
        entry.host_prefix = None
        with self._lock:
            self._all.pop(entry.key, None)

    def _report(self) -> None:
        if self.metrics is None:
            return
        registered: dict[str, int] = {}
        resident: dict[str, int] = {}
        with self._lock:
            for e in self._by_id.values():
                registered[e.kind.value.lower()] = registered.get(e.kind.value.lower(), 0) + 1
            for e in list(self._lru.values()):
                resident[e.kind.value.lower()] = resident.get(e.kind.value.lower(), 0) + 1
        self.metrics.set_adapter_counts(registered, resident)
