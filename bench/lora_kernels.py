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


def main() -> None:
    torch.manual_seed(0)
    slots = LoraSlots(ARGS, 64, "cpu", torch.float32)
    host = []
    for s in range(64):
        mods = {(0, m): SimpleNamespace(a=torch.randn(RANK, 576) * 0.01, b=torch.randn(o, RANK) * 0.01, scale=2.0)
                for m, o in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192))}
        slots.load(s, mods)
        host.append(mods)
    w = torch.randn(960, 576)
    a_all = torch.stack([torch.cat([m[(0, p)].a for p in ("q_proj", "k_proj", "v_proj")]) for m in host])  # [S,3r,in]
    print("| shape | adapters | base matmul us | grouped (ours) us | gather us | segments us |")
    print("|---|---|---|---|---|---|")
    for name, bsz, seq in (("decode B=32", 32, 1), ("prefill 4x128", 4, 128)):
        x = torch.randn(bsz, seq, 576)
        for n_adapters in (1, 8, 32):
            rows = [i % n_adapters for i in range(bsz)]
            out = torch.zeros(bsz, seq, 960)
            base = timeit(lambda: torch.nn.functional.linear(x, w))
            grouped = timeit(lambda: LoraBatch(slots, rows, None).apply(0, "qkv", x, out))
            idx = torch.tensor(rows)

            def gather():
                a = a_all[idx]  # [B, 3r, in] copy per row
                b = slots.bt[(0, "qkv")][0][idx]  # [B, r, out_q] copy per row (q part only, lower bound)
                return torch.bmm(torch.bmm(x, a.transpose(1, 2))[..., :RANK], b)

            def segments():
                y = torch.zeros(bsz, seq, 960)
                for s in sorted(set(rows)):
                    r = [i for i, v in enumerate(rows) if v == s]
                    xs = x[r]
                    shr = xs @ slots.at[(0, "qkv")][s]
                    y[r] += torch.cat([shr[..., j * RANK:(j + 1) * RANK] @ bt[s]
                                       for j, bt in enumerate(slots.bt[(0, "qkv")])], -1)
                return y

            print(f"| {name} | {n_adapters} | {base:.0f} | {grouped:.0f} | {timeit(gather):.0f} | "
                  f"{timeit(segments):.0f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
