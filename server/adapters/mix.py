"""A request's weighted mix of LoRA adapters (``GenerateRequest.adapters``).

Each part is a catalog reference of its own (acquired, activated and released together), so a mix
holds its adapters resident and registered exactly as single-adapter requests do. Its rows get
sum_i w_i * s_i * B_i A_i x (server.adapters.lora_batch.WeightedLoraBatch), PEFT's
``add_weighted_adapter(..., combination_type="cat")``.

Threads: built on an API thread; its parts' residency changes on the engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.adapters.entry import AdapterEntry


@dataclass(eq=False)
class AdapterMix:
    """Implements server.ports.AdapterRef for a weighted list of LoRA entries."""

    parts: tuple[tuple[AdapterEntry, float], ...]  # (entry of a LORA adapter, weight)

    @property
    def adapter_id(self) -> str:
        """How logs name the mix: ``a*0.5+b*-1``."""
        return "+".join(f"{e.adapter_id}*{w:g}" for e, w in self.parts)

    @property
    def num_virtual_tokens(self) -> int:
        return 0

    @property
    def slot(self) -> int | None:
        """The first part's slot: the engine sorts rows by it."""
        return self.parts[0][0].slot
