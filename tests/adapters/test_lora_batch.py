"""Batched LoRA against the per-row definition y = x W^T + s (x A^T) B^T, for every row layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.adapters.lora_batch import GROUPS, LoraBatch, LoraSlots
from server.model.config import ModelArgs

ARGS = ModelArgs(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _adapters(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        rank = 2 + i % 3  # mixed ranks: padded to the largest in the slots
        mods = {}
        for layer in range(ARGS.num_layers):
            for name in ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")[: 3 + i % 3]:
                o, k = ARGS.linear_shape(name)
                mods[(layer, name)] = SimpleNamespace(a=torch.randn(rank, k, generator=gen),
                                                      b=torch.randn(o, rank, generator=gen), scale=0.5 + i)
        out.append(mods)
    return out


def _reference(adapters, row_slots, layer, group, x):
    outs = []
    for row, slot in enumerate(row_slots):
        parts = []
        for name in GROUPS[group]:
            o, _ = ARGS.linear_shape(name)
            mod = adapters[slot].get((layer, name)) if slot >= 0 else None
            parts.append(torch.zeros(x.shape[1], o) if mod is None else (x[row] @ mod.a.t()) @ mod.b.t() * mod.scale)
        outs.append(torch.cat(parts, -1))
    return torch.stack(outs)


# layout -> (rows' slots, blocks (consecutive slots with equal row counts in consecutive rows))
LAYOUTS = {
    "one adapter": ([0, 0, 0, 0], 1),
    "even, sorted": ([0, 0, 1, 1, 2, 2], 1),
    "base rows first, then even": ([-1, -1, 1, 2, 3], 1),
    "uneven, sorted": ([0, 0, 1, 1, 2], 2),
    "uneven, sorted, four blocks": ([0, 0, 0, 1, 2, 2, 3], 4),
    "with base rows between": ([-1, 1, -1, 3, 3], 2),
    "even, unsorted": ([2, 0, 1, 0, 2, 1], 0),
    "gap in slots": ([0, 3, 3, 0], 0),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("seq", [1, 3])
def test_every_row_gets_exactly_its_own_adapter(layout, seq):
    adapters = _adapters(4)
    slots = LoraSlots(ARGS, 4, "cpu", torch.float32, decode_threads=1)
    for i, mods in enumerate(adapters):
        slots.load(i, mods)
    rows, blocks = LAYOUTS[layout]
    batch = LoraBatch(slots, rows, None)
    assert len(batch.blocks) == blocks
    for layer in range(ARGS.num_layers):
        for group in GROUPS:
            in_f = ARGS.linear_shape(GROUPS[group][0])[1]
            x = torch.randn(len(rows), seq, in_f)
            out = torch.zeros(len(rows), seq, sum(ARGS.linear_shape(m)[0] for m in GROUPS[group]))
            batch.apply(layer, group, x, out)
            torch.testing.assert_close(out, _reference(adapters, rows, layer, group, x), rtol=1e-4, atol=1e-4)


def test_decode_lora_threads_are_restored_after_each_op():
    """--lora-threads applies to the LoRA matmuls of decode steps only; the base model keeps its threads."""
    slots = LoraSlots(ARGS, 4, "cpu", torch.float32, decode_threads=1)
    slots.load(0, _adapters(1)[0])
    batch = LoraBatch(slots, [0, 0], None)
    before = torch.get_num_threads()
    x = torch.randn(2, 1, ARGS.hidden_size)
    out = torch.zeros(2, 1, sum(ARGS.linear_shape(m)[0] for m in GROUPS["qkv"]))
    batch.apply(0, "qkv", x, out)
    assert torch.get_num_threads() == before
    assert out.abs().sum() > 0
