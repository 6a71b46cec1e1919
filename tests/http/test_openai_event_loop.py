"""HTTP logprob token texts are named off the event loop (timing-free, as tests/server/test_event_loop.py for gRPC).

The tokenizer's ``token_text`` is made to block until the test lets it go; meanwhile the same
server must answer /health. Were the naming on the loop, /health would hang (the timeouts only
turn a hang into a failure; nothing here measures time).
"""

from __future__ import annotations

import concurrent.futures
import threading

import httpx2 as httpx
import pytest

from tests.http.conftest import client
from tests.server.test_event_loop import blocking


@pytest.mark.parametrize("stream", [False, True], ids=["response", "stream"])
def test_loop_serves_health_while_http_logprob_tokens_are_named(start_http, stream):
    srv = start_http()
    tok = srv.app.model.tokenizer
    entered, release = threading.Event(), threading.Event()
    tok.token_text = blocking(tok.token_text, entered, release, lambda token_id: True)

    def complete() -> list[str]:
        kw = dict(model="", prompt="hello world", max_tokens=3, logprobs=2, extra_body={"ignore_eos": True})
        if not stream:
            return client(srv).completions.create(**kw).choices[0].logprobs.tokens
        chunks = client(srv).completions.create(**kw, stream=True)
        return [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        resp = pool.submit(complete)
        assert entered.wait(30)
        try:
            assert httpx.get(f"http://127.0.0.1:{srv.app.http_port}/health", timeout=10).text == "SERVING"
            assert not resp.done()
        finally:
            release.set()
        assert len(resp.result(60)) == 3
