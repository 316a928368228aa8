"""``Tracker``: the decoder tier's video tracking sessions, without gRPC.

A session is a ``VideoSession`` over frame embeddings that the encoder tier stored
(``EmbedImages`` with ``video_frame``), loaded from the shared store on demand. After every
change its state (``VideoSession.to_state``) is written to the store (one entry in the store's
byte format, ``EmbeddingStore.put_session``) with an idle TTL, next to a small revision, so
any replica can continue it: a replica without the session, or
with an older revision than the store's, loads it from there. Sessions idle for
``session_ttl_s`` expire in the store (TTL) and in memory (checked on access, LRU bound).

Concurrency: one caller drives a session at a time (a per-session lock, held for the whole
of a propagation); different sessions run in parallel on worker threads.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from decoder_service.video_upload import (
    DEFAULT_MAX_VIDEO_FRAMES,
    FrameSpool,
    FrameUpload,
    VideoFile,
    read_frame_ids,
)
from sam2_shared.embedding import ImageEmbedding, check_id_namespace, namespace_of_id, scope_id
from sam2_shared.errors import (
    CorruptEntryError,
    EmbeddingNotFoundError,
    InvalidInputError,
    ResourceExhaustedError,
    SessionBusyError,
    SessionNotFoundError,
    UnknownModelError,
)
from sam2_shared.inference.video import FrameResult, FrameSource, Sam2VideoModel, VideoSession
from sam2_shared.store import EmbeddingStore
from sam2_shared.units import MIB

logger = logging.getLogger(__name__)

MAX_FRAMES = 100_000
MAX_OBJECTS = 64  # objects per session: each holds ~5.5 MiB of state
MAX_PROMPTED_FRAMES = 64  # frames with prompts per object: each is a conditioning memory


@dataclass
class _LiveSession:
    session_id: str
    frame_ids: list[str]
    session: VideoSession
    revision: int = 0
    stored_bytes: int = 0  # tensor bytes of the last saved state
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bytes of cached frame features and tracking state, as of the last measure(): only the
    # lock holder may walk the session (another thread may be changing it).
    held: int = 0

    def measure(self) -> int:
        """Measure ``held`` (call with the lock held)."""
        self.held = self.session.frames.cached_nbytes() + self.session.state_nbytes()
        return self.held


class Propagation:
    """One running propagation: ``step()`` tracks the next frame (None at the end);
    ``close()`` (always call it, also after a cancellation) saves the state and frees the
    session for the next caller. ``close`` waits for a ``step`` running on another thread
    (a cancelled call's last frame) to finish."""

    def __init__(self, tracker: Tracker, live: _LiveSession, frames: Any) -> None:
        self._tracker = tracker
        self._live = live
        self._frames = frames
        self._closed = False
        self._stepping = threading.Lock()
        self.frames_done = 0

    def step(self) -> FrameResult | None:
        with self._stepping:
            if self._closed:
                return None
            result = next(self._frames, None)
            if result is not None:
                self.frames_done += 1
            return result

    def close(self) -> None:
        with self._stepping:
            if self._closed:
                return
            self._closed = True
            try:
                self._frames.close()
                # Saved even after 0 frames: starting a propagation files the new prompts'
                # memories (the session's preflight), a change another replica must see.
                self._tracker._save(self._live)
            finally:
                self._live.lock.release()


class Tracker:
    """Video tracking sessions over stored frame embeddings.

    Arguments:
        model: the tracker network (``Sam2VideoModel``, no encoder needed).
        store: the shared store with the frame embeddings; sessions are saved there too.
        session_ttl_s: idle time after which a session expires.
        max_live_sessions: most sessions kept in memory (least recently used leave first;
            they stay in the store).
        frame_cache_size: frame embeddings kept in memory per session (16 MiB each).
        max_objects: most objects one session tracks.
        max_prompted_frames: most frames one object may have prompts on (every prompted
            frame is kept as a conditioning memory and attended to on every frame).
        memory_budget_bytes: most bytes (cached frames and state) live sessions hold
            together; beyond it the least recently used idle sessions leave memory (they
            are in the store and reload on next use), and a session that alone holds more
            is refused RESOURCE_EXHAUSTED for prompts and propagation.
    """

    def __init__(
        self,
        model: Sam2VideoModel,
        store: EmbeddingStore,
        *,
        session_ttl_s: float = 1800.0,
        max_live_sessions: int = 16,
        frame_cache_size: int = 2,
        max_objects: int = MAX_OBJECTS,
        max_prompted_frames: int = MAX_PROMPTED_FRAMES,
        memory_budget_bytes: int = 1024 * MIB,
        max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
        max_video_pixels: int = 100_000_000,
    ) -> None:
        self.model = model
        self.store = store
        self.session_ttl_s = float(session_ttl_s)
        self.max_live_sessions = max(1, int(max_live_sessions))
        self.frame_cache_size = max(1, int(frame_cache_size))
        self.max_objects = max(1, int(max_objects))
        self.max_prompted_frames = max(1, int(max_prompted_frames))
        self.memory_budget_bytes = max(1, int(memory_budget_bytes))
        self.sessions_evicted = 0  # left memory for the budget (still in the store)
        self._live: OrderedDict[str, _LiveSession] = OrderedDict()
        self._guard = threading.Lock()  # protects _live
        self.sessions_loaded = 0  # sessions continued from the store (moved or evicted)
        self.sessions_refused = 0  # stored sessions naming frames outside their namespace
        self.max_video_frames = max(1, int(max_video_frames))
        self.max_video_pixels = max(1, int(max_video_pixels))
        # Sessions over uploaded videos whose frames are still being embedded (or failed to).
        self._uploads: dict[str, FrameUpload] = {}

    @property
    def model_id(self) -> str:
        return self.model.model_id

    # ------------------------------------------------------------------ sessions

    def start(self, model_id: str, frame_ids: Sequence[str], namespace: str = ""
              ) -> tuple[str, int, tuple[int, int]]:
        """A new session; returns its id, frame count and (H, W)."""
        self._check_model(model_id)
        ids = [str(i) for i in frame_ids]
        if not ids:
            raise InvalidInputError("no frames: send frame embedding ids or a video")
        if len(ids) > MAX_FRAMES:
            raise InvalidInputError(f"{len(ids)} frames; at most {MAX_FRAMES} per session")
        for frame_id in ids:
            check_id_namespace(frame_id, namespace)
        first = self._load_frame(ids[0])
        for index, frame_id in enumerate(ids[1:], start=1):
            if not self.store.has_embedding(frame_id):
                raise EmbeddingNotFoundError(
                    f"frame {index}: embedding {frame_id!r} is not stored; embed the frame "
                    "with video_frame set first", embedding_id=frame_id)
        return self._new_session(ids, first.original_hw, namespace)

    def start_video(self, model_id: str, data: bytes, namespace: str = ""
                    ) -> tuple[str, int, tuple[int, int], VideoFile, FrameUpload]:
        """A new session over an encoded video whose frames are not embedded yet.

        Reads the video once (bounded) for its frames' ids; the caller then has the encoder
        embed them (``video_upload.embed_frames`` with the returned file and upload), and
        tracking waits for frames not stored yet. Returns the session's id, frame count,
        (H, W), the video file and the upload.
        """
        self._check_model(model_id)
        video = VideoFile(data, max_frames=min(self.max_video_frames, MAX_FRAMES),
                          max_pixels=self.max_video_pixels)
        try:
            ids, video_hw = read_frame_ids(video, model_id, namespace)
            upload = FrameUpload(ids)
            session_id, count, video_hw = self._new_session(ids, video_hw, namespace, upload)
        except BaseException:
            video.close()
            raise
        return session_id, count, video_hw, video, upload

    def frame_spool(self, model_id: str, namespace: str = "") -> FrameSpool:
        """Somewhere to stream a video's frames into (``FrameSpool.add``), within the bounds
        of a video file; pass it to ``start_frames`` then, or close it."""
        self._check_model(model_id)
        return FrameSpool(model_id, namespace, max_frames=min(self.max_video_frames, MAX_FRAMES),
                          max_pixels=self.max_video_pixels)

    def start_frames(self, spool: FrameSpool, upload: FrameUpload
                     ) -> tuple[str, int, tuple[int, int]]:
        """A new session over the streamed frames, which the caller has the encoder embed
        from ``spool`` into ``upload`` (``video_upload.embed_frames``, already while they
        arrived): tracking waits for frames not stored yet, as with ``start_video``. Returns
        the session's id, frame count and (H, W)."""
        return self._new_session(list(spool.ids), spool.size, spool.namespace, upload)

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise UnknownModelError(
                f"this decoder tracks with {self.model_id!r}, not {model_id or '(empty)'!r}",
                served_model_id=self.model_id,
            )

    def _new_session(self, ids: list[str], video_hw: tuple[int, int], namespace: str,
                     upload: FrameUpload | None = None) -> tuple[str, int, tuple[int, int]]:
        session_id = scope_id(namespace, uuid.uuid4().hex)
        session = VideoSession(self.model, self._frame_source(session_id, ids, video_hw))
        live = _LiveSession(session_id, ids, session)
        with live.lock:
            self._remember(live)
            self._save(live)
        if upload is not None:
            # Registered once the session is in the store (pruning drops uploads of sessions
            # not stored) and before its id is returned (no frame is loaded before).
            self._prune_uploads()
            upload.session_id = session_id
            with self._guard:
                self._uploads[session_id] = upload
        return session_id, session.num_frames, session.video_hw

    def add_prompt(
        self,
        session_id: str,
        frame_idx: int,
        obj_id: int,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        keep_old_points: bool = False,
        mask: np.ndarray | None = None,
        namespace: str = "",
    ) -> FrameResult:
        """Points and/or a box, or a mask, for one object on one frame."""
        has_points = points is not None and len(points) > 0
        if mask is not None:
            if has_points or box is not None:
                raise InvalidInputError("a prompt is either a mask or points and/or a box")
        elif not has_points and box is None:
            raise InvalidInputError("empty prompt: send points, a box or a mask",
                                    reason="EMPTY_PROMPT")
        live = self._acquire(session_id, namespace, grows=True)
        try:
            known = live.session.obj_ids
            if obj_id not in known and len(known) >= self.max_objects:
                raise InvalidInputError(
                    f"session {session_id!r} already tracks {len(known)} objects, the most "
                    f"allowed; remove one first", limit=str(self.max_objects))
            prompted = live.session.prompted_frames(obj_id)
            if frame_idx not in prompted and len(prompted) >= self.max_prompted_frames:
                raise InvalidInputError(
                    f"object {obj_id} already has prompts on {len(prompted)} frames, the most "
                    "allowed; refine one of those frames or remove the object",
                    limit=str(self.max_prompted_frames))
            if mask is not None:
                result = live.session.add_mask(frame_idx, obj_id, mask)
            else:
                result = live.session.add_points(
                    frame_idx, obj_id, points if has_points else None,
                    labels if has_points else None, box, clear_old_points=not keep_old_points,
                )
            self._save(live)
            return result
        finally:
            live.lock.release()

    def video_size(self, session_id: str, namespace: str = "") -> tuple[int, int]:
        """The session's (height, width): the one size a mask prompt may have."""
        live = self._acquire(session_id, namespace)
        try:
            return live.session.video_hw
        finally:
            live.lock.release()

    def propagate(self, session_id: str, start_frame_idx: int | None = None,
                  max_frames: int | None = None, reverse: bool = False,
                  namespace: str = "") -> Propagation:
        """Start tracking; the caller steps it frame by frame and must ``close()`` it."""
        live = self._acquire(session_id, namespace, grows=True)
        try:
            frames = live.session.propagate(start_frame_idx, max_frames, reverse)
        except BaseException:
            live.lock.release()
            raise
        return Propagation(self, live, iter(frames))

    def remove_object(self, session_id: str, obj_id: int, namespace: str = "") -> list[int]:
        """Drop an object; returns the remaining object ids."""
        live = self._acquire(session_id, namespace)
        try:
            remaining, _ = live.session.remove_object(obj_id)
            self._save(live)
            return remaining
        finally:
            live.lock.release()

    def reset(self, session_id: str, namespace: str = "") -> None:
        live = self._acquire(session_id, namespace)
        try:
            live.session.reset()
            self._save(live)
        finally:
            live.lock.release()

    def close(self, session_id: str, namespace: str = "") -> None:
        """End a session here and in the store."""
        live = self._acquire(session_id, namespace)
        try:
            with self._guard:
                self._live.pop(session_id, None)
            self._drop_upload(session_id, "was closed")
            self.store.delete_session(session_id)
        finally:
            live.lock.release()

    def upload_count(self) -> int:
        """Uploads some session may still wait for (in progress, or failed)."""
        with self._guard:
            return len(self._uploads)

    def live_session_count(self) -> int:
        with self._guard:
            return len(self._live)

    def stored_bytes(self) -> int:
        """Bytes of the live sessions' tracking state as last saved to the store."""
        with self._guard:
            return sum(live.stored_bytes for live in self._live.values())

    def held_bytes(self) -> int:
        """Bytes the live sessions hold (cached frame features and tracking state)."""
        with self._guard:
            return sum(live.held for live in self._live.values())

    # ------------------------------------------------------------------ internals

    def _check_session_id(self, session_id: str, namespace: str) -> None:
        if not session_id or len(session_id) > 256 or namespace_of_id(session_id) != namespace:
            raise SessionNotFoundError(f"no tracking session {session_id!r}; start one",
                                       session_id=session_id)

    def _acquire(self, session_id: str, namespace: str, *, grows: bool = False) -> _LiveSession:
        """The session, current with the store, with its lock held, within the memory
        budget (``grows``: the call adds state, so a session over the budget alone is
        refused; removing, resetting and closing always work)."""
        self._check_session_id(session_id, namespace)
        live = self._lookup(session_id)
        revision = self._stored_revision(session_id)
        if revision is None:  # expired or closed elsewhere
            self._forget(session_id)
            self._drop_upload(session_id, "expired")
            raise SessionNotFoundError(
                f"tracking session {session_id!r} is unknown or expired (idle for more than "
                f"{self.session_ttl_s:g} s); start a new one", session_id=session_id)
        if live is None or live.revision != revision:
            live = self._load(session_id)
            self._remember(live)
        # Never wait for another caller: a propagation holds the session for its whole run,
        # and a blocked worker thread per waiting call would hang the tier.
        if not live.lock.acquire(blocking=False):
            raise SessionBusyError(
                f"tracking session {session_id!r} is busy (a propagation is running); cancel "
                "it or wait for it to finish, then retry", session_id=session_id)
        live.last_used = time.monotonic()
        try:
            self._fit_budget(live, refuse=grows)
        except BaseException:
            live.lock.release()
            raise
        return live

    def _fit_budget(self, keep: _LiveSession, refuse: bool) -> None:
        """Drop least recently used idle sessions until the live ones fit the budget
        (``keep``, whose lock the caller holds, is measured afresh)."""
        own = keep.measure()
        with self._guard:
            total = sum(v.held for v in self._live.values() if v is not keep) + own
            for sid in [s for s, v in self._live.items() if v is not keep]:
                if total <= self.memory_budget_bytes:
                    break
                if self._live[sid].lock.locked():  # in use: cannot leave memory now
                    continue
                total -= self._live.pop(sid).held
                self.sessions_evicted += 1
        if refuse and own > self.memory_budget_bytes:
            raise ResourceExhaustedError(
                f"tracking session {keep.session_id!r} holds {own / MIB:.1f} MiB, more than "
                f"this decoder's tracking memory budget of {self.memory_budget_bytes / MIB:.0f} "
                "MiB; remove objects or reset the session", session_id=keep.session_id,
                limit=str(self.memory_budget_bytes))

    def _lookup(self, session_id: str) -> _LiveSession | None:
        now = time.monotonic()
        with self._guard:
            for sid in [s for s, v in self._live.items() if now - v.last_used > self.session_ttl_s
                        and not v.lock.locked()]:
                del self._live[sid]
            live = self._live.get(session_id)
            if live is not None:
                self._live.move_to_end(session_id)
            return live

    def _remember(self, live: _LiveSession) -> None:
        with self._guard:
            self._live[live.session_id] = live
            self._live.move_to_end(live.session_id)
            while len(self._live) > self.max_live_sessions:
                oldest = next(iter(self._live))
                if self._live[oldest].lock.locked():  # in use: keep it, stop evicting
                    break
                del self._live[oldest]

    def _forget(self, session_id: str) -> None:
        with self._guard:
            self._live.pop(session_id, None)

    def _prune_uploads(self) -> None:
        """Forget the uploads no session waits for: those with every frame stored, and
        those whose session expired or was closed on another replica (the store no longer
        has it), which nothing else removes from a long-running server."""
        with self._guard:
            uploads = list(self._uploads.items())
        for session_id, upload in uploads:
            if upload.finished and not upload.failed:
                with self._guard:
                    if self._uploads.get(session_id) is upload:
                        del self._uploads[session_id]
            elif self._stored_revision(session_id) is None:
                self._drop_upload(session_id, "expired")

    def _drop_upload(self, session_id: str, why: str) -> None:
        """Forget the session's upload; one still running is failed, which stops its
        embedding (``embed_frames`` sends no frame after a failure)."""
        with self._guard:
            upload = self._uploads.pop(session_id, None)
        if upload is not None and not upload.finished:
            upload.fail(SessionNotFoundError(
                f"tracking session {session_id!r} {why} before its video was embedded",
                session_id=session_id))

    def _stored_revision(self, session_id: str) -> int | None:
        return self.store.session_revision(session_id)

    def _save(self, live: _LiveSession) -> None:
        """Save the state as the next revision (compare-and-set, with the idle TTL).

        When the save fails (another replica saved first: ``SessionConflictError``, or the
        store is down) this copy is dropped, so the next call reloads what the store holds.
        """
        state, tensors = live.session.to_state()
        tracking = {"model_id": self.model_id, "frame_ids": live.frame_ids,
                    "video_hw": list(live.session.video_hw)}
        try:
            self.store.put_session(live.session_id, state, tensors, tracking,
                                   live.revision + 1, self.session_ttl_s)
        except BaseException:
            self._forget(live.session_id)
            raise
        live.revision += 1
        live.stored_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
        self._fit_budget(live, refuse=False)  # it may have grown

    def _load(self, session_id: str) -> _LiveSession:
        stored = self.store.get_session(session_id)
        if stored is None:
            raise SessionNotFoundError(f"tracking session {session_id!r} is unknown or expired",
                                       session_id=session_id)
        state, tensors, tracking = stored
        try:
            frame_ids = [str(i) for i in tracking["frame_ids"]]
            height, width = (int(v) for v in tracking["video_hw"])
            revision = int(tracking["revision"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptEntryError(f"tracking session {session_id!r}: {exc!r}") from None
        # A stored session naming another tenant's frames is refused, not used: whoever
        # wrote it must not get this tenant's caller to read those frames.
        namespace = namespace_of_id(session_id)
        if any(namespace_of_id(frame_id) != namespace for frame_id in frame_ids):
            self.sessions_refused += 1
            logger.warning("tracking session %s names frames outside its namespace: refused",
                           session_id)
            raise SessionNotFoundError(f"tracking session {session_id!r} is unknown or expired",
                                       session_id=session_id)
        frames = self._frame_source(session_id, frame_ids, (height, width))
        session = VideoSession.from_state(self.model, frames, state, tensors)
        self.sessions_loaded += 1
        logger.info("tracking session %s loaded from the store (revision %d)", session_id,
                    revision)
        return _LiveSession(session_id, frame_ids, session, revision=revision)

    def _frame_source(self, session_id: str, frame_ids: Sequence[str],
                      video_hw: tuple[int, int]) -> FrameSource:
        ids = list(frame_ids)

        def load(index: int) -> ImageEmbedding:
            upload = self._uploads.get(session_id)
            if upload is not None:
                upload.wait(index)  # the frame may still be on its way to the store
            return self._load_frame(ids[index])

        return FrameSource(len(ids), video_hw, load, cache_size=self.frame_cache_size)

    def _load_frame(self, frame_id: str) -> ImageEmbedding:
        embedding = self.store.get_embedding(frame_id, self.model_id)
        if embedding is None:
            raise EmbeddingNotFoundError(
                f"frame embedding {frame_id!r} is not stored (expired?); embed the frame "
                "with video_frame set again", embedding_id=frame_id)
        return embedding.to(self.model.device, torch.float32)
