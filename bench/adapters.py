"""Multi-adapter benchmark: adapterserve's mixed batches vs PEFT, baselines in the same run.

    python -m bench.adapters --requests 32 --max-new-tokens 64 --repeats 3

Builds rank-16 LoRA adapters on every linear layer of the model (plus prompt-tuning and prefix
adapters) in PEFT's format, serves them, and reports throughput ratios:
server with 8 LoRA adapters / the same server base-only; / PEFT mixed-batch generate(adapter_names=);
/ PEFT set_adapter + generate per request; a merged adapter / base; register latency; 1 -> 8 -> 64 adapters;
8 DoRA, 8 IA3, 8 LN-tuning adapters, 8 weighted mixes of 2 LoRAs, and one load with a request of every kind.
8 bottleneck adapters (AdapterHub SeqBn / Pfeiffer, reduction factor 16) next to 8 LoRA in the same rounds.

    python -m bench.adapters --clock cpu    # for a shared, busy host

``--clock cpu`` runs the server on one thread (``--threads 1 --lora-threads 1``) and reports tokens per
CPU second of the server process (/proc utime + stime) instead of per wall second, and the PEFT
baselines on one thread per CPU second of this process: other tenants' load then stretches wall time
but hardly the CPU time a token costs, so the ratios between loads stay meaningful on a busy host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch
from safetensors.torch import load_file, save_file

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from bench.load import markdown_table, run_load
from bench.server_process import ServerProcess
from bench.serving import chat_prompts

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(folder: Path, out: Path, n_lora: int, n_prompt: int, n_prefix: int, rank: int,
                   n_other: int = 0) -> list[str]:
    """Write adapters in PEFT's own format; one of each kind made by PEFT, the rest re-randomized copies:
    `n_lora` LoRA, `n_prompt` prompt tuning, `n_prefix` prefix tuning, and `n_other` each of DoRA, IA3 and
    LN tuning. Returns their folder names (= adapter ids), in that order.

    DoRA magnitudes, IA3 vectors and LN-tuning norms are PEFT's initial values times (1 + 0.02 N(0, 1)).
    """
    from peft import (
        IA3Config,
        LNTuningConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        get_peft_model,
    )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    made = []
    kinds = [("lora", n_lora, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LINEAR, task_type="CAUSAL_LM")),
             ("prompt", n_prompt, PromptTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")),
             ("prefix", n_prefix, PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")),
             ("dora", n_other, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LINEAR, use_dora=True,
                                          task_type="CAUSAL_LM")),
             ("ia3", n_other, IA3Config(task_type="CAUSAL_LM")),
             ("ln", n_other, LNTuningConfig(task_type="CAUSAL_LM"))]
    for kind, count, cfg in kinds:
        if count == 0:
            continue
        template = out / f"{kind}-0"
        model = get_peft_model(base, cfg)
        model.save_pretrained(template, safe_serialization=True)
        base = model.unload() if kind not in ("prompt", "prefix") else model.base_model
        tensors = load_file(str(template / "adapter_model.safetensors"))
        for i in range(count):
            gen = torch.Generator().manual_seed(1000 * len(made) + i)
            target = out / f"{kind}-{i}"
            target.mkdir(parents=True, exist_ok=True)
            (target / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
            save_file({k: _randomized(k, v, kind, gen) for k, v in tensors.items()},
                      str(target / "adapter_model.safetensors"))
            made.append(target.name)
    return made


def _randomized(key: str, v: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if any(s in key for s in ("lora_magnitude_vector", "ia3_l", "ln_tuning_layers")):
        return v * (1 + 0.02 * torch.randn(v.shape, generator=gen))
    return torch.randn(v.shape, generator=gen) * (0.02 if kind in ("lora", "dora") else 0.5)


def build_bottlenecks(folder: Path, out: Path, count: int, reduction_factor: int = 16) -> list[str]:
    """Write `count` Pfeiffer bottleneck adapters in AdapterHub's ``save_adapter`` format (the layout
    server/adapters/kinds/bottleneck.py reads; made without the reference venv so the bench runs anywhere)."""
    cfg = json.loads((folder / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    width = hidden // reduction_factor
    config = {"config": {"mh_adapter": False, "output_adapter": True, "reduction_factor": reduction_factor,
                         "non_linearity": "relu", "original_ln_before": True, "original_ln_after": True,
                         "residual_before_ln": True, "adapter_residual_before_ln": False, "ln_before": False,
                         "ln_after": False, "is_parallel": False, "scaling": 1.0, "use_gating": False,
                         "inv_adapter": None, "phm_layer": False},
              "hidden_size": hidden, "model_type": cfg.get("model_type", "llama"), "name": "bn", "type": "text_task"}
    made = []
    for i in range(count):
        gen = torch.Generator().manual_seed(5000 + i)
        target = out / f"bottleneck-{i}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "adapter_config.json").write_text(json.dumps(config))
        tensors = {}
        for layer in range(layers):
            p = f"model.layers.{layer}.output_adapters.adapters.bn."
            tensors[p + "adapter_down.0.weight"] = torch.randn(width, hidden, generator=gen) * 0.02
            tensors[p + "adapter_down.0.bias"] = torch.zeros(width)
            tensors[p + "adapter_up.weight"] = torch.randn(hidden, width, generator=gen) * 0.02
            tensors[p + "adapter_up.bias"] = torch.zeros(hidden)
        save_file(tensors, str(target / "adapter.safetensors"))
        made.append(target.name)
    return made


def register(target: str, adapter_id: str, path: str, merge: bool = False) -> float:
    with grpc.insecure_channel(target) as ch:
        t0 = time.perf_counter()
        pb_grpc.AdapterServiceStub(ch).RegisterAdapter(
            pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path, merge=merge), timeout=120)
        return (time.perf_counter() - t0) * 1000


def unregister(target: str, adapter_id: str) -> None:
    with grpc.insecure_channel(target) as ch:
        pb_grpc.AdapterServiceStub(ch).UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id))


def load(server: ServerProcess, prompts, adapters, max_new, clock: str = "wall") -> float:
    """One load's throughput: tokens per wall second, or (clock "cpu") per CPU second of the server."""
    cpu0 = server.cpu_seconds()
    run = asyncio.run(run_load(server.target, prompts, adapters, max_new, len(prompts)))
    assert run.errors == 0, run.errors
    return run.tokens / (server.cpu_seconds() - cpu0) if clock == "cpu" else run.tokens_per_s


def interleaved(server: ServerProcess, prompts, loads: dict[str, list[str]], max_new, repeats,
                clock: str = "wall") -> dict[str, float]:
    """Median throughput of each load, run in rounds (A, B, C, A, B, C, ...) so the host's drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in loads}
    for _ in range(repeats):
        for name, adapters in loads.items():
            samples[name].append(load(server, prompts, adapters, max_new, clock))
    return {name: statistics.median(v) for name, v in samples.items()}


def merged_rounds(server: ServerProcess, prompts, adapter: str, max_new, repeats,
                  clock: str = "wall") -> dict[str, float]:
    """Per round: base with nothing merged, then merge `adapter` and run its requests and base requests, unmerge."""
    samples: dict[str, list[float]] = {"base only, nothing merged (merge rounds)": [], "merged adapter only": [],
                                       "base only (merge active)": []}
    unregister(server.target, adapter)
    for _ in range(repeats):
        samples["base only, nothing merged (merge rounds)"].append(load(server, prompts, [""], max_new, clock))
        register(server.target, adapter, adapter, merge=True)
        samples["merged adapter only"].append(load(server, prompts, [adapter], max_new, clock))
        samples["base only (merge active)"].append(load(server, prompts, [""], max_new, clock))
        unregister(server.target, adapter)
    return {name: statistics.median(v) for name, v in samples.items()}


def peft_baselines(folder: Path, root: Path, names: list[str], prompts: list[str], max_new: int,
                   sequential_requests: int, clock: str = "wall") -> tuple[float, float]:
    """(mixed-batch generate(adapter_names=) tok/s, set_adapter + generate per request tok/s); per CPU
    second of this process with clock "cpu"."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(root / n, adapter_name=n)
    model.eval()
    row_adapters = [names[i % len(names)] for i in range(len(prompts))]
    now = time.process_time if clock == "cpu" else time.perf_counter
    with torch.inference_mode():
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = now()
        out = model.generate(**batch, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             adapter_names=row_adapters)
        mixed = (out.shape[1] - batch.input_ids.shape[1]) * len(prompts) / (now() - t0)
        t0, tokens = now(), 0
        for i in range(sequential_requests):
            model.set_adapter(row_adapters[i])
            ids = tok(prompts[i], return_tensors="pt", add_special_tokens=False)
            o = model.generate(**ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
            tokens += o.shape[1] - ids.input_ids.shape[1]
        per_request = tokens / (now() - t0)
    return mixed, per_request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the loads (medians reported)")
    ap.add_argument("--scaling", default="1,8,64", help="adapter counts for the scaling rows")
    ap.add_argument("--sequential-requests", type=int, default=4, help="requests timed for the per-request baseline")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: one thread, tokens per CPU second of the server (for a busy host; see above)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from server.model.loader import resolve_model_folder

    threads = 1 if args.clock == "cpu" else os.cpu_count() or 1
    torch.set_num_threads(threads)
    _, folder = resolve_model_folder(args.model)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(folder), args.requests)
    scaling = [int(x) for x in args.scaling.split(",")]
    root = Path(tempfile.mkdtemp(prefix="adapterserve-bench-"))
    n_lora = max(8, *scaling)
    names = build_adapters(folder, root, n_lora, 4, 4, args.rank, n_other=8)
    bottlenecks = build_bottlenecks(folder, root, 8)
    loras = [n for n in names if n.startswith("lora")]
    others = [n for n in names if n.startswith(("prompt", "prefix"))]
    by_kind = {k: [n for n in names if n.startswith(k + "-")] for k in ("dora", "ia3", "ln")}
    mixes = [f"{loras[i]}=1,{loras[(i + 1) % 8]}=0.5" for i in range(8)]  # 8 mixes of 2 LoRAs each

    server = ServerProcess("--model", args.model, "--adapter-root", str(root), "--max-batch-size",
                           str(args.requests), "--max-resident-adapters", str(n_lora + 48),
                           "--lora-threads", "1", "--log-level", "WARNING", threads=threads)
    results: dict[str, float] = {}
    try:
        reg_ms = []
        for n in loras + others + sum(by_kind.values(), []) + bottlenecks:  # one at a time on an idle server, as an operator registers them
            reg_ms.append(register(server.target, n, n))
            time.sleep(0.2)
        results["register p50 ms (rank-16 LoRA)"] = statistics.median(reg_ms[:len(loras)])
        # Warm-up: every adapter of the measured loads has served a request before timing starts.
        kinds = sum(by_kind.values(), [])
        asyncio.run(run_load(server.target, prompts, [""] + loras[:max(scaling)] + others + kinds + mixes + bottlenecks, 4,
                             len(prompts)))
        every = ["", loras[0], others[0], others[-1], by_kind["dora"][0], by_kind["ia3"][0], by_kind["ln"][0],
                 mixes[0]]
        loads = {"base only": [""], "8 LoRA": loras[:8], "8 LoRA + 4 prompt + 4 prefix": loras[:8] + others,
                 "8 DoRA": by_kind["dora"], "8 IA3": by_kind["ia3"], "8 LN tuning": by_kind["ln"],
                 "8 mixes of 2 LoRA": mixes, "8 bottleneck (Pfeiffer, rf 16)": bottlenecks, "every kind (base, LoRA, prompt, prefix, DoRA, IA3, LN, mix)": every}
        loads.update({f"{n} LoRA adapters": loras[:n] for n in scaling if n != 8})
        results.update(interleaved(server, prompts, loads, args.max_new_tokens, args.repeats, args.clock))
        results.update(merged_rounds(server, prompts, loras[0], args.max_new_tokens, args.repeats, args.clock))
    finally:
        server.stop()
    mixed, per_request = peft_baselines(folder, root, loras[:8], prompts, args.max_new_tokens,
                                        args.sequential_requests, args.clock)
    base = results["base only"]
    merged_base = results["base only, nothing merged (merge rounds)"]
    unit = "tok/s" if args.clock == "wall" else "tok per CPU s"
    rows = [{"load": k, unit: round(v, 1), "vs server base-only": f"{v / base:.2f}x"}
            for k, v in results.items() if not k.startswith("register")]
    rows.append({"load": "PEFT generate(adapter_names=...), 8 LoRA", unit: round(mixed, 1),
                 "vs server base-only": f"{mixed / base:.2f}x"})
    rows.append({"load": "PEFT set_adapter + generate per request", unit: round(per_request, 1),
                 "vs server base-only": f"{per_request / base:.2f}x"})
    print(f"\n{args.requests} concurrent greedy requests x {args.max_new_tokens} new tokens, model={args.model}, "
          f"LoRA rank {args.rank} on {', '.join(LINEAR)}, torch threads={threads}, clock={args.clock}, "
          f"medians of {args.repeats}\n")
    print(markdown_table(rows))
    lora8 = results["8 LoRA"]
    bn8 = results["8 bottleneck (Pfeiffer, rf 16)"]
    print(f"\n8 bottleneck / base-only: {bn8 / base:.2f}x   8 bottleneck / 8 LoRA (same rounds): {bn8 / lora8:.2f}x")
    print(f"\n8 LoRA / base-only: {lora8 / base:.2f}x   8 LoRA / PEFT mixed batch: {lora8 / mixed:.2f}x   "
          f"8 LoRA / PEFT per request: {lora8 / per_request:.2f}x")
    print(f"IA3 / base: {results['8 IA3'] / base:.2f}x (target >= 0.95)   LN tuning / base: "
          f"{results['8 LN tuning'] / base:.2f}x (>= 0.95)   DoRA / LoRA: {results['8 DoRA'] / lora8:.2f}x (>= 0.95)   "
          f"2-LoRA mix / LoRA: {results['8 mixes of 2 LoRA'] / lora8:.2f}x (>= 0.75)")
    print(f"merged adapter / base (same rounds): {results['merged adapter only'] / merged_base:.2f}x   "
          f"register rank-{args.rank} LoRA p50: {results['register p50 ms (rank-16 LoRA)']:.1f} ms")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
