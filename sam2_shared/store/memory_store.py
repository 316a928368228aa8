"""``memory://``: an in-process store for tests and single-process use."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from sam2_shared.store.base import BlobStore

DEFAULT_MEMORY_SIZE_LIMIT_BYTES = 1 << 30


class MemoryBlobStore(BlobStore):
    """A dict in this process, bounded by total value size, least recently used out first.

    Arguments:
        size_limit_bytes (int): total size of values kept; None for no bound.
    """

    def __init__(self, size_limit_bytes: int | None = DEFAULT_MEMORY_SIZE_LIMIT_BYTES) -> None:
        self.url = "memory://" + (f"?size_limit_bytes={size_limit_bytes}"
                                  if size_limit_bytes is not None else "")
        self.size_limit_bytes = size_limit_bytes
        # key -> (data, monotonic expiry or None); order = least recently used first
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        data, expires_at = entry
        if expires_at is not None and time.monotonic() >= expires_at:
            self._remove(key)
            return None
        return data

    def _remove(self, key: str) -> None:
        data, _ = self._entries.pop(key)
        self._nbytes -= len(data)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._live(key)
            if data is not None:
                self._entries.move_to_end(key)
            return data

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        with self._lock:
            self._put_locked(key, bytes(data), ttl_s)

    def put_if_absent(self, key: str, data: bytes, ttl_s: float | None = None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._put_locked(key, bytes(data), ttl_s)
            return True

    def replace_if(self, key: str, expected: bytes, data: bytes,
                   ttl_s: float | None = None) -> bool:
        with self._lock:
            if self._live(key) != expected:
                return False
            self._put_locked(key, bytes(data), ttl_s)
            return True

    def _put_locked(self, key: str, data: bytes, ttl_s: float | None) -> None:
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (data, time.monotonic() + ttl_s if ttl_s is not None else None)
        self._nbytes += len(data)
        if self.size_limit_bytes is not None:
            # Evict least recently used first, but never the entry just written.
            while self._nbytes > self.size_limit_bytes and len(self._entries) > 1:
                self._remove(next(iter(self._entries)))

    def delete(self, key: str) -> None:
        with self._lock:
            if key in self._entries:
                self._remove(key)

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._live(key) is not None

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
