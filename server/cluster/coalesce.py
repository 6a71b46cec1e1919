"""Stream messages of one request that are ready together, sent as one (one Ray item per hop instead of many).

:func:`coalesced` reads a GenerateStream on a task of its own; whenever its consumer (Serve's
streaming of the replica's generator) asks for the next message, every message already waiting is
merged into one: text concatenated, token ids and logprobs appended, the last message's
finish_reason, usage and timings kept. Nothing waits for a message to merge with: a message that is
alone goes out as it came. Thread domain: the replica's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

from adapterserve.v1 import adapterserve_pb2 as pb

ENABLED = os.environ.get("ADAPTERSERVE_CLUSTER_COALESCE", "0") == "1"  # experiment switch (bench.cluster --variant)
_END = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def merge(into: pb.GenerateStreamResponse, later: pb.GenerateStreamResponse) -> None:
    """Append `later` to `into` (both messages of one stream, `later` after `into`)."""
    into.text += later.text
    into.token_ids.extend(later.token_ids)
    into.logprobs.extend(later.logprobs)
    if later.finish_reason:
        into.finish_reason = later.finish_reason
    for field in ("usage", "timings"):
        if later.HasField(field):
            getattr(into, field).CopyFrom(getattr(later, field))


async def coalesced(stream: AsyncIterator[pb.GenerateStreamResponse]) -> AsyncIterator[pb.GenerateStreamResponse]:
    """`stream`'s messages, those ready together merged into one; `stream`'s error after what preceded it."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for message in stream:
                queue.put_nowait(message)
        except Exception as e:  # (RpcStatus and the like: re-raised by the consumer in order)
            queue.put_nowait(_Failed(e))
        else:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    received = sent = 0
    try:
        while True:
            item = await queue.get()
            merged: pb.GenerateStreamResponse | None = None
            while True:
                if item is _END or isinstance(item, _Failed):
                    if merged is not None:
                        sent += 1
                        yield merged
                    if isinstance(item, _Failed):
                        raise item.error
                    return
                received += 1
                if merged is None:
                    merged = item
                else:
                    merge(merged, item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            sent += 1
            yield merged
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if received != sent:  # experiment trace (bench.cluster's output)
            print(f"coalesce: {received} messages in {sent} items", file=sys.stderr, flush=True)
