"""Functions sent to the engine thread: the one way other threads change device state.

Threads: `call` from any thread; `run_pending` on the engine thread only, between steps.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class CommandQueue:
    """FIFO of (function, future); the engine thread runs them between steps (implements server.ports.EngineCommands)."""

    def __init__(self) -> None:
        self.wakeup = threading.Event()  # set when there is work for the engine thread (commands or requests)
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._closed: BaseException | None = None  # set once the engine thread is gone

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the engine thread between steps; its result or exception comes back in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed is not None:  # nobody would ever run it
            fut.set_exception(self._closed)
            return fut
        self._items.put((fn, fut))
        self.wakeup.set()
        if self._closed is not None:  # closed meanwhile: answer what is left
            self.fail_pending(self._closed)
        return fut

    def run_pending(self) -> None:
        """Engine thread: run every queued function."""
        while True:
            try:
                fn, fut = self._items.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed back to the caller's thread
                fut.set_exception(e)

    def fail_pending(self, exc: BaseException) -> None:
        """Answer every queued function, and every later one, with `exc` (the engine thread is gone)."""
        self._closed = exc
        while True:
            try:
                _, fut = self._items.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)
