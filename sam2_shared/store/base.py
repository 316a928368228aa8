"""The store interfaces: a byte-level ``BlobStore`` and the typed ``EmbeddingStore`` on top.

Backends only move bytes; everything about formats, verification and counting lives in
``EmbeddingStore`` so that every backend behaves the same.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import torch

from sam2_shared.embedding import ImageEmbedding, scope_id
from sam2_shared.errors import CorruptEntryError, InvalidInputError, SessionConflictError
from sam2_shared.store import codec
from sam2_shared.store.errors import StoreUnavailableError

logger = logging.getLogger(__name__)

EMBEDDING_PREFIX = "emb/"
LOGITS_PREFIX = "logits/"
SESSION_PREFIX = "session/"
SESSION_REVISION_PREFIX = "session-rev/"
IMPORT_ID_PREFIX = "imp-"  # ids of uploaded embeddings (PutEmbedding), never content ids
T = TypeVar("T")
# Ids and handles become parts of keys, file names and object names: keep them plain.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")
_SECRET_QUERY_WORDS = ("password", "secret", "token", "credential", "access_key")


def mask_url(url: str) -> str:
    """``url`` with its password and secret-looking query values replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        name = user.split(":", 1)[0]
        netloc = f"{name}:***@{host}"
    query = [
        (key, "***" if any(word in key.lower() for word in _SECRET_QUERY_WORDS) else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*/:"),
                       parts.fragment))


def _revision_of(pointer: bytes | None) -> int | None:
    """The revision in a session pointer ``b"<revision>.<token>"``; None when malformed."""
    if pointer is None or len(pointer) > 64:
        return None
    revision, _, token = pointer.decode("ascii", "replace").partition(".")
    if not (revision.isascii() and revision.isdigit() and 0 < len(revision) <= 20):
        return None
    if not (token.isascii() and token.isalnum()):
        return None
    return int(revision)


class BlobStore(ABC):
    """Bytes by string key, with an optional time to live. Implementations are thread-safe.

    Every method raises ``StoreUnavailableError`` (naming ``self.url``) when the backend
    cannot be reached; a missing or expired key is not an error.
    """

    url: str  # for logs and error messages, secrets masked

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def put_if_absent(self, key: str, data: bytes, ttl_s: float | None = None) -> bool:
        """Write unless the key exists; return whether it was written.

        Not atomic by default; backends that can do it atomically override it. Entries are
        content-addressed, so a lost race writes the same bytes twice, nothing worse.
        """
        if self.exists(key):
            return False
        self.put(key, data, ttl_s)
        return True

    def replace_if(self, key: str, expected: bytes, data: bytes,
                   ttl_s: float | None = None) -> bool:
        """Write ``data`` only if the key holds exactly ``expected``; return whether it did.

        Not atomic by default (a read, then a write); the memory, diskcache and Redis
        backends override it atomically. S3 keeps this default: the S3-compatible servers
        this project runs do not all honour conditional writes.
        """
        if self.get(key) != expected:
            return False
        self.put(key, data, ttl_s)
        return True

    def ping(self) -> None:
        """Raise ``StoreUnavailableError`` unless the backend answers (for readiness checks)."""
        self.exists("ping")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or files."""

    def unavailable(self, action: str, exc: BaseException) -> StoreUnavailableError:
        """The error to raise when ``action`` failed because of ``exc``.

        Callers see what they can act on; the store's address and the driver's message go
        to the log only (they can name hosts, users and paths).
        """
        logger.warning("store %s: %s failed: %s: %s", self.url, action, type(exc).__name__, exc)
        return StoreUnavailableError(
            "the shared embedding store is unavailable right now; retry shortly (the "
            "operator's log has the details)"
        )


@dataclass(frozen=True)
class LatencySample:
    """One store operation, as handed to ``StoreStats`` observers."""

    op: str  # "get" | "put"
    kind: str  # "embedding" | "logits"
    outcome: str  # "hit" | "miss" | "corrupt" | "written" | "exists" | "error"
    seconds: float
    nbytes: int


@dataclass
class StoreStats:
    """Counters of one ``EmbeddingStore``; a metrics layer reads them or adds an observer.

    ``hits``/``misses`` count embedding and logits reads; a corrupt entry counts as a miss
    and in ``corrupt``. ``errors`` counts operations that raised ``StoreUnavailableError``.
    """

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0
    session_conflicts: int = 0  # compare-and-set saves lost to another writer
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds_total: float = 0.0
    write_seconds_total: float = 0.0
    observers: list[Callable[[LatencySample], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, sample: LatencySample) -> None:
        with self._lock:
            if sample.op == "get":
                self.read_seconds_total += sample.seconds
                self.bytes_read += sample.nbytes
                self.hits += sample.outcome == "hit"
                self.misses += sample.outcome in ("miss", "corrupt")
            else:
                self.write_seconds_total += sample.seconds
                self.bytes_written += sample.nbytes
                self.writes += sample.outcome == "written"
            self.corrupt += sample.outcome == "corrupt"
            self.errors += sample.outcome == "error"
        for observer in self.observers:
            try:
                observer(sample)
            except Exception:  # a broken metrics hook must not fail a request
                logger.exception("store latency observer failed")


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise InvalidInputError(
            f"{what} {value!r} must be 1-255 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return value


class EmbeddingStore:
    """Typed, verified access to embeddings and logits in a ``BlobStore``.

    Arguments:
        blobs (BlobStore): the backend.
        storage_dtype (str): dtype new embeddings are stored in ("float32", "float16",
            "bfloat16"); entries of any dtype are read.
        embedding_ttl_s (float | None): time to live of new embeddings; None keeps them until
            the backend evicts them.
        max_image_pixels (int | None): largest image (H * W) an embedding or a tracking
            session may claim; sizes read back are data like any other, so a larger one is a
            corrupt entry (counted, a miss, kept for a deployment with a higher limit).
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        storage_dtype: codec.StorageDtype = "float16",
        embedding_ttl_s: float | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        if storage_dtype not in codec.STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype {storage_dtype!r} is not one of {', '.join(codec.STORAGE_DTYPES)}"
            )
        self.blobs = blobs
        self.storage_dtype = storage_dtype
        self.embedding_ttl_s = embedding_ttl_s
        self.max_image_pixels = max_image_pixels
        self.stats = StoreStats()

    @property
    def url(self) -> str:
        return self.blobs.url

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.url}, storage_dtype={self.storage_dtype})"

    @staticmethod
    def embedding_key(embedding_id: str) -> str:
        return EMBEDDING_PREFIX + _check_id(embedding_id, "embedding id")

    @staticmethod
    def logits_key(handle: str) -> str:
        return LOGITS_PREFIX + _check_id(handle, "logits handle")

    @staticmethod
    def session_key(session_id: str, version: str) -> str:
        """Key of one saved state of a session (``version``: its revision pointer's value)."""
        return f"{SESSION_PREFIX}{_check_id(session_id, 'session id')}@{version}"

    def _record(self, op: str, kind: str, outcome: str, started: float, nbytes: int) -> None:
        self.stats.record(LatencySample(op, kind, outcome, time.perf_counter() - started, nbytes))

    def _read(self, kind: str, key: str) -> tuple[bytes | None, float]:
        started = time.perf_counter()
        try:
            return self.blobs.get(key), started
        except StoreUnavailableError:
            self._record("get", kind, "error", started, 0)
            raise

    def _write(self, kind: str, key: str, data: bytes, ttl_s: float | None,
               started: float) -> bool:
        try:
            written = self.blobs.put_if_absent(key, data, ttl_s)
        except StoreUnavailableError:
            self._record("put", kind, "error", started, 0)
            raise
        self._record("put", kind, "written" if written else "exists", started,
                     len(data) if written else 0)
        return written

    def _discard_corrupt(self, kind: str, key: str, exc: CorruptEntryError, started: float,
                         nbytes: int, delete: bool = True) -> None:
        logger.warning("corrupt %s entry %s in %s (%s): %s", kind, key, self.url,
                       "deleted" if delete else "kept", exc)
        self._record("get", kind, "corrupt", started, nbytes)
        if delete:
            try:
                self.blobs.delete(key)
            except StoreUnavailableError:
                logger.warning("could not delete corrupt entry %s from %s", key, self.url)

    def _get_verified(self, kind: str, key: str, decode: Callable[[bytes], T]) -> T | None:
        """Read ``key`` and ``decode`` it; a miss, or a damaged entry (counted, logged,
        deleted), is None."""
        data, started = self._read(kind, key)
        if data is None:
            self._record("get", kind, "miss", started, 0)
            return None
        try:
            value = decode(data)
        except CorruptEntryError as exc:
            self._discard_corrupt(kind, key, exc, started, len(data))
            return None
        self._record("get", kind, "hit", started, len(data))
        return value

    def get_embedding(self, embedding_id: str, model_id: str, *,
                      keep_storage_dtype: bool = False) -> ImageEmbedding | None:
        """The verified embedding, or None on a miss.

        A damaged entry is counted in ``stats.corrupt``, logged, deleted and reported as a
        miss. An intact entry of another model is counted and reported as a miss too, but
        kept: the request was wrong, not the entry, and a caller must not be able to delete
        other people's embeddings by naming the wrong model.
        """
        loaded = self._load_embedding(embedding_id, model_id, keep_storage_dtype)
        return None if loaded is None else loaded[0]

    def _load_embedding(self, embedding_id: str, model_id: str,
                        keep_storage_dtype: bool) -> tuple[ImageEmbedding, bytes] | None:
        key = self.embedding_key(embedding_id)
        data, started = self._read("embedding", key)
        if data is None:
            self._record("get", "embedding", "miss", started, 0)
            return None
        try:
            embedding = codec.decode_embedding(
                data, expected_embedding_id=embedding_id, keep_storage_dtype=keep_storage_dtype
            )
        except CorruptEntryError as exc:
            self._discard_corrupt("embedding", key, exc, started, len(data))
            return None
        if embedding.model_id != model_id:
            exc = CorruptEntryError(f"entry is for model {embedding.model_id!r}, not {model_id!r}")
            self._discard_corrupt("embedding", key, exc, started, len(data), delete=False)
            return None
        try:
            self.check_image_size(embedding.original_hw, "embedding")
        except CorruptEntryError as exc:
            self._discard_corrupt("embedding", key, exc, started, len(data), delete=False)
            return None
        self._record("get", "embedding", "hit", started, len(data))
        return embedding, data

    def check_image_size(self, hw: Any, what: str) -> None:
        """Raise ``CorruptEntryError`` unless ``hw`` is a size this store accepts."""
        try:
            height, width = (int(v) for v in hw)
        except (TypeError, ValueError):
            raise CorruptEntryError(f"{what} has no valid image size: {hw!r}") from None
        if height <= 0 or width <= 0 or (
                self.max_image_pixels is not None and height * width > self.max_image_pixels):
            raise CorruptEntryError(
                f"{what} claims a {width}x{height} image, over the limit of "
                f"{self.max_image_pixels} pixels")

    def put_embedding(self, embedding: ImageEmbedding, *, ttl_s: float | None = None) -> bool:
        """Store ``embedding`` under its id; return True if it was already there."""
        key = self.embedding_key(embedding.embedding_id)
        started = time.perf_counter()
        try:
            if self.blobs.exists(key):  # skip serialising and uploading ~8 MiB
                self._record("put", "embedding", "exists", started, 0)
                return True
        except StoreUnavailableError:
            self._record("put", "embedding", "error", started, 0)
            raise
        data = codec.encode_embedding(embedding, self.storage_dtype)
        ttl = ttl_s if ttl_s is not None else self.embedding_ttl_s
        return not self._write("embedding", key, data, ttl, started)

    def has_embedding(self, embedding_id: str) -> bool:
        """Whether an entry exists (unverified; ``get_embedding`` verifies)."""
        key = self.embedding_key(embedding_id)
        try:
            return self.blobs.exists(key)
        except StoreUnavailableError:
            self._record("get", "embedding", "error", time.perf_counter(), 0)
            raise

    def delete_embedding(self, embedding_id: str) -> None:
        self.blobs.delete(self.embedding_key(embedding_id))

    def export_embedding(self, embedding_id: str, model_id: str) -> bytes | None:
        """The stored entry as verified codec bytes (``GetEmbedding``), or None on a miss.

        The bytes are exactly what is stored, in its storage dtype; ``import_embedding`` on
        another deployment stores them unchanged.
        """
        loaded = self._load_embedding(embedding_id, model_id, keep_storage_dtype=True)
        return None if loaded is None else loaded[1]

    def import_embedding(self, data: bytes, *, expected_model_id: str | None = None,
                         namespace: str = "",
                         ttl_s: float | None = None) -> tuple[ImageEmbedding, bool]:
        """Verify codec bytes from a client (``PutEmbedding``) and store them under an id of
        the import space, never under the content id they claim.

        A content id says "the encoder computed this from these pixels"; an upload cannot
        prove that, so it is stored as ``imp-<sha256 of model, size and tensors>`` (scoped
        to ``namespace``): the same upload gets the same id, and an entry the encoder wrote
        is never replaced or shadowed. The tensors are kept in their uploaded dtype. Returns
        the stored embedding (with its new id) and whether it was already stored. Raises
        ``CorruptEntryError`` if ``data`` fails any check.
        """
        embedding = codec.decode_embedding(data, expected_model_id=expected_model_id,
                                           keep_storage_dtype=True)
        self.check_image_size(embedding.original_hw, "the upload")
        metadata = codec.read_metadata(data)
        digest = hashlib.sha256()
        for part in (embedding.model_id, str(list(embedding.original_hw)),
                     str(metadata["payload_sha256"])):
            digest.update(part.encode())
            digest.update(b"\0")
        imported = ImageEmbedding(
            image_embed=embedding.image_embed, high_res_feats=embedding.high_res_feats,
            original_hw=embedding.original_hw, model_id=embedding.model_id,
            embedding_id=scope_id(namespace, IMPORT_ID_PREFIX + digest.hexdigest()),
        )
        entry = codec.encode_embedding(imported, metadata["dtype"])
        key = self.embedding_key(imported.embedding_id)
        ttl = ttl_s if ttl_s is not None else self.embedding_ttl_s
        written = self._write("embedding", key, entry, ttl, time.perf_counter())
        return imported, not written

    def get_logits(self, handle: str) -> np.ndarray | None:
        """The verified float32 [C, 256, 256] logits of ``handle``, or None on a miss."""
        return self._get_verified("logits", self.logits_key(handle), codec.decode_logits)

    def put_logits(self, handle: str, logits: np.ndarray, ttl_s: float | None) -> None:
        """Store ``logits`` [C, 256, 256] under ``handle`` (overwriting) for ``ttl_s``."""
        key = self.logits_key(handle)
        started = time.perf_counter()
        data = codec.encode_logits(logits)
        try:
            self.blobs.put(key, data, ttl_s)
        except StoreUnavailableError:
            self._record("put", "logits", "error", started, 0)
            raise
        self._record("put", "logits", "written", started, len(data))

    # ------------------------------------------------------------------ tracking sessions

    def put_session(self, session_id: str, state: dict[str, Any],
                    tensors: Sequence[tuple[str, torch.Tensor]], tracking: dict[str, Any],
                    revision: int, ttl_s: float | None) -> None:
        """Save a tracking session (``VideoSession.to_state`` plus the tier's ``tracking``
        metadata) as ``revision``, which must follow the stored one (1 for a new session).

        Compare-and-set: the state goes under a key of its own, then the revision pointer
        (``"<revision>.<token>"``) moves from the stored value to this one only if nobody
        moved it meanwhile. Of two replicas saving revision N+1, one wins and the other gets
        ``SessionConflictError`` and leaves the winner's state untouched. Both live ``ttl_s``.
        """
        revision = int(revision)
        pointer_key = SESSION_REVISION_PREFIX + _check_id(session_id, "session id")
        started = time.perf_counter()
        version = f"{revision}.{uuid.uuid4().hex}"
        data = codec.encode_session(
            state, tensors, {**tracking, "session_id": session_id, "revision": revision})
        state_key = self.session_key(session_id, version)
        try:
            previous = self.blobs.get(pointer_key) if revision > 1 else None
            if revision > 1 and _revision_of(previous) != revision - 1:
                raise self._conflict(session_id, revision)
            self.blobs.put(state_key, data, ttl_s)
            moved = (self.blobs.put_if_absent(pointer_key, version.encode(), ttl_s)
                     if previous is None else
                     self.blobs.replace_if(pointer_key, previous, version.encode(), ttl_s))
            if not moved:
                self.blobs.delete(state_key)
                raise self._conflict(session_id, revision)
            if previous is not None:  # the replaced state; a reader holding it retries
                self.blobs.delete(self.session_key(session_id, previous.decode("ascii")))
        except StoreUnavailableError:
            self._record("put", "session", "error", started, 0)
            raise
        self._record("put", "session", "written", started, len(data))

    def _conflict(self, session_id: str, revision: int) -> SessionConflictError:
        self.stats.session_conflicts += 1
        return SessionConflictError(
            f"tracking session {session_id!r} was changed by another call while this one ran "
            f"(revision {revision} is taken); send the call again", session_id=session_id)

    def session_revision(self, session_id: str) -> int | None:
        """The stored revision of a session, or None (expired, closed, or unreadable)."""
        return _revision_of(self._session_pointer(session_id))

    def _session_pointer(self, session_id: str) -> bytes | None:
        key = SESSION_REVISION_PREFIX + _check_id(session_id, "session id")
        data = self.blobs.get(key)
        if data is not None and _revision_of(data) is None:
            logger.warning("corrupt session revision %s in %s: %r", key, self.url, data[:32])
            return None
        return data

    def get_session(
        self, session_id: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
        """The verified current session (state, tensors, tracking metadata), or None on a
        miss; a damaged entry is counted, logged, deleted and reported as a miss."""
        def decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
            state, tensors, tracking = codec.decode_session(data)
            try:
                hw = state["video_hw"]
                if list(hw) != list(tracking["video_hw"]):
                    raise CorruptEntryError("session and tracking metadata disagree on the size")
                if tracking["revision"] != _revision_of(pointer):
                    raise CorruptEntryError("session state is not of its revision")
                if tracking["session_id"] != session_id:  # an entry copied from elsewhere
                    raise CorruptEntryError("session entry names another session")
            except (KeyError, TypeError) as exc:
                raise CorruptEntryError(f"session entry has no video size: {exc!r}") from None
            self.check_image_size(hw, "tracking session")
            return state, tensors, tracking

        for _ in range(3):  # a save between reading the pointer and the state: read again
            pointer = self._session_pointer(session_id)
            if pointer is None:
                return None
            key = self.session_key(session_id, pointer.decode("ascii"))
            loaded = self._get_verified("session", key, decode)
            if loaded is not None or self._session_pointer(session_id) == pointer:
                return loaded
        return None

    def delete_session(self, session_id: str) -> None:
        pointer = self._session_pointer(session_id)
        self.blobs.delete(SESSION_REVISION_PREFIX + _check_id(session_id, "session id"))
        if pointer is not None:
            self.blobs.delete(self.session_key(session_id, pointer.decode("ascii")))

    def ping(self) -> None:
        self.blobs.ping()

    def close(self) -> None:
        self.blobs.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
