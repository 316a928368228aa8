"""Bounded in-process caches of the public API.

``LruCache`` is a generic thread-safe LRU bounded by entry count and optionally by bytes; the
decoder tier's hot embedding cache uses it too. The two SAM 2 caches mirror the well-known
in-process API (``Sam2ImageEmbeddingsInMemoryCache``, ``Sam2LowResolutionMasksInMemoryCache``)
but evict the least *recently used* entry: a lookup refreshes recency, so the image a user is
annotating is not pushed out by background embeds (a plain insertion-ordered FIFO would).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.prompts import LOW_RES_SIZE, Prompt

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Thread-safe least-recently-used cache.

    Arguments:
        size_limit (int): most entries kept (0 keeps nothing).
        max_bytes (int | None): most total ``size_of(value)`` kept, or None for no byte bound.
        size_of (Callable[[V], int] | None): size of a value in bytes; required with max_bytes.

    ``get`` refreshes recency and counts a hit or a miss; ``__contains__`` does neither. A value
    larger than ``max_bytes`` on its own is not stored. ``evictions`` counts entries dropped to
    honour the limits (not ``pop``, ``clear`` or replacement of a key).
    """

    def __init__(
        self,
        size_limit: int,
        max_bytes: int | None = None,
        size_of: Callable[[V], int] | None = None,
    ) -> None:
        if size_limit < 0:
            raise ValueError(f"size_limit must be >= 0, got {size_limit}")
        if max_bytes is not None:
            if max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
            if size_of is None:
                raise ValueError("max_bytes needs a size_of function")
        self.size_limit = size_limit
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # oldest first
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return default
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` as the most recently used entry; False if it could not be kept."""
        size = self._size_of(value) if self._size_of is not None else 0  # outside the lock
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old[1]
            too_big = self.max_bytes is not None and size > self.max_bytes
            if self.size_limit == 0 or too_big:
                return False
            self._entries[key] = (value, size)
            self._nbytes += size
            while len(self._entries) > self.size_limit or (
                self.max_bytes is not None and self._nbytes > self.max_bytes
            ):
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self._nbytes -= evicted_size
                self.evictions += 1
            return True

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Remove ``key`` and return its value, or ``default``."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return default
            self._nbytes -= entry[1]
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def keys(self) -> list[K]:
        """Keys from least to most recently used (a snapshot)."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Total ``size_of`` of the stored values (0 without ``size_of``)."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries


class Sam2ImageEmbeddingsInMemoryCache:
    """``ImageEmbedding`` values by key (normally the ``embedding_id``), LRU.

    Arguments:
        size_limit (int): most embeddings kept (one is 16 MiB in fp32).
        send_to_cpu (bool): store a CPU copy, so cached entries do not hold accelerator memory.
        max_bytes (int | None): optional bound on the total tensor bytes.
    """

    def __init__(
        self, size_limit: int = 100, send_to_cpu: bool = True, max_bytes: int | None = None
    ) -> None:
        self.send_to_cpu = send_to_cpu
        self._cache: LruCache[str, ImageEmbedding] = LruCache(
            size_limit,
            max_bytes=max_bytes,
            size_of=lambda embedding: embedding.nbytes,
        )

    @classmethod
    def init(
        cls, size_limit: int = 100, send_to_cpu: bool = True, max_bytes: int | None = None
    ) -> Sam2ImageEmbeddingsInMemoryCache:
        """The constructor under the name users of the SAM 2 model API call."""
        return cls(size_limit=size_limit, send_to_cpu=send_to_cpu, max_bytes=max_bytes)

    def save_embeddings(self, key: str, embedding: ImageEmbedding) -> None:
        self._cache.put(key, embedding.to("cpu") if self.send_to_cpu else embedding)

    def retrieve_embeddings(
        self, key: str, device: torch.device | str | None = None
    ) -> ImageEmbedding | None:
        """The cached embedding, moved to ``device`` if given, or None on a miss."""
        embedding = self._cache.get(key)
        if embedding is None or device is None:
            return embedding
        return embedding.to(device)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    @property
    def nbytes(self) -> int:
        """Tensor bytes held."""
        return self._cache.nbytes

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: object) -> bool:
        return key in self._cache


Point = tuple[float, float, int]  # (x, y, label), coordinates as float32 values


@dataclass(frozen=True)
class PromptSignature:
    """What of a prompt decides whether a later prompt extends it.

    Coordinates are compared as float32 values: that is what the model sees, so two inputs that
    are equal in float32 give the same masks.
    """

    box: tuple[float, ...] | None
    points: tuple[Point, ...]

    @classmethod
    def of(cls, prompt: Prompt) -> PromptSignature:
        box = None
        if prompt.box is not None:
            box = tuple(np.asarray(prompt.box, dtype=np.float32).reshape(-1).tolist())
        points: tuple[Point, ...] = ()
        if prompt.point_coords is not None and prompt.point_labels is not None:
            coords = np.asarray(prompt.point_coords, dtype=np.float32).reshape(-1, 2).tolist()
            labels = np.asarray(prompt.point_labels).reshape(-1).astype(np.int64).tolist()
            points = tuple((x, y, label) for (x, y), label in zip(coords, labels, strict=True))
        return cls(box=box, points=points)

    def is_extended_by(self, other: PromptSignature) -> bool:
        """True if ``other`` has the same box and strictly more points, ours as its prefix."""
        return (
            self.box == other.box
            and len(self.points) < len(other.points)
            and other.points[: len(self.points)] == self.points
        )


class Sam2LowResolutionMasksInMemoryCache:
    """Low-res logits of earlier prompts, so a prompt that adds points can refine them.

    For each embedding id it keeps a list of (prompt signature, [256, 256] float32 logits of the
    chosen mask). ``size_limit`` counts prompts over all images; when it is exceeded the least
    recently used image is dropped whole (the oldest prompts of the current image go last).

    A prompt that carries its own ``mask_input`` should not be looked up: the caller uses the
    mask it was given. Saving such a prompt is allowed; its logits are stored under its points.

    Arguments:
        size_limit (int): most prompts kept in total.
        send_to_cpu (bool): store logits on the CPU (otherwise on the device they came on).
    """

    def __init__(self, size_limit: int = 1000, send_to_cpu: bool = True) -> None:
        if size_limit < 0:
            raise ValueError(f"size_limit must be >= 0, got {size_limit}")
        self.size_limit = size_limit
        self.send_to_cpu = send_to_cpu
        # embedding id -> [(signature, logits)], oldest image and oldest prompt first
        self._images: OrderedDict[str, list[tuple[PromptSignature, torch.Tensor]]] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @classmethod
    def init(
        cls, size_limit: int = 1000, send_to_cpu: bool = True
    ) -> Sam2LowResolutionMasksInMemoryCache:
        """The constructor under the name users of the SAM 2 model API call."""
        return cls(size_limit=size_limit, send_to_cpu=send_to_cpu)

    def save_mask(
        self, embedding_id: str, prompt: Prompt, logits: np.ndarray | torch.Tensor
    ) -> None:
        """Remember ``logits`` ([256, 256] or [1, 256, 256]) as the result of ``prompt``.

        Prompts with neither points nor a box are ignored: no later prompt extends them.
        """
        tensor = torch.as_tensor(logits).detach()
        if tuple(tensor.shape) not in ((LOW_RES_SIZE, LOW_RES_SIZE), (1, LOW_RES_SIZE,
                                                                       LOW_RES_SIZE)):
            raise ValueError(f"logits must be [256, 256], got {tuple(tensor.shape)}")
        signature = PromptSignature.of(prompt)
        if signature.box is None and not signature.points:
            return
        if self.send_to_cpu:
            tensor = tensor.to("cpu")
        # Own copy: neither the caller nor a later in-place op can change what we hold.
        tensor = tensor.reshape(LOW_RES_SIZE, LOW_RES_SIZE).to(torch.float32, copy=True)
        with self._lock:
            if self.size_limit == 0:
                return
            entries = self._images.setdefault(embedding_id, [])
            self._images.move_to_end(embedding_id)
            kept = [(sig, value) for sig, value in entries if sig != signature]
            self._count -= len(entries) - len(kept)
            kept.append((signature, tensor))
            self._images[embedding_id] = kept
            self._count += 1
            self._evict_locked()

    def _evict_locked(self) -> None:
        while self._count > self.size_limit:
            if len(self._images) > 1:
                _, dropped = self._images.popitem(last=False)
                self._count -= len(dropped)
                self.evictions += len(dropped)
            else:  # a single image holds more prompts than the limit: drop its oldest
                entries = next(iter(self._images.values()))
                del entries[0]
                self._count -= 1
                self.evictions += 1

    def find_refinement_tensor(
        self, embedding_id: str, prompt: Prompt, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """[256, 256] float32 logits of the longest cached prompt that ``prompt`` extends.

        A cached prompt is extended when it has the same box (or both none) and its points and
        labels are a strict prefix of the new ones, in order, with equal coordinates. The
        multimask flag does not matter. The returned tensor is the cache's own: do not modify.
        """
        signature = PromptSignature.of(prompt)
        with self._lock:
            entries = self._images.get(embedding_id)
            best: tuple[PromptSignature, torch.Tensor] | None = None
            if entries is not None:
                self._images.move_to_end(embedding_id)
                for cached, logits in entries:
                    if cached.is_extended_by(signature) and (
                        best is None or len(cached.points) > len(best[0].points)
                    ):
                        best = (cached, logits)
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
        logits = best[1]
        return logits if device is None else logits.to(device)

    def find_refinement(self, embedding_id: str, prompt: Prompt) -> np.ndarray | None:
        """Like ``find_refinement_tensor``, as a [256, 256] float32 numpy copy (for mask_input)."""
        logits = self.find_refinement_tensor(embedding_id, prompt)
        return None if logits is None else logits.cpu().numpy().copy()

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._count = 0

    def __len__(self) -> int:
        """Number of cached prompts over all images."""
        with self._lock:
            return self._count

    def __contains__(self, embedding_id: object) -> bool:
        with self._lock:
            return embedding_id in self._images
