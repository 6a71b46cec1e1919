"""Batched LoRA for rows of many adapters in one step.

Resident LoRA adapters live in numbered device slots: per (layer, module) one stacked tensor
``at`` [slots, in, r] (A transposed) and ``bt`` [slots, r, out] (B transposed, scale folded in),
zero-padded to the largest resident rank. A step groups its token rows by slot into a padded
[U, M, in] block (U = the contiguous slot range in use, M = most rows of any one slot), runs two
bmm over the stacked weights *without copying them*, and scatters the results back to the rows.
The grouping is computed once per step and shared by every layer and module.

A merged adapter's delta is already in the base weights; rows of other adapters get it back out
as a dense low-rank correction (-s * B_m A_m x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.config import ModelArgs


class LoraSlots:
    """Device storage for up to `num_slots` resident LoRA adapters."""

    def __init__(self, args: ModelArgs, num_slots: int, device: str, dtype: torch.dtype):
        self.args = args
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.rank = 0  # allocated (padded) rank
        self.at: dict[tuple[int, str], torch.Tensor] = {}  # [slots, in, r]
        self.bt: dict[tuple[int, str], torch.Tensor] = {}  # [slots, r, out]
        self.modules_in_slot: list[set[tuple[int, str]]] = [set() for _ in range(num_slots)]

    def _ensure(self, key: tuple[int, str], rank: int) -> None:
        if rank > self.rank:  # grow every stack to the new padded rank (rare: a bigger adapter arrived)
            for k in list(self.at):
                self.at[k] = torch.nn.functional.pad(self.at[k], (0, rank - self.rank))
                self.bt[k] = torch.nn.functional.pad(self.bt[k], (0, 0, 0, rank - self.rank))
            self.rank = rank
        if key not in self.at:
            out_f, in_f = self.args.linear_shape(key[1])
            self.at[key] = torch.zeros((self.num_slots, in_f, self.rank), dtype=self.dtype, device=self.device)
            self.bt[key] = torch.zeros((self.num_slots, self.rank, out_f), dtype=self.dtype, device=self.device)

    def load(self, slot: int, modules: dict) -> None:
        """Write an adapter's modules {(layer, name): LoraModule} into `slot`."""
        self.clear(slot)
        for key, m in modules.items():
            r = m.a.shape[0]
            self._ensure(key, r)
            self.at[key][slot, :, :r] = m.a.t().to(self.device, self.dtype)  # [in, r]
            self.bt[key][slot, :r, :] = (m.b * m.scale).t().to(self.device, self.dtype)  # [r, out]
            self.modules_in_slot[slot].add(key)

    def clear(self, slot: int) -> None:
        for key in self.modules_in_slot[slot]:
            self.at[key][slot].zero_()
            self.bt[key][slot].zero_()
        self.modules_in_slot[slot] = set()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.at.values(), *self.bt.values()])


@dataclass
class MergedCorrection:
    """The merged adapter's modules and which rows must have its delta removed."""

    modules: dict  # {(layer, name): (at [in, r], bt [r, out] scaled)}
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
        dev = slots.device
        used = sorted({s for s in row_slots if s >= 0})
        self.lo, hi = used[0], used[-1]
        groups: dict[int, list[int]] = {}
        for row, s in enumerate(row_slots):
            if s >= 0:
                groups.setdefault(s, []).append(row)
        self.m = max(len(v) for v in groups.values())
        self.u = hi - self.lo + 1
        self.rows = len(row_slots)
        pad_row = self.rows  # index of an all-zero row appended to x / y
        gather = [pad_row] * (self.u * self.m)  # [U*M]: source row of each padded position
        back = [self.u * self.m] * self.rows  # [B]: padded position of each row (zero row for base rows)
        for s, rows in groups.items():
            for j, row in enumerate(rows):
                pos = (s - self.lo) * self.m + j
                gather[pos] = row
                back[row] = pos
        self.gather = torch.tensor(gather, device=dev)
        self.back = torch.tensor(back, device=dev)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, in] -> [U, M*S, in] rows grouped by slot (cached for q/k/v and gate/up sharing x)."""
        if self._grouped_for is not x:
            bsz, seq, d = x.shape
            flat = torch.cat([x.reshape(bsz, seq * d), x.new_zeros(1, seq * d)])  # [B+1, S*in]
            self._grouped_x = flat[self.gather].view(self.u, self.m * seq, d)
            self._grouped_for = x
        return self._grouped_x

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """x [B, S, in] -> LoRA contribution [B, S, out] for this module, or None."""
        key = (layer, module)
        out = None
        if self.active and key in self.slots.at:
            bsz, seq, _ = x.shape
            at = self.slots.at[key][self.lo:self.lo + self.u]  # [U, in, r] (a view: no copy)
            bt = self.slots.bt[key][self.lo:self.lo + self.u]  # [U, r, out]
            y = torch.bmm(torch.bmm(self._grouped(x), at), bt)  # [U, M*S, out]
            n_out = y.shape[-1]
            y = y.view(self.u * self.m, seq * n_out)
            y = torch.cat([y, y.new_zeros(1, seq * n_out)])[self.back]  # [B, S*out]
            out = y.view(bsz, seq, n_out)
        if self.merged is not None and key in self.merged.modules:
            at_m, bt_m = self.merged.modules[key]
            corr = (x @ at_m) @ bt_m * self.merged.sign  # [B, S, out]
            out = corr if out is None else out + corr
        return out
