"""A memory-bounded LRU cache for embeddings (tensors or tuples of tensors/arrays)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Tuple

import blake3
import numpy as np
import torch


def nbytes_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    return 64


def content_key(array: np.ndarray, *more: np.ndarray) -> str:
    """A digest of an array's bytes, shape and dtype (and of ``more`` arrays after it): the same pixels give
    the same key.

    BLAKE3 (cryptographic, so that no client can craft pixels that collide with another client's cached
    canvas; ~4 GB/s on one core here, and multi-threaded for large canvases).
    """
    h = None
    for a in (array, *more):
        data = memoryview(np.ascontiguousarray(a)).cast("B")
        head = f"{a.dtype.str}{a.shape}".encode()
        if h is None:
            h = blake3.blake3(head, max_threads=blake3.blake3.AUTO if data.nbytes > (8 << 20) else 1)
        else:
            h.update(head)
        h.update(data)
    return h.hexdigest(length=16)


class LRUCache:
    """Least-recently-used cache bounded by the bytes of what it holds. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._data: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes_of(value)
        with self._lock:
            if key in self._data:
                self._bytes -= self._data.pop(key)[1]
            if size > self.max_bytes:
                return  # never evict everything for one oversized entry
            self._data[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, freed) = self._data.popitem(last=False)
                self._bytes -= freed

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def drop_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove the entries whose key satisfies ``predicate``; returns how many."""
        with self._lock:
            keys = [k for k in self._data if predicate(k)]
            for k in keys:
                self._bytes -= self._data.pop(k)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._data), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}

    def __len__(self) -> int:
        return len(self._data)
