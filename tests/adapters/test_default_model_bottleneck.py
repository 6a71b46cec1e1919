"""Bottleneck adapters on the real default model (SmolLM2-135M-Instruct) against AdapterHub's forward pass."""

from __future__ import annotations

import concurrent.futures

import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from server.model.default_model import ensure_default_model
from tests.adapterhub import call_many, greedy_request, make_request

N_NEW = 6


@pytest.mark.slow
def test_pfeiffer_and_houlsby_on_the_default_model_equal_adapterhub(start_server, tmp_path):
    base = ensure_default_model()
    srv = start_server("default", adapter_root=str(tmp_path), kv_cache_tokens=2048, max_batch_size=8)
    prompt = srv.app.model.tokenizer.encode_chat([{"role": "user", "content": "Name a colour."}])
    names = (None, "pfeiffer", "houlsby")
    answers = call_many([
        make_request(base, tmp_path / "pfeiffer", "SeqBnConfig", seed=1, std=0.05, reduction_factor=16),
        make_request(base, tmp_path / "houlsby", "DoubleSeqBnConfig", seed=2, std=0.05, reduction_factor=16),
        *[greedy_request(base, None if n is None else tmp_path / n, [prompt], N_NEW) for n in names]])
    refs = {n: (a["results"][0]["tokens"], a["results"][0]["logprobs"]) for n, a in zip(names, answers[2:], strict=True)}
    for name in names[1:]:
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=name, path=name))
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:  # one mixed batch
        futs = {name: pool.submit(srv.generate, token_ids=prompt, adapter_id=name or "", max_new_tokens=N_NEW,
                                  ignore_eos=True, logprobs=True) for name in names}
        for name, fut in futs.items():
            resp = fut.result()
            tokens, logprobs = refs[name]
            assert list(resp.token_ids) == tokens, name
            assert max(abs(a.logprob - b) for a, b in zip(resp.logprobs, logprobs, strict=True)) < 1e-3, name
    assert refs["pfeiffer"][0] != refs[None][0] and refs["houlsby"][0] != refs[None][0]
