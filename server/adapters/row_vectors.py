"""Device tables of row vectors (see server.adapters.kinds.base) for the resident adapters.

Per key ``(layer, group, role)`` one table [num_slots + 1, width]: row 0 holds the identity (ones,
zeros, or the base norm weight), row s + 1 the vector of the adapter in slot s (the identity where
it has none). A step gathers one row per batch row with a single index tensor, so IA3, LN tuning and
DoRA rows of any adapters mix freely; keys no resident adapter uses have no table and cost nothing.

Threads: engine thread only.
"""

from __future__ import annotations

import torch

from server.adapters.kinds.base import BaseWeights, VectorKey, group_width, identity


class VectorSlots:
    """Row-vector tables for up to `num_slots` resident adapters."""

    def __init__(self, base: BaseWeights, num_slots: int, device: str, dtype: torch.dtype):
        self.base = base
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.tables: dict[VectorKey, torch.Tensor] = {}  # key -> [num_slots + 1, width]
        self._loaded: dict[int, list[VectorKey]] = {}  # slot -> keys it wrote

    def load(self, slot: int, vectors: dict[VectorKey, torch.Tensor]) -> None:
        """Write an adapter's row vectors into `slot` (0-based; table row slot + 1)."""
        self.clear(slot)
        for key, v in vectors.items():
            table = self.tables.get(key)
            if table is None:
                row = identity(self.base, key, group_width(self.base.args, key[1], key[2]))
                table = row.to(self.device, self.dtype).expand(self.num_slots + 1, -1).contiguous()
                self.tables[key] = table
            table[slot + 1] = v.to(self.device, self.dtype)
        self._loaded[slot] = list(vectors)

    def clear(self, slot: int) -> None:
        for key in self._loaded.pop(slot, []):
            self.tables[key][slot + 1] = self.tables[key][0]

    def rows(self, key: VectorKey, index: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, width] vectors of the rows (`index` [B]: table row of each), or None if no adapter has `key`."""
        table = self.tables.get(key)
        return None if table is None else table.index_select(0, index)[:, None, :]
