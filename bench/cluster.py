"""Scale-out on Ray Serve: the cluster's overhead and its adapter hit rate, in one run.

    python -m bench.cluster --requests 32 --max-new-tokens 64 --adapters 8 --repeats 3
    python -m bench.cluster --part hitrate          # the simulation only (seconds, no model)

Throughput: 32 concurrent gRPC streams x 64 tokens over 8 rank-16 LoRA adapters (bench.load), the
same load against (a) the single server (`python -m server`), (b) `python -m server.cluster
--replicas 1` and (c) `--replicas 2` (on a 2-core host the two replicas share the same cores: each
gets --threads cores/2). Each setup starts once; then in each round every setup runs the load while
the others are paused (SIGSTOP of their whole process tree, Ray included), the order reversed every
other round; medians of tok/s, ratios to the single server (target for 1 replica: >= 0.9x). The
clusters' Ray workers run 15 nicer than the bench (Ray's default; ``--ray-worker-niceness 0``: the
same niceness as the single server). Each
cluster also runs the load through its engine application directly (``--paths direct``: the
clients' ``engine_app`` option, one Ray hop fewer: proxy -> engine replica) and lookaside
(``--paths lookaside``: the clients' ``lookaside`` option, a lease through the proxy per request, the
tokens straight from the replica's own gRPC server), setups of their own on the same cluster
processes, so the paths are compared within one run. Also
tokens per CPU second of each setup's whole process tree (Ray's processes included): on a busy
shared host the wall-clock ratio mixes in the other tenants, the CPU ratio is the overhead itself.

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

ENGINE_APP = "adapterserve-engine"  # python -m server.cluster's engine application (default --app-name)


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
    """Every setup started once, then `--repeats` rounds; in each round every setup runs the same load
    while the others are paused (SIGSTOP of the whole process tree), order reversed every other round,
    so the host's drift hits every setup alike."""
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
    # A process: module, args, threads, env. A setup: a process and the path the load takes into it.
    processes: dict[str, dict] = {
        "single server": dict(module="server", args=[*common, "--max-resident-adapters", str(args.adapters)],
                              threads=cores, env={}),
    }
    setups: dict[str, dict] = {"single server": dict(process="single server", engine_app=None, lookaside=False)}
    for n in args.replicas:
        cluster_args = [*common, "--replicas", str(n), "--max-adapters-per-replica", str(args.adapters)]
        threads = max(1, cores // n)  # replicas on one host share its cores
        for label, env in [("", {}), *args.variant]:
            name = f"cluster, {n} replica{'s' if n > 1 else ''}" + (f", {label}" if label else "")
            # Ray starts its workers (replicas, proxy, controller) at +worker_niceness (15) from the CLI's own
            # niceness; the single server runs at the bench's (--ray-worker-niceness 0: the same).
            ray_env = {} if args.ray_worker_niceness is None else {"RAY_worker_niceness": str(args.ray_worker_niceness)}
            processes[name] = dict(module="server.cluster", args=cluster_args, threads=threads, env={**ray_env, **env})
            if "ingress" in args.paths:
                setups[name] = dict(process=name, engine_app=None, lookaside=False)
            if "direct" in args.paths:
                setups[f"{name}, direct"] = dict(process=name, engine_app=ENGINE_APP, lookaside=False)
            if "lookaside" in args.paths:
                setups[f"{name}, lookaside"] = dict(process=name, engine_app=ENGINE_APP, lookaside=True)
    procs: dict[str, ServerProcess] = {}
    runs: dict[str, list[LoadResult]] = {name: [] for name in setups}
    try:
        for name, setup in processes.items():  # started one at a time, then paused while the others start
            proc = ServerProcess(*setup["args"], threads=setup["threads"], module=setup["module"],
                                 ready_timeout=900, env=setup["env"])
            procs[name] = proc
            if setup["module"] == "server":  # the single server registers them; cluster replicas load them on use
                for n in names:
                    register(proc.target, n, n)
            for app, lookaside in {(s["engine_app"], s["lookaside"]) for s in setups.values() if s["process"] == name}:
                asyncio.run(run_load(proc.target, prompts, names, 4, len(prompts), engine_app=app,  # warm-up
                                     lookaside=lookaside))
            proc.pause()
        for r in range(args.repeats):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))
            for name in order:
                proc = procs[setups[name]["process"]]
                proc.resume()
                try:
                    cpu0 = proc.tree_cpu_seconds()
                    by_process0 = proc.tree_cpu_by_process()
                    result = asyncio.run(run_load(proc.target, prompts, names, args.max_new_tokens, len(prompts),
                                                  engine_app=setups[name]["engine_app"],
                                                  lookaside=setups[name]["lookaside"]))
                    cpu = proc.tree_cpu_seconds() - cpu0
                    by_process = cpu_per_token(by_process0, proc.tree_cpu_by_process(), result.tokens)
                finally:
                    proc.pause()
                assert result.errors == 0, (name, result.errors)
                result.cpu_s = cpu  # the setup's whole process tree
                runs[name].append(result)
                print(f"round {r + 1}: {name}: {result.tokens_per_s:.1f} tok/s, {result.tokens / cpu:.1f} tok per "
                      f"CPU s (load {os.getloadavg()[0]:.1f}); CPU ms per token: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in by_process.items()), flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
    return runs


def cpu_per_token(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  tokens: int) -> dict[str, float]:
    """CPU ms per streamed token by process label (summed over processes of one label), largest first."""
    by_label: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        used = cpu - before.get(pid, (label, 0.0))[1]
        by_label[label] = by_label.get(label, 0.0) + 1000 * used / max(1, tokens)
    return dict(sorted(((k, v) for k, v in by_label.items() if v >= 0.05), key=lambda kv: -kv[1]))


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """LABEL=KEY=VALUE[,KEY=VALUE...]: an extra cluster setup run with those environment variables."""
    label, _, assignments = text.partition("=")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    if not label or not env:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: want LABEL=KEY=VALUE[,KEY=VALUE...]")
    return label, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "throughput", "hitrate"], default="all")
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="load rounds per setup (medians reported)")
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 2],
                    help="cluster setups: replica counts (none: the single server alone, a smoke test)")
    ap.add_argument("--paths", nargs="+", choices=["ingress", "direct", "lookaside"],
                    default=["ingress", "direct", "lookaside"],
                    help="how the load enters each cluster: through the ingress (any gRPC client), straight to "
                         "the engine application (the clients' engine_app option), and/or leased from it and "
                         "sent to the replica's own server (the clients' lookaside option)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness of the clusters: Ray runs its workers this much nicer than the "
                         "process that starts Ray (default: Ray's, 15, below the single server's priority on a "
                         "shared host; 0: the same; on a quiet host 15 measured 1.03-1.04x of 0)")
    ap.add_argument("--variant", type=_variant, action="append", default=[],
                    help="LABEL=KEY=VALUE[,...]: also each cluster setup with these environment variables "
                         "(Ray Serve knobs, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)")
    ap.add_argument("--zipf", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    args = ap.parse_args()
    out: dict = {}
    if args.part in ("all", "throughput"):
        runs = throughput(args)
        med = {name: statistics.median(r.tokens_per_s for r in rs) for name, rs in runs.items()}
        per_cpu = {name: statistics.median(r.tokens / r.cpu_s for r in rs) for name, rs in runs.items()}
        base, base_cpu = med["single server"], per_cpu["single server"]
        rows = [{"setup": name, "tok/s": round(v, 1), "vs single": round(v / base, 3),
                 "tok per CPU s": round(per_cpu[name], 1), "CPU vs single": round(per_cpu[name] / base_cpu, 3),
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
