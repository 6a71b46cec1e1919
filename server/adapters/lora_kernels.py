"""Batched LoRA on the Triton kernels (the CUDA path of server.adapters.lora_batch).

Every row carries its slot index in a device tensor; per step the tokens are grouped by slot
once (server.kernels.lora.sort_tokens, device ops only) and each (layer, group) costs one shrink
and one expand launch over the resident slot tensors, whatever the mix of adapters and ranks.
The row-slot tensor can be a CUDA graph's static buffer: the slot tensors are read in place, so
an adapter registered into or evicted from a slot is seen by the next replay without recapture.

Thread domain: the engine thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from server.kernels.lora import SortedTokens, expand, shrink, sort_tokens

if TYPE_CHECKING:
    from server.adapters.lora_batch import LoraSlots


class KernelLora:
    """LoRA contributions of one step for rows with slots `row_slots` [B] (int64, -1 = none)."""

    row_hooks = False  # LoRA only: the forward calls `apply` and no other server.model.llama.AdapterRows hook

    def __init__(self, slots: LoraSlots, row_slots: torch.Tensor):
        self.slots = slots
        self.row_slots = row_slots  # [B] on the device
        self._tokens: tuple[int, SortedTokens] | None = None  # (S, grouping) shared by every layer

    def tokens(self, seq: int) -> SortedTokens:
        """The step's tokens [B*S] grouped by slot (computed on the first layer's first call)."""
        if self._tokens is None or self._tokens[0] != seq:
            token_slots = self.row_slots.repeat_interleave(seq) if seq > 1 else self.row_slots  # [B*S]
            self._tokens = (seq, sort_tokens(token_slots, self.slots.num_slots))
        return self._tokens[1]

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [B, S, out] += LoRA of x [B, S, in] for every row of an adapter, in place."""
        key = (layer, group)
        at = self.slots.at.get(key)
        if at is None:
            return
        bsz, seq, d = x.shape
        tokens = self.tokens(seq)
        shrunk = shrink(x.reshape(bsz * seq, d), at, tokens)  # [B*S, G*r] float32
        expand(shrunk, self.slots.bt[key], self.slots.columns[group], out.view(bsz * seq, out.shape[-1]), tokens)


def row_slots_tensor(row_slots: list[int], device: str) -> torch.Tensor:
    """Row slots as a device tensor, copied from pinned memory without blocking the host on CUDA."""
    t = torch.tensor(row_slots, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
