"""``Sam2VideoModel``: the network parts video tracking needs, loaded once, and the
sessions it starts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import InvalidInputError
from sam2_shared.inference.checkpoints import load_parts
from sam2_shared.inference.video.frames import FrameSource, encode_video_frames
from sam2_shared.model.config import Sam2Config
from sam2_shared.model.parts import Sam2DecoderPart, Sam2EncoderPart
from sam2_shared.model.tracker import Sam2TrackerPart

if TYPE_CHECKING:
    from sam2_shared.inference.video.session import VideoSession


# Names of the memory-attention dtypes a video model runs in (``tracking_dtype``).
TRACKING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Sam2VideoModel:
    """The network parts video tracking needs, on one device (float32; memory attention
    optionally bfloat16, ``tracking_dtype``)."""

    def __init__(
        self,
        config: Sam2Config,
        decoder: Sam2DecoderPart,
        tracker: Sam2TrackerPart,
        encoder: Sam2EncoderPart | None = None,
        device: torch.device | str = "cpu",
        tracking_dtype: str = "float32",
    ) -> None:
        if tracking_dtype not in TRACKING_DTYPES:
            raise ValueError(f"tracking_dtype must be one of {sorted(TRACKING_DTYPES)}, "
                             f"not {tracking_dtype!r}")
        self.config = config
        self.device = torch.device(device)
        self.tracking_dtype = tracking_dtype
        self.decoder = decoder.to(self.device).eval()
        self.tracker = tracker.to(self.device).eval()
        self.tracker.set_tracking_dtype(TRACKING_DTYPES[tracking_dtype])
        self.encoder = encoder.to(self.device).eval() if encoder is not None else None

    @property
    def model_id(self) -> str:
        return self.config.model_id

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        checkpoint: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        with_encoder: bool = True,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        tracking_dtype: str = "float32",
    ) -> Sam2VideoModel:
        """Load the decoder and tracker parts (and the encoder unless ``with_encoder=False``,
        as in a decoder tier that reads frame embeddings from the store)."""
        parts = ("decoder", "tracker", "encoder") if with_encoder else ("decoder", "tracker")
        config, modules = load_parts(model_id, parts, checkpoint, cache_dir=cache_dir,
                                     download=download)
        decoder, tracker, encoder = (modules["decoder"], modules["tracker"],
                                     modules.get("encoder"))
        return cls(config, decoder, tracker, encoder, device=device,
                   tracking_dtype=tracking_dtype)

    @torch.inference_mode()
    def embed_frames(self, frames: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Encode RGB uint8 frames with the video preprocessing, one frame at a time."""
        if self.encoder is None:
            raise RuntimeError("this Sam2VideoModel was built without the encoder part")
        # One frame per forward: frames of a video are embedded as they are needed.
        return [embedding for rgb in frames
                for embedding in encode_video_frames(self.encoder, [rgb], self.model_id,
                                                     self.device)]

    def frame_source(
        self, frames: Sequence[np.ndarray] | Sequence[ImageEmbedding] | FrameSource,
        cache_size: int = 2,
    ) -> FrameSource:
        if isinstance(frames, FrameSource):
            return frames
        items = list(frames)
        if not items:
            raise InvalidInputError("a video needs at least one frame")
        if all(isinstance(f, ImageEmbedding) for f in items):
            wrong = {f.model_id for f in items} - {self.model_id}
            if wrong:
                raise InvalidInputError(f"frame embeddings of {sorted(wrong)}, not {self.model_id}")
            return FrameSource.from_embeddings(items)
        for i, rgb in enumerate(items):
            if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
                    or rgb.shape[2] != 3 or rgb.size == 0:
                raise InvalidInputError(f"frame {i}: expected HxWx3 uint8 RGB or ImageEmbedding")
        sizes = {rgb.shape[:2] for rgb in items}
        if len(sizes) != 1:
            raise InvalidInputError(f"all frames must have the same size, got {sorted(sizes)}")
        return FrameSource(
            len(items), items[0].shape[:2], lambda i: self.embed_frames([items[i]])[0], cache_size
        )

    def start_session(
        self, frames: Sequence[np.ndarray] | Sequence[ImageEmbedding] | FrameSource
    ) -> VideoSession:
        """A new session over RGB uint8 frames, their embeddings, or a ``FrameSource``."""
        from sam2_shared.inference.video.session import VideoSession  # it imports this module

        return VideoSession(self, self.frame_source(frames))
