"""One registered adapter's record, and the errors of the catalog and the residency.

Threads: an entry's catalog fields (``refs``, ``draining``) change under the catalog's lock; its
residency fields (``slot``, ``prefix``, ``resident``, ``merged``, ``running``, ``freed``) change on
the engine thread only; other threads read them for reports (ListAdapters) and never write them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from server.adapters.formats import AdapterKind, AdapterSpec

# Kinds that take a device slot (LoRA weights and/or row vectors), and those that can be merged.
SLOT_KINDS = (AdapterKind.LORA, AdapterKind.DORA, AdapterKind.IA3, AdapterKind.LN_TUNING, AdapterKind.BOTTLENECK)
MERGEABLE = (AdapterKind.LORA, AdapterKind.DORA, AdapterKind.IA3)


class InvalidMixError(ValueError):
    """INVALID_ARGUMENT: a weighted mix names an adapter that cannot be mixed (the message names the field)."""


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
    """FAILED_PRECONDITION: e.g. a second merged adapter, a merge of a non-LoRA adapter, or a pin or
    merge that would leave no device slot for the other adapters."""


class AdapterCapacityError(Exception):
    """RESOURCE_EXHAUSTED: a pinned adapter cannot get a device slot right now (all busy)."""


@dataclass(eq=False)
class AdapterEntry:
    """One registered adapter (implements server.ports.AdapterRef)."""

    adapter_id: str
    spec: AdapterSpec
    key: int
    pinned: bool = False
    merge_requested: bool = False
    registered_at: float = field(default_factory=time.time)
    load_ms: float = 0.0
    version: str = ""  # the adapter store's version it was loaded from ("" when registered otherwise)
    # -- catalog state: written under the catalog's lock
    draining: bool = False
    refs: int = 0  # requests submitted and not finished
    # -- residency state: written on the engine thread only (read elsewhere for reports)
    merged: bool = False
    freed: bool = False
    running: int = 0  # requests currently in the batch
    slot: int | None = None  # LoRA device slot
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # device K/V [L, H_kv, n, D] when resident
    host_prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # host copy (prompt kinds)
    vectors: dict | None = None  # row vectors (DoRA, IA3, LN tuning; server.adapters.kinds.base), set at install
    resident: bool = False

    @property
    def kind(self) -> AdapterKind:
        return self.spec.kind

    @property
    def num_virtual_tokens(self) -> int:
        return self.spec.num_virtual_tokens

    @property
    def state(self) -> AdapterState:
        if self.draining:
            return AdapterState.DRAINING
        if self.merged:
            return AdapterState.MERGED
        return AdapterState.RESIDENT if self.resident else AdapterState.REGISTERED
