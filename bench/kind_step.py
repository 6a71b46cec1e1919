"""Decode-step cost of each adapter kind, in-process, on the CPU clock: issue 13/15's per-kind targets.

    python -m bench.kind_step                  # 32 rows over 8 adapters of each kind vs 32 base rows
    python -m bench.kind_step --rows 16 --rounds 8

One engine per load (base; 8 LoRA, DoRA, IA3, LN-tuning, bottleneck adapters; 8 weighted mixes of 2
LoRAs), all on the same model object, each with `--rows` running greedy requests prefilled once.
Rounds alternate the loads' order; each round times 8 whole engine iterations (scheduling, forward,
sampling) per load on this process's CPU clock with one torch thread, so other tenants' load on a
shared host stretches wall time but hardly these figures. Reported: median ms per step and base
step time / the load's step time (1.00 = free).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.adapters import build_adapters, build_bottlenecks
from bench.decode_step import PAGE, build_model
from bench.load import markdown_table
from server.adapters.catalog import AdapterCatalog
from server.adapters.formats import AdapterLimits, load_adapter_dir
from server.adapters.residency import Residency
from server.engine.commands import CommandQueue
from server.engine.engine import Engine
from server.engine.request import Request, Sampling
from server.model.loader import LoadedModel, resolve_model_folder

CONTEXT = 69  # prompt tokens per row: the midpoint of a 37-token prompt + 64 new tokens
Load = list[str | tuple[str, str] | None]  # per row pattern: adapter id, a (LoRA, LoRA) mix, or None = base


def running_engine(model: LoadedModel, root: Path, rows: int, pattern: Load, steps_after: int) -> Engine:
    """An engine whose `rows` requests (adapters cycling through `pattern`) are prefilled and decoding."""
    commands = CommandQueue()
    residency = Residency(model.runtime, max_resident=16, memory_bytes=1 << 31, lora_threads=1)
    catalog = AdapterCatalog(residency, commands)
    engine = Engine(model.runtime, model.tokenizer, residency, catalog, commands,
                    kv_cache_tokens=rows * (CONTEXT + steps_after + 16), page_size=PAGE, max_batch_size=rows,
                    max_queue=rows, max_prefill_tokens=512, prefix_cache=False)
    ids = sorted({part for p in pattern if p is not None for part in ((p,) if isinstance(p, str) else p)})
    for adapter_id in ids:  # registration's install runs as an engine command: pump iterations meanwhile
        spec = load_adapter_dir(root / adapter_id, model.args, AdapterLimits())
        t = threading.Thread(target=catalog.register, args=(adapter_id, spec))
        t.start()
        while t.is_alive():
            engine._iteration()
            time.sleep(0.001)
    prompt = list(range(100, 100 + CONTEXT))
    for i in range(rows):
        p = pattern[i % len(pattern)]
        req = Request(f"r{i}", prompt, Sampling(max_new_tokens=steps_after, ignore_eos=True), lambda e: None)
        if isinstance(p, str):
            req.adapter = catalog.acquire(p)
        elif p is not None:
            req.adapter = catalog.acquire_mix([(p[0], 1.0), (p[1], 0.5)])
        engine.submit(req)
    while len(engine.running) < rows or any(r.cached < len(r.prompt_ids) for r in engine.running):
        engine._iteration()  # admission and prefill
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8, help="engine iterations timed per load and round")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()

    model = build_model("onednn", "float32", threads=1)
    _, folder = resolve_model_folder("default")
    root = Path(tempfile.mkdtemp(prefix="adapterserve-kind-step-"))
    names = build_adapters(folder, root, 8, 0, 0, args.rank, n_other=8) + build_bottlenecks(folder, root, 8)
    of = {k: [n for n in names if n.startswith(k + "-")] for k in ("lora", "dora", "ia3", "ln", "bottleneck")}
    loads: dict[str, Load] = {
        "base": [None], "8 LoRA": of["lora"], "8 DoRA": of["dora"], "8 IA3": of["ia3"], "8 LN tuning": of["ln"],
        "8 bottleneck (Pfeiffer, rf 16)": of["bottleneck"],
        "8 mixes of 2 LoRA": [(of["lora"][i], of["lora"][(i + 1) % 8]) for i in range(8)]}
    steps_after = args.rounds * (args.steps + 1) + 4
    engines = {name: running_engine(model, root, args.rows, pattern, steps_after) for name, pattern in loads.items()}
    samples: dict[str, list[float]] = {name: [] for name in loads}
    order = list(loads)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            engine = engines[name]
            engine._iteration()  # warm-up after the other loads ran
            times = []
            for _ in range(args.steps):
                t0 = time.process_time()
                engine._iteration()
                times.append(time.process_time() - t0)
            samples[name].append(statistics.median(times))
    ms = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    print(f"\n{args.rows} decoding rows, rank-{args.rank} LoRA/DoRA on every projection, 1 torch thread, "
          f"CPU clock, medians of {args.rounds} rounds x {args.steps} steps\n")
    print(markdown_table([{"load": n, "ms/step": round(v, 1), "base / load": f"{ms['base'] / v:.3f}"}
                          for n, v in ms.items()]))
    lora = ms["8 LoRA"]
    print(f"\nIA3 / base {ms['base'] / ms['8 IA3']:.3f} (target >= 0.95)   LN tuning / base "
          f"{ms['base'] / ms['8 LN tuning']:.3f} (>= 0.95)   DoRA / LoRA {lora / ms['8 DoRA']:.3f} (>= 0.95)   "
          f"2-LoRA mix / LoRA {lora / ms['8 mixes of 2 LoRA']:.3f} (>= 0.75)   bottleneck / LoRA "
          f"{lora / ms['8 bottleneck (Pfeiffer, rf 16)']:.3f} (>= 0.90)")


if __name__ == "__main__":
    main()
