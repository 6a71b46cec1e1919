"""Batched LoRA for rows of many adapters in one step.

The runtime fuses q/k/v and gate/up into single matmuls, so LoRA works per *group* of
projections that share an input: qkv, o, gate_up, down. For each (layer, group) the resident
adapters live in numbered device slots:

    at [slots, in, G*r]      A transposed, one r-wide block per projection j of the group
    bt[j] [slots, r, out_j]  B transposed and scaled, one tensor per projection of the group

zero-padded to the largest resident rank r. A step groups its rows by slot into a padded
[U, M, in] block (U = the contiguous slot range in use, M = most rows of any one slot), runs one
shrink bmm per group and one expand bmm per projection over the stacked weights *without copying
them*, and adds the result into the fused output (in place when the rows already come grouped,
else with one gather). The grouping is computed once per step and shared by every layer.

Decoding reads every resident adapter's weights each step: at rank 16, eight adapters are a
third of the base model's bytes, so bytes and the number of ops decide the cost. (B stored
block-diagonally, one [G*r, out] matrix per group, needed one op fewer but read 1.5x the bytes;
bench/lora_kernels.py compares the layouts.)

A merged adapter's delta is already in the base weights; rows of other adapters get it back out
as a dense low-rank correction (-B_m A_m x, block-diagonal packing, one adapter only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from server.adapters.lora_kernels import KernelLora, row_slots_tensor
from server.adapters.slot_uploads import SlotUploader
from server.model.config import ModelArgs

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# Decode steps with more blocks are gathered instead: a 32-row step over 8 adapters ran blocks vs
# gathered at 57.8 vs 59.2 ms with 1 block, 61.1 vs 61.7 ms with 3, 67.0 vs 63.0 ms with 5.
MAX_DECODE_BLOCKS = 3
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
               device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One adapter's projections of (layer, group) as (at [in, G*r], bt [G*r, out] block-diagonal); None if none."""
    names = [m for m in GROUPS[group] if (layer, m) in modules]
    if not names:
        return None
    in_f, cols = _group_shape(args, group)
    at = torch.zeros((in_f, len(cols) * rank), dtype=dtype, device=device)
    bt = torch.zeros((len(cols) * rank, cols[-1][1]), dtype=dtype, device=device)
    for name in names:
        mod = modules[(layer, name)]
        j = GROUPS[group].index(name)
        c0, c1 = cols[j]
        r = mod.a.shape[0]
        at[:, j * rank:j * rank + r] = mod.a.t()
        bt[j * rank:j * rank + r, c0:c1] = (mod.b * mod.scale).t()
    return at, bt


class LoraSlots:
    """Device storage for up to `num_slots` resident LoRA adapters."""

    def __init__(self, args: ModelArgs, num_slots: int, device: str, dtype: torch.dtype, decode_threads: int = 0):
        self.args = args
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.decode_threads = decode_threads  # CPU threads for decode-step LoRA matmuls (0 = torch's setting)
        self.rank = 0  # padded rank of every block
        self.columns = {g: _group_shape(args, g)[1] for g in GROUPS}  # group -> [(c0, c1)] per projection
        self.at: dict[tuple[int, str], torch.Tensor] = {}  # (layer, group) -> [slots, in, G*r]
        self.bt: dict[tuple[int, str], list[torch.Tensor]] = {}  # (layer, group) -> per projection [slots, r, out_j]
        self._loaded: dict[int, dict] = {}  # slot -> the adapter's modules (host), to repack on growth
        self._views: dict[tuple[int, int], dict] = {}  # (lo, u) -> the slot range's operands, see operands()
        self.use_kernels = False  # set by the owner when the runtime runs the Triton kernels
        self.version = 0  # bumped whenever slot tensors are reallocated (CUDA graphs recapture then)
        self.uploader = SlotUploader(device)  # host -> device copies (pinned, side stream on CUDA)

    def operands(self, lo: int, u: int) -> dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Views of slots lo..lo+u-1 per (layer, group): (at [U, in, G*r], per projection B^T [U, r, out_j]).

        Cached per slot range (a decode step reuses the last one), so a layer issues no view ops.
        """
        views = self._views.get((lo, u))
        if views is None:
            views = {key: (at[lo:lo + u], [bt[lo:lo + u] for bt in self.bt[key]]) for key, at in self.at.items()}
            if len(self._views) > 64:
                self._views.clear()
            self._views[(lo, u)] = views
        return views

    def load(self, slot: int, modules: dict) -> None:
        """Write an adapter's modules {(layer, "q_proj"): LoraModule(a [r,in], b [out,r], scale)} into `slot`."""
        self.clear(slot)
        rank = max(m.a.shape[0] for m in modules.values())
        self._loaded[slot] = modules
        if rank > self.rank:  # a bigger adapter arrived: repack every resident one at the new width
            self.rank = rank
            self.at, self.bt = {}, {}
            self._views.clear()
            self.version += 1
            for s, mods in self._loaded.items():
                self._write(s, mods)
        else:
            self._write(slot, modules)

    def _write(self, slot: int, modules: dict) -> None:
        """Copy each projection straight into its blocks of the slot (no staging tensors)."""
        for (layer, name), mod in modules.items():
            group = GROUP_OF[name]
            key = (layer, group)
            if key not in self.at:
                self._allocate(key)
            j = GROUPS[group].index(name)
            r = mod.a.shape[0]
            self.uploader.copy(self.at[key][slot, :, j * self.rank:j * self.rank + r], mod.a.t())
            self.uploader.copy_scaled(self.bt[key][j][slot, :r], mod.b.t(), mod.scale)
        self.uploader.done()

    def wait_for_uploads(self) -> None:
        """Make the compute stream wait (on the device, not the host) for slot writes in flight."""
        self.uploader.wait()

    def _allocate(self, key: tuple[int, str]) -> None:
        in_f, cols = _group_shape(self.args, key[1])
        zeros = dict(dtype=self.dtype, device=self.device)
        self.at[key] = torch.zeros((self.num_slots, in_f, len(cols) * self.rank), **zeros)
        self.bt[key] = [torch.zeros((self.num_slots, self.rank, c1 - c0), **zeros) for c0, c1 in cols]
        self._views.clear()
        self.version += 1

    def clear(self, slot: int) -> None:
        modules = self._loaded.pop(slot, None)
        if not modules:
            return
        for key in {(layer, GROUP_OF[m]) for layer, m in modules}:
            if key in self.at:
                self.uploader.zero(self.at[key][slot])
                for bt in self.bt[key]:
                    self.uploader.zero(bt[slot])
        self.uploader.done()


@dataclass
class MergedCorrection:
    """The merged adapter, packed per (layer, group), and which rows must have its delta removed."""

    packed: dict  # (layer, group) -> (at [in, G*r], bt [G*r, out])
    sign: torch.Tensor  # [B, 1, 1]: -1 for rows of other adapters or the base, 0 for the merged adapter's rows


class LoraBatch:
    """The per-step LoRA contributions (the additive part of server.adapters.step_batch.AdapterBatch).

    The engine sorts rows by slot, so each slot's rows are contiguous. They split into *blocks*:
    consecutive slots lo..lo+U-1 with M rows each in consecutive rows (an even spread over
    adapters, or a single adapter, is one block; 31 rows over 8 adapters are two). A block's
    grouping is a view and its expands add straight into the output rows: one shrink and one
    expand per projection per block. Decode steps with more than MAX_DECODE_BLOCKS blocks, and
    rows not sorted by slot, are gathered into a padded [U, M] grid and gathered back instead.
    Prefill rows always go by blocks (a 31-row prefill over 8 adapters spent 109 ms in LoRA one
    slot at a time and 326 ms gathered).
    """

    def __init__(self, slots: LoraSlots, row_slots: list[int], merged: MergedCorrection | None):
        self.slots = slots
        self.merged = merged
        self.row_slots = row_slots
        self.active = any(s >= 0 for s in row_slots)
        self.kernel: KernelLora | None = None  # the Triton path (CUDA), see server.adapters.lora_kernels
        if self.active:
            slots.wait_for_uploads()
        if self.active and slots.use_kernels:
            self.kernel = KernelLora(slots, row_slots_tensor(row_slots, slots.device))
            return
        if not self.active:
            return
        lora_rows = [(row, s) for row, s in enumerate(row_slots) if s >= 0]
        counts: dict[int, int] = {}
        for _, s in lora_rows:
            counts[s] = counts.get(s, 0) + 1
        self.lo, hi = min(counts), max(counts)
        self.u = hi - self.lo + 1  # the contiguous slot range in use
        self.m = max(counts.values())  # most rows of any one slot
        segments: list[list[int]] = []  # [slot, first row, end row] of each run of rows of one slot
        for row, s in lora_rows:
            if segments and segments[-1][0] == s and segments[-1][2] == row:
                segments[-1][2] = row + 1
            else:
                segments.append([s, row, row + 1])
        # Blocks: consecutive slots with the same row count in consecutive rows, (lo, u, m, first row).
        self.blocks: list[tuple[int, int, int, int]] = []
        if len(segments) == len(counts):  # every slot's rows are contiguous (the engine sorts by slot)
            for s, start, end in segments:
                if self.blocks:
                    lo, u, m, first = self.blocks[-1]
                    if s == lo + u and end - start == m and start == first + u * m:
                        self.blocks[-1] = (lo, u + 1, m, first)
                        continue
                self.blocks.append((s, 1, end - start, start))
        self._lora_rows, self._bsz = lora_rows, len(row_slots)
        self._indices: tuple[torch.Tensor, torch.Tensor] | None = None

    # A LoraBatch alone is a LoRA-only step (server.model.llama.AdapterRows with identity hooks).
    row_hooks = False

    def plain_lora(self) -> LoraBatch:
        return self

    def norm_weight(self, layer: int, group: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def scale_input(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def block_output(self, layer: int, site: str, residual: torch.Tensor, out: torch.Tensor) -> None:
        """Nothing to add after a sub-layer: LoRA acts inside the projections."""

    def _gather_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gather [U*M]: source row of each padded position, back [B]: padded position of each row),
        built on first use: steps that go by blocks never need them."""
        if self._indices is None:
            pad_row = 0  # padded positions read any real row; their outputs are never read back
            zero_pos = self.u * self.m  # a zero row appended to the output for base rows
            gather = [pad_row] * (self.u * self.m)
            back = [zero_pos] * self._bsz
            seen: dict[int, int] = {}
            for row, s in self._lora_rows:
                pos = (s - self.lo) * self.m + seen.get(s, 0)
                seen[s] = seen.get(s, 0) + 1
                gather[pos] = row
                back[row] = pos
            device = self.slots.device
            self._indices = torch.tensor(gather, device=device), torch.tensor(back, device=device)
        return self._indices

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the LoRA contribution for x [B, S, in] into the fused `group` output out [B, S, out] in place."""
        key = (layer, group)
        if self.kernel is not None:
            self.kernel.apply(layer, group, x, out)
            self._merged(key, x, out)
            return
        with _cpu_threads(self.slots.decode_threads if x.shape[1] == 1 and x.device.type == "cpu" else 0):
            if self.active and key in self.slots.at:
                if self.blocks and out.is_contiguous() and (len(self.blocks) <= MAX_DECODE_BLOCKS or x.shape[1] > 1):
                    for lo, u, m, first in self.blocks:
                        rows = slice(first, first + u * m)
                        self._add_grouped(key, x[rows], out[rows], lo, u, m)
                else:
                    self._add_gathered(key, x, out)
            self._merged(key, x, out)

    def _add_grouped(self, key: tuple[int, str], x: torch.Tensor, out: torch.Tensor, lo: int, u: int, m: int) -> None:
        """Rows of x [u*m, S, in] are m rows each of slots lo..lo+u-1: add into out [u*m, S, out] (contiguous)."""
        seq, d, n_out = x.shape[1], x.shape[2], out.shape[-1]
        at, bts = self.slots.operands(lo, u)[key]
        shrunk = torch.bmm(x.reshape(u, m * seq, d), at)  # [U, M*S, G*r]
        self._expand(key[1], shrunk, out.view(u, m * seq, n_out), bts)

    def _add_gathered(self, key: tuple[int, str], x: torch.Tensor, out: torch.Tensor) -> None:
        """Any row layout: gather rows into the padded [U, M] grid, expand, gather back into row order."""
        bsz, seq, d = x.shape
        n_out = out.shape[-1]
        gather, back = self._gather_indices()
        grouped = x.reshape(bsz, seq * d).index_select(0, gather).view(self.u, self.m * seq, d)
        at, bts = self.slots.operands(self.lo, self.u)[key]
        shrunk = torch.bmm(grouped, at)  # [U, M*S, G*r]
        y = shrunk.new_zeros(self.u, self.m * seq, n_out)  # [U, M*S, out]
        self._expand(key[1], shrunk, y, bts)
        # Back to row order with one gather (base rows read an appended zero row); index_add_ (a
        # scatter) measured 20x slower on this CPU than gather + add.
        y = y.view(self.u * self.m, seq * n_out)
        if len(self._lora_rows) < bsz:  # base rows read the appended zero row
            y = torch.cat([y, y.new_zeros(1, seq * n_out)])
        out += y.index_select(0, back).view(bsz, seq, n_out)

    def _expand(self, group: str, shrunk: torch.Tensor, target: torch.Tensor, bts: list[torch.Tensor]) -> None:
        """target [U, M*S, out] += B_j^T (bts[j]: [U, r, w_j]) applied to projection j's block of shrunk [U, M*S, G*r]."""
        r = self.slots.rank
        if len(bts) == 1:  # the whole group is one projection (o, down)
            target.baddbmm_(shrunk, bts[0])
            return
        for j, ((c0, c1), b) in enumerate(zip(self.slots.columns[group], bts, strict=True)):
            target[..., c0:c1].baddbmm_(shrunk[..., j * r:(j + 1) * r], b)

    def _merged(self, key: tuple[int, str], x: torch.Tensor, out: torch.Tensor) -> None:
        if self.merged is not None and key in self.merged.packed:
            at_m, bt_m = self.merged.packed[key]
            out.addcmul_((x @ at_m) @ bt_m, self.merged.sign)  # rows of other adapters: -B_m A_m x


class WeightedLoraBatch:
    """Rows that sit in several LoRA slots or carry a weight (per-request mixes): row r gets
    sum_i w_i * s_i * B_i A_i x_r over its (slot_i, w_i) entries, as PEFT's
    ``add_weighted_adapter(..., combination_type="cat")`` computes it.

    Each entry becomes a *virtual row* (a copy of its row's input); virtual rows are sorted by slot
    and go through a LoraBatch (blocks, as usual), are weighted, and are added back into their rows
    with one index_add_. Only steps holding a mix or a weight != 1 take this path.
    """

    def __init__(self, slots: LoraSlots, row_entries: list[list[tuple[int, float]]],
                 merged: MergedCorrection | None):
        virtual = sorted((slot, row, w) for row, entries in enumerate(row_entries) for slot, w in entries)
        device = slots.device
        self.src = torch.tensor([row for _, row, _ in virtual], device=device)  # [V] row of each virtual row
        self.weights = torch.tensor([w for _, _, w in virtual], dtype=slots.dtype, device=device).view(-1, 1, 1)
        self.inner = LoraBatch(slots, [slot for slot, _, _ in virtual], None)
        self.merged = LoraBatch(slots, [-1] * len(row_entries), merged) if merged is not None else None
        self.slots = slots

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add every row's weighted LoRA sum for x [B, S, in] into out [B, S, out] in place."""
        if self.inner.active and (layer, group) in self.slots.at:
            xv = x.index_select(0, self.src)  # [V, S, in]
            yv = out.new_zeros(xv.shape[0], xv.shape[1], out.shape[-1])  # [V, S, out]
            self.inner.apply(layer, group, xv, yv)
            out.index_add_(0, self.src, yv.mul_(self.weights))
        if self.merged is not None:
            self.merged.apply(layer, group, x, out)


@contextmanager
def _cpu_threads(n: int) -> Iterator[None]:
    """Run the block's torch CPU ops on `n` threads (0 = unchanged).

    Measured on the 2-core development VM, in the server under 32 streams: a decode step's LoRA
    matmuls are small (a few rows per adapter), and as two-thread parallel regions each one waits
    at a barrier whenever the gRPC threads hold the other core. With them on one thread, eight
    rank-16 adapters ran at 0.79x of base-only throughput instead of 0.72x, one adapter at 0.84x
    instead of 0.72x (isolated from the server, two threads are faster).
    """
    previous = torch.get_num_threads()
    if n <= 0 or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
