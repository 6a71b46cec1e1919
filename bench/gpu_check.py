"""Device check of the GPU path: correctness against transformers/PEFT, kernels, throughput, memory.

Run on a CUDA machine, from the repository root (under 5 minutes on one H200):

    python -m bench.gpu_check                      # tiny + 1b + 8b configs, bf16
    python -m bench.gpu_check --configs tiny,1b    # quicker

Wheels to carry: none. It needs PyTorch with CUDA, triton, transformers and peft (the device
machine has them; safetensors/tokenizers come with transformers). No weights travel: every model
is a random-weight Llama of the named shape built on the GPU, and the adapters are random LoRA
adapters of mixed ranks plus a random KV prefix (prompt/prefix adapters are KV prefixes here).
CPU smoke run, as tests/bench/test_gpu_check.py does: ``python -m bench.gpu_check --device cpu --tiny``.

Prints one markdown table: greedy tokens and logits vs transformers and PEFT (mixed LoRA batch,
same weights, same device); the fused-kernel forward vs the torch forward after a cached prefix;
each kernel vs its torch reference; decode throughput at 1/16/64/256 concurrent rows for base,
8 LoRA and 64 LoRA, CUDA graphs on and off, and transformers' batched generate() as the baseline
(each timed end to end: prefill + decode steps, sampled ids copied to the host every step);
peak GPU memory per config.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from server.adapters.lora_batch import LoraBatch, LoraSlots
from server.model.config import LINEAR_MODULES, ModelArgs
from server.model.llama import LlamaRuntime, PagedKVCache, StepInput
from server.model.weights import fuse_weights

CONFIGS = {  # Llama-3.2-1B and Llama-3.1-8B shapes; tiny for the smoke run
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, head_dim=16),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=128),
}
PAGE = 16


@dataclass
class Row:
    section: str
    config: str
    item: str
    value: str
    note: str = ""


def build(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(transformers model, our runtime with kernels on CUDA, our runtime with graphs off) sharing weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(architectures=["LlamaForCausalLM"], rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=4096, **CONFIGS[name])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly (an 8B model in fp32 would be 32 GB first)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    args = ModelArgs.from_hf_config(cfg.to_dict())
    weights = fuse_weights(dict(hf.state_dict()), args, dtype, device)
    rt = LlamaRuntime(args, weights, device, dtype, matmul="blas", kernels="auto", cuda_graphs="on")
    eager = LlamaRuntime(args, weights, device, dtype, matmul="blas", kernels="auto", cuda_graphs="off")
    return hf, rt, eager


def random_lora(args: ModelArgs, rank: int, seed: int, device: str) -> dict:
    """{(layer, module): (a [r, in], b [out, r], scale)} over every linear module, on `device`; b nonzero."""
    gen = torch.Generator(device=device).manual_seed(seed)
    mods = {}
    for layer in range(args.num_layers):
        for m in LINEAR_MODULES:
            out_f, in_f = args.linear_shape(m)
            mods[(layer, m)] = SimpleNamespace(a=torch.randn(rank, in_f, generator=gen, device=device) / in_f ** 0.5,
                                               b=torch.randn(out_f, rank, generator=gen, device=device) * 0.02,
                                               scale=2.0)
    return mods


def make_slots(rt: LlamaRuntime, adapters: list[dict]) -> LoraSlots:
    slots = LoraSlots(rt.args, max(1, len(adapters)), rt.device, rt.dtype)
    slots.use_kernels = rt.use_kernels
    for i, mods in enumerate(adapters):
        slots.load(i, mods)
    return slots


def new_cache(rt: LlamaRuntime, tokens: int) -> PagedKVCache:
    return PagedKVCache(rt.args, tokens // PAGE + 1, PAGE, rt.dtype, rt.device)


def generate(rt: LlamaRuntime, ids: torch.Tensor, new_tokens: int, slots: LoraSlots | None = None,
             row_slots: list[int] | None = None, cache: PagedKVCache | None = None,
             ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decode of equal-length prompts ids [B, S] through a paged cache; (tokens per row, prefill logits).

    Pass the same `cache` to repeated runs: CUDA graphs are captured for one cache."""
    bsz, seq = ids.shape
    dev = rt.device
    prefix = 0
    per_row = (prefix + seq + new_tokens) // PAGE + 1
    if cache is None or cache.num_pages < bsz * per_row:
        cache = new_cache(rt, bsz * per_row * PAGE)
    tables = torch.arange(bsz * per_row, device=dev).view(bsz, per_row)
    lora = (lambda: LoraBatch(slots, row_slots, None)) if slots is not None else (lambda: None)
    start = torch.full((bsz,), prefix, device=dev)
    step = StepInput(start=start, lengths=torch.full((bsz,), seq, device=dev), block_tables=tables,
                     input_ids=ids, lora=lora())
    logits = rt.forward(step, cache)  # [B, V]
    first = logits
    out: list[list[int]] = [[] for _ in range(bsz)]
    ones = torch.ones(bsz, dtype=torch.long, device=dev)
    for i in range(new_tokens):
        nxt = logits.argmax(-1)  # [B]
        for r, t in enumerate(nxt.tolist()):  # the one host copy of a step
            out[r].append(t)
        if i + 1 == new_tokens:
            break
        step = StepInput(start=start + seq + i, lengths=ones, block_tables=tables, input_ids=nxt[:, None],
                         lora=lora())
        logits = rt.forward(step, cache)
    return out, first


def check_vs_transformers(name: str, hf, rt: LlamaRuntime, rows: list[Row], new_tokens: int) -> None:
    dev = rt.device
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, rt.args.vocab_size, (4, 12), generator=gen).to(dev)
    with torch.inference_mode():
        want = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0).tolist()
        ref_logits = hf(ids).logits[:, -1].float()
    got, logits = generate(rt, ids, new_tokens)
    same = sum(g == w[12:] for g, w in zip(got, want, strict=True))
    rows.append(Row("vs transformers", name, "greedy tokens equal (rows)", f"{same}/4", f"{new_tokens} tokens"))
    rows.append(Row("vs transformers", name, "prefill logits max |diff|", f"{(logits - ref_logits).abs().max():.3g}",
                    f"logit scale {ref_logits.abs().max():.3g}"))


def check_vs_peft(name: str, hf, rt: LlamaRuntime, rows: list[Row], new_tokens: int) -> None:
    """A mixed batch (two LoRA adapters of ranks 8 and 16, and base rows) against PEFT's adapter_names."""
    from peft import LoraConfig, get_peft_model

    adapters = [random_lora(rt.args, r, seed, rt.device) for seed, r in ((10, 8), (11, 16))]
    targets = list(LINEAR_MODULES)
    peft_model = None
    for i, (mods, r) in enumerate(zip(adapters, (8, 16), strict=True)):
        cfg = LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=targets, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(hf, cfg, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", cfg)
        for (layer, m), mod in mods.items():
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            lin = getattr(getattr(peft_model.base_model.model.model.layers[layer], block), m)
            lin.lora_A[f"a{i}"].weight.data.copy_(mod.a)
            lin.lora_B[f"a{i}"].weight.data.copy_(mod.b)
    peft_model.eval()
    slots = make_slots(rt, adapters)
    row_slots = [0, -1, 1, 0]
    names = ["a0", "__base__", "a1", "a0"]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, rt.args.vocab_size, (4, 12), generator=gen).to(rt.device)
    with torch.inference_mode():
        ref_logits = peft_model(input_ids=ids, adapter_names=names).logits[:, -1].float()
        want = peft_model.generate(input_ids=ids, adapter_names=names, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0).tolist()
    got, logits = generate(rt, ids, new_tokens, slots, row_slots)
    same = sum(g == w[12:] for g, w in zip(got, want, strict=True))
    rows.append(Row("vs PEFT", name, "mixed LoRA batch: greedy tokens equal", f"{same}/4", "ranks 8+16 + base rows"))
    rows.append(Row("vs PEFT", name, "mixed LoRA batch: logits max |diff|", f"{(logits - ref_logits).abs().max():.3g}"))
    peft_model.unload()  # back to the plain model for the baselines


def check_prefix(name: str, rt: LlamaRuntime, rows: list[Row]) -> None:
    """Prefill after a 20-entry KV prefix (a prompt/prefix adapter): kernel forward vs torch forward."""
    if not rt.use_kernels:
        rows.append(Row("prefix", name, "kernel vs torch forward", "n/a", "kernels off on this device"))
        return
    ref = LlamaRuntime(rt.args, rt.w, rt.device, rt.dtype, matmul="blas", kernels="torch")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, rt.args.vocab_size, (3, 9), generator=gen).to(rt.device)
    results = []
    for runtime in (rt, ref):
        cache = new_cache(runtime, 3 * 4 * PAGE)
        for layer in range(rt.args.num_layers):
            g = torch.Generator(device=rt.device).manual_seed(layer)
            cache.k[layer].normal_(generator=g)
            cache.v[layer].normal_(generator=g)
        tables = torch.arange(12, device=rt.device).view(3, 4)
        step = StepInput(start=torch.full((3,), 20, device=rt.device), lengths=torch.tensor([9, 5, 1], device=rt.device),
                         block_tables=tables, input_ids=ids)
        results.append(runtime.forward(step, cache))
    rows.append(Row("prefix", name, "kernel vs torch forward, max |diff|", f"{(results[0] - results[1]).abs().max():.3g}",
                    "20-entry prefix, ragged 9/5/1"))


def check_kernels(device: str, dtype: torch.dtype, rows: list[Row]) -> None:
    """Each kernel against its reference at a realistic size (1B shapes), on this device."""
    from server.kernels import lora, norm, paged_attention, rope

    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    n, d, r, slots = 64, 2048, 16, 8
    ts = torch.randint(-1, slots, (n,), generator=g, device=device)
    at, bts = rnd(slots, d, 3 * r), [rnd(slots, r, w) for w in (2048, 512, 512)]
    cols = [(0, 2048), (2048, 2560), (2560, 3072)]
    x = rnd(n, d)
    tok = lora.sort_tokens(ts, slots)
    y = lora.shrink(x, at, tok)
    rows.append(Row("kernels", device, "lora shrink max |diff|", f"{(y - lora.shrink_reference(x, at, ts)).abs().max():.3g}"))
    out = rnd(n, 3072)
    want = out.clone()
    lora.expand(y, bts, cols, out, tok)
    lora.expand_reference(y, bts, cols, want, ts)
    rows.append(Row("kernels", device, "lora expand max |diff|", f"{(out.float() - want.float()).abs().max():.3g}"))
    kc, vc = rnd(512 * PAGE, 8, 64), rnd(512 * PAGE, 8, 64)
    tables = torch.randperm(512, generator=g, device=device)[:64 * 8].view(64, 8)
    start = torch.randint(0, 100, (64,), generator=g, device=device)
    for label, seq in (("decode", 1), ("prefill+prefix", 16)):
        q = rnd(64, seq, 32, 64)
        lengths = torch.full((64,), seq, device=device)
        o = paged_attention.paged_attention(q, kc, vc, tables, start, lengths, PAGE)
        w = paged_attention.paged_attention_reference(q, kc, vc, tables, start, lengths, PAGE)
        rows.append(Row("kernels", device, f"paged attention {label} max |diff|", f"{(o.float() - w.float()).abs().max():.3g}"))
    h, dl, wt = rnd(64, 2048), rnd(64, 2048), rnd(2048)
    s1, n1 = norm.add_rms_norm(h, dl, wt, 1e-5)
    s2, n2 = norm.add_rms_norm_reference(h, dl, wt, 1e-5)
    rows.append(Row("kernels", device, "add+rmsnorm max |diff|", f"{(n1.float() - n2.float()).abs().max():.3g}"))
    qkv = rnd(8, 4, 48 * 64)
    emb = torch.outer(torch.arange(256, device=device).float(), 1.0 / 500000 ** (torch.arange(0, 64, 2, device=device) / 64))
    cos, sin = emb.repeat(1, 2).cos().to(dtype), emb.repeat(1, 2).sin().to(dtype)
    caches = [torch.zeros_like(kc) for _ in range(4)]
    st, ln = torch.randint(0, 100, (8,), generator=g, device=device), torch.full((8,), 4, device=device)
    q1 = rope.rope_write_kv(qkv, cos, sin, st, ln, tables[:8], caches[0], caches[1], PAGE, 32)
    q2 = rope.rope_write_kv_reference(qkv, cos, sin, st, ln, tables[:8], caches[2], caches[3], PAGE, 32)
    err = max((q1.float() - q2.float()).abs().max(), (caches[0].float() - caches[2].float()).abs().max())
    rows.append(Row("kernels", device, "rope + kv write max |diff|", f"{err:.3g}"))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def throughput(name: str, hf, rt: LlamaRuntime, eager: LlamaRuntime, rows: list[Row], concurrency: list[int],
               steps: int, prompt: int, adapter_counts: list[int]) -> None:
    """Tokens/s of prefill + `steps` greedy tokens for B rows (end to end, host copy every step)."""
    dev = rt.device
    pools = {n: make_slots(rt, [random_lora(rt.args, (8, 16)[i % 2], 100 + i, dev) for i in range(n)])
             for n in adapter_counts if n > 0}
    per_row = (prompt + steps) // PAGE + 1
    caches = {id(r): new_cache(r, max(concurrency) * per_row * PAGE) for r in (rt, eager)}  # one per runtime
    for bsz in concurrency:
        ids = torch.randint(0, rt.args.vocab_size, (bsz, prompt), device=dev)
        with torch.inference_mode():
            hf.generate(ids[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
            _sync(dev)
        hf_tps = bsz * steps / (time.perf_counter() - t0)
        rows.append(Row("throughput", name, f"transformers generate, {bsz} concurrent", f"{hf_tps:.0f} tok/s", "baseline"))
        for n in adapter_counts:
            slots = pools.get(n)
            row_slots = [i % n for i in range(bsz)] if n else None
            label = "base" if n == 0 else f"{n} LoRA"
            for graphs, runtime in (("graphs on", rt), ("graphs off", eager)):
                if graphs == "graphs on" and runtime.graphs is None:
                    continue
                cache = caches[id(runtime)]
                generate(runtime, ids, min(steps, 4), slots, row_slots, cache)  # warm-up (Triton compiles, graph captures)
                _sync(dev)
                t0 = time.perf_counter()
                generate(runtime, ids, steps, slots, row_slots, cache)
                _sync(dev)
                tps = bsz * steps / (time.perf_counter() - t0)
                rows.append(Row("throughput", name, f"{label}, {graphs}, {bsz} concurrent", f"{tps:.0f} tok/s",
                                f"{tps / hf_tps:.2f}x transformers"))


def print_table(rows: list[Row]) -> str:
    lines = ["| section | config | check | value | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.config} | {r.item} | {r.value} | {r.note} |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="smoke run: the tiny config only, few steps, float32")
    ap.add_argument("--configs", default="tiny,1b,8b")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--adapters", default="0,8,64", help="LoRA adapter counts to time (0 = base)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per throughput run")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny for the smoke run")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    configs = ["tiny"] if args.tiny else args.configs.split(",")
    concurrency = [1, 4] if args.tiny else [int(c) for c in args.concurrency.split(",")]
    steps = 4 if args.tiny else args.steps
    adapter_counts = [int(a) for a in args.adapters.split(",")]
    rows: list[Row] = []
    t_start = time.perf_counter()
    if device == "cuda":
        check_kernels(device, dtype, rows)
    for name in configs:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        hf, rt, eager = build(name, device, dtype)
        new_tokens = 8 if args.tiny else 16
        check_vs_transformers(name, hf, rt, rows, new_tokens)
        check_vs_peft(name, hf, rt, rows, new_tokens)
        check_prefix(name, rt, rows)
        conc = concurrency if name != "8b" else [c for c in concurrency if c in (1, 64, 256)]
        throughput(name, hf, rt, eager, rows, conc, steps, 32 if not args.tiny else 8, adapter_counts)
        if device == "cuda":
            rows.append(Row("memory", name, "peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
                            "transformers + our fused copy + caches"))
        rows.append(Row("time", name, "wall time of this config", f"{time.perf_counter() - t0:.0f} s"))
        del hf, rt, eager
    rows.append(Row("time", "all", "total wall time", f"{time.perf_counter() - t_start:.0f} s"))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
