"""``Encoder``: the encoder tier's logic, without gRPC.

Embeds images into the shared store with dynamic batching, and exports / imports stored
embeddings. The servicer only translates protos to these calls and back.

Per image: decode and hash on a worker thread (never on the event loop); if the store
already has the id, answer ``already_stored`` without computing; otherwise queue the
decoded pixels on the ``MicroBatcher`` keyed by the id, so identical concurrent requests
are encoded once and different ones share a forward; then write to the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam2_shared.embedding import (
    EmbeddingRef,
    ImageEmbedding,
    check_id_namespace,
    namespaced_content_id,
    video_frame_id,
)
from sam2_shared.errors import (
    CorruptEntryError,
    EmbeddingNotFoundError,
    InvalidInputError,
    UnknownModelError,
)
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.inference.video import encode_video_frames
from sam2_shared.serving.batching import MicroBatcher
from sam2_shared.store import EmbeddingStore, codec

EXPORT_FORMAT = f"sam2-embedding-v{codec.FORMAT_VERSION}"
WARMUP_SIZE = (64, 96)  # small and non-square: exercises resize and padding paths

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedEmbedding:
    """A stored entry as codec bytes, with what ``PutEmbedding`` checks on the way back."""

    info: EmbeddingRef
    data: bytes
    sha256: str
    format: str = EXPORT_FORMAT


class Encoder:
    """Batched, idempotent image embedding into a shared store.

    Arguments:
        model: a ``Sam2Model`` with the encoder part loaded.
        store: where embeddings are written and exported from.
        max_batch_size: most images per encoder forward.
        max_wait_s: longest an image waits for its batch to fill.
        max_queue: most distinct images waiting; beyond, ``RESOURCE_EXHAUSTED``.
    """

    def __init__(
        self,
        model: Sam2Model,
        store: EmbeddingStore,
        *,
        max_batch_size: int = 4,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
    ) -> None:
        self.model = model
        self.store = store
        self.batcher: MicroBatcher[tuple[np.ndarray, str, bool], ImageEmbedding] = MicroBatcher(
            self._encode_batch,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            name="encoder",
        )
        self.images_encoded = 0  # forward passes' images: what coalescing and the store save

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def check_model(self, model_id: str) -> None:
        """Raise ``UnknownModelError`` unless ``model_id`` is the model served here."""
        if model_id != self.model_id:
            raise UnknownModelError(
                f"this encoder serves {self.model_id!r}, not {model_id or '(empty)'!r}; "
                "send the request to an encoder of that model",
                served_model_id=self.model_id,
            )

    # ------------------------------------------------------------------ embedding

    def _encode_batch(self, items: list[tuple[np.ndarray, str, bool]]) -> list[ImageEmbedding]:
        """Runs on the batcher's thread: one batched forward per preprocessing kind."""
        out: list[ImageEmbedding | None] = [None] * len(items)
        for video_frame in (False, True):
            picked = [i for i, item in enumerate(items) if item[2] == video_frame]
            if not picked:
                continue
            rgbs = [items[i][0] for i in picked]
            ids = [items[i][1] for i in picked]
            encode = self._encode_video_frames if video_frame else self.model.encode_rgb
            for i, embedding in zip(picked, encode(rgbs, ids), strict=True):
                out[i] = embedding
        self.images_encoded += len(items)
        return [e for e in out if e is not None]

    def _encode_video_frames(self, rgbs: list[np.ndarray], ids: list[str]) -> list[ImageEmbedding]:
        """The one video-frame embedding (``inference.video.encode_video_frames``) on this
        tier's encoder, with the tier's (namespaced) ids."""
        if self.model.encoder is None:
            raise RuntimeError("this encoder was built without the encoder part")
        return encode_video_frames(self.model.encoder, rgbs, self.model_id, self.model.device,
                                   ids)

    def _decode(self, image: Any, color_format: str, namespace: str,
                video_frame: bool = False) -> tuple[np.ndarray, str]:
        rgb = self.model.decode_image(image, color_format)
        if video_frame:
            return rgb, video_frame_id(rgb, self.model_id, namespace)
        return rgb, namespaced_content_id(rgb, self.model_id, namespace)

    async def embed(self, image: Any, color_format: str = "rgb", namespace: str = "",
                    video_frame: bool = False) -> tuple[EmbeddingRef, bool]:
        """Embed one image into the store; returns its info and whether it was stored
        before this call (then nothing was computed).

        ``image``: encoded bytes or an [H, W] / [H, W, 3|4] uint8 array in ``color_format``.
        Raises ``InvalidInputError`` for bad images, ``ResourceExhaustedError`` when the
        queue is full. ``namespace``: the caller's tenant (``sam2_shared.serving.auth``), part
        of the id. ``video_frame``: embed as a video frame for tracking (the video
        preprocessing, ``VIDEO_PREPROCESS_VERSION`` in the id).
        """
        rgb, embedding_id = await asyncio.to_thread(
            self._decode, image, color_format, namespace, video_frame
        )
        info = EmbeddingRef(embedding_id, self.model_id, (int(rgb.shape[0]), int(rgb.shape[1])))
        if await asyncio.to_thread(self.store.has_embedding, embedding_id):
            return info, True
        embedding = await self.batcher.submit((rgb, embedding_id, video_frame), key=embedding_id)
        # Coalesced twins both get here; put_embedding skips the upload if the first wrote.
        await asyncio.to_thread(self.store.put_embedding, embedding)
        return info, False

    async def warm_up(self) -> None:
        """One encode of a small image (not stored): loads kernels and allocator pools
        before the server reports SERVING."""
        height, width = WARMUP_SIZE
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        await asyncio.to_thread(self.model.encode_rgb, [rgb], ["warmup"])

    # ------------------------------------------------------------------ export / import

    async def export(self, embedding_id: str, namespace: str = "") -> ExportedEmbedding:
        """The stored entry of ``embedding_id`` as verified bytes; ``EmbeddingNotFoundError``
        when it is not stored (or its entry was corrupt, or belongs to another namespace)."""
        check_id_namespace(embedding_id, namespace)
        data = await asyncio.to_thread(self.store.export_embedding, embedding_id, self.model_id)
        if data is None:
            raise EmbeddingNotFoundError(
                f"embedding {embedding_id!r} is not stored for model {self.model_id!r}; "
                "embed the image first",
                embedding_id=embedding_id,
            )
        metadata = codec.read_metadata(data)
        height, width = metadata["original_hw"]
        info = EmbeddingRef(embedding_id, self.model_id, (int(height), int(width)))
        return ExportedEmbedding(info, data, hashlib.sha256(data).hexdigest())

    async def import_(
        self,
        data: bytes,
        model_id: str,
        *,
        sha256: str | None = None,
        size_bytes: int | None = None,
        embedding_id: str | None = None,
        format: str = EXPORT_FORMAT,
        namespace: str = "",
    ) -> tuple[EmbeddingRef, bool]:
        """Verify an exported entry and store it under an import id (``imp-...``, never the
        content id it claims: see ``EmbeddingStore.import_embedding``); returns its reference
        (with the id to segment with) and whether it was already stored. Any mismatch or
        damage raises ``InvalidInputError`` (the upload is bad, the server is fine)."""
        self.check_model(model_id)
        if format != EXPORT_FORMAT:
            raise InvalidInputError(
                f"unknown embedding format {format!r}; this server reads {EXPORT_FORMAT!r}",
                reason="UNSUPPORTED_FORMAT",
            )
        if size_bytes is not None and len(data) != size_bytes:
            raise InvalidInputError(
                f"upload has {len(data)} bytes, header announced {size_bytes}",
                reason="EMBEDDING_CORRUPT",
            )
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
            raise InvalidInputError(
                "upload's SHA-256 does not match the header; resend it", reason="EMBEDDING_CORRUPT"
            )
        try:
            stored_id = codec.read_metadata(data).get("embedding_id")
            if embedding_id and stored_id != embedding_id:
                raise CorruptEntryError(f"it holds embedding {stored_id!r}, not {embedding_id!r}")
            embedding, existed = await asyncio.to_thread(
                self.store.import_embedding, data, expected_model_id=self.model_id,
                namespace=namespace,
            )
        except CorruptEntryError as exc:
            raise InvalidInputError(
                f"uploaded embedding is invalid: {exc}", reason="EMBEDDING_CORRUPT"
            ) from None
        return EmbeddingRef(embedding.embedding_id, embedding.model_id,
                            embedding.original_hw), existed

    async def close(self) -> None:
        """Finish queued encodes, then stop the batch worker."""
        await self.batcher.close()
