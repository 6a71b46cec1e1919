"""Bottleneck adapters served over gRPC against AdapterHub's own forward pass (reference environment).

AdapterHub makes and saves the adapters (``save_adapter``, safetensors) and decodes them greedily with
full forward passes; the server reads the folders unchanged and must give the same greedy tokens with
logprobs within 1e-3, alone and in one batch step with every other kind (checked against PEFT: LoRA,
prompt, P-tuning, prefix, DoRA, IA3, LN tuning, a weighted LoRA mix against ``add_weighted_adapter``
``cat``) and the base model.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.adapterhub import call_many, greedy_request, make_request
from tests.peft_reference import make_peft_adapter, peft_greedy_reference, peft_mix_reference
from tests.serving import make_request as make_generate_request

N_NEW = 8
BOTTLENECKS = {  # name -> (AdapterHub config class, config); widths on the tiny llama (hidden 64): 4, 8, 16
    "pfeiffer": ("SeqBnConfig", {"reduction_factor": 16}),
    "houlsby": ("DoubleSeqBnConfig", {"reduction_factor": 8}),
    "bn_gelu_learned": ("BnConfig", {"mh_adapter": True, "output_adapter": False, "reduction_factor": 4,
                                     "non_linearity": "gelu", "original_ln_before": True, "scaling": "learned"}),
}
PEFT_KINDS = ["lora", "prompt", "ptuning", "prefix", "dora", "ia3", "ln"]
MIX = [("lora", 0.7), ("lora2", -0.5)]  # a weighted LoRA mix (GenerateRequest.adapters)
MIX_ID = "lora*0.7+lora2*-0.5"  # how the server names that mix


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_factory):
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("bn_adapters")
    from server.model.loader import load_model

    tok = load_model(str(base)).tokenizer
    prompts = [tok.encode("the quick brown fox"), tok.encode("hello world, this is")]
    requests = [make_request(base, root / name, cls, seed=20 + i, std=0.5, **cfg)
                for i, (name, (cls, cfg)) in enumerate(BOTTLENECKS.items())]
    requests += [greedy_request(base, None, prompts, N_NEW)]
    requests += [greedy_request(base, root / name, prompts, N_NEW) for name in BOTTLENECKS]
    answers = call_many(requests)[len(BOTTLENECKS):]
    refs = {name: [(r["tokens"], r["logprobs"]) for r in a["results"]]
            for name, a in zip(["hub_base", *BOTTLENECKS], answers, strict=True)}
    for i, kind in enumerate(PEFT_KINDS):
        make_peft_adapter(base, root / kind, kind, seed=40 + i)
    make_peft_adapter(base, root / "lora2", "lora", seed=60, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    for name in [None, *PEFT_KINDS]:
        refs[name] = [peft_greedy_reference(base, None if name is None else root / name, p, N_NEW) for p in prompts]
    refs[MIX_ID] = [peft_mix_reference(base, [(root / a, w) for a, w in MIX], p, N_NEW) for p in prompts]
    return root, prompts, refs


@pytest.fixture
def server(start_server, tiny_llama, setup):
    return start_server(tiny_llama, adapter_root=str(setup[0]), kv_cache_tokens=4096, max_batch_size=32,
                        max_resident_adapters=16)


def register(srv, adapter_id, path=None, **kw):
    return srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path or adapter_id, **kw))


def gen(srv, ids, adapter=""):
    """Greedy generation with `adapter` (an id, "" for the base model, or MIX_ID for the weighted mix)."""
    request = make_generate_request(token_ids=ids, adapter_id="" if adapter == MIX_ID else adapter,
                                    max_new_tokens=N_NEW, ignore_eos=True, logprobs=True)
    if adapter == MIX_ID:
        request.adapters.extend(pb.AdapterWeight(adapter_id=a, weight=w) for a, w in MIX)
    return srv.gen.Generate(request, timeout=120)


def assert_matches(resp, ref, name=None):
    tokens, logprobs = ref
    assert list(resp.token_ids) == tokens, name
    for got, want in zip(resp.logprobs, logprobs, strict=True):
        assert abs(got.logprob - want) < 1e-3, name


def test_reference_environments_agree_on_the_base_model(setup):
    _, prompts, refs = setup
    for (tok_hub, lp_hub), (tok_peft, lp_peft) in zip(refs["hub_base"], refs[None], strict=True):
        assert tok_hub == tok_peft
        assert max(abs(a - b) for a, b in zip(lp_hub, lp_peft, strict=True)) < 1e-4


@pytest.mark.parametrize("name", list(BOTTLENECKS))
def test_each_bottleneck_equals_adapterhub_and_differs_from_base(server, setup, name):
    _, prompts, refs = setup
    info = register(server, name)
    assert info.type == pb.BOTTLENECK
    for i, p in enumerate(prompts):
        assert_matches(gen(server, p, name), refs[name][i], name)
    assert any(refs[name][i][0] != refs[None][i][0] for i in range(len(prompts))), "adapter must change the output"


def test_every_kind_shares_one_batch_step_with_equal_outputs(server, setup):
    """One request of every kind per prompt, queued while the engine is held so that they join the batch
    together: a decode step holds a row of each (three bottleneck variants, LoRA, prompt, P-tuning, prefix,
    DoRA, IA3, LN tuning, a weighted mix, base), and each output equals its own reference."""
    _, prompts, refs = setup
    for name in [*BOTTLENECKS, *PEFT_KINDS, "lora2"]:
        register(server, name)
    kinds = [None, *BOTTLENECKS, *PEFT_KINDS, MIX_ID]
    engine = server.app.engine
    steps: list[tuple[str, set[str]]] = []
    forward = engine._forward

    def spy(rows, phase):  # engine thread: which adapters each forward's rows belong to
        steps.append((phase, {r.adapter.adapter_id if r.adapter is not None else "" for r, _ in rows}))
        forward(rows, phase)

    engine._forward = spy
    resume = threading.Event()
    engine.call(lambda: resume.wait(60))  # the engine holds between steps until every request is queued
    jobs = [(name, i) for name in kinds for i in range(len(prompts))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = [(name, i, pool.submit(gen, server, prompts[i], name or "")) for name, i in jobs]
        try:
            deadline = time.monotonic() + 30
            while len(engine.waiting) < len(jobs) and time.monotonic() < deadline:
                time.sleep(0.01)
            queued = len(engine.waiting)
        finally:
            resume.set()
        assert queued == len(jobs)
        for name, i, f in futs:
            assert_matches(f.result(), refs[name][i], name)
    every = {name or "" for name in kinds}
    assert any(phase == "decode" and ids == every for phase, ids in steps), steps[:4]


def test_upload_inline_replace_and_unregister(server, setup):
    root, prompts, refs = setup
    files = pb.AdapterFiles(config_json=(root / "houlsby" / "adapter_config.json").read_bytes(),
                            safetensors=(root / "houlsby" / "adapter.safetensors").read_bytes())
    server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="up", files=files))
    assert_matches(gen(server, prompts[0], "up"), refs["houlsby"][0])
    server.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="up", path="pfeiffer", replace=True))
    assert_matches(gen(server, prompts[1], "up"), refs["pfeiffer"][1])
    server.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="up"))
    assert_matches(gen(server, prompts[1]), refs[None][1])


def test_refusals(start_server, tiny_llama, setup, tmp_path):
    root, _, _ = setup
    srv = start_server(tiny_llama, adapter_root=str(root), max_bottleneck_width=4)
    with pytest.raises(grpc.RpcError) as err:
        register(srv, "h", "houlsby")  # width 8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-bottleneck-width 4" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        register(srv, "p", "pfeiffer", merge=True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not BOTTLENECK" in err.value.details()
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_bytes((root / "pfeiffer" / "adapter_config.json").read_bytes())
    (pickled / "pytorch_adapter.bin").write_bytes(b"not opened")
    with pytest.raises(grpc.RpcError) as err:
        register(srv, "k", "pickled")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pytorch_adapter.bin" in err.value.details() and "use_safetensors=True" in err.value.details()
