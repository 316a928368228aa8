"""Video object tracking sessions with bounded, serialisable state.

Semantics follow Meta's per-object ``SAM2VideoPredictor`` (Dec 2024, ``sam2==1.1.0``):
prompts (points, a box, a mask) on any frame create an object's conditioning frames;
``propagate`` tracks every object forward or backward, each with its own memory bank;
prompts on an already tracked frame are corrections fed with that frame's previous logits.

Differences, on purpose:

- **Bounded memory.** Meta keeps every frame's output forever. A session keeps, per
  object, its conditioning frames, the spatial memories (and logits) of the
  ``NUM_MASKMEM - 1`` = 6 frames just behind the last tracked frame, and the pointers of
  the ``MAX_OBJ_PTRS - 1`` = 15 frames behind it: exactly what the next step in either
  direction can read. Propagations that start at a conditioning frame, or continue or
  reverse within 6 frames of where the last one stopped, give Meta's results; starting
  elsewhere inside an already tracked stretch sees fewer old memories than Meta would.
  Output logits of frames dropped from the window are no longer returned by a later
  prompt on the same frame (Meta would show them; they are recomputed on propagation).
- **No hole filling.** Meta's video builder sets ``fill_hole_area=8``, which needs the
  CUDA extension ``sam2._C``; without it (every CPU install) Meta warns and skips the
  step. We always skip it, so we match Meta on CPU and differ on GPU builds with ``_C``
  only where tiny background holes (<= 8 low-res pixels) sit inside a mask.
- Unknown objects, frames out of range and empty prompts raise ``InvalidInputError``.

A session is not thread-safe: one caller drives it at a time. ``to_bytes`` /
``VideoSession.from_bytes`` move it between processes (the frames are not part of the
state: the new process supplies the same frames or their stored embeddings).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sam2_shared.embedding import ImageEmbedding, content_id
from sam2_shared.errors import CorruptEntryError, InvalidInputError
from sam2_shared.inference import transforms
from sam2_shared.inference.checkpoints import load_part, read_state_dict, resolve_checkpoint
from sam2_shared.model.build import Sam2DecoderPart, Sam2EncoderPart
from sam2_shared.model.config import Sam2Config, get_config
from sam2_shared.model.tracker import (
    MAX_OBJ_PTRS,
    NO_OBJ_SCORE,
    NUM_MASKMEM,
    FrameOutput,
    Sam2TrackerPart,
)

# Part of video frame ids: PIL bicubic resize, see transforms.preprocess_video_frames.
VIDEO_PREPROCESS_VERSION = "sam2-video-v1"


# ---------------------------------------------------------------------------------------
# results and frames


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


# ---------------------------------------------------------------------------------------
# the model


class Sam2VideoModel:
    """The network parts video tracking needs, on one device (float32)."""

    def __init__(
        self,
        config: Sam2Config,
        decoder: Sam2DecoderPart,
        tracker: Sam2TrackerPart,
        encoder: Sam2EncoderPart | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.decoder = decoder.to(self.device).eval()
        self.tracker = tracker.to(self.device).eval()
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
    ) -> Sam2VideoModel:
        """Load the decoder and tracker parts (and the encoder unless ``with_encoder=False``,
        as in a decoder tier that reads frame embeddings from the store)."""
        config = get_config(model_id)
        path = resolve_checkpoint(config, checkpoint, cache_dir=cache_dir, download=download)
        state = read_state_dict(path)
        decoder, tracker = Sam2DecoderPart(config), Sam2TrackerPart(config)
        load_part(decoder, "decoder", state, path)
        load_part(tracker, "tracker", state, path)
        encoder = None
        if with_encoder:
            encoder = Sam2EncoderPart(config)
            load_part(encoder, "encoder", state, path)
        del state
        return cls(config, decoder, tracker, encoder, device=device)

    @torch.inference_mode()
    def embed_frames(self, frames: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Encode RGB uint8 frames with the video preprocessing, one frame at a time."""
        if self.encoder is None:
            raise RuntimeError("this Sam2VideoModel was built without the encoder part")
        out = []
        for rgb in frames:
            batch = transforms.preprocess_video_frames([rgb]).to(self.device)
            image_embed, feat_s0, feat_s1 = self.encoder(batch)
            out.append(
                ImageEmbedding(
                    image_embed=image_embed,
                    high_res_feats=(feat_s0, feat_s1),
                    original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
                    model_id=self.model_id,
                    # The same id the encoder tier gives this frame (video_frame=true).
                    embedding_id=content_id(
                        rgb, self.model_id, preprocess_version=VIDEO_PREPROCESS_VERSION
                    ),
                )
            )
        return out

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
        return VideoSession(self, self.frame_source(frames))


# ---------------------------------------------------------------------------------------
# per-object state


@dataclass
class _ObjectState:
    obj_id: int
    num_frames: int
    points: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask_frames: set[int] = field(default_factory=set)
    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    temp_cond: dict[int, FrameOutput] = field(default_factory=dict)
    temp_non_cond: dict[int, FrameOutput] = field(default_factory=dict)
    tracked: np.ndarray = field(init=False)  # [T] bool: frame has been tracked
    tracked_reverse: np.ndarray = field(init=False)  # [T] bool: ...and last in reverse
    # Pointers of frames 6..14 behind the last tracked one, in a fixed-size ring (slot =
    # frame mod size; any 15 consecutive frames map to distinct slots), so the state does
    # not grow while the pointer window fills.
    ring_frames: torch.Tensor = field(init=False)  # [R] int32 frame of each slot, -1 empty
    ring_ptrs: torch.Tensor = field(init=False)  # [R, 1, 256]
    ring_scores: torch.Tensor = field(init=False)  # [R, 1, 1]
    device: torch.device = torch.device("cpu")
    dim: int = 256

    def __post_init__(self) -> None:
        self.tracked = np.zeros(self.num_frames, dtype=bool)
        self.tracked_reverse = np.zeros(self.num_frames, dtype=bool)
        slots = MAX_OBJ_PTRS - 1
        self.ring_frames = torch.full((slots,), -1, dtype=torch.int32)
        self.ring_ptrs = torch.zeros((slots, 1, self.dim), device=self.device)
        self.ring_scores = torch.zeros((slots, 1, 1), device=self.device)

    def to_ring(self, frame_idx: int, out: FrameOutput) -> None:
        slot = frame_idx % len(self.ring_frames)
        self.ring_frames[slot] = frame_idx
        self.ring_ptrs[slot] = out.obj_ptr.to(self.ring_ptrs.dtype)
        self.ring_scores[slot] = out.object_score_logits.to(self.ring_scores.dtype)

    def memory_bank(self) -> _NonCondBank:
        return _NonCondBank(self)

    def stores(self) -> dict[str, dict[int, FrameOutput]]:
        return {
            "cond": self.cond,
            "non_cond": self.non_cond,
            "temp_cond": self.temp_cond,
            "temp_non_cond": self.temp_non_cond,
        }

    def lookup(self, frame_idx: int, temp: dict[int, FrameOutput]) -> FrameOutput | None:
        for store in (temp, self.cond, self.non_cond):
            if frame_idx in store:
                return store[frame_idx]
        return None

    def nbytes(self) -> int:
        total = self.tracked.nbytes + self.tracked_reverse.nbytes
        total += sum(_tensor_nbytes(t) for t in (self.ring_frames, self.ring_ptrs,
                                                  self.ring_scores))
        for coords, labels in self.points.values():
            total += _tensor_nbytes(coords) + _tensor_nbytes(labels)
        for store in self.stores().values():
            for out in store.values():
                total += sum(_tensor_nbytes(t) for t in _output_tensors(out).values())
        return total


class _NonCondBank(Mapping[int, FrameOutput]):
    """An object's non-conditioning outputs: full entries, then pointer-only ring slots."""

    def __init__(self, obj: _ObjectState) -> None:
        self._obj = obj

    def __getitem__(self, frame_idx: int) -> FrameOutput:
        obj = self._obj
        if frame_idx in obj.non_cond:
            return obj.non_cond[frame_idx]
        slot = frame_idx % len(obj.ring_frames)
        if frame_idx >= 0 and int(obj.ring_frames[slot]) == frame_idx:
            return FrameOutput(None, None, obj.ring_ptrs[slot], obj.ring_scores[slot])
        raise KeyError(frame_idx)

    def __iter__(self) -> Iterator[int]:
        ring = [int(f) for f in self._obj.ring_frames if f >= 0]
        return iter(list(self._obj.non_cond) + [f for f in ring if f not in self._obj.non_cond])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _output_tensors(out: FrameOutput) -> dict[str, torch.Tensor | None]:
    return {
        "maskmem_features": out.maskmem_features,
        "pred_masks": out.pred_masks,
        "obj_ptr": out.obj_ptr,
        "object_score_logits": out.object_score_logits,
    }


# ---------------------------------------------------------------------------------------
# the session


class VideoSession:
    """Tracking state of one video: objects, prompts and bounded memory banks."""

    def __init__(self, model: Sam2VideoModel, frames: FrameSource) -> None:
        self.model = model
        self.frames = frames
        self._objects: dict[int, _ObjectState] = {}

    # ---------------------------------------------------------------- inspection

    @property
    def num_frames(self) -> int:
        return self.frames.num_frames

    @property
    def video_hw(self) -> tuple[int, int]:
        return self.frames.video_hw

    @property
    def obj_ids(self) -> list[int]:
        return list(self._objects)

    def state_nbytes(self, obj_id: int | None = None) -> int:
        """Bytes of tensor state (memories, logits, pointers, prompts, frame flags) of one
        object, or of all objects."""
        if obj_id is not None:
            return self._object(obj_id).nbytes()
        return sum(obj.nbytes() for obj in self._objects.values())

    # ---------------------------------------------------------------- validation

    def _check_frame(self, frame_idx: Any) -> int:
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)):
            raise InvalidInputError(f"frame index must be an integer, got {frame_idx!r}")
        if not 0 <= int(frame_idx) < self.num_frames:
            raise InvalidInputError(
                f"frame index {frame_idx} is out of range: the video has {self.num_frames} "
                "frames",
                reason="FRAME_OUT_OF_RANGE",
            )
        return int(frame_idx)

    def _check_obj_id(self, obj_id: Any) -> int:
        if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)):
            raise InvalidInputError(f"object id must be an integer, got {obj_id!r}")
        return int(obj_id)

    def _object(self, obj_id: Any, create: bool = False) -> _ObjectState:
        obj_id = self._check_obj_id(obj_id)
        if obj_id not in self._objects:
            if not create:
                raise InvalidInputError(
                    f"object {obj_id} is not in this session (objects: {self.obj_ids})",
                    reason="UNKNOWN_OBJECT",
                )
            self._objects[obj_id] = self._new_object(obj_id)
        return self._objects[obj_id]

    def _new_object(self, obj_id: int) -> _ObjectState:
        return _ObjectState(
            obj_id, self.num_frames, device=self.model.device, dim=self.model.config.embed_dim
        )

    # ---------------------------------------------------------------- prompts

    @torch.inference_mode()
    def add_points(
        self,
        frame_idx: int,
        obj_id: int,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        clear_old_points: bool = True,
    ) -> FrameResult:
        """Clicks (``points`` [N, 2] (x, y) video pixels, ``labels`` [N] 1/0) and/or a box
        ``[x0, y0, x1, y1]`` for an object on a frame; returns every object's mask there.

        ``clear_old_points=False`` adds the clicks to this frame's earlier ones (no box then).
        """
        frame_idx = self._check_frame(frame_idx)
        self._check_obj_id(obj_id)
        coords, point_labels = self._prompt_points(points, labels, box, clear_old_points)
        obj = self._object(obj_id, create=True)
        if not clear_old_points and frame_idx in obj.points:
            old_coords, old_labels = obj.points[frame_idx]
            coords = torch.cat((old_coords, coords), dim=1)
            point_labels = torch.cat((old_labels, point_labels), dim=1)
        obj.points[frame_idx] = (coords, point_labels)
        obj.mask_frames.discard(frame_idx)
        return self._prompt_step(obj, frame_idx, coords, point_labels, None)

    @torch.inference_mode()
    def add_mask(self, frame_idx: int, obj_id: int, mask: Any) -> FrameResult:
        """A binary mask (HxW, any size; resized to 1024 with antialiasing, >= 0.5) for an
        object on a frame, taken as that frame's output."""
        frame_idx = self._check_frame(frame_idx)
        self._check_obj_id(obj_id)
        array = np.asarray(mask)
        if array.ndim != 2 or array.size == 0:
            raise InvalidInputError(f"mask must be a non-empty HxW array, got {array.shape}")
        if array.dtype.kind not in "biuf" or not np.isfinite(array.astype(np.float32)).all():
            raise InvalidInputError(f"mask must be boolean or 0/1 numbers, got {array.dtype}")
        size = self.model.config.image_size
        mask_t = torch.from_numpy(array.astype(bool)).float()[None, None].to(self.model.device)
        if tuple(mask_t.shape[-2:]) != (size, size):
            mask_t = F.interpolate(
                mask_t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            mask_t = (mask_t >= 0.5).float()
        obj = self._object(obj_id, create=True)
        obj.mask_frames.add(frame_idx)
        obj.points.pop(frame_idx, None)
        return self._prompt_step(obj, frame_idx, None, None, mask_t)

    def _prompt_points(
        self, points: Any, labels: Any, box: Any, clear_old_points: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompt -> coords [1, N, 2] float32 in the 1024 frame, labels [1, N]."""
        if (points is None) != (labels is None):
            raise InvalidInputError("points and labels must be given together")
        coords = np.zeros((0, 2), np.float32)
        point_labels = np.zeros((0,), np.int32)
        if points is not None:
            coords = np.asarray(points, dtype=np.float32).reshape(-1, 2) \
                if np.size(points) % 2 == 0 else None
            point_labels = np.asarray(labels).reshape(-1)
            if coords is None or len(coords) != len(point_labels):
                raise InvalidInputError(
                    f"points must be [N, 2] with N labels, got {np.shape(points)} points and "
                    f"{np.shape(labels)} labels"
                )
            if not np.isin(point_labels, (0, 1)).all():
                raise InvalidInputError("point labels must be 1 (positive) or 0 (negative)")
            point_labels = point_labels.astype(np.int32)
        if box is not None:
            if not clear_old_points:
                raise InvalidInputError("a box replaces earlier clicks: use clear_old_points=True")
            corners = np.asarray(box, dtype=np.float32).reshape(-1)
            if corners.shape != (4,) or corners[2] < corners[0] or corners[3] < corners[1]:
                raise InvalidInputError(f"box must be [x0, y0, x1, y1] with x0<=x1, y0<=y1: {box}")
            coords = np.concatenate((corners.reshape(2, 2), coords))
            point_labels = np.concatenate((np.array([2, 3], np.int32), point_labels))
        if len(coords) == 0:
            raise InvalidInputError("empty prompt: give points with labels, or a box")
        if not np.isfinite(coords).all():
            raise InvalidInputError("prompt coordinates must be finite")
        height, width = self.video_hw
        # Same float32 operations as Meta's predictor: / [W, H], then * 1024.
        scaled = torch.from_numpy(coords)[None] / torch.tensor([width, height])
        scaled = scaled * self.model.config.image_size
        device = self.model.device
        return scaled.to(device), torch.from_numpy(point_labels)[None].to(device)

    def _prompt_step(
        self,
        obj: _ObjectState,
        frame_idx: int,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> FrameResult:
        is_init_cond = not obj.tracked[frame_idx]
        reverse = False if is_init_cond else bool(obj.tracked_reverse[frame_idx])
        # Corrections on tracked frames stay non-conditioning (Meta's default).
        temp = obj.temp_cond if is_init_cond else obj.temp_non_cond
        prev_logits = None
        if mask is None:
            prev = obj.lookup(frame_idx, temp)
            if prev is not None and prev.pred_masks is not None:
                prev_logits = prev.pred_masks.clamp(-32.0, 32.0)
        embedding = self._features(frame_idx)
        temp[frame_idx] = self.model.tracker.track_step(
            self.model.decoder,
            frame_idx,
            embedding.image_embed,
            embedding.high_res_feats,
            is_init_cond_frame=is_init_cond,
            cond_outputs=obj.cond,
            non_cond_outputs=obj.memory_bank(),
            num_frames=self.num_frames,
            reverse=reverse,
            point_coords=coords,
            point_labels=labels,
            mask_input=mask,
            prev_mask_logits=prev_logits,
            run_mem_encoder=False,  # encoded when propagation starts
        )
        return self._consolidated(frame_idx, temp_key="temp_cond" if is_init_cond else
                                  "temp_non_cond")

    @torch.inference_mode()
    def clear_prompts(self, frame_idx: int, obj_id: int) -> FrameResult:
        """Remove an object's prompts on a frame (a conditioning frame becomes an ordinary
        tracked frame); returns every object's mask there."""
        frame_idx = self._check_frame(frame_idx)
        obj = self._object(obj_id)
        self._clear_prompts(obj, frame_idx)
        is_cond = any(frame_idx in o.temp_cond for o in self._objects.values())
        return self._consolidated(frame_idx, "temp_cond" if is_cond else "temp_non_cond")

    def _clear_prompts(self, obj: _ObjectState, frame_idx: int) -> None:
        obj.points.pop(frame_idx, None)
        obj.mask_frames.discard(frame_idx)
        obj.temp_cond.pop(frame_idx, None)
        obj.temp_non_cond.pop(frame_idx, None)
        out = obj.cond.pop(frame_idx, None)
        if out is not None:
            obj.non_cond[frame_idx] = out
            obj.tracked[frame_idx] = False
            obj.tracked_reverse[frame_idx] = False

    @torch.inference_mode()
    def remove_object(self, obj_id: int) -> tuple[list[int], list[FrameResult]]:
        """Drop an object; returns the remaining ids and the others' masks on the frames
        where the removed object had prompts."""
        obj = self._object(obj_id)
        if len(self._objects) == 1:
            self.reset()
            return [], []
        prompted = sorted(set(obj.points) | obj.mask_frames)
        del self._objects[obj.obj_id]
        updated = []
        for frame_idx in prompted:
            is_cond = any(frame_idx in o.temp_cond for o in self._objects.values())
            updated.append(
                self._consolidated(frame_idx, "temp_cond" if is_cond else "temp_non_cond")
            )
        return self.obj_ids, updated

    def reset(self) -> None:
        """Forget every object, prompt and memory."""
        self._objects.clear()

    # ---------------------------------------------------------------- propagation

    @torch.inference_mode()
    def propagate(
        self,
        start_frame_idx: int | None = None,
        max_frames: int | None = None,
        reverse: bool = False,
    ) -> Iterator[FrameResult]:
        """Track every object frame by frame; yields one ``FrameResult`` per frame.

        Starts at ``start_frame_idx`` (default: the earliest conditioning frame) and covers
        up to ``max_frames`` further frames (default: to the end, or to frame 0 in
        reverse; a reverse run from frame 0 yields nothing, as in Meta's predictor).
        Stopping the iteration early leaves a consistent state.
        """
        self._preflight()
        if start_frame_idx is None:
            start_frame_idx = min(t for obj in self._objects.values() for t in obj.cond)
        start = self._check_frame(start_frame_idx)
        if max_frames is None:
            max_frames = self.num_frames
        if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) \
                or max_frames < 0:
            raise InvalidInputError(f"max_frames must be a non-negative integer: {max_frames!r}")
        if reverse:
            end = max(start - max_frames, 0)
            order = range(start, end - 1, -1) if start > 0 else range(0)
        else:
            end = min(start + max_frames, self.num_frames - 1)
            order = range(start, end + 1)
        return self._propagate(order, reverse)

    def _propagate(self, order: range, reverse: bool) -> Iterator[FrameResult]:
        tracker, decoder = self.model.tracker, self.model.decoder
        for frame_idx in order:
            with torch.inference_mode():
                embedding = None
                low_res, scores = [], []
                for obj in self._objects.values():
                    out = obj.cond.get(frame_idx)
                    if out is None:
                        if embedding is None:
                            embedding = self._features(frame_idx)
                        out = tracker.track_step(
                            decoder,
                            frame_idx,
                            embedding.image_embed,
                            embedding.high_res_feats,
                            is_init_cond_frame=False,
                            cond_outputs=obj.cond,
                            non_cond_outputs=obj.memory_bank(),
                            num_frames=self.num_frames,
                            reverse=reverse,
                        )
                        obj.non_cond[frame_idx] = out
                    obj.tracked[frame_idx] = True
                    obj.tracked_reverse[frame_idx] = reverse
                    self._evict(obj, frame_idx, reverse)
                    low_res.append(out.pred_masks)
                    scores.append(out.object_score_logits)
                result = self._result(frame_idx, low_res, scores)
            yield result

    def _preflight(self) -> None:
        """Encode the memories of newly prompted frames and file them (Meta's preflight)."""
        if not self._objects:
            raise InvalidInputError("no objects: add points, a box or a mask first")
        for obj in self._objects.values():
            for temp, store in ((obj.temp_non_cond, obj.non_cond), (obj.temp_cond, obj.cond)):
                for frame_idx, out in temp.items():
                    if out.maskmem_features is None:
                        embedding = self._features(frame_idx)
                        out.maskmem_features = self.model.tracker.memory_for_output(
                            embedding.image_embed, out
                        )
                    store[frame_idx] = out
                temp.clear()
            if not obj.cond:
                raise InvalidInputError(
                    f"object {obj.obj_id} has no prompts; add some or remove the object"
                )
            for frame_idx in obj.cond:
                obj.non_cond.pop(frame_idx, None)
                slot = frame_idx % len(obj.ring_frames)
                if int(obj.ring_frames[slot]) == frame_idx:
                    obj.ring_frames[slot] = -1

    def _evict(self, obj: _ObjectState, frame_idx: int, reverse: bool) -> None:
        """Keep only what a next step from ``frame_idx`` can read (see the module doc)."""
        keep_memory = NUM_MASKMEM - 2  # frames 0..5 behind: the next frame's 6 memories
        keep_pointer = MAX_OBJ_PTRS - 2  # frames 0..14 behind: its 15 pointers
        def behind(t: int) -> int:
            return t - frame_idx if reverse else frame_idx - t

        for slot, t in enumerate(obj.ring_frames.tolist()):
            if t >= 0 and not keep_memory < behind(t) <= keep_pointer:
                obj.ring_frames[slot] = -1
        for t in list(obj.non_cond):
            distance = behind(t)
            out = obj.non_cond.pop(t)
            if 0 <= distance <= keep_memory:
                obj.non_cond[t] = out
            elif keep_memory < distance <= keep_pointer:
                obj.to_ring(t, out)

    # ---------------------------------------------------------------- outputs

    def _features(self, frame_idx: int) -> ImageEmbedding:
        embedding = self.frames.features(frame_idx)
        return embedding.to(self.model.device, torch.float32)

    def _consolidated(self, frame_idx: int, temp_key: str) -> FrameResult:
        low_res, scores = [], []
        for obj in self._objects.values():
            out = obj.lookup(frame_idx, obj.stores()[temp_key])
            if out is None or out.pred_masks is None:
                low_res.append(None)
                scores.append(None)
            else:
                low_res.append(out.pred_masks)
                scores.append(out.object_score_logits)
        return self._result(frame_idx, low_res, scores)

    def _result(
        self,
        frame_idx: int,
        low_res: list[torch.Tensor | None],
        scores: list[torch.Tensor | None],
    ) -> FrameResult:
        height, width = self.video_hw
        device = self.model.device
        filler = torch.full((1, 1, 256, 256), NO_OBJ_SCORE, device=device)
        stacked = torch.cat([m.float() if m is not None else filler for m in low_res]) \
            if low_res else torch.zeros((0, 1, 256, 256), device=device)
        logits = F.interpolate(stacked, size=(height, width), mode="bilinear",
                               align_corners=False) if low_res else \
            torch.zeros((0, 1, height, width), device=device)
        score_values = [
            float(s.reshape(-1)[0]) if s is not None else NO_OBJ_SCORE for s in scores
        ]
        return FrameResult(
            frame_idx=frame_idx,
            obj_ids=self.obj_ids,
            logits=logits[:, 0].cpu().numpy().astype(np.float32, copy=False),
            object_score_logits=np.asarray(score_values, dtype=np.float32),
            low_res_logits=stacked[:, 0].cpu().numpy().astype(np.float32, copy=False),
        )

    # ---------------------------------------------------------------- serialisation

    def to_bytes(self) -> bytes:
        """The whole tracking state (not the frames), checksummed; see ``SESSION_FORMAT``."""
        table = _TensorTable()
        objects = []
        for obj in self._objects.values():
            entries = []
            for store_name, store in obj.stores().items():
                for frame_idx, out in store.items():
                    names = {
                        key: table.add(tensor)
                        for key, tensor in _output_tensors(out).items()
                        if tensor is not None
                    }
                    entries.append({"store": store_name, "frame": frame_idx, "tensors": names})
            points = [
                {"frame": f, "coords": table.add(c), "labels": table.add(lab)}
                for f, (c, lab) in obj.points.items()
            ]
            objects.append({
                "obj_id": obj.obj_id,
                "ring": [table.add(obj.ring_frames), table.add(obj.ring_ptrs),
                         table.add(obj.ring_scores)],
                "points": points,
                "mask_frames": sorted(obj.mask_frames),
                "tracked": np.flatnonzero(obj.tracked).tolist(),
                "tracked_reverse": np.flatnonzero(obj.tracked_reverse).tolist(),
                "entries": entries,
            })
        metadata = {
            "kind": "video_session",
            "model_id": self.model.model_id,
            "num_frames": self.num_frames,
            "video_hw": list(self.video_hw),
            "objects": objects,
        }
        return _pack(metadata, table)

    @classmethod
    def from_bytes(
        cls,
        model: Sam2VideoModel,
        frames: Sequence[np.ndarray] | Sequence[ImageEmbedding] | FrameSource,
        data: bytes,
    ) -> VideoSession:
        """Continue a session saved by ``to_bytes`` (possibly in another process)."""
        metadata, tensors = _unpack(data)
        if metadata.get("kind") != "video_session":
            raise CorruptEntryError(f"not a video session: kind {metadata.get('kind')!r}")
        if metadata["model_id"] != model.model_id:
            raise InvalidInputError(
                f"session of {metadata['model_id']} cannot continue on {model.model_id}"
            )
        session = cls(model, model.frame_source(frames))
        if metadata["num_frames"] != session.num_frames or \
                tuple(metadata["video_hw"]) != session.video_hw:
            raise InvalidInputError(
                f"session was for {metadata['num_frames']} frames of {metadata['video_hw']}, "
                f"given {session.num_frames} frames of {list(session.video_hw)}"
            )
        device = model.device

        def get(name: str | None) -> torch.Tensor | None:
            return None if name is None else tensors[name].to(device)

        for item in metadata["objects"]:
            obj = session._new_object(int(item["obj_id"]))
            ring_frames, ring_ptrs, ring_scores = (get(name) for name in item["ring"])
            obj.ring_frames, obj.ring_ptrs, obj.ring_scores = ring_frames.cpu(), ring_ptrs, \
                ring_scores
            for point in item["points"]:
                obj.points[int(point["frame"])] = (get(point["coords"]), get(point["labels"]))
            obj.mask_frames = {int(f) for f in item["mask_frames"]}
            obj.tracked[item["tracked"]] = True
            obj.tracked_reverse[item["tracked_reverse"]] = True
            stores = obj.stores()
            for entry in item["entries"]:
                names = entry["tensors"]
                stores[entry["store"]][int(entry["frame"])] = FrameOutput(
                    maskmem_features=get(names.get("maskmem_features")),
                    pred_masks=get(names.get("pred_masks")),
                    obj_ptr=get(names["obj_ptr"]),
                    object_score_logits=get(names["object_score_logits"]),
                )
            session._objects[obj.obj_id] = obj
        return session


# ---------------------------------------------------------------------------------------
# byte format

SESSION_FORMAT = """
Layout (little-endian), the house style of ``sam2_shared.store.codec``::

    0     8  magic            b"SAM2VSES"
    8     2  format_version   uint16, currently 1
    10    2  reserved         0
    12    4  metadata_nbytes  uint32
    16    4  metadata_crc32   uint32 (zlib.crc32 of the JSON block)
    20    M  metadata         UTF-8 JSON
    20+M  P  payload          raw tensors back to back (C order)

Metadata: kind "video_session", model_id, num_frames, video_hw, objects (ids, prompts,
tracked frames, memory-bank entries naming their tensors), tensors ({name, dtype, shape,
offset, nbytes}; bfloat16 travels as its raw 2 bytes), payload_nbytes, payload_sha256.
"""

SESSION_MAGIC = b"SAM2VSES"
SESSION_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHII")
_MAX_METADATA_NBYTES = 16 * 1024 * 1024
_DTYPES = {
    "float32": (torch.float32, np.dtype("<f4")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "int32": (torch.int32, np.dtype("<i4")),
}


class _TensorTable:
    def __init__(self) -> None:
        self.arrays: list[tuple[str, str, np.ndarray]] = []

    def add(self, tensor: torch.Tensor) -> str:
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int32: "int32"}.get(
            tensor.dtype
        )
        if dtype is None:
            raise ValueError(f"cannot serialise tensors of dtype {tensor.dtype}")
        cpu = tensor.detach().to("cpu").contiguous()
        if dtype == "bfloat16":
            cpu = cpu.view(torch.int16)
        name = f"t{len(self.arrays)}"
        self.arrays.append((name, dtype, np.ascontiguousarray(cpu.numpy(), _DTYPES[dtype][1])))
        return name


def _pack(metadata: dict[str, Any], table: _TensorTable) -> bytes:
    digest = hashlib.sha256()
    described, offset = [], 0
    for name, dtype, array in table.arrays:
        digest.update(memoryview(array).cast("B"))
        described.append({"name": name, "dtype": dtype, "shape": list(array.shape),
                          "offset": offset, "nbytes": array.nbytes})
        offset += array.nbytes
    metadata = {
        **metadata,
        "format_version": SESSION_FORMAT_VERSION,
        "tensors": described,
        "payload_nbytes": offset,
        "payload_sha256": digest.hexdigest(),
    }
    meta_bytes = json.dumps(metadata, separators=(",", ":"), sort_keys=True).encode()
    header = _HEADER.pack(
        SESSION_MAGIC, SESSION_FORMAT_VERSION, 0, len(meta_bytes), zlib.crc32(meta_bytes)
    )
    return b"".join([header, meta_bytes, *(memoryview(a).cast("B") for _, _, a in table.arrays)])


def _unpack(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise CorruptEntryError("video session blob is truncated (no header)")
    magic, version, _, meta_nbytes, meta_crc = _HEADER.unpack_from(view)
    if magic != SESSION_MAGIC:
        raise CorruptEntryError("not a video session blob (bad magic)")
    if version != SESSION_FORMAT_VERSION:
        raise CorruptEntryError(
            f"video session format {version} is not supported (this build reads "
            f"{SESSION_FORMAT_VERSION})"
        )
    if meta_nbytes > _MAX_METADATA_NBYTES or _HEADER.size + meta_nbytes > len(view):
        raise CorruptEntryError("video session metadata is truncated or too large")
    meta_bytes = bytes(view[_HEADER.size : _HEADER.size + meta_nbytes])
    if zlib.crc32(meta_bytes) != meta_crc:
        raise CorruptEntryError("video session metadata failed its CRC32 check")
    try:
        metadata = json.loads(meta_bytes)
    except ValueError as exc:
        raise CorruptEntryError(f"video session metadata is not JSON: {exc}") from None
    payload = view[_HEADER.size + meta_nbytes :]
    if len(payload) != metadata.get("payload_nbytes"):
        raise CorruptEntryError(
            f"video session payload has {len(payload)} bytes, expected "
            f"{metadata.get('payload_nbytes')}"
        )
    if hashlib.sha256(payload).hexdigest() != metadata.get("payload_sha256"):
        raise CorruptEntryError("video session payload failed its SHA-256 check")
    tensors = {}
    for item in metadata["tensors"]:
        torch_dtype, np_dtype = _DTYPES[item["dtype"]]
        start, nbytes = item["offset"], item["nbytes"]
        array = np.frombuffer(payload[start : start + nbytes], dtype=np_dtype).reshape(
            item["shape"]
        )
        tensor = torch.from_numpy(array.copy())
        tensors[item["name"]] = tensor.view(torch.bfloat16) if item["dtype"] == "bfloat16" \
            else tensor.to(torch_dtype)
    return metadata, tensors
