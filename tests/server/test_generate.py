"""Generation over real gRPC against the in-process server: correctness, batching, errors, cleanup."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import torch

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.serving import make_request

PROMPTS = ["the quick brown fox", "hello world, this is", "prompt tuning and prefix", "Write a haiku about",
           "0123456789 + -", "low rank adaptation keeps"]


def hf_greedy(folder, ids, n):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        toks, lps = list(ids), []
        for _ in range(n):
            logits = hf(torch.tensor([toks])).logits[0, -1]
            nxt = int(logits.argmax())
            lps.append(torch.log_softmax(logits, -1))
            toks.append(nxt)
    return toks[len(ids):], lps


@pytest.fixture
def server(start_server, tiny_llama):
    return start_server(tiny_llama, kv_cache_tokens=4096, max_batch_size=16)


def test_greedy_tokens_and_logprobs_match_transformers(server, tiny_llama):
    ids = server.app.model.tokenizer.encode(PROMPTS[0])
    resp = server.generate(token_ids=ids, max_new_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=5)
    ref_tokens, ref_lps = hf_greedy(tiny_llama, ids, 10)
    assert list(resp.token_ids) == ref_tokens
    assert resp.finish_reason == pb.LENGTH
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 10
    for lp, ref in zip(resp.logprobs, ref_lps, strict=True):
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
        assert len(lp.top) == 5 and lp.top[0].token_id == lp.token_id
        assert abs(lp.top[1].logprob - ref.topk(2).values[1].item()) < 1e-4
    assert resp.timings.total_ms >= resp.timings.time_to_first_token_ms > 0


def test_output_does_not_depend_on_batch_composition(server):
    alone = [list(server.generate(p, max_new_tokens=12, ignore_eos=True).token_ids) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        noise = [pool.submit(server.generate, p, max_new_tokens=30, temperature=1.0, ignore_eos=True)
                 for p in PROMPTS * 2]
        time.sleep(0.05)  # let the noise occupy the batch so the greedy ones join mid-flight
        busy = [pool.submit(server.generate, p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS]
        busy_tokens = [list(f.result().token_ids) for f in busy]
        for f in noise:
            f.result()
    assert busy_tokens == alone


def test_seeded_sampling_is_reproducible_inside_any_batch(server):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = list(server.generate(PROMPTS[1], **kw).token_ids)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(server.generate, p, max_new_tokens=20, temperature=0.7, ignore_eos=True) for p in PROMPTS]
        again = pool.submit(server.generate, PROMPTS[1], **kw).result()
        [f.result() for f in others]
    assert list(again.token_ids) == alone
    other_seed = list(server.generate(PROMPTS[1], **{**kw, "seed": 99}).token_ids)
    assert other_seed != alone


def test_stream_matches_unary(server):
    unary = server.generate(PROMPTS[2], max_new_tokens=15, ignore_eos=True)
    chunks = list(server.gen.GenerateStream(make_request(PROMPTS[2], max_new_tokens=15, ignore_eos=True)))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == pb.LENGTH and chunks[-1].usage.completion_tokens == 15
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_stop_string_cuts_output(server):
    full = server.generate(PROMPTS[3], max_new_tokens=20, ignore_eos=True)
    stop = full.text[5:8]
    assert stop.strip(), full.text
    resp = server.generate(PROMPTS[3], max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert resp.finish_reason == pb.STOP
    assert resp.text == full.text[: full.text.index(stop)]
    streamed = "".join(c.text for c in server.gen.GenerateStream(
        make_request(PROMPTS[3], max_new_tokens=20, ignore_eos=True, stop=[stop])))
    assert streamed == resp.text


def test_eos_finishes_unless_ignored(server):
    first = server.generate(PROMPTS[0], max_new_tokens=3).token_ids[0]
    server.app.model.tokenizer.eos_token_ids.add(first)
    try:
        resp = server.generate(PROMPTS[0], max_new_tokens=8)
        assert resp.finish_reason == pb.EOS and list(resp.token_ids) == [first]
        resp = server.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True)
        assert resp.finish_reason == pb.LENGTH and len(resp.token_ids) == 8
    finally:
        server.app.model.tokenizer.eos_token_ids.discard(first)


def test_min_new_tokens_holds_off_stop_strings_and_eos(server):
    full = server.generate(PROMPTS[3], max_new_tokens=12, ignore_eos=True)
    stop = full.text[2:5]
    assert stop.strip(), full.text
    assert server.generate(PROMPTS[3], max_new_tokens=12, ignore_eos=True, stop=[stop]).finish_reason == pb.STOP
    held = server.generate(PROMPTS[3], max_new_tokens=12, min_new_tokens=12, ignore_eos=True, stop=[stop])
    assert held.finish_reason == pb.LENGTH and held.text == full.text  # the stop string came too early to count
    first = full.token_ids[0]
    server.app.model.tokenizer.eos_token_ids.add(first)  # the first greedy token would end the output
    try:
        resp = server.generate(PROMPTS[3], max_new_tokens=6, min_new_tokens=3)
    finally:
        server.app.model.tokenizer.eos_token_ids.discard(first)
    assert len(resp.token_ids) >= 3 and first not in resp.token_ids[:3]  # masked while below the minimum


def test_chat_messages_use_the_chat_template(server):
    tok = server.app.model.tokenizer
    resp = server.generate(messages=[("user", "hello world")], max_new_tokens=4, ignore_eos=True)
    expected = tok.hf.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                          tokenize=False)
    assert resp.usage.prompt_tokens == len(tok.encode(expected))


INVALID = [
    ("input", {}),
    ("prompt", {"prompt": ""}),
    ("prompt_token_ids", {"token_ids": [1, 99999]}),
    ("params.max_new_tokens", {"prompt": "hi", "max_new_tokens": 0}),
    ("params.max_new_tokens", {"prompt": "hi", "max_new_tokens": 100000}),
    ("params.temperature", {"prompt": "hi", "temperature": -0.5}),
    ("params.top_p", {"prompt": "hi", "top_p": 0.0}),
    ("params.top_p", {"prompt": "hi", "top_p": 1.5}),
    ("params.repetition_penalty", {"prompt": "hi", "repetition_penalty": 0.0}),
    ("params.min_new_tokens", {"prompt": "hi", "max_new_tokens": 2, "min_new_tokens": 3}),
    ("top_logprobs", {"prompt": "hi", "top_logprobs": 21}),
    ("prompt", {"prompt": "hello world " * 200}),
    ("messages[0].role", {"messages": [("robot", "hi")]}),
]


@pytest.mark.parametrize("field,kwargs", INVALID, ids=[f for f, _ in INVALID])
def test_invalid_input_names_the_field(server, field, kwargs):
    with pytest.raises(grpc.RpcError) as err:
        server.generate(**kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()
    assert server.generate("still serving", max_new_tokens=2).usage.completion_tokens == 2


def test_unknown_adapter_is_not_found_never_base_output(server):
    with pytest.raises(grpc.RpcError) as err:
        server.generate("hi", adapter_id="nope", max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in err.value.details()


def _wait_kv_free(app, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if app.engine.allocator.free_pages == app.engine.allocator.num_pages and not app.engine.running:
            return True
        time.sleep(0.01)
    return False


def test_deadline_stops_request_and_frees_kv(server):
    call = server.gen.GenerateStream(make_request("the quick", max_new_tokens=200, ignore_eos=True), timeout=0.4)
    next(call)  # running and holding KV pages
    server.app.engine.call(lambda: time.sleep(0.6))  # a slow step: the deadline passes mid-request
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_kv_free(server.app)


def test_client_cancel_frees_kv(server):
    call = server.gen.GenerateStream(make_request("the quick", max_new_tokens=200, ignore_eos=True))
    next(call)
    next(call)
    call.cancel()
    assert _wait_kv_free(server.app)
    assert server.generate("after cancel", max_new_tokens=3).usage.completion_tokens == 3


def test_queue_full_is_resource_exhausted(start_server, tiny_llama):
    srv = start_server(tiny_llama, max_batch_size=1, max_queue=1)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(srv.generate, "x y z", max_new_tokens=60, ignore_eos=True) for _ in range(6)]
        codes = []
        for f in futs:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert codes.count(grpc.StatusCode.OK) >= 2
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_kv_budget_admission_keeps_everyone_served(start_server, tiny_llama):
    # Budget for ~2 requests at a time: the rest wait in the queue and are still answered.
    srv = start_server(tiny_llama, kv_cache_tokens=96, kv_page_tokens=16, max_batch_size=8)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        res = [f.result() for f in [pool.submit(srv.generate, p, max_new_tokens=20, ignore_eos=True) for p in PROMPTS]]
    assert all(r.usage.completion_tokens == 20 for r in res)
    assert _wait_kv_free(srv.app)


def test_model_info_health_and_reflection(server):
    info = server.gen.GetModelInfo(pb.GetModelInfoRequest())
    assert info.architecture == "LlamaForCausalLM" and info.vocab_size == 320
    assert info.limits.max_top_logprobs == 20 and info.dtype == "float32" and info.device == "cpu"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"adapterserve.v1.GenerationService", "adapterserve.v1.AdapterService", "grpc.health.v1.Health"} <= names


def test_a_failing_step_fails_its_rows_and_the_server_keeps_serving(server):
    runtime = server.app.model.runtime
    original = runtime.forward
    calls = {"n": 0}

    def flaky(step, cache, all_logits=False):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel fault")
        return original(step, cache, all_logits)

    runtime.forward = flaky
    try:
        with pytest.raises(grpc.RpcError) as err:
            server.generate("boom", max_new_tokens=4)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "simulated kernel fault" in err.value.details()
        assert _wait_kv_free(server.app)
        assert server.generate("fine again", max_new_tokens=4).usage.completion_tokens == 4
    finally:
        runtime.forward = original
