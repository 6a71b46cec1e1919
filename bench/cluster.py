"""Scale-out on Ray Serve: the cluster's overhead and its adapter hit rate, in one run.

    python -m bench.cluster --requests 32 --max-new-tokens 64 --adapters 8 --repeats 3
    python -m bench.cluster --part hitrate          # the simulation only (seconds, no model)

Throughput: 32 concurrent gRPC streams x 64 tokens over 8 rank-16 LoRA adapters (bench.load), the
same load against (a) the single server (`python -m server`), (b) `python -m server.cluster
--replicas 1` and (c) `--replicas 2` (on a 2-core host the two replicas share the same cores: each
gets --threads cores/2). Rounds alternate the order; medians of tok/s, ratios to the single server
(target for 1 replica: >= 0.9x).

Hit rate: a simulation of Serve's multiplexed routing (replicas holding the adapter first, else the
replica with the fewest adapters; LRU per replica) against random routing, Zipf(s) popularity over
64 adapters, 2 replicas x 8 slots; also the 10 000-adapter rows of docs/scale-out.md's capacity model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
from collections import OrderedDict
from pathlib import Path

from bench.load import LoadResult, markdown_table, run_load


# ---------------------------------------------------------------------------------- hit rate
def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(w)
    return [x / total for x in w]


def simulate(n_adapters: int, replicas: int, slots: int, s: float, routing: str, requests: int = 200_000,
             warmup: int = 20_000, seed: int = 0) -> float:
    """Fraction of requests (after warm-up) whose adapter was already on the replica that served it.

    ``affinity``: Serve's multiplexed routing: a replica holding the adapter if any (random among
    holders), else one of the replicas holding the fewest adapters; ``random``: any replica."""
    rng = random.Random(seed)
    caches = [OrderedDict() for _ in range(replicas)]
    holders: dict[int, set[int]] = {}
    ids = rng.choices(range(n_adapters), weights=zipf_weights(n_adapters, s), k=requests + warmup)
    hits = 0
    for i, a in enumerate(ids):
        if routing == "affinity" and holders.get(a):
            r = rng.choice(sorted(holders[a]))
        elif routing == "affinity":
            fewest = min(len(c) for c in caches)
            r = rng.choice([j for j, c in enumerate(caches) if len(c) == fewest])
        else:
            r = rng.randrange(replicas)
        cache = caches[r]
        hit = a in cache
        if hit:
            cache.move_to_end(a)
        else:
            if len(cache) >= slots:
                gone, _ = cache.popitem(last=False)
                holders[gone].discard(r)
            cache[a] = True
            holders.setdefault(a, set()).add(r)
        if i >= warmup:
            hits += hit
    return hits / requests


def hitrate_rows(s_values: list[float]) -> list[dict]:
    rows = []
    for n, replicas, slots in [(64, 2, 8), (10_000, 16, 64), (10_000, 64, 64)]:
        for s in s_values:
            aff = simulate(n, replicas, slots, s, "affinity")
            rnd = simulate(n, replicas, slots, s, "random")
            rows.append({"adapters": n, "replicas x slots": f"{replicas} x {slots}", "zipf s": s,
                         "affinity hit %": round(100 * aff, 1), "random hit %": round(100 * rnd, 1)})
    return rows


# ---------------------------------------------------------------------------------- throughput
def throughput(args) -> dict[str, list[LoadResult]]:
    import torch
    from transformers import AutoTokenizer

    from bench.adapters import build_adapters, register
    from bench.server_process import ServerProcess
    from bench.serving import chat_prompts
    from server.model.loader import resolve_model_folder

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    _, folder = resolve_model_folder(args.model)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(folder), args.requests)
    root = Path(tempfile.mkdtemp(prefix="adapterserve-bench-cluster-"))
    names = build_adapters(folder, root, args.adapters, 0, 0, args.rank)  # the adapter store: <root>/<name>
    common = ["--model", args.model, "--adapter-root", str(root), "--max-batch-size", str(args.requests),
              "--log-level", "WARNING", "--http-port", "0", "--metrics-port", "0"]
    setups = {
        "single server": dict(module="server", args=[*common, "--max-resident-adapters", str(args.adapters)],
                              threads=cores),
        "cluster, 1 replica": dict(module="server.cluster", args=[
            *common, "--replicas", "1", "--max-adapters-per-replica", str(args.adapters)], threads=cores),
        "cluster, 2 replicas": dict(module="server.cluster", args=[
            *common, "--replicas", "2", "--max-adapters-per-replica", str(args.adapters)],
            threads=max(1, cores // 2)),
    }
    runs: dict[str, list[LoadResult]] = {name: [] for name in setups}
    for name, setup in setups.items():  # one at a time: the cluster's Ray would compete with the others
        proc = ServerProcess(*setup["args"], threads=setup["threads"], module=setup["module"], ready_timeout=600)
        try:
            if setup["module"] == "server":  # the single server registers them; cluster replicas load them on use
                for n in names:
                    register(proc.target, n, n)
            asyncio.run(run_load(proc.target, prompts, names, 4, len(prompts)))  # warm-up: every adapter loaded
            for _ in range(args.repeats):
                result = asyncio.run(run_load(proc.target, prompts, names, args.max_new_tokens, len(prompts)))
                assert result.errors == 0, (name, result.errors)
                runs[name].append(result)
        finally:
            proc.stop()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "throughput", "hitrate"], default="all")
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="load rounds per setup (medians reported)")
    ap.add_argument("--zipf", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    args = ap.parse_args()
    out: dict = {}
    if args.part in ("all", "throughput"):
        runs = throughput(args)
        med = {name: statistics.median(r.tokens_per_s for r in rs) for name, rs in runs.items()}
        base = med["single server"]
        rows = [{"setup": name, "tok/s": round(v, 1), "vs single": round(v / base, 3),
                 "ttft p50 ms": round(statistics.median(r.pct(r.ttft_s, 0.5) for r in runs[name]) * 1000, 1)}
                for name, v in med.items()]
        print(f"\n{args.requests} concurrent streams x {args.max_new_tokens} tokens over {args.adapters} rank-{args.rank} "
              f"LoRA adapters, model={args.model}, medians of {args.repeats} rounds\n")
        print(markdown_table(rows))
        out["throughput"] = {r["setup"]: r["vs single"] for r in rows}
    if args.part in ("all", "hitrate"):
        rows = hitrate_rows(args.zipf)
        print("\nAdapter hit rate, simulated (after warm-up; Serve's multiplexed routing vs random)\n")
        print(markdown_table(rows))
        out["hitrate"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
