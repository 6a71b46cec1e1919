"""One step's per-row adapter math (implements server.model.llama.AdapterRows).

Per fused projection of each layer, in this order (see server.adapters.kinds.base for the roles):

1. rows that are not the merged adapter's undo its row vectors (a merged DoRA or IA3), if any, and
   subtract its low-rank delta (a merged LoRA or DoRA) from what the merged weight saw;
2. LoRA: every LoRA / DoRA row adds s*B*A*x for its slot, a weighted mix adds sum_i w_i*s_i*B_i*A_i*x
   (see LoraBatch);
3. each row's own output scale and shift (IA3 attention targets, DoRA's m/‖W+sBA‖);

and after each sub-layer (attention, MLP), before its output joins the residual stream, bottleneck
rows add their adapter's layer (server.adapters.bottleneck_batch).

The projection input is scaled before the matmul (IA3 feed-forward targets; a merged IA3 undone),
and the RMSNorm weights are per row when an LN-tuning row is in the step. A step without rows of a
kind issues none of its ops: no table gathers, no ones-multiplies.

Threads: built and used on the engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.bottleneck_batch import BottleneckBatch
from server.adapters.lora_batch import LoraBatch, LoraSlots, MergedCorrection, WeightedLoraBatch
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

    def __init__(self, lora: LoraBatch | WeightedLoraBatch | None, own: RowVectorIndex | None,
                 undo: RowVectorIndex | None, correction: MergedCorrection | None = None,
                 bottleneck: BottleneckBatch | None = None):
        self.lora = lora  # None: no LoRA rows
        self.own = own  # None: no row of this step has row vectors
        self.undo = undo  # None: no merged DoRA / IA3, or only its own rows
        self.correction = correction  # the merged LoRA / DoRA low-rank delta other rows subtract, or None
        self.bottleneck = bottleneck  # None: no bottleneck rows

    @property
    def row_hooks(self) -> bool:
        """Whether this step needs the norm / input-scale / output-affine / block-output hooks (IA3, LN, DoRA,
        bottleneck rows, or a merged DoRA / IA3): the fused-kernel forward, which only calls `apply`, cannot
        take such a step."""
        return self.own is not None or self.undo is not None or self.bottleneck is not None

    def plain_lora(self) -> LoraBatch | None:
        """The step's LoraBatch when that is all the step holds (what a CUDA graph replays), else None."""
        if (self.own is None and self.undo is None and self.correction is None and self.bottleneck is None
                and isinstance(self.lora, LoraBatch)):
            return self.lora
        return None

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
        if self.correction is not None and (layer, group) in self.correction.packed:
            # The merged delta saw the projection's input: scaled where a row's own IA3 scales it.
            seen = x
            if self.own is not None:
                rows = self.own.rows(layer, group, "in")
                seen = x if rows is None else x * rows
            at_m, bt_m = self.correction.packed[(layer, group)]
            out.addcmul_((seen @ at_m) @ bt_m, self.correction.sign)  # other rows: -s B_m A_m x
        if self.lora is not None:
            self.lora.apply(layer, group, x, out)
        if self.own is not None:
            self._affine(self.own, layer, group, out)

    def block_output(self, layer: int, site: str, residual: torch.Tensor, out: torch.Tensor) -> None:
        """Finish the output out [B, S, H] of sub-layer `site` ("attn", "mlp") in place before it is added
        to the residual stream residual [B, S, H] (bottleneck adapters)."""
        if self.bottleneck is not None:
            self.bottleneck.apply(layer, site, residual, out)

    @staticmethod
    def _affine(index: RowVectorIndex, layer: int, group: str, out: torch.Tensor) -> None:
        scale = index.rows(layer, group, "out")
        if scale is not None:
            out.mul_(scale)  # [B, S, out] * [B, 1, out]
        shift = index.rows(layer, group, "shift")
        if shift is not None:
            out.add_(shift)


@dataclass
class MergedAdapter:
    """What rows of other adapters need to take a merged adapter back out of the base weights."""

    packed: dict  # (layer, group) -> (at [in, G*r], bt [G*r, out]): its low-rank delta (LoRA, DoRA); {} for IA3
    undo: VectorSlots | None  # one slot: the inverse of its row vectors (DoRA, IA3), else None


def build_step(slots: LoraSlots, vectors: VectorSlots, lora_rows: list[list[tuple[int, float]]],
               vector_rows: list[int], merged: MergedAdapter | None, merged_rows: list[bool],
               bottleneck: BottleneckBatch | None = None) -> AdapterBatch | None:
    """One step's AdapterBatch, or None when every row is the base model (and nothing is merged).

    `lora_rows[i]`: row i's (LoRA slot, weight) entries; `vector_rows[i]`: its VectorSlots slot + 1
    (0: none); `merged_rows[i]`: whether row i is the merged adapter's own (it needs no undo);
    `bottleneck`: the step's bottleneck rows, if any.
    """
    device = slots.device
    correction, undo = None, None
    if merged is not None and not all(merged_rows):
        if merged.packed:
            sign = torch.tensor([0.0 if m else -1.0 for m in merged_rows], dtype=slots.dtype, device=device)
            correction = MergedCorrection(merged.packed, sign.view(-1, 1, 1))
        if merged.undo is not None:
            undo = RowVectorIndex(merged.undo, torch.tensor([0 if m else 1 for m in merged_rows], device=device))
    lora: LoraBatch | WeightedLoraBatch | None = None
    if any(len(r) > 1 or any(w != 1.0 for _, w in r) for r in lora_rows):
        lora = WeightedLoraBatch(slots, lora_rows, None)
    elif any(lora_rows):
        lora = LoraBatch(slots, [r[0][0] if r else -1 for r in lora_rows], None)
    own = RowVectorIndex(vectors, torch.tensor(vector_rows, device=device)) if any(vector_rows) else None
    if lora is None and own is None and undo is None and correction is None and bottleneck is None:
        return None
    return AdapterBatch(lora, own, undo, correction, bottleneck)
