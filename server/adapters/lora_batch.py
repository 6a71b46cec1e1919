"""Batched LoRA for rows of many adapters in one step.

The runtime fuses q/k/v and gate/up into single matmuls, so LoRA works per *group* of
projections that share an input: qkv, o, gate_up, down. For each (layer, group) the resident
adapters live in numbered device slots as two stacked tensors:

    at [slots, in, G*r]    A transposed, one r-wide block per projection j of the group
    bt [slots, G*r, out]   B transposed and scaled, block-diagonal: block j only feeds
                           projection j's columns of the fused output

zero-padded to the largest resident rank r. A step groups its rows by slot into a padded
[U, M, in] block (U = the contiguous slot range in use, M = most rows of any one slot), runs one
shrink and one expand bmm per group over the stacked weights *without copying them*, and adds
the result back into the fused output rows with one gather. The grouping is computed once per
step and shared by every layer. (bench/lora_kernels.py compares this with per-row weight gathers
and with a loop over adapter segments on this CPU: per-op overhead, not FLOPs, decides here.)

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


def _write_module(at: torch.Tensor, bt: torch.Tensor, args: ModelArgs, name: str, mod, rank: int) -> None:
    """Copy one projection's A^T [in, r] and scaled B^T [r, out_j] into its blocks of at [in, G*r], bt [G*r, out]."""
    group = GROUP_OF[name]
    j = GROUPS[group].index(name)
    c0, c1 = _group_shape(args, group)[1][j]
    r = mod.a.shape[0]
    at[:, j * rank:j * rank + r] = mod.a.t()
    bt[j * rank:j * rank + r, c0:c1] = (mod.b * mod.scale).t()


def pack_group(args: ModelArgs, group: str, modules: dict, layer: int, rank: int,
               device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One adapter's projections of (layer, group) as (at [in, G*r], bt [G*r, out]); None if it has none."""
    names = [m for m in GROUPS[group] if (layer, m) in modules]
    if not names:
        return None
    in_f, cols = _group_shape(args, group)
    at = torch.zeros((in_f, len(cols) * rank), dtype=dtype, device=device)
    bt = torch.zeros((len(cols) * rank, cols[-1][1]), dtype=dtype, device=device)
    for name in names:
        _write_module(at, bt, args, name, modules[(layer, name)], rank)
    return at, bt


class LoraSlots:
    """Device storage for up to `num_slots` resident LoRA adapters."""

    def __init__(self, args: ModelArgs, num_slots: int, device: str, dtype: torch.dtype):
        self.args = args
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.rank = 0  # padded rank of every block
        self.at: dict[tuple[int, str], torch.Tensor] = {}  # (layer, group) -> [slots, in, G*r]
        self.bt: dict[tuple[int, str], torch.Tensor] = {}  # (layer, group) -> [slots, G*r, out]
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
        """Copy each projection straight into its blocks of the slot (no staging tensors)."""
        for (layer, name), mod in modules.items():
            key = (layer, GROUP_OF[name])
            if key not in self.at:
                in_f, cols = _group_shape(self.args, key[1])
                width = len(cols) * self.rank
                self.at[key] = torch.zeros((self.num_slots, in_f, width), dtype=self.dtype, device=self.device)
                self.bt[key] = torch.zeros((self.num_slots, width, cols[-1][1]), dtype=self.dtype, device=self.device)
            _write_module(self.at[key][slot], self.bt[key][slot], self.args, name, mod, self.rank)

    def clear(self, slot: int) -> None:
        modules = self._loaded.pop(slot, None)
        if not modules:
            return
        for key in {(layer, GROUP_OF[m]) for layer, m in modules}:
            if key in self.at:
                self.at[key][slot].zero_()
                self.bt[key][slot].zero_()


@dataclass
class MergedCorrection:
    """The merged adapter, packed per (layer, group), and which rows must have its delta removed."""

    packed: dict  # (layer, group) -> (at [in, G*r], bt [G*r, out])
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
        bsz = len(row_slots)
        self.has_base_rows = any(s < 0 for s in row_slots)
        pad_row = 0  # padded positions read any real row; their outputs are never read back
        zero_pos = self.u * self.m  # a zero row appended to the output for base rows
        gather = [pad_row] * (self.u * self.m)  # [U*M]: source row of each padded position
        back = [zero_pos] * bsz  # [B]: padded position of each row
        for s, rows in groups.items():
            for j, row in enumerate(rows):
                pos = (s - self.lo) * self.m + j
                gather[pos] = row
                back[row] = pos
        # Rows already in slot order with the same count per slot (the engine sorts rows by slot; an
        # even spread over adapters, or a single adapter, gives this): grouping is a reshape.
        self.identity = (not self.has_base_rows and bsz == self.u * self.m
                         and row_slots == [self.lo + i // self.m for i in range(bsz)])
        self.gather = torch.tensor(gather, device=slots.device)
        self.back = torch.tensor(back, device=slots.device)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, in] -> [U, M*S, in] rows grouped by slot (cached while x is the same tensor)."""
        if self._grouped_for is not x:
            bsz, seq, d = x.shape
            if self.identity:
                self._grouped_x = x.reshape(self.u, self.m * seq, d)
            else:
                self._grouped_x = x.reshape(bsz, seq * d).index_select(0, self.gather).view(self.u, self.m * seq, d)
            self._grouped_for = x
        return self._grouped_x

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the LoRA contribution for x [B, S, in] into the fused `group` output out [B, S, out] in place."""
        key = (layer, group)
        bsz, seq, _ = x.shape
        if self.active and key in self.slots.at:
            at = self.slots.at[key][self.lo:self.lo + self.u]  # [U, in, G*r] (a view: no copy)
            bt = self.slots.bt[key][self.lo:self.lo + self.u]  # [U, G*r, out]
            shrunk = torch.bmm(self._grouped(x), at)  # [U, M*S, G*r]
            n_out = bt.shape[-1]
            if self.identity and out.is_contiguous():  # rows already grouped: expand straight into out
                out.view(self.u, self.m * seq, n_out).baddbmm_(shrunk, bt)
            elif self.identity:
                out += torch.bmm(shrunk, bt).view(bsz, seq, n_out)
            else:
                # Back to row order with one gather (base rows read an appended zero row); index_add_
                # (a scatter) measured 20x slower on this CPU than gather + add.
                y = torch.bmm(shrunk, bt).view(self.u * self.m, seq * n_out)
                if self.has_base_rows:
                    y = torch.cat([y, y.new_zeros(1, seq * n_out)])
                out += y.index_select(0, self.back).view(bsz, seq, n_out)
        self._merged(key, x, out)

    def _merged(self, key: tuple[int, str], x: torch.Tensor, out: torch.Tensor) -> None:
        if self.merged is not None and key in self.merged.packed:
            at_m, bt_m = self.merged.packed[key]
            out.addcmul_((x @ at_m) @ bt_m, self.merged.sign)  # rows of other adapters: -B_m A_m x
