"""Device check of the GPU path: correctness against transformers/PEFT, kernels, throughput, memory.

Run on a CUDA machine, from the repository root (under 5 minutes on one H200):

    python -m bench.gpu_check                      # tiny + 1b + 8b configs, bf16
    python -m bench.gpu_check --configs tiny,1b    # quicker

Wheels to carry: none. It needs PyTorch with CUDA, triton, transformers and peft (the device
machine has them; safetensors/tokenizers come with transformers). No weights travel: every model
is a random-weight Llama of the named shape built on the GPU, and the adapters are PEFT adapters
with random weights: LoRA of mixed ranks, prompt tuning and prefix tuning (the latter two saved by
PEFT and read by the server's own adapter loader, then served as KV prefixes).
CPU smoke run, as tests/bench/test_gpu_check.py does: ``python -m bench.gpu_check --device cpu --tiny``.

Prints one markdown table: greedy tokens and logits vs transformers and PEFT (a mixed LoRA batch,
and a batch mixing a prompt-tuning and a prefix-tuning adapter; same weights, same device); each
kernel vs its torch reference (the sampling kernel's tokens vs the torch draw, and its time);
decode throughput at 1/16/64/256 concurrent rows for base,
8 LoRA and 64 LoRA, CUDA graphs on and off, and transformers' batched generate() as the baseline
(each timed end to end: prefill + decode steps, sampled ids copied to the host every step);
peak GPU memory per config.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from server.adapters.formats import AdapterLimits, PrefixWeights, load_adapter_dir
from server.adapters.lora_batch import LoraBatch, LoraSlots
from server.engine.sampler import GREEDY_BELOW, draw
from server.kernels.runtime import kernels_available
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
             prefixes: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
             ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decode of equal-length prompts ids [B, S] through a paged cache; (tokens per row, prefill logits).

    `prefixes`: per row, K and V [L, H_kv, n, D] of a prompt/prefix adapter written into the row's first n
    cache entries (its prompt then sits at positions n..), or None. Pass the same `cache` to repeated runs:
    CUDA graphs are captured for one cache."""
    bsz, seq = ids.shape
    dev = rt.device
    prefixes = prefixes or [None] * bsz
    lens = [0 if p is None else p[0].shape[2] for p in prefixes]
    per_row = (max(lens) + seq + new_tokens) // PAGE + 1
    if cache is None or cache.num_pages < bsz * per_row:
        cache = new_cache(rt, bsz * per_row * PAGE)
    tables = torch.arange(bsz * per_row, device=dev).view(bsz, per_row)
    for row, p in enumerate(prefixes):
        if p is not None:
            cache.write_prefix(p[0], p[1], cache.slots(tables[row:row + 1], torch.arange(lens[row], device=dev)[None])[0])
    lora = (lambda: LoraBatch(slots, row_slots, None)) if slots is not None else (lambda: None)
    start = torch.tensor(lens, device=dev)
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


def prefix_kv(rt: LlamaRuntime, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [L, H_kv, n, D] an adapter puts in front of a row: prefix tuning's raw K/V, or prompt tuning's
    virtual tokens run once at positions 0..n-1 (as server.adapters.residency does at registration)."""
    if isinstance(weights, PrefixWeights):
        return weights.keys.to(rt.device, rt.dtype), weights.values.to(rt.device, rt.dtype)
    emb = weights.embeddings.to(rt.device, rt.dtype)  # [n, hidden]
    n = emb.shape[0]
    cache = PagedKVCache(rt.args, 1, n, rt.dtype, rt.device)
    zero = torch.zeros(1, dtype=torch.long, device=rt.device)
    rt.forward(StepInput(start=zero, lengths=torch.tensor([n], device=rt.device), block_tables=zero[None],
                         input_embeds=emb[None]), cache)
    return cache.read(torch.arange(n, device=rt.device))


@torch.inference_mode()
def peft_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
    """(first logits [B, V], greedy tokens per row) from PEFT's forward over the whole sequence at every
    step (no KV cache and no generate(), whose prompt-learning path is the part under doubt)."""
    seq, first, out = ids, None, []
    for _ in range(new_tokens):
        logits = model(input_ids=seq).logits[:, -1].float()  # [B, V]
        first = logits if first is None else first
        nxt = logits.argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return first, torch.stack(out, 1).tolist()


def check_prompt_kinds(name: str, hf, rt: LlamaRuntime, rows: list[Row], new_tokens: int) -> None:
    """A prompt-tuning adapter (8 virtual tokens) and a prefix-tuning adapter (20) made by PEFT, saved and
    read back by the server's loader, served in one batch of ours (2 rows each); PEFT runs each on its own."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    kinds = {"prompt tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
             "prefix tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)}
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, rt.args.vocab_size, (4, 12), generator=gen).to(rt.device)
    prefixes, refs = [], []
    for i, cfg in enumerate(kinds.values()):
        torch.manual_seed(20 + i)  # PEFT's own random init of the virtual tokens / raw K/V (never zero)
        model = get_peft_model(hf, cfg).eval()
        part = ids[2 * i:2 * i + 2]
        refs.append(peft_greedy(model, part, new_tokens))
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, safe_serialization=True)
            spec = load_adapter_dir(folder, rt.args, AdapterLimits())
        prefixes += [prefix_kv(rt, spec.weights)] * 2
    got, logits = generate(rt, ids, new_tokens, prefixes=prefixes)
    for i, (kind, cfg) in enumerate(kinds.items()):
        ref_logits, want = refs[i]
        same = sum(g == w for g, w in zip(got[2 * i:2 * i + 2], want, strict=True))
        note = f"{cfg.num_virtual_tokens} virtual tokens, batched with the other kind"
        rows.append(Row("vs PEFT", name, f"{kind}: greedy tokens equal", f"{same}/2", note))
        diff = (logits[2 * i:2 * i + 2] - ref_logits).abs().max()
        rows.append(Row("vs PEFT", name, f"{kind}: logits max |diff|", f"{diff:.3g}"))


def check_sampling(device: str, rows: list[Row], bsz: int, vocab: int) -> None:
    """The sampling kernel against the torch draw (same uniforms): tokens equal, and the time of each."""
    from server.kernels.sampling import sample_rows

    g = torch.Generator(device=device).manual_seed(5)
    logits = torch.randn(bsz, vocab, generator=g, device=device) * 4  # [B, V] float32
    temps = torch.tensor([(0.0, 0.7, 1.0, 1.3)[i % 4] for i in range(bsz)], device=device)
    top_k = torch.tensor([(0, 50, 0, 1000)[i % 4] for i in range(bsz)], device=device)
    top_p = torch.tensor([(1.0, 1.0, 0.9, 0.95)[i % 4] for i in range(bsz)], device=device)
    u = torch.rand(bsz, generator=g, device=device)
    timings = {}
    for label, fn in (("kernel", lambda: sample_rows(logits, temps, top_k.float(), top_p, u, GREEDY_BELOW)),
                      ("torch", lambda: draw(logits, temps, top_k, top_p, u))):
        out = fn()  # warm-up (Triton compiles)
        times = []
        for _ in range(5 if device == "cuda" else 1):  # the interpreter is slow: once on CPU
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        timings[label] = (out, statistics.median(times))
    same = int((timings["kernel"][0] == timings["torch"][0]).sum())
    rows.append(Row("kernels", device, "sampling: tokens equal to the torch draw", f"{same}/{bsz}",
                    f"V={vocab}; greedy, top-k, top-p and both rows"))
    k_t, t_t = timings["kernel"][1], timings["torch"][1]
    rows.append(Row("kernels", device, "sampling: kernel / torch draw time", f"{k_t / t_t:.2f}",
                    f"{k_t * 1e3:.2f} ms vs {t_t * 1e3:.2f} ms for {bsz} rows"))


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
    check_sampling(device, rows, 64, 128256)


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
    elif kernels_available(device):  # the smoke run: the sampling check at toy size, under the interpreter
        check_sampling(device, rows, 4, 300)
    for name in configs:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        hf, rt, eager = build(name, device, dtype)
        new_tokens = 8 if args.tiny else 16
        check_vs_transformers(name, hf, rt, rows, new_tokens)
        check_vs_peft(name, hf, rt, rows, new_tokens)
        check_prompt_kinds(name, hf, rt, rows, new_tokens)
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
