"""How far the server's log-probabilities are from a float64 reference, next to PEFT's own float32 noise.

    python -m bench.precision --tokens 24 --seeds 4
    python -m bench.precision --modes onednn,blas,bf16     # + the server in --dtype bfloat16 and PEFT in bf16

For each adapter kind (and the base model) the server decodes greedily in both matmul modes
(``--matmul onednn`` and ``--matmul blas``; ``bf16``: ``--dtype bfloat16``, oneDNN mode) with the
top-20 log-probabilities of every step. The same
sequences (prompt + the server's tokens) are then scored teacher-forced by PEFT in float64 (the
ground truth) and by PEFT in float32 with ``sdpa`` and ``eager`` attention (what a user compares
against, and its own rounding noise). Reported per row: the largest |Δ logprob| of the chosen
tokens and the RMS over all top-20 entries, each against float64, and whether the greedy tokens
equal float64's argmax at every step. "strong prefix" is prefix tuning with PEFT's default init
scaled by 5 (large raw keys and values, the case issue 18 measured).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from tests.peft_reference import peft_teacher_forced

PROMPTS = ["Name a colour.", "Write a haiku about the sea and explain each line in detail, please."]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    """One adapter (or the base model, adapter None) and the sequences the server produced for it."""

    label: str
    adapter: str | None


def make_adapters(base: Path, out: Path, seeds: int) -> list[Case]:
    """PEFT ``save_pretrained`` folders: LoRA, prompt tuning, ordinary and strong prefix tuning."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cases = [Case("base", None)]
    for seed in range(seeds):
        for label, cfg, factor in [
            ("lora r8", LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR, task_type="CAUSAL_LM"), 0.0),
            ("prompt", PromptTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"), 1.0),
            ("prefix", PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"), 1.0),
            ("strong prefix", PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"), 5.0),
        ]:
            torch.manual_seed(seed)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg)
            with torch.no_grad():
                for _, p in model.named_parameters():
                    if not p.requires_grad:
                        continue
                    if factor == 0.0:  # LoRA: PEFT zero-inits B; random A and B that change the output
                        p.copy_(torch.randn_like(p) * 0.05)
                    else:
                        p.mul_(factor)
            name = f"{label.replace(' ', '-')}-{seed}"
            model.save_pretrained(str(out / name), safe_serialization=True)
            cases.append(Case(label, name))
    return cases


MODES = {"onednn": ("onednn", "float32"), "blas": ("blas", "float32"), "bf16": ("onednn", "bfloat16")}


def serve_and_decode(base: Path, root: Path, cases: list[Case], mode: str, prompts: list[list[int]],
                     tokens: int) -> dict[tuple[str | None, int], pb.GenerateResponse]:
    """Greedy decode every (case, prompt) on an in-process server in `mode` (MODES), top-20 logprobs."""
    from server.app import ServerApp
    from server.config import ServerConfig

    matmul, dtype = MODES[mode]
    cfg = ServerConfig(model=str(base), port=0, metrics_port=0, adapter_root=str(root), matmul=matmul,
                       dtype=dtype, kv_cache_tokens=8192, max_batch_size=16)
    app = ServerApp(cfg).start()
    try:
        with grpc.insecure_channel(app.target) as ch:
            adapters, gen = pb_grpc.AdapterServiceStub(ch), pb_grpc.GenerationServiceStub(ch)
            for c in cases:
                if c.adapter:
                    adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=c.adapter, path=c.adapter))
            futures = {}
            for c in cases:
                for i, ids in enumerate(prompts):
                    req = pb.GenerateRequest(adapter_id=c.adapter or "", top_logprobs=20,
                                             params=pb.SamplingParams(max_new_tokens=tokens, ignore_eos=True))
                    req.prompt_token_ids.ids.extend(ids)
                    futures[(c.adapter, i)] = gen.Generate.future(req, timeout=600)
            return {k: f.result() for k, f in futures.items()}  # all in flight together: mixed batches
    finally:
        app.stop()


def errors(resp: pb.GenerateResponse, ref: torch.Tensor) -> tuple[float, float, bool]:
    """(max |Δ| of chosen tokens, RMS over every top-20 entry, greedy == argmax of ref) for a server response."""
    chosen, every = [], []
    for j, lp in enumerate(resp.logprobs):
        chosen.append(abs(lp.logprob - float(ref[j, lp.token_id])))
        every += [(t.logprob - float(ref[j, t.token_id])) ** 2 for t in lp.top]
    same = list(resp.token_ids) == ref.argmax(-1).tolist()
    return max(chosen), math.sqrt(sum(every) / len(every)), same


def ref_errors(lp: torch.Tensor, ref: torch.Tensor, tokens: list[int]) -> tuple[float, float, bool]:
    """The same three figures for a teacher-forced float32 PEFT run."""
    idx = torch.tensor(tokens)[:, None]
    top = ref.topk(20, dim=-1).indices  # [n_new, 20]
    chosen = (lp.gather(1, idx) - ref.gather(1, idx)).abs().max().item()
    rms = (lp.gather(1, top) - ref.gather(1, top)).pow(2).mean().sqrt().item()
    return chosen, rms, lp.argmax(-1).tolist() == ref.argmax(-1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a local HF folder")
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per request")
    parser.add_argument("--seeds", type=int, default=2, help="adapters per kind")
    parser.add_argument("--modes", default="onednn,blas", help=f"server modes, of {','.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    torch.set_num_threads(2)
    from server.model.loader import resolve_model_folder
    from server.model.tokenizer import Tokenizer
    from server.model.weights import read_model_args

    _, base = resolve_model_folder(args.model)
    tok = Tokenizer.from_folder(base, read_model_args(base))
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = make_adapters(base, root, args.seeds)
        served = {m: serve_and_decode(base, root, cases, m, prompts, args.tokens) for m in modes}
        rows: dict[str, dict[str, list[tuple[float, float, bool]]]] = {}
        for c in cases:
            folder = root / c.adapter if c.adapter else None
            row = rows.setdefault(c.label, {})
            for i, ids in enumerate(prompts):
                refs: dict[tuple[int, ...], torch.Tensor] = {}  # float64 scores per distinct sequence
                for mode in modes:
                    resp = served[mode][(c.adapter, i)]
                    seq = tuple(ids + list(resp.token_ids))
                    if seq not in refs:
                        refs[seq] = peft_teacher_forced(base, folder, list(seq), len(ids), torch.float64, "eager")
                    row.setdefault(f"server {mode}", []).append(errors(resp, refs[seq]))
                seq, ref = next(iter(refs.items()))  # the first mode's sequence
                for attn in ("sdpa", "eager"):
                    lp = peft_teacher_forced(base, folder, list(seq), len(ids), torch.float32, attn)
                    row.setdefault(f"PEFT fp32 {attn}", []).append(ref_errors(lp, ref, list(seq[len(ids):])))
                if "bf16" in modes:  # PEFT in bf16 on the bf16 server's own sequence
                    seq = tuple(ids + list(served["bf16"][(c.adapter, i)].token_ids))
                    lp = peft_teacher_forced(base, folder, list(seq), len(ids), torch.bfloat16, "sdpa")
                    row.setdefault("PEFT bf16 sdpa", []).append(ref_errors(lp.double(), refs[seq],
                                                                           list(seq[len(ids):])))
    print(f"\n{args.tokens} greedy tokens x {len(PROMPTS)} prompts x {args.seeds} adapters per kind, "
          "all requests in flight together (mixed batches); errors against PEFT float64\n")
    print("| kind | system | max abs Δ chosen logprob | RMS Δ top-20 | greedy = f64 argmax |")
    print("|---|---|---|---|---|")
    for label, systems in rows.items():
        for system, vals in systems.items():
            print(f"| {label} | {system} | {max(v[0] for v in vals):.1e} | "
                  f"{math.sqrt(sum(v[1] ** 2 for v in vals) / len(vals)):.1e} | "
                  f"{sum(v[2] for v in vals)}/{len(vals)} |")


if __name__ == "__main__":
    main()
