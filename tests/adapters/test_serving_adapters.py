"""Adapters served over gRPC, checked against PEFT's own forward pass (the oracle)."""

from __future__ import annotations

import concurrent.futures
import random
import shutil
import threading
import time

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.peft_reference import make_peft_adapter, peft_greedy_reference
from tests.serving import make_request

KINDS = ["lora", "prompt", "ptuning", "prefix", "dora", "ia3", "ln"]
TYPES = {"lora": pb.LORA, "prompt": pb.PROMPT_TUNING, "ptuning": pb.P_TUNING, "prefix": pb.PREFIX_TUNING,
         "dora": pb.DORA, "ia3": pb.IA3, "ln": pb.LN_TUNING}
N_NEW = 8


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_factory):
    """Adapters of every kind (plus a second LoRA) on the tiny llama, saved by PEFT."""
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("adapters")
    for i, kind in enumerate(KINDS):
        make_peft_adapter(base, root / kind, kind, seed=10 + i)
    # IA3 with an output scale on o_proj and an input scale on o_proj's own input elsewhere; LN on every norm
    make_peft_adapter(base, root / "ia3b", "ia3", seed=31, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                      feedforward_modules=["o_proj"])
    make_peft_adapter(base, root / "ln_all", "ln", seed=32,
                      target_modules=["input_layernorm", "post_attention_layernorm", "norm"])
    make_peft_adapter(base, root / "lora2", "lora", seed=99, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    make_peft_adapter(base, root / "lora3", "lora", seed=7, r=8, lora_alpha=32, use_rslora=True,
                      target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    return root


@pytest.fixture(scope="module")
def references(adapter_root, tiny_model_factory):
    """PEFT greedy tokens + logprobs per adapter (None = base) for two prompts."""
    base = tiny_model_factory("llama")
    from server.model.loader import load_model

    tok = load_model(str(base)).tokenizer
    prompts = [tok.encode("the quick brown fox"), tok.encode("hello world, this is")]
    refs = {}
    for name in [None, *KINDS, "lora2", "lora3", "ia3b", "ln_all"]:
        adapter_dir = None if name is None else adapter_root / name
        refs[name] = [peft_greedy_reference(base, adapter_dir, p, N_NEW) for p in prompts]
    return prompts, refs


@pytest.fixture
def server(start_server, tiny_llama, adapter_root):
    return start_server(tiny_llama, adapter_root=str(adapter_root), kv_cache_tokens=4096, max_batch_size=16,
                        max_resident_adapters=16)


def register(srv, adapter_id, path=None, **kw):
    return srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path or adapter_id, **kw))


def gen(srv, ids, adapter="", **kw):
    return srv.generate(token_ids=ids, adapter_id=adapter, max_new_tokens=N_NEW, ignore_eos=True, logprobs=True, **kw)


def assert_matches(resp, ref, name=None):
    tokens, logprobs = ref
    assert list(resp.token_ids) == tokens, name
    for got, want in zip(resp.logprobs, logprobs, strict=True):
        assert abs(got.logprob - want) < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_equals_peft_and_differs_from_base(server, references, kind):
    prompts, refs = references
    info = register(server, kind)
    assert info.type == TYPES[kind]
    label = pb.AdapterType.Name(TYPES[kind]).lower()  # the metrics' type label: dora, ia3, ln_tuning, ...
    assert server.app.metrics.registry.get_sample_value("adapterserve_adapters_registered", {"type": label}) == 1
    for p, ref in zip(prompts, refs[kind], strict=True):
        resp = gen(server, p, kind)
        assert_matches(resp, ref)
        assert resp.adapter_id == kind
    assert any(refs[kind][i][0] != refs[None][i][0] for i in range(len(prompts))), "adapter must change the output"


def test_mixed_batch_of_peft_kinds_and_their_variants(server, references):
    """Every PEFT kind plus variants (mixed ranks, rsLoRA, IA3 on o_proj's input, LN on every norm) in shared
    batches; the one-step test of every kind, bottleneck and weighted mix included, is in
    test_serving_bottleneck.py (it needs AdapterHub's reference environment)."""
    prompts, refs = references
    names = [*KINDS, "lora2", "lora3", "ia3b", "ln_all"]
    for name in names:
        register(server, name)
    jobs = [(name, i) for name in [None, *names] for i in range(len(prompts))] * 2
    random.Random(0).shuffle(jobs)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = [(name, i, pool.submit(gen, server, prompts[i], name or "")) for name, i in jobs]
        for name, i, f in futs:
            assert_matches(f.result(), refs[name][i])
    assert server.app.engine.steps > 0


def test_upload_inline_equals_path(server, references, adapter_root):
    prompts, refs = references
    files = pb.AdapterFiles(config_json=(adapter_root / "prefix" / "adapter_config.json").read_bytes(),
                            safetensors=(adapter_root / "prefix" / "adapter_model.safetensors").read_bytes())
    server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="up", files=files))
    assert_matches(gen(server, prompts[0], "up"), refs["prefix"][0])


@pytest.mark.parametrize("merged", ["lora", "dora", "ia3"])
def test_merge_on_load_keeps_every_row_exact_and_unmerge_restores_bits(server, references, merged):
    prompts, refs = references
    before = [t.clone() for lw in server.app.model.runtime.w.layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    info = register(server, merged, merge=True)
    assert info.merged and info.state == pb.MERGED
    others = ["lora2", "prefix", "ia3b", "ln_all"] + (["dora"] if merged != "dora" else ["lora"])
    for name in others:
        register(server, name)
    jobs = [(n, i) for n in [None, merged, *others] for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = [(n, i, pool.submit(gen, server, prompts[i], n or "")) for n, i in jobs]
        for n, i, f in futs:
            assert_matches(f.result(), refs[n][i], n)
    with pytest.raises(grpc.RpcError) as err:
        register(server, "lora3", merge=True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=merged))
    after = [t for lw in server.app.model.runtime.w.layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    assert all(a.equal(b) for a, b in zip(before, after, strict=True))
    assert_matches(gen(server, prompts[0]), refs[None][0])


def _states(srv):
    return {a.adapter_id: a.state for a in srv.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters}


def test_lru_eviction_and_pinning_step_by_step(start_server, tiny_llama, adapter_root, references):
    prompts, refs = references
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), max_resident_adapters=2)
    R, G = pb.RESIDENT, pb.REGISTERED
    register(srv, "lora", pin=True)
    register(srv, "lora2")
    assert _states(srv) == {"lora": R, "lora2": R}
    register(srv, "lora3")  # evicts the least recently used unpinned one: lora2
    assert _states(srv) == {"lora": R, "lora2": G, "lora3": R}
    assert_matches(gen(srv, prompts[0], "lora2"), refs["lora2"][0])  # loaded on demand, evicting lora3
    assert _states(srv) == {"lora": R, "lora2": R, "lora3": G}
    register(srv, "prefix")  # lora2 is now the LRU unpinned one
    assert _states(srv) == {"lora": R, "lora2": G, "lora3": G, "prefix": R}
    assert_matches(gen(srv, prompts[1], "lora"), refs["lora"][1])
    assert_matches(gen(srv, prompts[1], "lora3"), refs["lora3"][1])
    assert _states(srv)["lora"] == R  # pinned: never evicted
    evictions = srv.app.metrics.registry.get_sample_value("adapterserve_adapter_evictions_total")
    assert evictions == 4  # lora2, lora3, lora2, prefix


def test_requests_wait_when_every_slot_is_busy(start_server, tiny_llama, adapter_root, references):
    prompts, refs = references
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), max_resident_adapters=1)
    register(srv, "lora")
    register(srv, "lora2")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [(n, pool.submit(gen, srv, prompts[0], n)) for n in ["lora", "lora2"] * 4]
        for n, f in futs:
            assert_matches(f.result(), refs[n][0])


def test_unregister_refuses_new_requests_and_lets_in_flight_finish(server, references):
    prompts, refs = references
    register(server, "lora")
    call = server.gen.GenerateStream(make_request(token_ids=prompts[0], adapter_id="lora", max_new_tokens=60,
                                                  ignore_eos=True))
    first = next(call)
    server.app.engine.call(lambda: time.sleep(0.3))  # keep it in flight while we unregister
    server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="lora"))
    with pytest.raises(grpc.RpcError) as err:
        gen(server, prompts[0], "lora")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    rest = list(call)
    tokens = list(first.token_ids) + [t for c in rest for t in c.token_ids]
    assert tokens[:N_NEW] == refs["lora"][0][0] and len(tokens) == 60
    end = time.time() + 5
    while _states(server) and time.time() < end:
        time.sleep(0.02)
    assert _states(server) == {}


def test_concurrent_register_unregister_generate_never_mixes_weights(server, references, adapter_root):
    prompts, refs = references
    allowed = {tuple(refs["lora"][0][0]), tuple(refs["lora2"][0][0])}
    stop = threading.Event()
    outputs, codes = [], []

    def churn():
        rng = random.Random(1)
        while not stop.is_set():
            src = rng.choice(["lora", "lora2"])
            try:
                register(server, "hot", path=src, replace=True)
                if rng.random() < 0.4:
                    server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="hot"))
            except grpc.RpcError as e:
                codes.append(e.code())

    def client():
        while not stop.is_set():
            try:
                outputs.append(tuple(gen(server, prompts[0], "hot").token_ids))
            except grpc.RpcError as e:
                codes.append(e.code())

    threads = [threading.Thread(target=churn) for _ in range(2)] + [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(30)
    assert outputs, "some requests must have been served"
    assert set(outputs) <= allowed
    assert set(codes) <= {grpc.StatusCode.NOT_FOUND}
    assert server.generate("still alive", max_new_tokens=2).usage.completion_tokens == 2


REGISTER_ERRORS = [
    ("escape", {"path": "../outside"}, grpc.StatusCode.INVALID_ARGUMENT, "path"),
    ("absolute", {"path": "/etc"}, grpc.StatusCode.INVALID_ARGUMENT, "path"),
    ("missing", {"path": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "path"),
    ("bad id", {"adapter_id": "a/b", "path": "lora"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ("dot id", {"adapter_id": "..", "path": "lora"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_id"),
    ("no source", {}, grpc.StatusCode.INVALID_ARGUMENT, "source"),
    ("merge prefix", {"path": "prefix", "merge": True}, grpc.StatusCode.FAILED_PRECONDITION, "merge"),
    ("merge ln", {"path": "ln", "merge": True}, grpc.StatusCode.FAILED_PRECONDITION,
     "merge: only LORA, DORA, IA3 adapters can be merged, not LN_TUNING"),
]


@pytest.mark.parametrize("name,fields,code,fragment", REGISTER_ERRORS, ids=[e[0] for e in REGISTER_ERRORS])
def test_register_errors(server, name, fields, code, fragment):
    fields = {"adapter_id": "x", **fields}
    with pytest.raises(grpc.RpcError) as err:
        server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(**fields))
    assert err.value.code() == code
    assert fragment in err.value.details()
    assert _states(server) == {}


def test_duplicate_unknown_and_limits(start_server, tiny_llama, adapter_root):
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), max_lora_rank=4, max_virtual_tokens=3)
    register(srv, "lora2")  # rank 4: allowed
    with pytest.raises(grpc.RpcError) as err:
        register(srv, "lora2")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        register(srv, "lora3")  # rank 8 > 4
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_lora_rank" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        register(srv, "prompt")  # 4 virtual tokens > 3
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_virtual_tokens" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        srv.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        srv.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_files_never_disturb_the_server(server, adapter_root, tmp_path, references):
    prompts, refs = references
    bad = adapter_root / "bad-truncated"
    if not bad.exists():
        shutil.copytree(adapter_root / "lora", bad)
        data = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(grpc.RpcError) as err:
        register(server, "bad", path="bad-truncated")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(
            adapter_id="junk", files=pb.AdapterFiles(config_json=b"{not json", safetensors=b"\x00" * 10)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_matches(gen(server, prompts[0]), refs[None][0])


def test_preload_registers_at_start(start_server, tiny_llama, adapter_root, references):
    prompts, refs = references
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), preload=["p1=prefix", "l1=lora"])
    assert set(_states(srv)) == {"p1", "l1"}
    assert_matches(gen(srv, prompts[1], "p1"), refs["prefix"][1])


def test_tight_kv_pages_with_prefixes_and_mixed_prompt_lengths(start_server, tiny_llama, adapter_root, references):
    # One-token pages: any under-reserved prefix or out-of-range padding position would fault.
    prompts, refs = references
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), kv_page_tokens=1, kv_cache_tokens=2048)
    register(srv, "prefix")
    register(srv, "prompt")
    long_prompt = prompts[0] * 6
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futs = [(n, i, pool.submit(gen, srv, prompts[i], n)) for n in ("prefix", "prompt") for i in range(2)]
        extra = [pool.submit(srv.generate, token_ids=long_prompt, max_new_tokens=2, ignore_eos=True)
                 for _ in range(2)]
        for n, i, f in futs:
            assert_matches(f.result(), refs[n][i])
        assert all(f.result().usage.completion_tokens == 2 for f in extra)


def test_adapter_memory_budget_limits_residency(start_server, tiny_llama, adapter_root, references):
    prompts, refs = references
    from server.adapters.formats import AdapterLimits, load_adapter_dir
    from server.model.weights import read_model_args

    size = load_adapter_dir(adapter_root / "lora", read_model_args(tiny_llama), AdapterLimits()).size_bytes
    srv = start_server(tiny_llama, adapter_root=str(adapter_root), adapter_memory_bytes=int(size * 1.2))
    register(srv, "lora")
    register(srv, "lora2")  # smaller, but both do not fit: lora is evicted
    assert _states(srv) == {"lora": pb.REGISTERED, "lora2": pb.RESIDENT}
    assert_matches(gen(srv, prompts[0], "lora"), refs["lora"][0])
    assert _states(srv) == {"lora": pb.RESIDENT, "lora2": pb.REGISTERED}
