"""Fixtures and helpers of the runtime-side reliability tests (slots, isolation, shutdown).

Test modules bind the fixtures by assignment (``adapter_root = runtime_fixtures.adapter_root``).
"""

from __future__ import annotations

import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.peft_reference import make_peft_adapter, peft_greedy_reference

N_NEW = 8


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_factory):
    """Three LoRA adapters (ranks 4, 4, 8) and a prefix adapter on the tiny llama, saved by PEFT."""
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("reliability-adapters")
    make_peft_adapter(base, root / "lora", "lora", seed=10)
    make_peft_adapter(base, root / "lora2", "lora", seed=99, target_modules=["q_proj", "v_proj", "down_proj"])
    make_peft_adapter(base, root / "lora3", "lora", seed=7, r=8, target_modules=["k_proj", "o_proj", "up_proj"])
    make_peft_adapter(base, root / "prefix", "prefix", seed=13)
    return root


@pytest.fixture(scope="module")
def references(adapter_root, tiny_model_factory):
    """(prompts, {adapter name or None: [(tokens, logprobs) per prompt]}) from PEFT / transformers."""
    base = tiny_model_factory("llama")
    from server.model.loader import load_model

    tok = load_model(str(base)).tokenizer
    prompts = [tok.encode("the quick brown fox"), tok.encode("hello world, this is")]
    refs = {name: [peft_greedy_reference(base, None if name is None else adapter_root / name, p, N_NEW)
                   for p in prompts]
            for name in (None, "lora", "lora2", "lora3", "prefix")}
    return prompts, refs


def register(srv, adapter_id, path=None, **kw) -> pb.Adapter:
    return srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path or adapter_id, **kw),
                                        timeout=60)


def gen(srv, ids, adapter="", **kw) -> pb.GenerateResponse:
    return srv.generate(token_ids=ids, adapter_id=adapter, max_new_tokens=N_NEW, ignore_eos=True, logprobs=True, **kw)


def assert_matches(resp, ref) -> None:
    tokens, logprobs = ref
    assert list(resp.token_ids) == tokens
    for got, want in zip(resp.logprobs, logprobs, strict=True):
        assert abs(got.logprob - want) < 1e-3
