"""Decode-step micro-benchmark: the default model's decode step in-process (no server, no gRPC).

    python -m bench.decode_step                          # ms per step and tok/s at 1, 16 and 64 rows
    python -m bench.decode_step --engine                 # whole engine iterations (scheduling, sampling, text)
    python -m bench.decode_step --ab attention=gather    # A/B of a runtime attribute, interleaved rounds
    python -m bench.decode_step --ab threads=1 --rows 1  # A/B of torch's thread count
    python -m bench.decode_step --profile                # torch.profiler time breakdown per row count

The model is built the way ``server/app.py`` builds it (same thread count, GIL switch interval,
``load_model``). Every row decodes at the same context length (``--context``, the midpoint of the
issue's 37-token prompt + 64 new tokens); its pages are scattered over the cache like a busy
server's. A/B rounds alternate the order of A and B and report medians of the per-round medians
and the median of the per-round ratios, so the host's drift (other tenants) hits both alike.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from server.engine.request import Request, Sampling
from server.engine.sampler import sample
from server.model.llama import PagedKVCache, StepInput
from server.model.loader import LoadedModel, load_model

PAGE = 16


def build_model(matmul: str, dtype: str, threads: int) -> LoadedModel:
    """As server.app.ServerApp does: thread count, GIL switch interval, then load_model."""
    torch.set_num_threads(threads)
    sys.setswitchinterval(0.0005)
    return load_model("default", "cpu", dtype, None, matmul)


class ForwardStep:
    """One decode forward of `rows` rows at context `context`, plus greedy sampling (the sampler's own path)."""

    def __init__(self, model: LoadedModel, rows: int, context: int):
        rt = model.runtime
        pages_per_row = -(-(context + 1) // PAGE)
        num_pages = rows * pages_per_row
        self.cache = PagedKVCache(model.args, num_pages, PAGE, rt.dtype, rt.device)
        for k, v in zip(self.cache.k, self.cache.v, strict=True):
            k.normal_()
            v.normal_()
        perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0))
        tables = perm.view(rows, pages_per_row)  # [B, P] scattered pages
        self.rt = rt
        self.rows = rows
        self.step = StepInput(start=torch.full((rows,), context), lengths=torch.ones(rows, dtype=torch.long),
                              block_tables=tables, input_ids=torch.randint(0, 1000, (rows, 1)))
        self.requests = [Request(f"r{i}", [1, 2, 3], Sampling(max_new_tokens=64), lambda e: None)
                         for i in range(rows)]

    def __call__(self) -> None:
        logits = self.rt.forward(self.step, self.cache)  # [B, V]
        sample(logits, self.requests, ())


class EngineStep:
    """Whole engine iterations over `rows` running greedy requests (prefilled once, then decode only)."""

    def __init__(self, model: LoadedModel, rows: int, context: int):
        from server.adapters.catalog import AdapterCatalog
        from server.adapters.residency import Residency
        from server.engine.commands import CommandQueue
        from server.engine.engine import Engine

        commands = CommandQueue()
        residency = Residency(model.runtime, max_resident=4, memory_bytes=1 << 30, lora_threads=1)
        catalog = AdapterCatalog(residency, commands)
        self.engine = Engine(model.runtime, model.tokenizer, residency, catalog, commands,
                             kv_cache_tokens=rows * (context + 4096), page_size=PAGE, max_batch_size=rows,
                             max_queue=rows, max_prefill_tokens=512, prefix_cache=False)
        prompt = list(range(100, 100 + context))
        for i in range(rows):
            self.engine.submit(Request(f"r{i}", prompt, Sampling(max_new_tokens=4000, ignore_eos=True),
                                       lambda e: None))
        while len(self.engine.running) < rows or any(r.cached < len(r.prompt_ids) for r in self.engine.running):
            self.engine._iteration()  # admission and prefill

    def __call__(self) -> None:
        self.engine._iteration()


def parse_setting(text: str) -> tuple[str, object]:
    name, _, raw = text.partition("=")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name, value


class Variant:
    """Settings applied for one side of an A/B: runtime attributes, ``module.path:NAME`` module
    attributes, or ``threads`` (torch.set_num_threads)."""

    def __init__(self, model: LoadedModel, settings: list[tuple[str, object]]):
        self.model = model
        self.settings = settings
        self.saved: dict[str, object] = {}

    def _target(self, name: str) -> tuple[object, str]:
        if ":" in name:  # module.path:ATTRIBUTE
            module, _, attr = name.partition(":")
            return importlib.import_module(module), attr
        return self.model.runtime, name

    def __enter__(self) -> Variant:
        for name, value in self.settings:
            if name == "threads":
                self.saved[name] = torch.get_num_threads()
                torch.set_num_threads(int(value))
                continue
            obj, attr = self._target(name)
            if not hasattr(obj, attr):
                raise SystemExit(f"{obj!r} has no attribute {attr!r}")
            self.saved[name] = getattr(obj, attr)
            setattr(obj, attr, value)
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self.saved.items():
            if name == "threads":
                torch.set_num_threads(int(value))
            else:
                obj, attr = self._target(name)
                setattr(obj, attr, value)


CLOCK = [time.perf_counter]


def time_steps(fn: Callable[[], None], steps: int) -> float:
    """Median seconds of one call over `steps` calls (after one warm-up call), on the chosen clock."""
    clock = CLOCK[0]
    fn()
    times = []
    for _ in range(steps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def ab(model: LoadedModel, fn: Callable[[], None], b_settings, rounds: int, steps: int) -> dict[str, float]:
    """Interleaved rounds of A (current settings) and B; medians of the rounds' medians and of their ratios."""
    a_times, b_times, ratios = [], [], []
    for i in range(rounds):
        order = ("A", "B") if i % 2 == 0 else ("B", "A")
        got = {}
        for side in order:
            with Variant(model, b_settings if side == "B" else []):
                got[side] = time_steps(fn, steps)
        a_times.append(got["A"])
        b_times.append(got["B"])
        ratios.append(got["A"] / got["B"])
    return {"A_ms": statistics.median(a_times) * 1e3, "B_ms": statistics.median(b_times) * 1e3,
            "speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def profile(model: LoadedModel, fn: Callable[[], None], rows: int, steps: int) -> None:
    """Print where one step's time goes (torch.profiler, CPU): by op, by category, and Python around the ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    wall_plain = (time.perf_counter() - t0) / steps
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) / steps
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None]  # top-level ops: their total includes their children
    in_ops = sum(e.cpu_time_total for e in top) / steps / 1e3  # ms per step
    n_ops = len(top) / steps
    cats: dict[str, float] = {}
    for e in top:
        cats[_category(e.name)] = cats.get(_category(e.name), 0.0) + e.cpu_time_total / steps / 1e3
    print(f"\n### {rows} rows: {wall_plain * 1e3:.2f} ms/step unprofiled, {wall * 1e3:.2f} ms profiled; "
          f"{n_ops:.0f} top-level ops/step, {in_ops:.2f} ms inside them, {wall * 1e3 - in_ops:.2f} ms Python between")
    for name, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {ms:7.2f} ms  {100 * ms / (wall * 1e3):5.1f}%")
    weights = _weight_bytes(model)
    mm = cats.get("projections (matmul)", 0.0) + cats.get("lm_head", 0.0)
    if mm:
        print(f"  weights read: {weights / 1e6:.0f} MB in {mm:.2f} ms of matmuls = {weights / mm / 1e6:.1f} GB/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def _weight_bytes(model: LoadedModel) -> int:
    w = model.runtime.w
    n = sum(t.numel() * t.element_size() for lw in w.layers
            for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down, lw.attn_norm, lw.mlp_norm))
    return n + w.lm_head.numel() * w.lm_head.element_size()


def _category(name: str) -> str:
    if name in ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm", "aten::matmul"):
        return "projections (matmul)"
    if name in ("aten::index_select",):
        return "KV gather (index_select)"
    if name in ("aten::index_put_", "aten::index", "aten::nonzero", "aten::index_copy_", "aten::masked_select"):
        return "KV write / row indexing"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention (SDPA)"
    if name in ("aten::sort", "aten::argmax", "aten::softmax", "aten::cumsum", "aten::log_softmax", "aten::topk",
                "aten::isfinite", "aten::all", "aten::item", "aten::_local_scalar_dense"):
        return "sampler / checks"
    if name in ("aten::bmm", "aten::baddbmm", "aten::addcmul_", "aten::addmm_"):
        return "LoRA (bmm)"
    if name in ("aten::tensor", "aten::lift_fresh", "aten::to", "aten::_to_copy", "aten::copy_", "aten::arange",
                "aten::full", "aten::empty", "aten::zeros", "aten::gather", "aten::where", "aten::lt", "aten::le",
                "aten::max", "aten::expand", "aten::div", "aten::remainder"):
        return "step setup (indices, masks)"
    if name in ("aten::view", "aten::reshape", "aten::transpose", "aten::slice", "aten::select", "aten::chunk",
                "aten::split", "aten::unsqueeze", "aten::as_strided", "aten::t", "aten::contiguous",
                "aten::_unsafe_view", "aten::narrow", "aten::clone", "aten::squeeze"):
        return "views / layout copies"
    return "elementwise (norm, rope, act)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64", help="comma-separated row counts")
    ap.add_argument("--context", type=int, default=69, help="KV entries each row attends to (prompt + output)")
    ap.add_argument("--matmul", default="onednn", choices=["onednn", "blas"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engine", action="store_true", help="time whole engine iterations instead of forward + sample")
    ap.add_argument("--ab", action="append", default=[], metavar="NAME=VALUE",
                    help="B side of an A/B: a runtime attribute (or 'threads'); repeat for several")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting (as --ab) applied to every run, A and B alike")
    ap.add_argument("--rounds", type=int, default=10, help="A/B rounds (alternating order)")
    ap.add_argument("--steps", type=int, default=10, help="steps timed per round (their median counts)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: the process's CPU time (all threads, spin-waits included), "
                         "which a busy host's other tenants disturb far less: use it with --threads 1 on a shared host")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown per row count")
    args = ap.parse_args()

    model = build_model(args.matmul, args.dtype, args.threads)
    CLOCK[0] = time.perf_counter if args.clock == "wall" else time.process_time
    settings = [parse_setting(s) for s in args.ab]
    print(f"# decode step, default model, {args.dtype}, --matmul {args.matmul}, {torch.get_num_threads()} threads, "
          f"context {args.context}, {args.clock} clock, {'engine iterations' if args.engine else 'forward + greedy sample'}")
    Variant(model, [parse_setting(s) for s in args.set]).__enter__()
    for rows in [int(r) for r in args.rows.split(",")]:
        fn = (EngineStep if args.engine else ForwardStep)(model, rows, args.context)
        if args.profile:
            profile(model, fn, rows, args.steps)
        elif settings:
            r = ab(model, fn, settings, args.rounds, args.steps)
            print(f"rows {rows:3d}: A {r['A_ms']:7.2f} ms ({rows / r['A_ms'] * 1e3:6.1f} tok/s)  "
                  f"B {r['B_ms']:7.2f} ms ({rows / r['B_ms'] * 1e3:6.1f} tok/s)  "
                  f"B speedup {r['speedup']:.3f}x (rounds {r['min']:.2f}-{r['max']:.2f})  B = {args.ab}")
        else:
            t = statistics.median(time_steps(fn, args.steps) for _ in range(args.rounds))
            print(f"rows {rows:3d}: {t * 1e3:7.2f} ms/step  {rows / t:7.1f} tok/s")


if __name__ == "__main__":
    main()
