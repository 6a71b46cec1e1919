"""Merged adapter vs base model, interleaved on one server and against a fresh server without merge.

    python -m bench.merged --requests 32 --max-new-tokens 64 --repeats 3

A merged LoRA's requests run the plain base path (its delta is in the weights); this checks that
they go as fast as base-model requests on a server with nothing merged (target: within 5%), and
shows what base rows pay for the low-rank correction while a merge is active.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from bench.adapters import build_adapters, register
from bench.load import run_load
from bench.server_process import ServerProcess
from bench.serving import chat_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from server.model.loader import resolve_model_folder

    _, folder = resolve_model_folder(args.model)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(folder), args.requests)
    root = Path(tempfile.mkdtemp(prefix="adapterserve-merged-"))
    build_adapters(folder, root, 1, 0, 0, 16)

    def tps(target: str, adapters: list[str]) -> float:
        return asyncio.run(run_load(target, prompts, adapters, args.max_new_tokens, len(prompts))).tokens_per_s

    common = ("--model", args.model, "--log-level", "WARNING", "--max-batch-size", str(args.requests))
    server = ServerProcess(*common, "--adapter-root", str(root))
    try:
        register(server.target, "m", "lora-0", merge=True)
        tps(server.target, ["", "m"])  # warm-up
        merged, base_with_merge = [], []
        for _ in range(args.repeats):
            merged.append(tps(server.target, ["m"]))
            base_with_merge.append(tps(server.target, [""]))
    finally:
        server.stop()
    server = ServerProcess(*common)
    try:
        tps(server.target, [""])  # warm-up
        base = [tps(server.target, [""]) for _ in range(args.repeats)]
    finally:
        server.stop()
    m, b, bm = statistics.median(merged), statistics.median(base), statistics.median(base_with_merge)
    print(f"\n| load | tok/s | vs base, nothing merged |\n|---|---|---|\n"
          f"| base model, server with nothing merged | {b:.1f} | 1.00x |\n"
          f"| merged rank-16 LoRA (all 7 projections) | {m:.1f} | {m / b:.2f}x |\n"
          f"| base model while that LoRA is merged | {bm:.1f} | {bm / b:.2f}x |")


if __name__ == "__main__":
    main()
