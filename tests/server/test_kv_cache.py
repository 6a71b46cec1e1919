"""KV cache management over real gRPC: preemption, chunked prefill, the adapter-aware prefix cache.

Every check compares outputs with a reference run of the same server code (alone, one-piece
prefill, or the prefix cache off): these mechanisms must change speed and memory, never tokens.
"""

from __future__ import annotations

import concurrent.futures
import random

import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.peft_reference import make_peft_adapter
from tests.serving import make_request

KINDS = ["lora", "prompt", "ptuning", "prefix", "dora", "ia3", "ln"]  # every PEFT kind the server serves
PAGE = 4  # small pages: many page boundaries, virtual tokens (6) straddle one


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_factory):
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("kv-adapters")
    for i, kind in enumerate(KINDS):
        extra = {"num_virtual_tokens": 6} if kind in ("prompt", "ptuning", "prefix") else {}
        make_peft_adapter(base, root / kind, kind, seed=30 + i, **extra)
    make_peft_adapter(base, root / "lora2", "lora", seed=77, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def register(srv, adapter_id, path=None, **kw):
    return srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path or adapter_id, **kw))


def ids(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(3, 300) for _ in range(n)]


def run(srv, prompt, adapter="", **kw):
    resp = srv.generate(token_ids=prompt, adapter_id=adapter, ignore_eos=True, logprobs=True, **kw)
    return list(resp.token_ids), [round(lp.logprob, 3) for lp in resp.logprobs]


def counter(app, name, **labels):
    value = app.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


# ------------------------------------------------------------------ preemption
@pytest.mark.parametrize("prefix_cache", ["on", "off"])
def test_preemption_keeps_every_output_and_stream_identical(start_server, tiny_llama, prefix_cache):
    # 64 pages of 4 tokens; 8 requests of 20 + 40 tokens need 120: they must take turns.
    srv = start_server(tiny_llama, kv_cache_tokens=256, kv_page_tokens=PAGE, max_batch_size=8,
                       max_prefill_tokens=64, prefix_cache=prefix_cache)
    seen = []
    submit = srv.app.engine.submit
    srv.app.engine.submit = lambda r: (seen.append(r), submit(r))[1]
    jobs = [(ids(20, i), dict(max_new_tokens=40) if i % 2 else dict(max_new_tokens=40, temperature=1.0, seed=i))
            for i in range(8)]
    alone = [srv.generate(token_ids=p, ignore_eos=True, **kw) for p, kw in jobs]
    assert counter(srv.app, "adapterserve_preemptions_total") == 0
    seen.clear()

    def stream(p, kw):
        return list(srv.gen.GenerateStream(make_request(token_ids=p, ignore_eos=True, **kw), timeout=120))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda job: stream(*job), jobs))
    assert counter(srv.app, "adapterserve_preemptions_total") > 0
    for chunks, ref in zip(streams, alone, strict=True):
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == list(ref.token_ids)  # no token repeated, skipped or changed
        assert "".join(c.text for c in chunks) == ref.text
        assert chunks[-1].usage.completion_tokens == 40
    preempted = [r for r in seen if r.preemptions]
    assert preempted
    for r in preempted:  # queue time counts the time spent preempted
        assert r.queue_s > r.admitted_at - r.submitted_at
    assert srv.app.engine.allocator.free_pages == srv.app.engine.allocator.num_pages


def test_request_that_cannot_fit_alone_is_refused_at_admission(start_server, tiny_llama):
    import grpc

    srv = start_server(tiny_llama, kv_cache_tokens=64, kv_page_tokens=PAGE)
    with pytest.raises(grpc.RpcError) as err:
        srv.generate(token_ids=ids(30, 1), max_new_tokens=40)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--kv-cache-tokens" in err.value.details()
    assert len(srv.generate(token_ids=ids(30, 1), max_new_tokens=34, ignore_eos=True).token_ids) == 34


# ------------------------------------------------------------------ chunked prefill
def test_chunked_prefill_equals_one_piece_for_every_kind(start_server, tiny_llama, adapter_root):
    common = dict(adapter_root=str(adapter_root), kv_page_tokens=PAGE, prefix_cache="off")
    chunked = start_server(tiny_llama, max_prefill_tokens=7, **common)
    whole = start_server(tiny_llama, max_prefill_tokens=4096, **common)
    for srv in (chunked, whole):
        for kind in KINDS:
            register(srv, kind)
    prompts = [ids(45, 5), ids(9, 6)]
    for adapter in ["", *KINDS]:
        for p in prompts:
            assert run(chunked, p, adapter, max_new_tokens=6) == run(whole, p, adapter, max_new_tokens=6), adapter
    # mixed: every kind's long prompt in flight at once, chunks interleaved with decode rows
    with concurrent.futures.ThreadPoolExecutor(len(KINDS) + 1) as pool:
        mixed = list(pool.map(lambda a: run(chunked, prompts[0], a, max_new_tokens=6), ["", *KINDS]))
    assert mixed == [run(whole, prompts[0], a, max_new_tokens=6) for a in ["", *KINDS]]


# ------------------------------------------------------------------ prefix cache
def test_prefix_cache_outputs_equal_cache_off_alone_mixed_after_eviction_and_replace(
        start_server, tiny_llama, adapter_root):
    common = dict(adapter_root=str(adapter_root), kv_page_tokens=PAGE, max_prefill_tokens=64)
    on = start_server(tiny_llama, kv_cache_tokens=512, **common)
    off = start_server(tiny_llama, prefix_cache="off", **common)
    for srv in (on, off):
        for kind in KINDS:
            register(srv, kind)
    register(off, "lora2")
    system = ids(30, 9)
    prompts = [system + ids(5, 10), system + ids(7, 11)]
    adapters = ["", *KINDS]
    ref = {(a, i): run(off, p, a, max_new_tokens=5) for a in adapters for i, p in enumerate(prompts)}
    for a in adapters:  # alone: the second prompt reuses the first one's system-prompt pages
        for i, p in enumerate(prompts):
            assert run(on, p, a, max_new_tokens=5) == ref[(a, i)], (a, i)
        label = a or "_base"
        assert counter(on.app, "adapterserve_prefix_cache_tokens_total", adapter=label, result="hit") >= 28, a
    assert counter(on.app, "adapterserve_prefix_cache_pages") > 0
    with concurrent.futures.ThreadPoolExecutor(2 * len(KINDS) + 2) as pool:  # mixed batches, all kinds at once
        jobs = [(a, i) for a in adapters for i in range(2)]
        got = list(pool.map(lambda j: run(on, prompts[j[1]], j[0], max_new_tokens=5), jobs))
    assert got == [ref[j] for j in jobs]
    # eviction: 128 pages; other prompts push the cached ones out, the originals are recomputed
    for s in range(12):
        run(on, ids(40, 100 + s), max_new_tokens=4)
    assert all(run(on, prompts[0], a, max_new_tokens=5) == ref[(a, 0)] for a in adapters)
    # replace: the same id with other weights must not see its old pages
    hits = counter(on.app, "adapterserve_prefix_cache_tokens_total", adapter="lora", result="hit")
    register(on, "lora", path="lora2", replace=True)
    assert run(on, prompts[0], "lora", max_new_tokens=5) == run(off, prompts[0], "lora2", max_new_tokens=5)
    assert counter(on.app, "adapterserve_prefix_cache_tokens_total", adapter="lora", result="hit") == hits
    assert on.gen.GetModelInfo(pb.GetModelInfoRequest()).limits.prefix_cache is True
    assert off.gen.GetModelInfo(pb.GetModelInfoRequest()).limits.prefix_cache is False


def test_crafted_collisions_never_reuse_another_adapters_pages(start_server, tiny_llama, adapter_root):
    """SGLang #24638: a base request reused a LoRA adapter's cached pages. Try every way a client can
    line its tokens up with another namespace's chain; none may hit, and outputs equal cache off."""
    common = dict(adapter_root=str(adapter_root), kv_page_tokens=PAGE)
    on = start_server(tiny_llama, **common)
    off = start_server(tiny_llama, prefix_cache="off", **common)
    for srv in (on, off):
        register(srv, "lora")
        register(srv, "twin", path="lora")  # the very same weights under another id
        register(srv, "prefix")
    p = ids(33, 21)

    def hits(label):
        return counter(on.app, "adapterserve_prefix_cache_tokens_total", adapter=label, result="hit")

    run(on, p, "lora", max_new_tokens=3)  # publishes the LoRA's pages
    run(on, [7, 7, 7, 7, 7, 7] + p, "prefix", max_new_tokens=3)  # and the prefix adapter's
    assert run(on, p, "", max_new_tokens=5) == run(off, p, "", max_new_tokens=5)  # base, same tokens
    assert run(on, p, "twin", max_new_tokens=5) == run(off, p, "twin", max_new_tokens=5)  # other id, same weights
    # base tokens placed where the prefix adapter's 6 virtual entries sit: same layout, other namespace
    crafted = [7, 7, 7, 7, 7, 7] + p
    assert run(on, crafted, "", max_new_tokens=5) == run(off, crafted, "", max_new_tokens=5)
    assert hits("_base") == 0 and hits("twin") == 0
    assert run(on, p, "lora", max_new_tokens=5) == run(off, p, "lora", max_new_tokens=5)
    assert hits("lora") >= 28  # its own pages are reused
