"""Bottleneck adapters per row (server.adapters.bottleneck_batch) against the definition, row by row.

The definition (server.adapters.kinds.bottleneck): a row of adapter a at place (layer, site) gets
``o + up_a f_a(down_a h + b_down) + b_up`` with ``h = o + r`` (Pfeiffer, original_ln_before) or ``o``
(Houlsby); rows of the base model and of adapters without a layer there keep ``o`` exactly.
"""

from __future__ import annotations

import pytest
import torch

from server.adapters.bottleneck_batch import BottleneckBatch, BottleneckSlots
from server.adapters.kinds.bottleneck import BottleneckLayer, BottleneckWeights, bottleneck_delta
from server.model.config import ModelArgs

ARGS = ModelArgs(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=16, intermediate_size=32,
                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)


def _adapter(seed: int, width: int, places, act: str, pfeiffer: bool) -> BottleneckWeights:
    g = torch.Generator().manual_seed(seed)
    h = ARGS.hidden_size

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    layers = {p: BottleneckLayer(rnd(width, h), rnd(width), rnd(h, width), rnd(h)) for p in places}
    return BottleneckWeights(layers, act, pfeiffer)


ADAPTERS = {
    0: _adapter(1, 4, [(0, "mlp"), (1, "mlp")], "relu", True),  # Pfeiffer
    1: _adapter(2, 8, [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")], "swish", False),  # Houlsby, wider
    2: _adapter(3, 2, [(1, "mlp")], "sigmoid", True),  # one place only; f(0) != 0 tests the zero padding
}

LAYOUTS = {
    "one adapter": [0, 0, 0],
    "grouped mix with base rows": [-1, 0, 0, 1, 2, 2],
    "interleaved": [1, -1, 2, 0, 1, 0],
    "base only": [-1, -1],
    "single row of each": [2, 1, 0],
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("seq", [1, 5])
def test_rows_match_the_definition(layout, seq):
    row_slots = LAYOUTS[layout]
    slots = BottleneckSlots(ARGS, num_slots=4, device="cpu", dtype=torch.float32)
    for slot, w in ADAPTERS.items():
        slots.load(slot, w)
    batch = BottleneckBatch(slots, row_slots)
    g = torch.Generator().manual_seed(7)
    for layer in range(ARGS.num_layers):
        for site in ("attn", "mlp"):
            r = torch.randn(len(row_slots), seq, ARGS.hidden_size, generator=g)
            o = torch.randn(len(row_slots), seq, ARGS.hidden_size, generator=g)
            got = o.clone()
            batch.apply(layer, site, r, got)
            for row, slot in enumerate(row_slots):
                want = o[row]
                w = ADAPTERS.get(slot)
                if w is not None and (layer, site) in w.layers:
                    h = o[row] + r[row] if w.add_residual_input else o[row]
                    want = o[row] + bottleneck_delta(h, w.layers[(layer, site)], w.non_linearity)
                    assert not torch.allclose(want, o[row], atol=1e-3)  # the adapter visibly changes the row
                torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5,
                                           msg=f"row {row} slot {slot} at {(layer, site)}")


def test_clear_and_replace_slot():
    slots = BottleneckSlots(ARGS, num_slots=2, device="cpu", dtype=torch.float32)
    slots.load(0, ADAPTERS[1])
    slots.load(0, ADAPTERS[0])  # replaced in place: Houlsby's attention layers must not linger
    r, o = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    got = o.clone()
    BottleneckBatch(slots, [0]).apply(0, "attn", r, got)
    torch.testing.assert_close(got, o, atol=0, rtol=0)
    slots.clear(0)
    got = o.clone()
    BottleneckBatch(slots, [0]).apply(0, "mlp", r, got)
    torch.testing.assert_close(got, o, atol=0, rtol=0)
