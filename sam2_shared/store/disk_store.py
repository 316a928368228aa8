"""``diskcache:///abs/path``: the embedded default, an SQLite-indexed directory on local disk.

Several processes on one machine may open the same directory: diskcache serialises writers
through SQLite and keeps large values in their own files.

Trust: diskcache stores values that are not bytes as pickles and unpickles them on read, so a
row that anything else wrote into a shared directory would run code in every tier reading it.
``BytesOnlyDisk`` reads and writes raw bytes only (a pickled or text row reads as an empty,
hence corrupt, entry that the store deletes), and a directory that group or others may write
is refused.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW

from sam2_shared.store.base import BlobStore

logger = logging.getLogger(__name__)

DEFAULT_DISK_SIZE_LIMIT_BYTES = 4 << 30


class UntrustedEntryError(Exception):
    """A row that is not raw bytes (pickle or text): never decoded."""


class BytesOnlyDisk(diskcache.Disk):
    """diskcache's serialiser restricted to raw bytes: no pickles in, no pickles out."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not isinstance(value, bytes) or read:
            raise TypeError(f"this store writes bytes only, not {type(value).__name__}")
        if len(value) < self.min_file_size:
            return super().store(value, read, key=key)  # a row in SQLite
        # diskcache writes a file by iterating a BytesIO, which yields lines: a float
        # payload has a b"\n" every ~256 bytes, so a 786 KB logits entry took ~3,000 write
        # calls (~2.4 ms of CPU). One write call does the same.
        filename, full_path = self.filename(key, value)
        _write_new_file(full_path, value)
        return len(value), MODE_BINARY, filename, None

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (MODE_RAW, MODE_BINARY) or read:
            raise UntrustedEntryError(f"row of mode {mode} is not raw bytes")
        data = super().fetch(mode, filename, value, read)
        if not isinstance(data, bytes):  # raw mode also holds small str / int rows
            raise UntrustedEntryError(f"row holds {type(data).__name__}, not bytes")
        return data

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:  # a pickled key (only iteration and culling read keys back)
            raise UntrustedEntryError("pickled key")
        return super().get(key, raw)


def _write_new_file(path: str, data: bytes, attempts: int = 10) -> None:
    """Create ``path`` holding ``data``; its directory is made if missing. Another process
    culling the cache may remove that directory between the two steps, hence the retries
    (diskcache's writer retries the same way)."""
    directory = os.path.dirname(path)
    for attempt in range(1, attempts + 1):
        try:
            # makedirs too: a parent it found may be removed before it makes the child
            os.makedirs(directory, exist_ok=True)
            with open(path, "xb") as file:
                file.write(data)
            return
        except FileNotFoundError:
            if attempt == attempts:
                raise


def check_private_directory(directory: str) -> None:
    """Refuse a cache directory that group or others may write (anyone who can add a row
    there would choose what every tier reads)."""
    try:
        mode = os.stat(directory).st_mode
    except FileNotFoundError:
        return  # diskcache creates it with the process's umask
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{directory} is writable by group or others ({stat.filemode(mode)}); make it "
            f"private (chmod 700 {directory}) or choose another directory"
        )


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
            check_private_directory(directory)
            self.cache = diskcache.Cache(
                directory,
                disk=BytesOnlyDisk,
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
        except UntrustedEntryError as exc:
            logger.warning("entry %s in %s is not raw bytes (%s): read as corrupt", key,
                           self.directory, exc)
            return b""  # fails the codec's checks: counted as corrupt and deleted
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

    def replace_if(self, key: str, expected: bytes, data: bytes,
                   ttl_s: float | None = None) -> bool:
        try:
            with self.cache.transact():  # one SQLite transaction: other processes wait
                if self.get(key) != expected:
                    return False
                self.cache.set(key, bytes(data), expire=ttl_s)
                return True
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self.unavailable(f"replace {key}", exc) from exc

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
