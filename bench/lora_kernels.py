"""Which batched-LoRA formulation is fastest on this machine? (decode and prefill shapes)

    python -m bench.lora_kernels

Compares, for one fused q/k/v group of the default model's width, rank 16:
  grouped   rows grouped by adapter slot into a padded block, bmm over the stacked slot weights (ours)
  gather    per-row gather of each row's A/B, then bmm (punica "bgmv" style)
  segments  Python loop over the adapters present, one matmul pair per segment (S-LoRA/SGMV style)
Times are medians of 50 runs; the base matmul of the same layer is the yardstick.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

from server.adapters.lora_batch import LoraBatch, LoraSlots
from server.model.config import ModelArgs

ARGS = ModelArgs(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                 num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64)
RANK = 16


def timeit(fn, n=50) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def measure(slots: LoraSlots, w: torch.Tensor, bsz: int, seq: int, n_adapters: int) -> tuple[float, ...]:
    """(base, grouped, gather, segments) microseconds for one batch shape."""
    x = torch.randn(bsz, seq, 576)
    rows = [i % n_adapters for i in range(bsz)]
    out = torch.zeros(bsz, seq, 960)
    idx = torch.tensor(rows)
    at, bt = slots.at[(0, "qkv")], slots.bt[(0, "qkv")]  # [S, in, 3r], [S, 3r, out]
    batch = LoraBatch(slots, rows, None)  # built once per step in the server, shared by every layer

    def grouped():
        batch._grouped_for = None  # the row grouping is redone per layer input, as in the forward pass
        batch.apply(0, "qkv", x, out)

    def gather():  # every row gathers its own adapter's weights, then one bmm pair
        out.add_(torch.bmm(torch.bmm(x, at[idx]), bt[idx]))

    def segments():  # one matmul pair per adapter present
        for s in sorted(set(rows)):
            r = [i for i, v in enumerate(rows) if v == s]
            out[r] += x[r] @ at[s] @ bt[s]

    return (timeit(lambda: torch.nn.functional.linear(x, w)), timeit(grouped), timeit(gather), timeit(segments))


def main() -> None:
    torch.manual_seed(0)
    slots = LoraSlots(ARGS, 64, "cpu", torch.float32)
    for s in range(64):
        mods = {(0, m): SimpleNamespace(a=torch.randn(RANK, 576) * 0.01, b=torch.randn(o, RANK) * 0.01, scale=2.0)
                for m, o in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}
        slots.load(s, mods)
    w = torch.randn(960, 576)
    print("| shape | adapters | base q/k/v matmul us | grouped (ours) us | per-row gather us | segments us |")
    print("|---|---|---|---|---|---|")
    for name, bsz, seq in (("decode B=32", 32, 1), ("prefill 4x128", 4, 128)):
        for n_adapters in (1, 8, 32):
            base, grouped, gather, segments = measure(slots, w, bsz, seq, n_adapters)
            print(f"| {name} | {n_adapters} | {base:.0f} | {grouped:.0f} | {gather:.0f} | {segments:.0f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
