"""Forked samples (n > 1) in the engine: one prompt computed once, samples that go away before the fork.

Requests are submitted to a real server's engine directly (the HTTP tests cover ``n`` end to end).
"""

from __future__ import annotations

import threading
import time

from server.engine.request import ErrorEvent, FinishEvent, Request, Sampling, TokenEvent


def _sample(j: int, ids: list[int], seed: int) -> tuple[Request, list, threading.Event]:
    events: list = []
    done = threading.Event()

    def emit(ev) -> None:
        events.append(ev)
        if not isinstance(ev, TokenEvent):
            done.set()

    sampling = Sampling(max_new_tokens=6, temperature=1.5, seed=seed, ignore_eos=True)
    return Request(request_id=f"s{j}", prompt_ids=list(ids), sampling=sampling, emit=emit), events, done


def _tokens(events: list) -> list[int]:
    return [t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids]


def test_samples_outlive_a_cancelled_first_sample_and_still_prefill_once(start_server, tiny_llama):
    srv = start_server(tiny_llama, prefix_cache="off", kv_page_tokens=4)
    engine = srv.app.engine
    ids = list(range(5, 35))  # 30 tokens: 7 full pages and a partial one
    samples = [_sample(j, ids, 100 + j) for j in range(4)]
    leader = samples[0][0]
    leader.forks = [r for r, _, _ in samples[1:]]
    resume = threading.Event()
    engine.call(lambda: resume.wait(60))  # the engine pauses: both cancels land before admission
    before = engine.prefill_tokens
    engine.submit(leader)
    leader.cancel()
    samples[2][0].cancel()
    resume.set()
    for _, _, done in samples:
        assert done.wait(60)
    for j in (0, 2):
        assert isinstance(samples[j][1][-1], ErrorEvent) and samples[j][1][-1].code == "CANCELLED"
    for j in (1, 3):
        assert isinstance(samples[j][1][-1], FinishEvent) and samples[j][1][-1].completion_tokens == 6
    assert engine.prefill_tokens - before == len(ids)  # sample 1 took the lead: still one prefill
    alone = [srv.generate(token_ids=ids, max_new_tokens=6, temperature=1.5, seed=100 + j, ignore_eos=True)
             for j in (1, 3)]
    assert [_tokens(samples[j][1]) for j in (1, 3)] == [list(a.token_ids) for a in alone]
    end = time.monotonic() + 30
    while engine.allocator.free_pages != engine.allocator.num_pages:
        assert time.monotonic() < end, "pages leaked"
        time.sleep(0.01)


def test_samples_that_could_never_fit_together_run_as_separate_requests(start_server, tiny_llama):
    # 9 pages of 4 tokens: the 30-token prompt takes 8, so its 2 forks' copies could never fit beside it.
    srv = start_server(tiny_llama, prefix_cache="off", kv_page_tokens=4, kv_cache_tokens=36)
    engine = srv.app.engine
    ids = list(range(5, 35))
    samples = [_sample(j, ids, 100 + j) for j in range(3)]
    for r, _, _ in samples:
        r.sampling.max_new_tokens = 2
    samples[0][0].forks = [r for r, _, _ in samples[1:]]
    before = engine.prefill_tokens
    engine.submit(samples[0][0])
    for _, events, done in samples:
        assert done.wait(60)
        assert isinstance(events[-1], FinishEvent), events[-1]
    assert engine.prefill_tokens - before == 3 * len(ids)
