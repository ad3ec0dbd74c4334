"""The embedding cache: bounded by bytes, least recently used first out; content keys."""
import numpy as np
import torch

from backend.cache import LRUCache, content_key


def test_lru_is_bounded_by_bytes_and_evicts_the_least_recently_used():
    cache = LRUCache(max_bytes=3 * 400)
    for k in "abc":
        cache.put(k, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert cache.stats()["bytes"] == 1200
    cache.put("huge", torch.zeros(1000))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 3
    calls = []
    assert cache.get_or_compute("e", lambda: calls.append(1) or torch.ones(10)).sum() == 10
    assert cache.get_or_compute("e", lambda: calls.append(1) or torch.ones(10)).sum() == 10 and calls == [1]
    assert LRUCache(0).get_or_compute("x", lambda: torch.ones(1)) is not None  # a disabled cache still computes


def test_content_keys_follow_pixels_shape_and_dtype():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert content_key(a) == content_key(a.copy()) == content_key(np.asfortranarray(a))
    b = a.copy()
    b[1, 2, 3] ^= 1
    assert content_key(b) != content_key(a)
    assert content_key(a.reshape(3, 2, 4)) != content_key(a)
    assert content_key(a.astype(np.uint16)) != content_key(a)
    big = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)  # multi-threaded path
    assert content_key(big) == content_key(big.copy()) != content_key(big[::-1].copy())
