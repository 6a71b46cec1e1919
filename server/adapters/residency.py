"""Adapter residency: device slots, LRU eviction, the merged adapter, prefix KV.

Resident adapters are evicted least recently used first when room is needed; pinned, merged and
running ones never are. Pins and merges may never take the last place other adapters need
(FAILED_PRECONDITION at the pin or merge), so every registered adapter can always become resident
once the running requests holding the other places finish: no request waits forever.

Threads: the engine thread only (implements server.ports.AdapterResidency; `install` and `free`
arrive from the catalog as `EngineCommands`). Nothing here takes a lock.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence

import torch

from server.adapters.base_weights import RuntimeBaseWeights
from server.adapters.bottleneck_batch import BottleneckBatch, BottleneckSlots
from server.adapters.entry import SLOT_KINDS, AdapterCapacityError, AdapterEntry, AdapterPreconditionError
from server.adapters.formats import LORA_KINDS, AdapterFormatError, AdapterKind, PrefixWeights, PromptWeights
from server.adapters.kinds import row_vector_kind
from server.adapters.lora_batch import GROUP_OF, LoraSlots, pack_group
from server.adapters.merge import merge_plan
from server.adapters.mix import AdapterMix
from server.adapters.row_vectors import VectorSlots
from server.adapters.step_batch import AdapterBatch, MergedAdapter, build_step
from server.metrics import ServerMetrics
from server.model.llama import PagedKVCache, StepInput
from server.ports import ModelRuntime, ModuleKey, RequestRefused

log = logging.getLogger("adapterserve.adapters")


class Residency:
    """Which adapters are on the device, in which slots, and the merged one (engine thread only)."""

    def __init__(self, runtime: ModelRuntime, *, max_resident: int, memory_bytes: int,
                 metrics: ServerMetrics | None = None, lora_threads: int = 0):
        self.runtime = runtime
        self.max_resident = max_resident
        self.memory_bytes = memory_bytes
        self.metrics = metrics
        self.slots = LoraSlots(runtime.args, max_resident, runtime.device, runtime.dtype, lora_threads)
        self.slots.use_kernels = getattr(runtime, "use_kernels", False)  # Triton LoRA where the model runs Triton
        self._free_slots = list(range(max_resident))
        self._installed: dict[int, AdapterEntry] = {}  # every installed, not yet freed entry
        self._lru: collections.OrderedDict[int, AdapterEntry] = collections.OrderedDict()  # resident, oldest first
        self.merged_entry: AdapterEntry | None = None
        self._merged_backup: dict[ModuleKey, torch.Tensor] = {}
        self._merged: MergedAdapter | None = None
        self.base = RuntimeBaseWeights(runtime, lambda: self._merged_backup)  # weights as loaded, never merged
        self.vectors = VectorSlots(self.base, max_resident, runtime.device, runtime.dtype)  # DoRA, IA3, LN rows
        self.bottlenecks = BottleneckSlots(runtime.args, max_resident, runtime.device, runtime.dtype)

    # ------------------------------------------------------------------ from the catalog
    def install(self, entry: AdapterEntry, old: AdapterEntry | None) -> None:
        """Prepare `entry` (replacing `old`, which stays until the catalog frees it); merge or load it."""
        if entry.merge_requested:
            if self.merged_entry is not None and self.merged_entry is not old:
                raise AdapterPreconditionError(f"merge: adapter {self.merged_entry.adapter_id!r} is already merged; "
                                               "one merged adapter at a time")
            if old is not None and old is self.merged_entry:
                raise AdapterPreconditionError("merge: cannot replace the merged adapter in place; unregister it first")
        self._check_room(entry, old)
        kind_weights = row_vector_kind(entry.spec.weights)
        if kind_weights is not None:  # once per registration, from the base weights as loaded
            entry.vectors = kind_weights.row_vectors(self.base)
        if entry.kind in (AdapterKind.PROMPT_TUNING, AdapterKind.P_TUNING):
            entry.host_prefix = self._prompt_prefix(entry.spec.weights)
        elif entry.kind == AdapterKind.PREFIX_TUNING:
            w: PrefixWeights = entry.spec.weights
            entry.host_prefix = (w.keys, w.values)
        if entry.merge_requested:
            self._merge(entry)
        elif not self._make_resident(entry, count=False) and entry.pinned:
            raise AdapterCapacityError("pin: every device slot is busy with running requests; retry later")
        self._installed[entry.key] = entry
        self._report()

    def free(self, entry: AdapterEntry) -> None:
        """Unmerge and evict `entry` for good (its last request has ended)."""
        if entry.freed:
            return
        if entry.merged:
            self._unmerge(entry)
        self._evict(entry)
        entry.freed = True
        entry.host_prefix = None
        self._installed.pop(entry.key, None)
        self._report()

    # ------------------------------------------------------------------ from the engine's step loop
    def activate(self, entry: AdapterEntry | AdapterMix) -> bool | None:
        """Make `entry` resident for a request joining the batch (see server.ports.AdapterResidency);
        a mix's parts all at once, or none of them."""
        if isinstance(entry, AdapterMix):
            done: list[AdapterEntry] = []
            hits = True
            for part, _ in entry.parts:
                try:
                    hit = self.activate(part)
                except Exception:
                    for d in done:
                        self.deactivate(d)
                    raise
                if hit is None:
                    for d in done:
                        self.deactivate(d)
                    return None
                done.append(part)
                hits = hits and hit
            return hits
        if entry.freed:
            raise RequestRefused("NOT_FOUND", f"adapter_id {entry.adapter_id!r} was unregistered")
        was_resident = entry.resident or entry.merged
        if not self._make_resident(entry, count=True):
            if not self._could_ever_fit(entry):
                raise RequestRefused("RESOURCE_EXHAUSTED", f"adapter_id {entry.adapter_id!r} cannot become resident: "
                                     "pinned and merged adapters hold every device slot")
            return None
        entry.running += 1
        return was_resident

    def deactivate(self, entry: AdapterEntry | AdapterMix) -> None:
        for part in [p for p, _ in entry.parts] if isinstance(entry, AdapterMix) else [entry]:
            part.running -= 1

    def prefix_kv(self, entry: AdapterEntry | AdapterMix) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if isinstance(entry, AdapterMix) else entry.prefix

    def kv_namespace(self, entry: AdapterEntry | AdapterMix | None) -> tuple:
        """What the K/V of `entry`'s rows (None: base rows) depend on besides their tokens: the prefix
        cache's namespace. The key is new at every registration (replace included); the virtual-token
        count places the prompt; the merged adapter changes the base weights every row computes with."""
        m = self.merged_entry
        merged = None if m is None else (m.adapter_id, m.key)
        if entry is None:
            return ("base", merged)
        if isinstance(entry, AdapterMix):  # a weighted LoRA mix: every part's registration and weight
            return ("mix", tuple((e.adapter_id, e.key, w) for e, w in entry.parts), merged)
        return ("adapter", entry.adapter_id, entry.key, entry.num_virtual_tokens, merged)

    def lora_delta(self, entries: Sequence[AdapterEntry | AdapterMix | None]) -> AdapterBatch | None:
        """The step's per-row adapter math (server.model.llama.AdapterRows); None for an all-base step."""
        lora_rows: list[list[tuple[int, float]]] = []
        vector_rows: list[int] = []
        for e in entries:
            if isinstance(e, AdapterMix):
                lora_rows.append([(p.slot, w) for p, w in e.parts if p.slot is not None])
                vector_rows.append(0)
                continue
            slot = None if e is None else e.slot
            lora_rows.append([(slot, 1.0)] if slot is not None and e.kind in LORA_KINDS else [])
            vector_rows.append(slot + 1 if slot is not None and e.vectors else 0)
        merged_rows = [e is not None and e is self.merged_entry for e in entries]
        bn_rows = [e.slot if isinstance(e, AdapterEntry) and e.kind == AdapterKind.BOTTLENECK and e.slot is not None
                   else -1 for e in entries]
        bn = BottleneckBatch(self.bottlenecks, bn_rows) if any(s >= 0 for s in bn_rows) else None
        return build_step(self.slots, self.vectors, lora_rows, vector_rows, self._merged, merged_rows, bn)

    # ------------------------------------------------------------------ room
    def _held(self, old: AdapterEntry | None) -> list[AdapterEntry]:
        """Entries that keep their place whatever runs: pinned and merged ones (`old` is leaving)."""
        return [e for e in self._installed.values() if (e.pinned or e.merged) and e is not old]

    def _check_room(self, entry: AdapterEntry, old: AdapterEntry | None) -> None:
        """Refuse a pin or merge that would leave no place for the other adapters, and an adapter that
        cannot fit beside the pinned and merged ones (FAILED_PRECONDITION: nothing would ever serve it)."""
        held = self._held(old)
        held_bytes = sum(e.spec.size_bytes for e in held)
        if entry.pinned or entry.merge_requested:
            what = "merge" if entry.merge_requested else "pin"
            if len(held) + 1 >= self.max_resident:
                raise AdapterPreconditionError(
                    f"{what}: {len(held)} pinned/merged adapter(s) already; one more would leave none of the "
                    f"{self.max_resident} resident places (--max-resident-adapters) for other adapters")
            others = [e.spec.size_bytes for e in self._installed.values()
                      if not (e.pinned or e.merged) and e is not old]
            need = held_bytes + entry.spec.size_bytes + max(others, default=0)
            if need > self.memory_bytes:
                raise AdapterPreconditionError(
                    f"{what}: pinned/merged adapters would take {held_bytes + entry.spec.size_bytes} of the "
                    f"{self.memory_bytes} bytes of --adapter-memory-bytes, leaving too little for the other adapters")
        elif held_bytes + entry.spec.size_bytes > self.memory_bytes:
            raise AdapterPreconditionError(
                f"adapter needs {entry.spec.size_bytes} bytes; beside the pinned/merged adapters only "
                f"{max(0, self.memory_bytes - held_bytes)} of --adapter-memory-bytes are left")

    def _could_ever_fit(self, entry: AdapterEntry) -> bool:
        """Whether `entry` fits once every running request has finished."""
        held = self._held(None)
        return (len(held) < self.max_resident
                and sum(e.spec.size_bytes for e in held) + entry.spec.size_bytes <= self.memory_bytes)

    def _resident_bytes(self) -> int:
        return sum(e.spec.size_bytes for e in self._lru.values())

    def _make_resident(self, entry: AdapterEntry, count: bool) -> bool:
        if entry.resident or entry.merged:
            if entry.key in self._lru:
                self._lru.move_to_end(entry.key)
            return True
        needs_slot = entry.kind in SLOT_KINDS
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
            if entry.kind in LORA_KINDS:
                self.slots.load(entry.slot, entry.spec.weights.modules)
            if entry.vectors:
                self.vectors.load(entry.slot, entry.vectors)
            if entry.kind == AdapterKind.BOTTLENECK:
                self.bottlenecks.load(entry.slot, entry.spec.weights)
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
            self.vectors.clear(entry.slot)
            self.bottlenecks.clear(entry.slot)
            self._free_slots.append(entry.slot)
            entry.slot = None
        entry.prefix = None
        entry.resident = False

    # ------------------------------------------------------------------ prompt kinds
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

    # ------------------------------------------------------------------ merge-on-load
    def _merge(self, entry: AdapterEntry) -> None:
        """Fold the adapter into the base weights (server.adapters.merge: LoRA, DoRA, IA3); refused with
        nothing changed if any merged weight would be non-finite. Other rows undo it every step."""
        rt = self.runtime
        plan = merge_plan(entry.spec, self.base)
        for (layer, name), delta in plan.deltas.items():
            if not bool(torch.isfinite(delta).all()):
                raise AdapterFormatError(f"merge: the delta of layer {layer} {name} holds NaN or inf")
        try:
            self._merged_backup = rt.add_deltas(plan.deltas)
        except ValueError as e:  # a finite delta that overflows the weight
            raise AdapterFormatError(f"merge: {e}") from e
        packed = {}
        if plan.lora_modules:
            rank = max(m.a.shape[0] for m in plan.lora_modules.values())
            for layer, group in {(layer, GROUP_OF[name]) for layer, name in plan.lora_modules}:
                packed[(layer, group)] = pack_group(rt.args, group, plan.lora_modules, layer, rank, rt.device, rt.dtype)
        undo = None
        if plan.undo:
            undo = VectorSlots(self.base, 1, rt.device, rt.dtype)
            undo.load(0, plan.undo)
        self._merged = MergedAdapter(packed, undo)
        entry.merged = True
        self.merged_entry = entry
        self._lru[entry.key] = entry
        entry.resident = True
        if self.metrics is not None:
            self.metrics.set_merged_adapter(entry.adapter_id)

    def _unmerge(self, entry: AdapterEntry) -> None:
        self.runtime.restore_rows(self._merged_backup)  # bit-exact restore
        self._merged_backup = {}
        self._merged = None
        self.merged_entry = None
        entry.merged = False
        if self.metrics is not None:
            self.metrics.set_merged_adapter(None)

    def _report(self) -> None:
        if self.metrics is None:
            return
        resident: dict[str, int] = {}
        for e in self._lru.values():
            resident[e.kind.value.lower()] = resident.get(e.kind.value.lower(), 0) + 1
        self.metrics.set_adapter_counts(resident=resident)
