"""Serving benchmark: adapterserve vs transformers generate(), sequential and batched, same process run.

    python -m bench.serving --requests 16 --max-new-tokens 64 --repeats 3

Reports server tokens/s, TTFT and TPOT (p50/p99) and the ratio to each baseline (medians of repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from bench.load import markdown_table, run_load
from bench.server_process import ServerProcess

PROMPTS = [
    "Write a short poem about the sea.", "Explain what a neural network is.", "List three uses of copper.",
    "What is the capital of France?", "Give me a recipe for pancakes.", "Why is the sky blue?",
    "Summarize the plot of Hamlet.", "How do vaccines work?", "Describe a cat to a child.",
    "What is photosynthesis?", "Tips for learning a new language.", "What causes earthquakes?",
    "Explain recursion with an example.", "Name five planets.", "What is the speed of light?",
    "How does a bicycle stay upright?",
]


def chat_prompts(tokenizer, n: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                          add_generation_prompt=True, tokenize=False) for i in range(n)]


def hf_sequential(model, tokenizer, prompts: list[str], max_new: int) -> float:
    """Tokens/s of transformers generate() one request at a time (greedy, exactly max_new tokens)."""
    t0, tokens = time.perf_counter(), 0
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        tokens += out.shape[1] - ids.input_ids.shape[1]
    return tokens / (time.perf_counter() - t0)


def hf_batched(model, tokenizer, prompts: list[str], max_new: int) -> float:
    """Tokens/s of one padded generate() call over every prompt."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    t0 = time.perf_counter()
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * len(prompts)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sequential", action="store_true", help="skip the slow one-at-a-time baseline")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.loader import resolve_model_folder

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    _, folder = resolve_model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = chat_prompts(tokenizer, args.requests)

    server = ServerProcess("--model", args.model, "--max-batch-size", str(max(32, args.requests)), threads=threads)
    runs = []
    try:
        asyncio.run(run_load(server.target, prompts[:2], [""], 4, 2))  # warm-up
        for _ in range(args.repeats):
            runs.append(asyncio.run(run_load(server.target, prompts, [""], args.max_new_tokens, args.requests)))
    finally:
        server.stop()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        hf_batched(model, tokenizer, prompts[:2], 4)  # warm-up
        batched = [hf_batched(model, tokenizer, prompts, args.max_new_tokens) for _ in range(args.repeats)]
        sequential = [] if args.skip_sequential else [hf_sequential(model, tokenizer, prompts, args.max_new_tokens)]

    best = sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]
    server_tps = statistics.median(r.tokens_per_s for r in runs)
    rows = [{"system": "adapterserve (gRPC, streaming)", **best.row(), "tok/s": round(server_tps, 1)}]
    rows.append({"system": "transformers generate(), batched + padded", "tok/s": round(statistics.median(batched), 1)})
    if sequential:
        rows.append({"system": "transformers generate(), one at a time", "tok/s": round(sequential[0], 1)})
    print(f"\n{args.requests} concurrent greedy requests x {args.max_new_tokens} new tokens, model={args.model}, "
          f"torch threads={threads}, medians of {args.repeats}\n")
    print(markdown_table(rows))
    print(f"\nratio vs batched transformers: {server_tps / statistics.median(batched):.2f}x")
    if sequential:
        print(f"ratio vs sequential transformers: {server_tps / sequential[0]:.2f}x")


if __name__ == "__main__":
    main()
