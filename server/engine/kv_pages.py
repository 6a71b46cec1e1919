"""KV page pool: reference-counted pages, fresh ones first, then idle prefix-cache pages (LRU).

A page is held by every running request whose block table lists it (a reused prefix page by
several). When the last holder lets go, a page the prefix cache published stays cached (idle,
evictable); any other page goes back to the free list. ``available`` counts both, so admission
and growth never wait on a cache that could make room.

Thread domain: engine thread only.
"""

from __future__ import annotations

from server.engine.prefix_cache import PrefixCache


class PagePool:
    """Fixed-size KV pages handed out on demand; `cache` is None when --prefix-cache is off."""

    def __init__(self, num_pages: int, page_size: int, cache: PrefixCache | None):
        self.num_pages = num_pages
        self.page_size = page_size
        self.cache = cache
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def available(self) -> int:
        """Pages an allocation may take now: free ones plus idle cached ones."""
        return len(self._free) + (self.cache.idle_pages if self.cache is not None else 0)

    @property
    def free_pages(self) -> int:
        """Pages no running request holds (== num_pages when the engine is idle)."""
        return self.available

    def usage(self) -> float:
        """Fraction of pages held by running requests (idle cached pages count as free)."""
        return 1.0 - self.available / self.num_pages

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages (evicting idle cached ones if the free list runs out), or None."""
        if n > self.available:
            return None
        pages = []
        for _ in range(n):
            page = self._free.pop() if self._free else self.cache.evict()
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: list[int]) -> None:
        """Hold published pages a request reuses from the prefix cache."""
        for page in pages:
            if self._refs[page] == 0:
                self.cache.busy(page)
            self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """Let go of `pages` (emptied in place)."""
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if self.cache is not None and self.cache.holds(page):
                    self.cache.idle(page)
                else:
                    self._free.append(page)
        pages.clear()
