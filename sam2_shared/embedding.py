"""The cached result of the image encoder and its content-addressed id.

No torch import at run time: the client computes content ids where torch is not installed.

Tenancy: ids made for a caller of a namespace are ``"<namespace>:<hex>"`` (the hex hashed with
the namespace too); a caller may only use ids of its own namespace, anything else is answered
like an unknown id (``check_id_namespace``), so one tenant can neither read nor probe
another's embeddings or logits, even for identical images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sam2_shared.errors import EmbeddingNotFoundError, LogitsNotFoundError

# Part of video frame ids: PIL bicubic resize, see transforms.preprocess_video_frames.
VIDEO_PREPROCESS_VERSION = "sam2-video-v1"

if TYPE_CHECKING:
    import torch

# Bump when anything that changes the embedding of given pixels changes
# (resize, normalisation, network wiring). It is part of every embedding id.
PREPROCESS_VERSION = "sam2-image-v1"
# Ids and logits handles of a namespaced (tenant) caller are "<namespace>:<hex>".
NAMESPACE_SEPARATOR = ":"


@dataclass
class ImageEmbedding:
    """Everything the prompt decoder needs for one image.

    Attributes:
        image_embed: [1, 256, 64, 64] stride-16 features with ``no_mem_embed`` added.
        high_res_feats: ([1, 32, 256, 256], [1, 64, 128, 128]) features after the
            mask decoder's ``conv_s0`` / ``conv_s1`` projections.
        original_hw: (H, W) of the original image in pixels.
        model_id: official model id, e.g. ``"sam2.1/hiera_tiny"``.
        embedding_id: content-addressed id (see ``content_id``).
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, torch.Tensor]
    original_hw: tuple[int, int]
    model_id: str
    embedding_id: str

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageEmbedding:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)

        return ImageEmbedding(
            image_embed=move(self.image_embed),
            high_res_feats=(move(self.high_res_feats[0]), move(self.high_res_feats[1])),
            original_hw=self.original_hw,
            model_id=self.model_id,
            embedding_id=self.embedding_id,
        )

    @property
    def nbytes(self) -> int:
        tensors = (self.image_embed, *self.high_res_feats)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class EmbeddingRef:
    """A stored embedding, by reference: no tensors (they stay in the shared store). What the
    encoder tier answers, what the decoder tier decoded from, what ``Sam2Client`` returns.

    Attributes:
        embedding_id: content-addressed id, as the decoder expects it.
        model_id: model that produced it.
        original_hw: (H, W) of the image in pixels.
        already_stored: the encoder found it stored and computed nothing.
    """

    embedding_id: str
    model_id: str
    original_hw: tuple[int, int]
    already_stored: bool = False


def content_id(
    rgb: np.ndarray, model_id: str, namespace: str = "", preprocess_version: str | None = None
) -> str:
    """Content-addressed embedding id of decoded RGB pixels for one model.

    Hashes the decoded, EXIF-oriented HxWx3 uint8 RGB pixels (so the same picture
    in PNG or lossless WebP gets the same id), their shape, the model id and
    ``PREPROCESS_VERSION`` (or ``preprocess_version``: video frames pass theirs, so a
    frame's id differs from the same picture's image id). ``namespace`` separates tenants.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"content_id expects HxWx3 uint8 RGB pixels, got {rgb.dtype} {rgb.shape}")
    digest = hashlib.sha256()
    version = PREPROCESS_VERSION if preprocess_version is None else preprocess_version
    for part in (namespace, model_id, version, f"{rgb.shape[0]}x{rgb.shape[1]}"):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


# --- tenant-scoped ids ------------------------------------------------------------


def scope_id(namespace: str, local_id: str) -> str:
    """The id a caller of ``namespace`` sees for ``local_id`` (unchanged without one)."""
    return f"{namespace}{NAMESPACE_SEPARATOR}{local_id}" if namespace else local_id


def namespace_of_id(scoped_id: str) -> str:
    """The namespace an id or logits handle was made in ("" for plain ids)."""
    head, separator, _ = scoped_id.partition(NAMESPACE_SEPARATOR)
    return head if separator else ""


def namespaced_content_id(rgb: Any, model_id: str, namespace: str = "") -> str:
    """Embedding id of decoded RGB pixels for a caller of ``namespace``: the content hash
    (which includes the namespace) prefixed by the namespace. Both tiers and the client
    compute ids with this, so they agree."""
    return scope_id(namespace, content_id(rgb, model_id, namespace=namespace))


def video_frame_id(rgb: Any, model_id: str, namespace: str = "") -> str:
    """Embedding id of a decoded RGB video frame for a caller of ``namespace``: like
    ``namespaced_content_id`` with the video preprocessing's version in the hash (a frame is
    resized differently from an image, so its id differs)."""
    local = content_id(rgb, model_id, namespace=namespace,
                       preprocess_version=VIDEO_PREPROCESS_VERSION)
    return scope_id(namespace, local)


def check_id_namespace(scoped_id: str, namespace: str, *, what: str = "embedding") -> None:
    """Raise NOT_FOUND unless ``scoped_id`` belongs to ``namespace``: another tenant's id
    is answered exactly like an id that does not exist."""
    if namespace_of_id(scoped_id) != namespace:
        if what == "logits":
            raise LogitsNotFoundError(
                f"logits handle {scoped_id!r} is unknown or expired; send the logits inline or "
                "start again from points or a box", logits_handle=scoped_id,
            )
        raise EmbeddingNotFoundError(
            f"embedding {scoped_id!r} is not stored; call EncoderService.EmbedImages with the "
            "image first", embedding_id=scoped_id,
        )
