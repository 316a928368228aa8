"""The shared store: embeddings, logits and tracking sessions, verified, over a pluggable backend.

``open_store(url)`` picks the backend by URL scheme:

- ``memory://[?size_limit_bytes=N]``: this process only (tests, single process).
- ``diskcache:///abs/path[?size_limit_bytes=N&cull_limit=K&timeout_s=T]``: local disk,
  shared by the processes of one machine. The default.
- ``redis://[user:pass@]host:port/db[?prefix=P&socket_timeout=...]``, ``rediss://`` (TLS).
- ``s3://bucket/prefix[?endpoint_url=URL&region=R&create_bucket=1&addressing_style=path]``:
  any S3-compatible store, credentials from the standard AWS environment variables.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

from sam2_shared.store.base import (
    EMBEDDING_PREFIX,
    LOGITS_PREFIX,
    BlobStore,
    EmbeddingStore,
    LatencySample,
    StoreStats,
    mask_url,
)
from sam2_shared.store.codec import StorageDtype
from sam2_shared.store.errors import StoreUnavailableError

SUPPORTED_SCHEMES = ("memory", "diskcache", "redis", "rediss", "s3")

__all__ = [
    "EMBEDDING_PREFIX",
    "LOGITS_PREFIX",
    "SUPPORTED_SCHEMES",
    "BlobStore",
    "EmbeddingStore",
    "LatencySample",
    "StoreStats",
    "StoreUnavailableError",
    "mask_url",
    "open_blob_store",
    "open_store",
]


def _options(query: str, allowed: tuple[str, ...], url: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} in store URL {mask_url(url)}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return options


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def open_blob_store(url: str) -> BlobStore:
    """The byte-level backend named by ``url`` (see the module docstring)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from sam2_shared.store.memory_store import MemoryBlobStore

        options = _options(parts.query, ("size_limit_bytes",), url)
        if "size_limit_bytes" in options:
            return MemoryBlobStore(int(options["size_limit_bytes"]))
        return MemoryBlobStore()
    if scheme == "diskcache":
        from sam2_shared.store.disk_store import DiskBlobStore

        directory = unquote(parts.path)
        if parts.netloc or not directory.startswith("/"):
            raise ValueError(
                f"diskcache URL needs an absolute path, diskcache:///abs/path; got {url!r}"
            )
        options = _options(parts.query, ("size_limit_bytes", "cull_limit", "timeout_s"), url)
        kwargs: dict = {}
        if "size_limit_bytes" in options:
            kwargs["size_limit_bytes"] = int(options["size_limit_bytes"])
        if "cull_limit" in options:
            kwargs["cull_limit"] = int(options["cull_limit"])
        if "timeout_s" in options:
            kwargs["timeout_s"] = float(options["timeout_s"])
        return DiskBlobStore(directory, **kwargs)
    if scheme in ("redis", "rediss"):
        from sam2_shared.store.redis_store import RedisBlobStore

        return RedisBlobStore(url)
    if scheme == "s3":
        from sam2_shared.store.s3_store import S3BlobStore

        options = _options(
            parts.query, ("endpoint_url", "region", "create_bucket", "addressing_style"), url
        )
        return S3BlobStore(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=options.get("endpoint_url") or None,
            region=options.get("region") or None,
            create_bucket=_flag(options.get("create_bucket", "0")),
            addressing_style=options.get("addressing_style") or None,
        )
    raise ValueError(
        f"unsupported store URL scheme {parts.scheme!r} in {mask_url(url)}; supported: "
        + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
    )


def open_store(
    url: str,
    *,
    storage_dtype: StorageDtype = "float16",
    embedding_ttl_s: float | None = None,
    max_image_pixels: int | None = None,
) -> EmbeddingStore:
    """An ``EmbeddingStore`` on the backend named by ``url``.

    Arguments:
        url (str): backend URL (see the module docstring).
        storage_dtype (str): dtype new embeddings are written in.
        embedding_ttl_s (float | None): time to live of new embeddings (None: until evicted).
        max_image_pixels (int | None): largest image size (H * W) an entry may claim; a
            larger one is read as corrupt (its masks are never allocated).
    """
    return EmbeddingStore(
        open_blob_store(url), storage_dtype=storage_dtype, embedding_ttl_s=embedding_ttl_s,
        max_image_pixels=max_image_pixels,
    )
