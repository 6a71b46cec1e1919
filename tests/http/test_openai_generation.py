"""The OpenAI HTTP API through the official `openai` client: equal to gRPC and to PEFT, shapes, n, stop, seed."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx2 as httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from adapterserve.v1 import adapterserve_pb2 as pb
from tests.http.conftest import KINDS, async_client, base_url, client
from tests.peft_reference import peft_greedy_reference
from tests.serving import make_request

N_NEW = 6
PROMPT = "the quick brown fox"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def references(tiny_model_factory, http_adapter_root):
    """PEFT greedy tokens per adapter kind (None = the base model) for PROMPT."""
    from server.model.loader import load_model

    base = tiny_model_factory("llama")
    ids = load_model(str(base)).tokenizer.encode(PROMPT)
    refs = {name: peft_greedy_reference(base, None if name is None else http_adapter_root / name, ids, N_NEW)[0]
            for name in [None, *KINDS]}
    return ids, refs


def test_greedy_http_equals_grpc_equals_peft_for_base_and_every_kind(http, references):
    ids, refs = references
    c = client(http)
    for kind in KINDS[:2]:  # registered over HTTP (vLLM's endpoint) and over gRPC: both serve at once
        r = httpx.post(base_url(http) + "/load_lora_adapter", json={"lora_name": kind, "lora_path": kind})
        assert r.status_code == 200, r.text
    for kind in KINDS[2:]:
        http.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=kind, path=kind))
    base_id = c.models.list().data[0].id
    for name in [None, *KINDS]:
        model = name or base_id
        resp = c.completions.create(model=model, prompt=ids, max_tokens=N_NEW, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
        got = [c_ for c_ in resp.choices[0].logprobs.tokens]
        grpc_resp = http.generate(token_ids=ids, adapter_id=name or "", max_new_tokens=N_NEW, ignore_eos=True)
        tok = http.app.model.tokenizer
        assert got == [tok.token_text(t) for t in refs[name]], name
        assert list(grpc_resp.token_ids) == refs[name], name
        assert resp.choices[0].text == grpc_resp.text
        assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == N_NEW
        assert resp.model == model
    # base:adapter (SGLang / Ray Serve form) selects the adapter too
    resp = c.completions.create(model=f"{base_id}:lora", prompt=ids, max_tokens=N_NEW, extra_body={"ignore_eos": True})
    assert resp.choices[0].text == http.generate(token_ids=ids, adapter_id="lora", max_new_tokens=N_NEW,
                                                 ignore_eos=True).text


def test_chat_sync_async_stream_and_not_agree_with_grpc_and_count_the_template(http):
    c = client(http)
    want = http.generate(messages=[(m["role"], m["content"]) for m in CHAT], max_new_tokens=N_NEW, ignore_eos=True)
    templated = len(http.app.model.tokenizer.encode_chat(CHAT))
    extra = {"ignore_eos": True}
    resp = c.chat.completions.create(model="", messages=CHAT, max_completion_tokens=N_NEW, extra_body=extra)
    assert resp.choices[0].message.content == want.text and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (templated, N_NEW)
    assert resp.usage.total_tokens == templated + N_NEW
    chunks = list(c.chat.completions.create(model="", messages=CHAT, max_tokens=N_NEW, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == templated
    assert all(ch.usage is None for ch in chunks[:-1])

    async def run_async():
        ac = async_client(http)
        full = await ac.chat.completions.create(model="", messages=CHAT, max_tokens=N_NEW, extra_body=extra)
        text = ""
        async for ch in await ac.chat.completions.create(model="", messages=CHAT, max_tokens=N_NEW, stream=True,
                                                         extra_body=extra):
            text += ch.choices[0].delta.content or ""
        await ac.close()
        return full.choices[0].message.content, text

    assert asyncio.run(run_async()) == (want.text, want.text)


def test_n_samples_are_independent_and_seed_reproduces_them(http):
    c = client(http)
    kw = dict(model="", prompt=PROMPT, max_tokens=8, temperature=1.5, n=4, seed=1234, extra_body={"ignore_eos": True})
    first = [ch.text for ch in c.completions.create(**kw).choices]
    again = [ch.text for ch in c.completions.create(**kw).choices]
    assert first == again
    assert len(set(first)) > 1, "n samples must be independent draws"
    other = [ch.text for ch in c.completions.create(**{**kw, "seed": 99}).choices]
    assert other != first
    # sample 0 of a seeded request is the single request with that seed (seed j = seed + j)
    single = http.generate(prompt=PROMPT, max_new_tokens=8, temperature=1.5, seed=1234, ignore_eos=True)
    assert first[0] == single.text
    # several prompts: one choice per prompt x n, in order; the prompt counted once per prompt
    resp = c.completions.create(model="", prompt=[PROMPT, "hello"], max_tokens=3, n=2, extra_body={"ignore_eos": True})
    assert [ch.index for ch in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text  # greedy samples agree
    tok = http.app.model.tokenizer
    assert resp.usage.prompt_tokens == len(tok.encode(PROMPT)) + len(tok.encode("hello"))
    assert resp.usage.completion_tokens == 12


def test_stop_strings_cut_the_text_and_finish_with_stop(http):
    c = client(http)
    kw = dict(model="", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    k = next(k for k in range(1, len(full)) if full[k] not in full[:k])  # a stop string met first at k
    stop = full[k]
    for value in (stop, [stop, "\x00never"]):
        got = c.completions.create(**kw, stop=value)
        assert got.choices[0].text == full[:k] and got.choices[0].finish_reason == "stop"
        text = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=value, stream=True))
        assert text == full[:k]


def test_logprobs_in_the_chat_and_the_legacy_shape_equal_grpc(http):
    c = client(http)
    want = http.generate(prompt=PROMPT, max_new_tokens=4, logprobs=True, top_logprobs=3, ignore_eos=True)
    tok = http.app.model.tokenizer
    legacy = c.completions.create(model="", prompt=PROMPT, max_tokens=4, logprobs=3, extra_body={"ignore_eos": True})
    lp = legacy.choices[0].logprobs
    assert lp.tokens == [tok.token_text(t) for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    for got, x in zip(lp.top_logprobs, want.logprobs, strict=True):
        best: dict[str, float] = {}
        for t in x.top:  # keyed by text: tokens that decode alike keep the best
            best.setdefault(t.token, t.logprob)
        assert got == pytest.approx(best, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chat_want = http.generate(messages=[("user", "hi")], max_new_tokens=4, logprobs=True, top_logprobs=2)
    chat = c.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [x.logprob for x in content] == pytest.approx([x.logprob for x in chat_want.logprobs], abs=1e-5)
    assert all(len(x.top_logprobs) == 2 and x.bytes == list(x.token.encode()) for x in content)
    plain = c.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None
    streamed = [ch for ch in c.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=4, logprobs=True, top_logprobs=2, stream=True)]
    got = [x.logprob for ch in streamed if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert got == pytest.approx([x.logprob for x in chat_want.logprobs], abs=1e-5)


def test_every_response_validates_against_the_openai_types_with_no_unknown_fields(http):
    url = base_url(http)
    body = {"model": "", "max_tokens": 3, "logprobs": True, "top_logprobs": 1, "n": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}

    def strict(model_cls, data):
        obj = model_cls.model_validate(data)
        assert set(data) <= set(model_cls.model_fields), set(data) - set(model_cls.model_fields)
        for choice, raw in zip(obj.choices, data["choices"], strict=True):
            assert set(raw) <= set(type(choice).model_fields), set(raw) - set(type(choice).model_fields)
        return obj

    strict(ChatCompletion, httpx.post(url + "/chat/completions", json=body).json())
    strict(Completion, httpx.post(url + "/completions", json={"model": "", "prompt": "hi", "max_tokens": 2,
                                                              "logprobs": 2}).json())
    with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    for line in lines[:-1]:
        strict(ChatCompletionChunk, json.loads(line[len("data: "):]))


LONG = "the quick brown fox jumps over the lazy dog, " * 3  # 89 tokens: 22 pages of 4 and a partial one


def _separate(srv, ids, model, n, seed, max_new, temperature=1.5):
    """n separate seeded gRPC requests (sample j of a seeded body is the request with seed + j), admitted
    in one engine step like the n choices: a row's float rounding may depend on its batch's size (a
    near-tie between two tokens then flips, as it can between any two batch shapes)."""
    resume = threading.Event()
    srv.app.engine.call(lambda: resume.wait(60))
    calls = [srv.gen.Generate.future(make_request(token_ids=ids, adapter_id=model, max_new_tokens=max_new,
                                                  temperature=temperature, seed=seed + j, ignore_eos=True), timeout=60)
             for j in range(n)]
    end = time.monotonic() + 30
    while len(srv.app.engine.waiting) < n:
        assert time.monotonic() < end
        time.sleep(0.01)
    resume.set()
    return [c.result().text for c in calls]


@pytest.mark.parametrize("kind", [None, "lora", "prompt", "prefix"])
def test_n_choices_prefill_the_prompt_once_and_equal_separate_seeded_requests(start_http, kind):
    # The prefix cache is off: one prefill comes from the fork (shared full pages, the partial one
    # copied), not from a cache hit. Small pages put the prompt's end (and virtual tokens) mid-page.
    srv = start_http(prefix_cache="off", kv_page_tokens=4)
    if kind:
        srv.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=kind, path=kind))
    engine = srv.app.engine
    ids = srv.app.model.tokenizer.encode(LONG)
    assert len(ids) % 4 and len(ids) > 8
    before = engine.prefill_tokens
    resp = client(srv).completions.create(model=kind or "", prompt=ids, n=4, max_tokens=8, temperature=1.5,
                                          seed=1234, extra_body={"ignore_eos": True})
    assert engine.prefill_tokens - before == len(ids)  # 4 choices, one prefill
    assert [ch.index for ch in resp.choices] == [0, 1, 2, 3]
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 32
    separate = _separate(srv, ids, kind or "", 4, 1234, 8)
    assert engine.prefill_tokens - before == 5 * len(ids)  # the counter counts: 4 separate requests, 4 prefills
    assert [ch.text for ch in resp.choices] == separate
    assert len(set(separate)) > 1
    assert engine.allocator.free_pages == engine.allocator.num_pages  # shared and copied pages all returned


def test_n_choices_under_preemption_and_chunked_prefill_equal_separate_seeded_requests(start_http):
    # 64 pages of 4 tokens: 4 samples of an 89-token prompt + 60 tokens need 86 even with the prompt's
    # full pages shared, so samples are preempted and recompute; the prompt is prefilled in chunks of 32.
    srv = start_http(prefix_cache="off", kv_page_tokens=4, kv_cache_tokens=256, max_prefill_tokens=32)
    ids = srv.app.model.tokenizer.encode(LONG)
    resp = client(srv).completions.create(model="", prompt=ids, n=4, max_tokens=60, temperature=1.5, seed=7,
                                          extra_body={"ignore_eos": True})
    get = srv.app.metrics.registry.get_sample_value
    assert get("adapterserve_preemptions_total") > 0
    assert [ch.text for ch in resp.choices] == _separate(srv, ids, "", 4, 7, 60)
    assert srv.app.engine.allocator.free_pages == srv.app.engine.allocator.num_pages


def test_n_above_the_batch_size_runs_in_groups_of_the_batch_size(start_http):
    # --max-batch-size 2 and n = 3: samples {0, 1} fork from one prefill, sample 2 prefills alone.
    srv = start_http(prefix_cache="off", kv_page_tokens=4, max_batch_size=2)
    engine = srv.app.engine
    ids = srv.app.model.tokenizer.encode(LONG)
    before = engine.prefill_tokens
    resp = client(srv).completions.create(model="", prompt=ids, n=3, max_tokens=6, temperature=1.5, seed=3,
                                          extra_body={"ignore_eos": True})
    assert engine.prefill_tokens - before == 2 * len(ids)
    assert [ch.index for ch in resp.choices] == [0, 1, 2] and resp.usage.completion_tokens == 18
    assert len({ch.text for ch in resp.choices}) > 1
