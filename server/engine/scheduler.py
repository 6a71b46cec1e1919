"""The bounded waiting queue (KV pages: server.engine.kv_pages)."""

from __future__ import annotations

import collections
import threading

from server.engine.request import Request


class QueueFullError(Exception):
    """The waiting queue holds --max-queue requests already (RESOURCE_EXHAUSTED)."""


class WaitingQueue:
    """FIFO of submitted requests, bounded; thread-safe (API threads put, engine thread takes)."""

    def __init__(self, max_size: int, wakeup: threading.Event | None = None):
        self.max_size = max_size
        self._items: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self.wakeup = wakeup or threading.Event()  # shared with the engine's command queue

    def put(self, *requests: Request) -> None:
        """Queue `requests` (all or none); a request with forks (n > 1 samples) takes a place per sample."""
        with self._lock:
            if len(self._items) + sum(1 + len(r.forks) for r in requests) > self.max_size:
                raise QueueFullError(f"waiting queue is full ({self.max_size} requests, --max-queue)")
            self._items.extend(requests)
        self.wakeup.set()

    def put_front(self, request: Request) -> None:
        """Put a preempted request back at the head (not bounded: it was admitted once already)."""
        with self._lock:
            self._items.appendleft(request)
        self.wakeup.set()

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self._items)

    def remove(self, requests: list[Request]) -> None:
        if not requests:
            return
        gone = set(map(id, requests))
        with self._lock:
            self._items = collections.deque(r for r in self._items if id(r) not in gone)

    def __len__(self) -> int:
        return len(self._items)
