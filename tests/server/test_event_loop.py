"""Prompt tokenization and logprob token texts run off the event loop (timing-free checks).

The tokenizer is made to block until the test lets it go; meanwhile the same server must answer a
health check and keep streaming another request. Were the work on the loop, both would hang (the
guards' timeouts only turn a hang into a failure; nothing here measures time).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading

from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving import make_request

HUGE = "the quick brown fox " * 1500  # 30 000 characters


def blocking(method, entered: threading.Event, release: threading.Event, when):
    def wrapper(*args):
        if when(*args):
            entered.set()
            assert release.wait(60)
        return method(*args)

    return wrapper


def test_loop_serves_health_and_streams_while_a_huge_prompt_is_tokenized(start_server, tiny_llama):
    srv = start_server(tiny_llama, max_context=0)
    tok = srv.app.model.tokenizer
    entered, release = threading.Event(), threading.Event()
    tok.encode = blocking(tok.encode, entered, release, lambda text: len(text) > 10_000)
    health = health_pb2_grpc.HealthStub(srv.channel)
    other = srv.gen.GenerateStream(make_request("hello world", max_new_tokens=40, ignore_eos=True), timeout=60)
    next(other)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        huge = pool.submit(srv.generate, HUGE, max_new_tokens=1)
        assert entered.wait(30)
        try:
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            assert len(list(itertools.islice(other, 5))) == 5  # the other stream goes on
            assert not huge.done()
        finally:
            release.set()
        huge.exception(60)  # answered either way (the tiny model's context may refuse it)
    assert list(other)[-1].usage.completion_tokens == 40


def test_loop_serves_health_while_logprob_tokens_are_named(start_server, tiny_llama):
    srv = start_server(tiny_llama)
    tok = srv.app.model.tokenizer
    entered, release = threading.Event(), threading.Event()
    tok.token_text = blocking(tok.token_text, entered, release, lambda token_id: True)
    health = health_pb2_grpc.HealthStub(srv.channel)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        resp = pool.submit(srv.generate, "hello world", max_new_tokens=3, logprobs=True, top_logprobs=2)
        assert entered.wait(30)
        try:
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            assert not resp.done()
        finally:
            release.set()
        assert len(resp.result(60).logprobs) == 3
