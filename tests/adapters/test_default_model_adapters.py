"""Adapters on the real default model (SmolLM2-135M-Instruct) against PEFT's forward pass."""

from __future__ import annotations

import concurrent.futures

import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from server.model.default_model import ensure_default_model
from tests.peft_reference import make_peft_adapter, peft_greedy_reference

N_NEW = 6


@pytest.mark.slow
def test_lora_and_prefix_on_the_default_model_equal_peft(start_server, tmp_path):
    base = ensure_default_model()
    make_peft_adapter(base, tmp_path / "lora", "lora", seed=3, r=8, lora_alpha=16)
    make_peft_adapter(base, tmp_path / "prefix", "prefix", seed=4, num_virtual_tokens=8)
    srv = start_server("default", adapter_root=str(tmp_path), kv_cache_tokens=2048, max_batch_size=8)
    prompt = srv.app.model.tokenizer.encode_chat([{"role": "user", "content": "Name a colour."}])
    refs = {name: peft_greedy_reference(base, None if name is None else tmp_path / name, prompt, N_NEW)
            for name in (None, "lora", "prefix")}
    for name in ("lora", "prefix"):
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=name, path=name))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = {name: pool.submit(srv.generate, token_ids=prompt, adapter_id=name or "", max_new_tokens=N_NEW,
                                  ignore_eos=True, logprobs=True) for name in refs}
        for name, fut in futs.items():
            resp = fut.result()
            tokens, logprobs = refs[name]
            assert list(resp.token_ids) == tokens, name
            assert max(abs(a.logprob - b) for a, b in zip(resp.logprobs, logprobs, strict=True)) < 1e-3
    assert refs["lora"][0] != refs[None][0] or refs["prefix"][0] != refs[None][0]
