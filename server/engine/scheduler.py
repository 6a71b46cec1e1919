"""KV page allocation and the bounded waiting queue."""

from __future__ import annotations

import collections
import threading

from server.engine.request import Request


class QueueFullError(Exception):
    """The waiting queue holds --max-queue requests already (RESOURCE_EXHAUSTED)."""


class PageAllocator:
    """Hands out fixed-size KV pages; a request reserves every page it may need at admission,
    so a running request is never preempted and the budget is never exceeded."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
        pages.clear()


class WaitingQueue:
    """FIFO of submitted requests, bounded; thread-safe (API threads put, engine thread takes)."""

    def __init__(self, max_size: int, wakeup: threading.Event | None = None):
        self.max_size = max_size
        self._items: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self.wakeup = wakeup or threading.Event()  # shared with the engine's command queue

    def put(self, request: Request) -> None:
        with self._lock:
            if len(self._items) >= self.max_size:
                raise QueueFullError(f"waiting queue is full ({self.max_size} requests, --max-queue)")
            self._items.append(request)
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
