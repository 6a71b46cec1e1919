"""One HTTP request through an ASGI app in another process: the ingress's half and the replica's half.

The ingress (:func:`request_scope`) turns the request it received into a plain, picklable ASGI scope
plus its body; the replica (:func:`call_asgi`) runs the single server's FastAPI app on them in
process and yields ``(status, headers)`` then the body's chunks as the app sends them, so a
server-sent-event stream flows chunk by chunk. When the caller stops reading (the client went
away), the app sees ``http.disconnect``, as it would from uvicorn, and cancels its engine requests.

Thread domain: the event loop of each side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request

#: Scope keys that travel (the rest of a server's scope holds live objects).
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
               "headers", "client", "server")
APP_EXIT_WAIT_S = 5.0


def request_scope(request: Request) -> dict:
    """A picklable copy of `request`'s ASGI scope (headers included), for :func:`call_asgi`."""
    scope = {k: request.scope[k] for k in _SCOPE_KEYS if k in request.scope}
    scope["asgi"] = {"version": "3.0", "spec_version": "2.3"}
    scope["root_path"] = ""
    scope["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", ())]
    for key in ("client", "server"):
        if scope.get(key) is not None:
            scope[key] = tuple(scope[key])
    return scope


async def call_asgi(app, scope: dict, body: bytes) -> AsyncIterator[object]:
    """Run `app` on one request; yield (status, [(name, value), ...]) then each non-empty body chunk."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.put_nowait(message)

    task = asyncio.create_task(app(dict(scope), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    finished = False
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) before its response ended
                task.result()
                return
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]
                yield message["status"], headers
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    finished = True
                    return
    finally:
        disconnected.set()  # after the response: the app's disconnect watchers end; before: it cancels
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), APP_EXIT_WAIT_S if finished else 1.0)
            if not task.done():
                task.cancel()
