"""Which batched-LoRA formulation is fastest on this machine? (decode and prefill shapes)

    python -m bench.lora_kernels

Compares, for one fused q/k/v group of the default model's width, rank 16:
  grouped   rows grouped by adapter slot, bmm over the stacked slot weights, B stored per
            projection (ours: server/adapters/lora_batch.py)
  blockdiag the same grouping with B stored block-diagonally as one [3r, out] matrix per slot
            (one expand bmm, but 1.5x the bytes: the layout before)
  gather    per-row gather of each row's A/B (block-diagonal), then bmm (punica "bgmv" style)
  segments  Python loop over the adapters present, one matmul pair per segment (S-LoRA/SGMV style)
Times are medians of 50 runs; the base matmul of the same layer is the yardstick. Weights here
stay in cache between runs, so this shows per-op cost; bytes read decide a real 30-layer step.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

from server.adapters.lora_batch import LoraBatch, LoraSlots, pack_group
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


def measure(slots: LoraSlots, at: torch.Tensor, bt: torch.Tensor, w: torch.Tensor, bsz: int, seq: int,
            n_adapters: int) -> tuple[float, ...]:
    """(base, grouped, blockdiag, gather, segments) microseconds for one batch shape.

    at [S, in, 3r] and bt [S, 3r, out] are the slots' adapters packed block-diagonally."""
    x = torch.randn(bsz, seq, 576)
    rows = sorted(i % n_adapters for i in range(bsz))  # the engine sorts rows by slot
    out = torch.zeros(bsz, seq, 960)
    idx = torch.tensor(rows)
    batch = LoraBatch(slots, rows, None)  # built once per step in the server, shared by every layer
    u, m = n_adapters, bsz // n_adapters

    def grouped():
        batch.apply(0, "qkv", x, out)

    def blockdiag():
        shrunk = torch.bmm(x.reshape(u, m * seq, 576), at[:u])
        out.view(u, m * seq, 960).baddbmm_(shrunk, bt[:u])

    def gather():  # every row gathers its own adapter's weights, then one bmm pair
        out.add_(torch.bmm(torch.bmm(x, at[idx]), bt[idx]))

    def segments():  # one matmul pair per adapter present
        for s in sorted(set(rows)):
            r = [i for i, v in enumerate(rows) if v == s]
            out[r] += x[r] @ at[s] @ bt[s]

    return (timeit(lambda: torch.nn.functional.linear(x, w)), timeit(grouped), timeit(blockdiag), timeit(gather),
            timeit(segments))


def main() -> None:
    torch.manual_seed(0)
    slots = LoraSlots(ARGS, 64, "cpu", torch.float32)
    packed = []
    for s in range(64):
        mods = {(0, m): SimpleNamespace(a=torch.randn(RANK, 576) * 0.01, b=torch.randn(o, RANK) * 0.01, scale=2.0)
                for m, o in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}
        slots.load(s, mods)
        packed.append(pack_group(ARGS, "qkv", mods, 0, RANK, "cpu", torch.float32))
    at = torch.stack([p[0] for p in packed])  # [S, in, 3r]
    bt = torch.stack([p[1] for p in packed])  # [S, 3r, out] block-diagonal
    w = torch.randn(960, 576)
    print("| shape | adapters | base q/k/v matmul us | grouped (ours) us | block-diagonal B us | per-row gather us "
          "| segments us |")
    print("|---|---|---|---|---|---|---|")
    for name, bsz, seq in (("decode B=32", 32, 1), ("prefill 8x64", 8, 64)):
        for n_adapters in (1, 8, 32):
            if bsz % n_adapters:
                continue
            base, grouped, blockdiag, gather, segments = measure(slots, at, bt, w, bsz, seq, n_adapters)
            print(f"| {name} | {n_adapters} | {base:.0f} | {grouped:.0f} | {blockdiag:.0f} | {gather:.0f} "
                  f"| {segments:.0f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
