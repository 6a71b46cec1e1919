"""KV page pool and prefix cache, step by step: reference counts, idle pages, LRU eviction, keys."""

from __future__ import annotations

from server.engine.kv_pages import PagePool
from server.engine.prefix_cache import PrefixCache, block_key, root_key


def test_pool_without_cache_frees_pages_at_last_release():
    pool = PagePool(4, 16, None)
    a = pool.allocate(3)
    assert len(a) == 3 and pool.available == 1
    assert pool.allocate(2) is None  # all or nothing
    pool.release(a)
    assert a == [] and pool.available == pool.free_pages == 4 and pool.usage() == 0.0


def test_published_pages_stay_cached_idle_and_are_evicted_lru_only_when_needed():
    cache = PrefixCache()
    pool = PagePool(4, 16, cache)
    keys = [block_key(root_key(("base", None)), [i] * 16) for i in range(3)]
    held = pool.allocate(3)
    for key, page in zip(keys, held, strict=True):
        cache.publish(key, page)
    first, second, third = held
    pool.release([first])
    pool.release([second])  # released after `first`: more recently used
    assert cache.idle_pages == 2 and pool.available == 3 and len(cache) == 3
    # a reuse makes a page busy again: it can't be evicted while held
    assert cache.match(keys[:2]) == [first, second]
    pool.share([first])
    assert cache.idle_pages == 1
    fresh = pool.allocate(2)  # the free page, then the only idle page (second) is evicted
    assert second in fresh and cache.match(keys) == [first]
    assert pool.allocate(1) is None  # `first` (shared) and `third` (running) are held
    pool.release([first])
    pool.release([third])
    assert pool.available == 2 and cache.idle_pages == 2


def test_match_stops_at_first_missing_block_and_publish_keeps_first_copy():
    cache = PrefixCache()
    pool = PagePool(8, 4, cache)
    root = root_key(("base", None))
    k0 = block_key(root, [1, 2, 3, 4])
    k1 = block_key(k0, [5, 6, 7, 8])
    pages = pool.allocate(3)
    cache.publish(k0, pages[0])
    cache.publish(k0, pages[1])  # the same block computed twice: first copy wins
    assert cache.match([k0, k1]) == [pages[0]]
    assert not cache.holds(pages[1])
    pool.release(pages)
    assert pool.available == 8 and cache.idle_pages == 1


def test_keys_differ_by_namespace_and_by_position_in_the_chain():
    base = root_key(("base", None))
    adapter = root_key(("adapter", "base", 1, 0, None))  # an adapter literally named "base"
    replaced = root_key(("adapter", "base", 2, 0, None))  # same id, new registration
    merged = root_key(("base", ("m", 3)))  # base rows while an adapter is merged into the weights
    assert len({base, adapter, replaced, merged}) == 4
    toks = [7, 8, 9, 10]
    assert block_key(base, toks) != block_key(adapter, toks)
    assert block_key(block_key(base, toks), toks) != block_key(base, toks)
    # token boundaries are part of the bytes: [1, 23] and [12, 3] never meet
    assert block_key(base, [1, 23]) != block_key(base, [12, 3])
