"""Video frames: their per-frame features (``FrameSource``), one frame's result
(``FrameResult``), and the one implementation of video-frame embedding (used in process and
by the encoder tier, so both give the same features and ids)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sam2_shared.embedding import (
    VIDEO_PREPROCESS_VERSION,  # noqa: F401 (re-exported)
    ImageEmbedding,
    video_frame_id,
)
from sam2_shared.errors import InvalidInputError
from sam2_shared.inference import transforms


@dataclass
class FrameResult:
    """Every object's mask on one frame.

    Iterates as ``(frame_idx, obj_ids, logits, object_score_logits)``.

    Attributes:
        frame_idx: frame index.
        obj_ids: object ids, in the session's order (order of first prompt).
        logits: [O, H, W] float32 mask logits at the video's size (> 0 is the mask);
            objects without output on this frame are filled with -1024.
        object_score_logits: [O] float32 presence logits (> 0: visible); -1024 if none.
        low_res_logits: [O, 256, 256] float32 logits as the model produced them.
    """

    frame_idx: int
    obj_ids: list[int]
    logits: np.ndarray
    object_score_logits: np.ndarray
    low_res_logits: np.ndarray

    @property
    def masks(self) -> np.ndarray:
        """[O, H, W] bool."""
        return self.logits > 0.0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.frame_idx, self.obj_ids, self.logits, self.object_score_logits))



class FrameSource:
    """A video's per-frame encoder features, loaded on demand, a few kept (LRU).

    ``load(i)`` returns frame i's ``ImageEmbedding`` (from the encoder, a store...).
    """

    def __init__(
        self,
        num_frames: int,
        video_hw: tuple[int, int],
        load: Callable[[int], ImageEmbedding],
        cache_size: int = 2,
    ) -> None:
        if num_frames <= 0:
            raise InvalidInputError("a video needs at least one frame")
        self.num_frames = int(num_frames)
        self.video_hw = (int(video_hw[0]), int(video_hw[1]))
        self._load = load
        self._cache: OrderedDict[int, ImageEmbedding] = OrderedDict()
        self._cache_size = max(1, cache_size)

    @classmethod
    def from_embeddings(cls, embeddings: Sequence[ImageEmbedding]) -> FrameSource:
        """All frames already encoded (with ``Sam2VideoModel.embed_frames``)."""
        if not embeddings:
            raise InvalidInputError("a video needs at least one frame")
        sizes = {tuple(e.original_hw) for e in embeddings}
        if len(sizes) != 1:
            raise InvalidInputError(f"all frames must have the same size, got {sorted(sizes)}")
        frames = list(embeddings)
        return cls(len(frames), frames[0].original_hw, frames.__getitem__, len(frames))

    def cached_nbytes(self) -> int:
        """Bytes of the frame features held in the cache now."""
        return sum(embedding.nbytes for embedding in self._cache.values())

    def features(self, frame_idx: int) -> ImageEmbedding:
        if frame_idx in self._cache:
            self._cache.move_to_end(frame_idx)
            return self._cache[frame_idx]
        embedding = self._load(frame_idx)
        if tuple(embedding.original_hw) != self.video_hw:
            raise InvalidInputError(
                f"frame {frame_idx} is {tuple(embedding.original_hw)}, the video {self.video_hw}"
            )
        self._cache[frame_idx] = embedding
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return embedding



@torch.inference_mode()
def encode_video_frames(
    encoder: nn.Module,
    rgbs: Sequence[np.ndarray],
    model_id: str,
    device: torch.device,
    ids: Sequence[str] | None = None,
) -> list[ImageEmbedding]:
    """HxWx3 uint8 RGB frames -> float32 ``ImageEmbedding``s with Meta's video preprocessing
    (``transforms.preprocess_video_frames``), as one batch on ``encoder``.

    ``ids`` default to the frames' video content ids (``VIDEO_PREPROCESS_VERSION`` in the
    hash: the same picture as an image has another id).
    """
    dtype = next(encoder.parameters()).dtype
    batch = transforms.preprocess_video_frames(rgbs).to(device, dtype)
    image_embed, feat_s0, feat_s1 = encoder(batch)
    if ids is None:
        ids = [video_frame_id(rgb, model_id) for rgb in rgbs]
    return [
        ImageEmbedding(
            image_embed=image_embed[i : i + 1].float(),
            high_res_feats=(feat_s0[i : i + 1].float(), feat_s1[i : i + 1].float()),
            original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
            model_id=model_id,
            embedding_id=ids[i],
        )
        for i, rgb in enumerate(rgbs)
    ]
