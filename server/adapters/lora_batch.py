"""Batched LoRA for rows of many adapters in one step.

The runtime fuses q/k/v and gate/up into single matmuls, so LoRA works per *group* of
projections that share an input: qkv, o, gate_up, down. For each (layer, group) the resident
adapters live in numbered device slots as two stacked tensors:

    at    [slots, in, G*r]   A transposed, one r-wide block per projection in the group
    bt[j] [slots, r, out_j]  B transposed and scaled, per projection j

zero-padded to the largest resident rank r. A step groups its rows by slot into a padded
[U, M, in] block (U = the contiguous slot range in use, M = most rows of any one slot), runs
one shrink bmm per group and one expand bmm per projection over the stacked weights *without
copying them*, and adds the result into the fused output rows with one index_add. The
grouping is computed once per step and shared by every layer.

A merged adapter's delta is already in the base weights; rows of other adapters get it back out
as a dense low-rank correction (-B_m A_m x, same packing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.config import ModelArgs

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {m: g for g, mods in GROUPS.items() for m in mods}


def _group_shape(args: ModelArgs, group: str) -> tuple[int, list[tuple[int, int]]]:
    """(in_features, [(col_start, col_end) of each projection in the fused output])."""
    cols, start = [], 0
    for m in GROUPS[group]:
        out_f, in_f = args.linear_shape(m)
        cols.append((start, start + out_f))
        start += out_f
    return in_f, cols


def pack_group(args: ModelArgs, group: str, modules: dict, layer: int, rank: int,
               device: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """One adapter's projections of (layer, group) packed as (at [in, G*r], [bt_j [r, out_j] per projection]).

    Projections the adapter does not target get zero blocks; None if it targets none of the group.
    """
    in_f, cols = _group_shape(args, group)
    present = {j: modules[(layer, m)] for j, m in enumerate(GROUPS[group]) if (layer, m) in modules}
    if not present:
        return None
    at = torch.zeros((in_f, len(cols) * rank), dtype=torch.float32)
    bts = [torch.zeros((rank, c1 - c0), dtype=torch.float32) for c0, c1 in cols]
    for j, mod in present.items():
        r = mod.a.shape[0]
        at[:, j * rank:j * rank + r] = mod.a.t()  # [in, r]
        bts[j][:r] = (mod.b * mod.scale).t()  # [r, out_j]
    return at.to(device, dtype), [bt.to(device, dtype) for bt in bts]


class LoraSlots:
    """Device storage for up to `num_slots` resident LoRA adapters."""

    def __init__(self, args: ModelArgs, num_slots: int, device: str, dtype: torch.dtype):
        self.args = args
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.rank = 0  # padded rank of every block
        self.at: dict[tuple[int, str], torch.Tensor] = {}  # (layer, group) -> [slots, in, G*r]
        self.bt: dict[tuple[int, str], list[torch.Tensor]] = {}  # (layer, group) -> [[slots, r, out_j] per projection]
        self._loaded: dict[int, dict] = {}  # slot -> the adapter's modules (host), to repack on growth

    def load(self, slot: int, modules: dict) -> None:
        """Write an adapter's modules {(layer, "q_proj"): LoraModule(a [r,in], b [out,r], scale)} into `slot`."""
        self.clear(slot)
        rank = max(m.a.shape[0] for m in modules.values())
        self._loaded[slot] = modules
        if rank > self.rank:  # a bigger adapter arrived: repack every resident one at the new width
            self.rank = rank
            self.at, self.bt = {}, {}
            for s, mods in self._loaded.items():
                self._write(s, mods)
        else:
            self._write(slot, modules)

    def _write(self, slot: int, modules: dict) -> None:
        """Copy each projection's A^T and scaled B^T straight into its block of the slot (no staging)."""
        r = self.rank
        for (layer, name), mod in modules.items():
            group = GROUP_OF[name]
            key = (layer, group)
            if key not in self.at:
                in_f, cols = _group_shape(self.args, group)
                self.at[key] = torch.zeros((self.num_slots, in_f, len(cols) * r), dtype=self.dtype, device=self.device)
                self.bt[key] = [torch.zeros((self.num_slots, r, c1 - c0), dtype=self.dtype, device=self.device)
                                for c0, c1 in cols]
            j = GROUPS[group].index(name)
            ra = mod.a.shape[0]
            self.at[key][slot, :, j * r:j * r + ra] = mod.a.t()  # [in, ra]
            self.bt[key][j][slot, :ra] = (mod.b * mod.scale).t()  # [ra, out_j]

    def clear(self, slot: int) -> None:
        modules = self._loaded.pop(slot, None)
        if not modules:
            return
        for key in {(layer, GROUP_OF[m]) for layer, m in modules}:
            if key in self.at:
                self.at[key][slot].zero_()
                for stacked in self.bt[key]:
                    stacked[slot].zero_()

    def nbytes(self) -> int:
        tensors = [*self.at.values(), *(t for bts in self.bt.values() for t in bts)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MergedCorrection:
    """The merged adapter, packed per (layer, group), and which rows must have its delta removed."""

    packed: dict  # (layer, group) -> (at [in, G*r], [bt_j [r, out_j]])
    sign: torch.Tensor  # [B, 1, 1]: -1 for rows of other adapters or the base, 0 for the merged adapter's rows


class LoraBatch:
    """The per-step LoRA contributions (implements server.model.llama.LoraDelta)."""

    def __init__(self, slots: LoraSlots, row_slots: list[int], merged: MergedCorrection | None):
        self.slots = slots
        self.merged = merged
        self.active = any(s >= 0 for s in row_slots)
        self._grouped_for: torch.Tensor | None = None
        if not self.active:
            return
        used = sorted({s for s in row_slots if s >= 0})
        self.lo, hi = used[0], used[-1]
        groups: dict[int, list[int]] = {}
        for row, s in enumerate(row_slots):
            if s >= 0:
                groups.setdefault(s, []).append(row)
        self.m = max(len(v) for v in groups.values())
        self.u = hi - self.lo + 1
        pad_row = len(row_slots)  # index of an all-zero row appended to x / y
        gather = [pad_row] * (self.u * self.m)  # [U*M]: source row of each padded position
        back = [self.u * self.m] * len(row_slots)  # [B]: padded position of each row (zero row for base rows)
        for s, rows in groups.items():
            for j, row in enumerate(rows):
                pos = (s - self.lo) * self.m + j
                gather[pos] = row
                back[row] = pos
        self.gather = torch.tensor(gather, device=slots.device)
        rows_with = [row for row, s in enumerate(row_slots) if s >= 0]
        self.rows = torch.tensor(rows_with, device=slots.device)  # [N]: rows that carry a LoRA
        self.pos = torch.tensor([back[row] for row in rows_with], device=slots.device)  # [N]: their padded position

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, in] -> [U, M*S, in] rows grouped by slot (cached while x is the same tensor)."""
        if self._grouped_for is not x:
            bsz, seq, d = x.shape
            flat = torch.cat([x.reshape(bsz, seq * d), x.new_zeros(1, seq * d)])  # [B+1, S*in]
            self._grouped_x = flat[self.gather].view(self.u, self.m * seq, d)
            self._grouped_for = x
        return self._grouped_x

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the LoRA contribution for x [B, S, in] into the fused `group` output out [B, S, out] in place."""
        key = (layer, group)
        bsz, seq, _ = x.shape
        if self.active and key in self.slots.at:
            at = self.slots.at[key][self.lo:self.lo + self.u]  # [U, in, G*r] (a view: no copy)
            shrunk = torch.bmm(self._grouped(x), at)  # [U, M*S, G*r]
            r = self.slots.rank
            parts = [torch.bmm(shrunk[..., j * r:(j + 1) * r], bt[self.lo:self.lo + self.u])  # [U, M*S, out_j]
                     for j, bt in enumerate(self.slots.bt[key])]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [U, M*S, out]
            y = y.view(self.u * self.m, seq * out.shape[-1]).index_select(0, self.pos)  # [N, S*out]
            out.view(bsz, seq * out.shape[-1]).index_add_(0, self.rows, y)
        if self.merged is not None and key in self.merged.packed:
            at_m, bts_m = self.merged.packed[key]
            shrunk = x @ at_m  # [B, S, G*r]
            r = bts_m[0].shape[0]
            parts = [shrunk[..., j * r:(j + 1) * r] @ bt for j, bt in enumerate(bts_m)]
            corr = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [B, S, out]
            out.addcmul_(corr, self.merged.sign)
