"""Adapter-aware prefix cache: full KV pages addressed by a hash chain over their tokens.

A page-sized block of a sequence's KV entries depends on everything before it and on every weight
that produced it. So block i's key is ``H(key(i-1) || tokens of block i)`` and the chain starts at
``H(namespace)``, where the namespace names what changes K/V besides the tokens: the adapter (its
id and registration key: a replaced or re-registered adapter gets a new key, so its old pages are
unreachable), its virtual-token count (prompt/prefix adapters put those entries first, and the
namespace pins their K/V), and the merged adapter folded into the base weights, if any. Base
requests have their own namespace. The namespace is a typed tuple hashed as its ``repr``, never a
string a client can write, and every key is a 32-byte BLAKE2b digest: no request can craft a key
that lands in another adapter's chain (the bug SGLang #24638 shipped with its ``extra_key``).

Only full pages whose every entry is computed are published, and a page is never written again
while published: requests that reuse it only read it. Published pages that no running request
holds are "idle" and are evicted least recently used first, only when a fresh page is needed.

Thread domain: engine thread only.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence

Namespace = tuple  # ("base", merged) or ("adapter", id, registration key, virtual tokens, merged)


def root_key(namespace: Namespace) -> bytes:
    """The chain's start for one namespace."""
    return hashlib.blake2b(repr(namespace).encode(), digest_size=32).digest()


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a block whose real tokens are `tokens` (virtual entries are pinned by the namespace)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PrefixCache:
    """Maps block keys to published KV pages; remembers which published pages are idle (LRU)."""

    def __init__(self) -> None:
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first

    def __len__(self) -> int:
        """Published pages (in use or idle)."""
        return len(self._key_of)

    @property
    def idle_pages(self) -> int:
        return len(self._idle)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Pages holding the leading blocks `keys` (stops at the first block not cached)."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def publish(self, key: bytes, page: int) -> None:
        """`page` (held by a running request, fully computed) now holds block `key`."""
        if key in self._page_of or page in self._key_of:
            return  # the same block computed twice (two requests at once): keep the first copy
        self._page_of[key] = page
        self._key_of[page] = key

    def holds(self, page: int) -> bool:
        return page in self._key_of

    def idle(self, page: int) -> None:
        """No running request holds published `page` any more: evictable, most recently used."""
        self._idle[page] = None

    def busy(self, page: int) -> None:
        """A request reuses published `page`: not evictable while it holds it."""
        self._idle.pop(page, None)

    def evict(self) -> int:
        """Unpublish the least recently used idle page and return it (for reuse)."""
        page, _ = self._idle.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        return page
