"""Per-request weighted LoRA mixes (GenerateRequest.adapters) against PEFT's
``add_weighted_adapter(..., combination_type="cat")``, in batches with other rows, and their refusals."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.peft_reference import make_peft_adapter, peft_greedy_reference, peft_mix_reference
from tests.serving import make_request

N_NEW = 8
# name -> [(adapter, weight)]: 1, 2 and 4 adapters, negative weights, different ranks and targets
MIXES = {
    "one scaled": [("m1", 1.7)],
    "two": [("m1", 0.6), ("m2", 1.3)],
    "two, one negative": [("m2", -0.8), ("m1", 1.0)],
    "four": [("m1", 0.5), ("m2", -1.5), ("m3", 2.0), ("m4", 0.75)],
}


@pytest.fixture(scope="module")
def mix_root(tmp_path_factory, tiny_model_factory):
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("mixes")
    make_peft_adapter(base, root / "m1", "lora", seed=41)
    make_peft_adapter(base, root / "m2", "lora", seed=42, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    make_peft_adapter(base, root / "m3", "lora", seed=43, r=8, lora_alpha=32, use_rslora=True,
                      target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    make_peft_adapter(base, root / "m4", "lora", seed=44, r=4, target_modules=["v_proj", "o_proj", "down_proj"])
    make_peft_adapter(base, root / "dora", "dora", seed=45)
    return root


@pytest.fixture(scope="module")
def mix_refs(mix_root, tiny_model_factory):
    base = tiny_model_factory("llama")
    from server.model.loader import load_model

    prompt = load_model(str(base)).tokenizer.encode("hello world, this is")
    refs = {name: peft_mix_reference(base, [(mix_root / a, w) for a, w in parts], prompt, N_NEW)
            for name, parts in MIXES.items()}
    refs["m1"] = peft_greedy_reference(base, mix_root / "m1", prompt, N_NEW)
    refs[None] = peft_greedy_reference(base, None, prompt, N_NEW)
    return prompt, refs


@pytest.fixture
def server(start_server, tiny_llama, mix_root):
    srv = start_server(tiny_llama, adapter_root=str(mix_root), kv_cache_tokens=4096, max_batch_size=16)
    for name in ("m1", "m2", "m3", "m4", "dora"):
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=name, path=name))
    return srv


def _mix_request(prompt, parts, **kw):
    req = make_request(token_ids=prompt, max_new_tokens=N_NEW, ignore_eos=True, logprobs=True, **kw)
    for adapter_id, weight in parts:
        req.adapters.append(pb.AdapterWeight(adapter_id=adapter_id, weight=weight))
    return req


def test_mixes_equal_peft_cat_in_one_batch_with_single_and_base_rows(server, mix_refs):
    prompt, refs = mix_refs
    jobs = [(name, _mix_request(prompt, parts)) for name, parts in MIXES.items()]
    jobs += [("m1", make_request(token_ids=prompt, adapter_id="m1", max_new_tokens=N_NEW, ignore_eos=True,
                                 logprobs=True)),
             (None, make_request(token_ids=prompt, max_new_tokens=N_NEW, ignore_eos=True, logprobs=True))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs) * 2) as pool:
        futs = [(name, pool.submit(server.gen.Generate, req, timeout=120)) for name, req in jobs * 2]
        for name, fut in futs:
            resp = fut.result()
            tokens, logprobs = refs[name]
            assert list(resp.token_ids) == tokens, name
            assert max(abs(g.logprob - w) for g, w in zip(resp.logprobs, logprobs, strict=True)) < 1e-3, name
    assert len({tuple(refs[n][0]) for n in refs}) >= 4, "the mixes must change the output"


def test_a_mix_of_one_with_weight_one_is_the_adapter(server, mix_refs):
    prompt, refs = mix_refs
    resp = server.gen.Generate(_mix_request(prompt, [("m1", 1.0)]), timeout=60)
    assert list(resp.token_ids) == refs["m1"][0]


MIX_ERRORS = [
    # (id, parts, adapter_id, code, exact message)
    ("with adapter_id", [("m1", 1.0)], "m2", grpc.StatusCode.INVALID_ARGUMENT,
     "adapters: mutually exclusive with adapter_id; give one or the other"),
    ("too many", [("m1", 1.0), ("m2", 1.0), ("m3", 1.0), ("m4", 1.0), ("dora", 1.0)], "",
     grpc.StatusCode.INVALID_ARGUMENT, "adapters: at most 4 adapters per request (--max-adapters-per-request), got 5"),
    ("duplicate", [("m1", 1.0), ("m1", 0.5)], "", grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[1].adapter_id: 'm1' appears more than once"),
    ("nan weight", [("m1", float("nan"))], "", grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[0].weight: must be finite and in [-4, 4], got nan"),
    ("inf weight", [("m1", 1.0), ("m2", float("-inf"))], "", grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[1].weight: must be finite and in [-4, 4], got -inf"),
    ("big weight", [("m1", 4.5)], "", grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[0].weight: must be finite and in [-4, 4], got 4.5"),
    ("empty id", [("", 1.0)], "", grpc.StatusCode.INVALID_ARGUMENT, "adapters[0].adapter_id: must not be empty"),
    ("not lora", [("m1", 1.0), ("dora", 1.0)], "", grpc.StatusCode.INVALID_ARGUMENT,
     "adapters[1].adapter_id: 'dora' is a DORA adapter; only LORA adapters can be mixed"),
    ("unknown", [("m1", 1.0), ("ghost", 1.0)], "", grpc.StatusCode.NOT_FOUND,
     "adapter_id 'ghost' is not registered"),
]


@pytest.mark.parametrize("case,parts,adapter_id,code,message", MIX_ERRORS, ids=[e[0] for e in MIX_ERRORS])
def test_mix_refusals_name_the_field(server, mix_refs, case, parts, adapter_id, code, message):
    prompt, refs = mix_refs
    with pytest.raises(grpc.RpcError) as err:
        server.gen.Generate(_mix_request(prompt, parts, adapter_id=adapter_id), timeout=60)
    assert err.value.code() == code
    assert err.value.details() == message
    assert all(e.refs == 0 for e in server.app.adapters.list())  # every reference taken before the refusal was given back
    resp = server.gen.Generate(_mix_request(prompt, MIXES["two"]), timeout=60)
    assert list(resp.token_ids) == refs["two"][0]


def test_a_merged_adapter_cannot_be_mixed(start_server, tiny_llama, mix_root, mix_refs):
    prompt, _ = mix_refs
    srv = start_server(tiny_llama, adapter_root=str(mix_root))
    srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="m1", path="m1", merge=True))
    srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="m2", path="m2"))
    with pytest.raises(grpc.RpcError) as err:
        srv.gen.Generate(_mix_request(prompt, [("m2", 1.0), ("m1", 1.0)]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("adapters[1].adapter_id: 'm1' is merged into the base weights; "
                                   "a merged adapter cannot be mixed")


def test_the_http_api_takes_the_same_mix_as_an_extra_body_field(start_server, tiny_llama, mix_root, mix_refs):
    import openai

    from tests.http.conftest import free_port

    prompt, refs = mix_refs
    srv = start_server(tiny_llama, adapter_root=str(mix_root), http_port=free_port())
    for name in ("m1", "m2"):
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=name, path=name))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.app.http_port}/v1", api_key="none", max_retries=0,
                           timeout=60)
    mix = [{"adapter_id": a, "weight": w} for a, w in MIXES["two"]]
    out = client.completions.create(model="", prompt=prompt, max_tokens=N_NEW, temperature=0,
                                    extra_body={"adapters": mix, "ignore_eos": True})
    assert out.choices[0].text == srv.gen.Generate(_mix_request(prompt, MIXES["two"]), timeout=60).text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m1", prompt=prompt, max_tokens=2, extra_body={"adapters": mix})
    assert "adapters: mutually exclusive with adapter_id" in str(err.value)
