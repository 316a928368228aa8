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

A session is not thread-safe: one caller drives it at a time. ``to_state`` /
``VideoSession.from_state`` move it between processes through the shared store (one entry in
the store's byte format); the frames are not part of the state: the new process supplies the
same frames or their stored embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import CorruptEntryError, InvalidInputError
from sam2_shared.inference.video.frames import FrameResult, FrameSource
from sam2_shared.inference.video.model import Sam2VideoModel
from sam2_shared.inference.video.state import ObjectState, output_tensors
from sam2_shared.model.tracker import MAX_OBJ_PTRS, NO_OBJ_SCORE, NUM_MASKMEM, FrameOutput

# Objects tracked in one pass: each adds ~30 MiB of activations (its 1024x1024 mask for the
# memory encoder, the decoder's upscaled maps, attention), so a session's 64 objects go in
# batches of 8 rather than all at once.
MAX_OBJECTS_PER_PASS = 8


class VideoSession:
    """Tracking state of one video: objects, prompts and bounded memory banks."""

    def __init__(self, model: Sam2VideoModel, frames: FrameSource) -> None:
        self.model = model
        self.frames = frames
        self._objects: dict[int, ObjectState] = {}

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

    def _object(self, obj_id: Any, create: bool = False) -> ObjectState:
        obj_id = self._check_obj_id(obj_id)
        if obj_id not in self._objects:
            if not create:
                raise InvalidInputError(
                    f"object {obj_id} is not in this session (objects: {self.obj_ids})",
                    reason="UNKNOWN_OBJECT",
                )
            self._objects[obj_id] = self._new_object(obj_id)
        return self._objects[obj_id]

    def _new_object(self, obj_id: int) -> ObjectState:
        return ObjectState(
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
        obj: ObjectState,
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

    def _clear_prompts(self, obj: ObjectState, frame_idx: int) -> None:
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

    def prompted_frames(self, obj_id: int) -> set[int]:
        """Frames where ``obj_id`` has clicks, a box or a mask (empty for a new object)."""
        obj = self._objects.get(obj_id)
        return set() if obj is None else set(obj.points) | obj.mask_frames

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
                tracked: dict[int, FrameOutput] = {}
                # Objects without a prompt here, grouped by memory layout: each group is
                # tracked in batches of up to MAX_OBJECTS_PER_PASS (one memory-attention and
                # decoder pass), not one pass per object.
                groups: dict[tuple, list[ObjectState]] = {}
                for obj in self._objects.values():
                    if frame_idx not in obj.cond:
                        layout = tracker.memory_layout(frame_idx, obj.cond, obj.memory_bank(),
                                                       self.num_frames, reverse)
                        groups.setdefault(layout, []).append(obj)
                embedding = self._features(frame_idx) if groups else None
                for objs in groups.values():
                    for first in range(0, len(objs), MAX_OBJECTS_PER_PASS):
                        batch = objs[first : first + MAX_OBJECTS_PER_PASS]
                        outs = tracker.track_objects(
                            decoder, frame_idx, embedding.image_embed,
                            embedding.high_res_feats,
                            [(obj.cond, obj.memory_bank()) for obj in batch],
                            num_frames=self.num_frames, reverse=reverse,
                        )
                        for obj, out in zip(batch, outs, strict=True):
                            obj.non_cond[frame_idx] = out
                            tracked[obj.obj_id] = out
                low_res, scores = [], []
                for obj in self._objects.values():
                    out = obj.cond[frame_idx] if frame_idx in obj.cond else tracked[obj.obj_id]
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

    def _evict(self, obj: ObjectState, frame_idx: int, reverse: bool) -> None:
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

    # ---------------------------------------------------------------- state out and in

    def to_state(self) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
        """The whole tracking state (not the frames) as JSON-able metadata and named tensors;
        the store writes it as one checksummed entry (``store.codec.encode_session``)."""
        tensors: list[tuple[str, torch.Tensor]] = []

        def add(tensor: torch.Tensor) -> str:
            name = f"t{len(tensors)}"
            tensors.append((name, tensor))
            return name

        objects = []
        for obj in self._objects.values():
            entries = []
            for store_name, store in obj.stores().items():
                for frame_idx, out in store.items():
                    names = {key: add(tensor) for key, tensor in output_tensors(out).items()
                             if tensor is not None}
                    entries.append({"store": store_name, "frame": frame_idx, "tensors": names})
            points = [{"frame": f, "coords": add(c), "labels": add(lab)}
                      for f, (c, lab) in obj.points.items()]
            objects.append({
                "obj_id": obj.obj_id,
                "ring": [add(obj.ring_frames), add(obj.ring_ptrs), add(obj.ring_scores)],
                "points": points,
                "mask_frames": sorted(obj.mask_frames),
                "tracked": np.flatnonzero(obj.tracked).tolist(),
                "tracked_reverse": np.flatnonzero(obj.tracked_reverse).tolist(),
                "entries": entries,
            })
        metadata = {
            "model_id": self.model.model_id,
            "num_frames": self.num_frames,
            "video_hw": list(self.video_hw),
            "objects": objects,
        }
        return metadata, tensors

    @classmethod
    def from_state(
        cls,
        model: Sam2VideoModel,
        frames: Sequence[np.ndarray] | Sequence[ImageEmbedding] | FrameSource,
        metadata: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
    ) -> VideoSession:
        """Continue a session from ``to_state``'s values (possibly in another process).

        Names the metadata gives must exist in ``tensors``; anything that does not fit is a
        ``CorruptEntryError`` (the values come from a shared store).
        """
        try:
            return cls._from_state(model, frames, metadata, tensors)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise CorruptEntryError(f"video session state does not fit: {exc!r}") from None

    @classmethod
    def _from_state(cls, model, frames, metadata, tensors) -> VideoSession:  # noqa: ANN001
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
