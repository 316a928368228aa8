"""``diskcache:///abs/path``: the embedded default, an SQLite-indexed directory on local disk.

Several processes on one machine may open the same directory: diskcache serialises writers
through SQLite and keeps large values in their own files.
"""

from __future__ import annotations

import sqlite3

import diskcache

from sam2_shared.store.base import BlobStore

DEFAULT_DISK_SIZE_LIMIT_BYTES = 4 << 30


class DiskBlobStore(BlobStore):
    """A bounded ``diskcache.Cache`` that evicts the least recently used entries.

    Arguments:
        directory (str): absolute path of the cache directory (created if missing).
        size_limit_bytes (int): approximate bound on the directory's size. diskcache checks it
            after each write and then evicts up to ``cull_limit`` least recently used entries,
            so the directory can exceed the bound by about one entry.
        cull_limit (int): entries evicted per over-limit write (diskcache's default is 10).
        timeout_s (float): how long to wait for the SQLite lock before giving up.
    """

    def __init__(
        self,
        directory: str,
        *,
        size_limit_bytes: int = DEFAULT_DISK_SIZE_LIMIT_BYTES,
        cull_limit: int = 10,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = f"diskcache://{directory}?size_limit_bytes={size_limit_bytes}"
        self.directory = directory
        try:
            self.cache = diskcache.Cache(
                directory,
                timeout=timeout_s,
                size_limit=size_limit_bytes,
                cull_limit=cull_limit,
                eviction_policy="least-recently-used",
            )
        except (sqlite3.Error, OSError) as exc:
            raise self.unavailable("opening the cache directory", exc) from exc

    def get(self, key: str) -> bytes | None:
        try:
            return self.cache.get(key, default=None)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self.unavailable(f"get {key}", exc) from exc

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        try:
            self.cache.set(key, bytes(data), expire=ttl_s)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self.unavailable(f"put {key}", exc) from exc

    def put_if_absent(self, key: str, data: bytes, ttl_s: float | None = None) -> bool:
        try:
            return self.cache.add(key, bytes(data), expire=ttl_s)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self.unavailable(f"put {key}", exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.cache.delete(key)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self.unavailable(f"delete {key}", exc) from exc

    def exists(self, key: str) -> bool:
        try:
            return key in self.cache
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self.unavailable(f"exists {key}", exc) from exc

    def close(self) -> None:
        self.cache.close()
