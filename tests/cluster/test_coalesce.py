"""server.cluster.coalesce: stream messages ready together leave as one; nothing waits; errors keep their place."""

from __future__ import annotations

import asyncio

import pytest

from adapterserve.v1 import adapterserve_pb2 as pb
from server.cluster.coalesce import coalesced
from server.cluster.rpc import RpcStatus


def _token(text: str, token_id: int) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(text=text, token_ids=[token_id], request_id="r", adapter_id="a",
                                     logprobs=[pb.TokenLogprob(token_id=token_id, logprob=-1.0)])


def _finish() -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(finish_reason=pb.LENGTH, usage=pb.Usage(prompt_tokens=3, completion_tokens=3),
                                     request_id="r")


async def _source(batches: list[list]):
    """Yield each batch's messages back to back, then pause (the consumer catches up) before the next."""
    for batch in batches:
        for item in batch:
            if isinstance(item, Exception):
                raise item
            yield item
        await asyncio.sleep(0.01)


def _run(batches) -> tuple[list[pb.GenerateStreamResponse], BaseException | None]:
    async def go():
        out, error = [], None
        try:
            async for m in coalesced(_source(batches)):
                out.append(m)
                await asyncio.sleep(0)  # the consumer yields to the loop between messages, as Serve's does
        except RpcStatus as e:
            error = e
        return out, error

    return asyncio.run(go())


def test_messages_ready_together_are_merged():
    out, error = _run([[_token("a", 1)], [_token("b", 2), _token("c", 3), _finish()]])
    assert error is None
    assert [m.text for m in out] == ["a", "bc"]
    merged = out[1]
    assert list(merged.token_ids) == [2, 3] and [lp.token_id for lp in merged.logprobs] == [2, 3]
    assert merged.finish_reason == _finish().finish_reason and merged.usage.completion_tokens == 3
    assert "".join(m.text for m in out) == "abc" and [t for m in out for t in m.token_ids] == [1, 2, 3]


def test_a_lone_message_leaves_as_it_came():
    out, error = _run([[_token("a", 1)], [_token("b", 2)], [_finish()]])
    assert error is None and [m.text for m in out] == ["a", "b", ""]


def test_an_error_comes_after_the_messages_before_it():
    boom = RpcStatus("UNAVAILABLE", "gone")
    out, error = _run([[_token("a", 1)], [_token("b", 2), boom]])
    assert "".join(m.text for m in out) == "ab"
    assert error is boom


@pytest.mark.parametrize("stop_after", [0, 1])
def test_leaving_early_closes_the_source(stop_after):
    closed = asyncio.Event()

    async def source():
        try:
            for i in range(100):
                yield _token("x", i)
                await asyncio.sleep(0.005)
        finally:
            closed.set()

    async def go():
        stream = coalesced(source())
        seen = 0
        async for _ in stream:
            if seen == stop_after:
                break
            seen += 1
        await stream.aclose()
        await asyncio.sleep(0)
        return closed.is_set()

    assert asyncio.run(go())
