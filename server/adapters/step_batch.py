"""One step's per-row adapter math (implements server.model.llama.AdapterRows).

Per fused projection of each layer, in this order (see server.adapters.kinds.base for the roles):

1. rows that are not the merged adapter's undo its row vectors (a merged DoRA or IA3), if any;
2. LoRA: every LoRA / DoRA row adds s*B*A*x for its slot, a weighted mix adds sum_i w_i*s_i*B_i*A_i*x
   (see LoraBatch), other rows subtract a merged LoRA / DoRA low-rank delta;
3. each row's own output scale and shift (IA3 attention targets, DoRA's m/‖W+sBA‖).

The projection input is scaled before the matmul (IA3 feed-forward targets; a merged IA3 undone),
and the RMSNorm weights are per row when an LN-tuning row is in the step. A step without rows of a
kind issues none of its ops: no table gathers, no ones-multiplies.

Threads: built and used on the engine thread only.
"""

from __future__ import annotations

import torch

from server.adapters.lora_batch import LoraBatch
from server.adapters.row_vectors import VectorSlots


class RowVectorIndex:
    """Which table row each batch row reads from a VectorSlots (built once per step)."""

    def __init__(self, slots: VectorSlots, index: torch.Tensor):
        self.slots = slots
        self.index = index  # [B] int64

    def rows(self, layer: int, group: str, role: str) -> torch.Tensor | None:
        return self.slots.rows((layer, group, role), self.index)


class AdapterBatch:
    """LoRA rows, row vectors of the resident adapters, and the merged adapter's undo, for one step."""

    def __init__(self, lora: LoraBatch | None, own: RowVectorIndex | None, undo: RowVectorIndex | None):
        self.lora = lora  # None: no LoRA rows and no merged low-rank delta
        self.own = own  # None: no row of this step has row vectors
        self.undo = undo  # None: no merged DoRA / IA3, or only its own rows

    def norm_weight(self, layer: int, group: str, weight: torch.Tensor) -> torch.Tensor:
        """The RMSNorm weight of `group` ("attn_norm", "mlp_norm"; "norm" at layer L): [H] or per row [B, 1, H]."""
        if self.own is None:
            return weight
        rows = self.own.rows(layer, group, "norm")
        return weight if rows is None else rows

    def scale_input(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """The projection input x [B, S, in], scaled per row where a row (or the merged undo) says so."""
        for index in (self.undo, self.own):
            if index is not None:
                rows = index.rows(layer, group, "in")
                if rows is not None:
                    x = x * rows  # [B, S, in] * [B, 1, in]
        return x

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Finish the fused output out [B, S, out] of `group` in place; x [B, S, in] is the unscaled input."""
        if self.undo is not None:
            self._affine(self.undo, layer, group, out)
        if self.lora is not None:
            self.lora.apply(layer, group, x, out)
        if self.own is not None:
            self._affine(self.own, layer, group, out)

    @staticmethod
    def _affine(index: RowVectorIndex, layer: int, group: str, out: torch.Tensor) -> None:
        scale = index.rows(layer, group, "out")
        if scale is not None:
            out.mul_(scale)  # [B, S, out] * [B, 1, out]
        shift = index.rows(layer, group, "shift")
        if shift is not None:
            out.add_(shift)
