"""Bottleneck adapters per row of a mixed batch (see server.adapters.kinds.bottleneck for the math).

Device tables per inserted place ``(layer, site)`` ("attn": after self-attention, "mlp": after the
MLP), one entry per resident slot, zero-padded to the widest resident bottleneck ``R``:
``down`` [slots, hidden, R] (transposed), ``down_bias`` [slots, 1, R], ``up`` [slots, R, hidden],
``up_bias`` [slots, 1, hidden]. Zero padding is exact for every non-linearity: padded columns of
``down`` meet zero rows of ``up``. A slot without a layer at a place holds zeros there too, but its
rows are left out of that place's matmuls.

Per step, at each place only the rows of adapters with a layer there take part: their inputs and
their slots' weights are gathered (``index_select``, one entry per row), run through two batched
matmuls (``baddbmm``) and the activation of their adapter, and the result is added into the sub-layer
output with one ``index_add_``. A step without bottleneck rows issues none of these ops. The tables
hold every slot at the widest resident width, outside ``--adapter-memory-bytes`` (as the LoRA slots).

Threads: engine thread only.
"""

from __future__ import annotations

import torch

from server.adapters.kinds.bottleneck import ACTIVATIONS, BottleneckWeights
from server.model.config import ModelArgs

Place = tuple[int, str]  # (layer, "attn" | "mlp")


class BottleneckSlots:
    """Bottleneck weights of up to `num_slots` resident adapters, on the device."""

    def __init__(self, args: ModelArgs, num_slots: int, device: str | torch.device, dtype: torch.dtype):
        self.args = args
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.width = 0  # R: the widest resident bottleneck
        self.down: dict[Place, torch.Tensor] = {}  # [slots, hidden, R]
        self.down_bias: dict[Place, torch.Tensor] = {}  # [slots, 1, R]
        self.up: dict[Place, torch.Tensor] = {}  # [slots, R, hidden]
        self.up_bias: dict[Place, torch.Tensor] = {}  # [slots, 1, hidden]
        self.places: dict[int, frozenset[Place]] = {}  # slot -> places it has a layer at
        self.activation: dict[int, str] = {}  # slot -> non-linearity
        self.add_residual: dict[int, bool] = {}  # slot -> the adapter reads o + r (Pfeiffer) rather than o
        self._weights: dict[int, BottleneckWeights] = {}

    def load(self, slot: int, w: BottleneckWeights) -> None:
        """Write an adapter into `slot` (widening every table when it is wider than R)."""
        self.clear(slot)
        if w.width > self.width:
            self._widen(w.width)
        hidden = self.args.hidden_size
        for place, m in w.layers.items():
            if place not in self.down:
                self._new_place(place, hidden)
            r = m.down.shape[0]
            self.down[place][slot, :, :r] = m.down.t().to(self.device, self.dtype)
            self.down_bias[place][slot, 0, :r] = m.down_bias.to(self.device, self.dtype)
            self.up[place][slot, :r] = m.up.t().to(self.device, self.dtype)
            self.up_bias[place][slot, 0] = m.up_bias.to(self.device, self.dtype)
        self.places[slot] = frozenset(w.layers)
        self.activation[slot] = w.non_linearity
        self.add_residual[slot] = w.add_residual_input
        self._weights[slot] = w

    def clear(self, slot: int) -> None:
        """Zero `slot` (its rows then add nothing) and forget it."""
        for place in self.places.pop(slot, frozenset()):
            for table in (self.down, self.down_bias, self.up, self.up_bias):
                table[place][slot].zero_()
        self.activation.pop(slot, None)
        self.add_residual.pop(slot, None)
        self._weights.pop(slot, None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for table in (self.down, self.down_bias, self.up, self.up_bias) for t in table.values())

    def _new_place(self, place: Place, hidden: int) -> None:
        z = dict(device=self.device, dtype=self.dtype)
        self.down[place] = torch.zeros(self.num_slots, hidden, self.width, **z)
        self.down_bias[place] = torch.zeros(self.num_slots, 1, self.width, **z)
        self.up[place] = torch.zeros(self.num_slots, self.width, hidden, **z)
        self.up_bias[place] = torch.zeros(self.num_slots, 1, hidden, **z)

    def _widen(self, width: int) -> None:
        pad = width - self.width
        for place in self.down:
            self.down[place] = torch.nn.functional.pad(self.down[place], (0, pad))
            self.down_bias[place] = torch.nn.functional.pad(self.down_bias[place], (0, pad))
            self.up[place] = torch.nn.functional.pad(self.up[place], (0, 0, 0, pad))
        self.width = width


class BottleneckBatch:
    """One step's bottleneck rows: which batch rows use which slot (built once per step)."""

    def __init__(self, slots: BottleneckSlots, row_slots: list[int]):
        self.slots = slots
        device = slots.device
        self.active = [(row, s) for row, s in enumerate(row_slots) if s >= 0 and s in slots.places]
        self._per_place: dict[Place, tuple[torch.Tensor, torch.Tensor, list[tuple[str, torch.Tensor]], torch.Tensor]]
        self._per_place = {}
        by_place: dict[Place, list[tuple[int, int]]] = {}
        for row, s in self.active:
            for place in slots.places[s]:
                by_place.setdefault(place, []).append((row, s))
        for place, rows in by_place.items():
            idx = torch.tensor([r for r, _ in rows], device=device)  # [A] batch rows
            sl = torch.tensor([s for _, s in rows], device=device)  # [A] their slots
            acts: dict[str, list[int]] = {}
            for i, (_, s) in enumerate(rows):
                acts.setdefault(slots.activation[s], []).append(i)
            groups = [(name, torch.tensor(pos, device=device)) for name, pos in acts.items()]
            resid = torch.tensor([1.0 if slots.add_residual[s] else 0.0 for _, s in rows], device=device,
                                 dtype=slots.dtype).view(-1, 1, 1)  # [A, 1, 1]
            self._per_place[place] = (idx, sl, groups, resid)

    def apply(self, layer: int, site: str, residual: torch.Tensor, out: torch.Tensor) -> None:
        """Add each bottleneck row's delta into the sub-layer output out [B, S, H] in place; residual
        [B, S, H] is the stream the sub-layer's input was normed from (the caller then adds out to it)."""
        entry = self._per_place.get((layer, site))
        if entry is None:
            return
        idx, sl, groups, resid = entry
        place = (layer, site)
        s = self.slots
        h = out.index_select(0, idx)  # [A, S, H]
        h = h.addcmul_(residual.index_select(0, idx), resid)  # o + r for Pfeiffer rows, o for Houlsby rows
        z = torch.baddbmm(s.down_bias[place].index_select(0, sl), h, s.down[place].index_select(0, sl))  # [A, S, R]
        if len(groups) == 1:
            z = ACTIVATIONS[groups[0][0]](z)
        else:
            z = z.clone()
            for name, pos in groups:
                z.index_copy_(0, pos, ACTIVATIONS[name](z.index_select(0, pos)))
        y = torch.baddbmm(s.up_bias[place].index_select(0, sl), z, s.up[place].index_select(0, sl))  # [A, S, H]
        out.index_add_(0, idx, y)

