"""Bottleneck adapters served over gRPC against AdapterHub's own forward pass (reference environment).

AdapterHub makes and saves the adapters (``save_adapter``, safetensors) and decodes them greedily with
full forward passes; the server reads the folders unchanged and must give the same greedy tokens with
logprobs within 1e-3, alone and in one mixed batch with every other kind (checked against PEFT).
"""

from __future__ import annotations

import concurrent.futures
import random

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.adapterhub import call_many, greedy_request, make_request
from tests.peft_reference import make_peft_adapter, peft_greedy_reference

N_NEW = 8
BOTTLENECKS = {  # name -> (AdapterHub config class, config); widths on the tiny llama (hidden 64): 4, 8, 16
    "pfeiffer": ("SeqBnConfig", {"reduction_factor": 16}),
    "houlsby": ("DoubleSeqBnConfig", {"reduction_factor": 8}),
    "bn_gelu_learned": ("BnConfig", {"mh_adapter": True, "output_adapter": False, "reduction_factor": 4,
                                     "non_linearity": "gelu", "original_ln_before": True, "scaling": "learned"}),
}
PEFT_KINDS = ["lora", "prompt", "prefix", "ia3"]


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
    for name in [None, *PEFT_KINDS]:
        refs[name] = [peft_greedy_reference(base, None if name is None else root / name, p, N_NEW) for p in prompts]
    return root, prompts, refs


@pytest.fixture
def server(start_server, tiny_llama, setup):
    return start_server(tiny_llama, adapter_root=str(setup[0]), kv_cache_tokens=4096, max_batch_size=16,
                        max_resident_adapters=16)


def register(srv, adapter_id, path=None, **kw):
    return srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path or adapter_id, **kw))


def gen(srv, ids, adapter=""):
    return srv.generate(token_ids=ids, adapter_id=adapter, max_new_tokens=N_NEW, ignore_eos=True, logprobs=True)


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


def test_mixed_batch_with_every_kind_and_base(server, setup):
    _, prompts, refs = setup
    names = [*BOTTLENECKS, *PEFT_KINDS]
    for name in names:
        register(server, name)
    jobs = [(name, i) for name in [None, *names] for i in range(len(prompts))] * 2
    random.Random(0).shuffle(jobs)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futs = [(name, i, pool.submit(gen, server, prompts[i], name or "")) for name, i in jobs]
        for name, i, f in futs:
            assert_matches(f.result(), refs[name][i], name)


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
