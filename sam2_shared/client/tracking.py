"""``Sam2TrackingClient``: video tracking through the tiers (frames embedded by the encoder
tier with video preprocessing, sessions in the decoder tier's ``sam2.v1.TrackingService``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sam2_shared import wire
from sam2_shared.api.v1 import tracking_pb2, tracking_pb2_grpc
from sam2_shared.client import Sam2Client
from sam2_shared.errors import SessionBusyError
from sam2_shared.wire.status import error_from_rpc_error
from sam2_shared.wire.tracking import (
    TrackedFrame,
    tracked_frame_from_proto,
    tracking_prompt_to_proto,
)


@dataclass(frozen=True)
class TrackingSession:
    """A tracking session as ``StartSession`` answered it."""

    session_id: str
    frame_count: int
    video_hw: tuple[int, int]
    frame_embedding_ids: tuple[str, ...] = ()


# A busy session (a propagation still finishing its frame, e.g. right after a cancel) answers
# at once with ABORTED SESSION_BUSY; the client asks again, every BUSY_RETRY_S, within its
# deadline. Nothing was applied by a refused call, so asking again is safe.
BUSY_RETRY_S = 0.1
PROPAGATE_TIMEOUT_S = 3600.0  # a whole Propagate stream (cancel() ends it sooner)
UPLOAD_TIMEOUT_S = 600.0  # least time a StartSessionFromFrames stream may take


def _session_from_proto(response: Any) -> TrackingSession:
    """``StartSessionResponse`` or ``StartSessionFromFramesResponse`` (the same fields)."""
    return TrackingSession(response.session_id, response.frame_count,
                           (response.height_px, response.width_px),
                           tuple(response.frame_embedding_ids))


class PropagationStream:
    """Iterator over ``Propagate``'s frames; ``cancel()`` (or leaving the iteration early
    through ``close()`` / a ``with`` block) cancels the call, and the server stops."""

    def __init__(self, start: Callable[[], Any], deadline: float) -> None:
        self._start = start
        self._deadline = deadline
        self._call = start()
        self._started = False

    def __iter__(self) -> PropagationStream:
        return self

    def __next__(self) -> TrackedFrame:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                error = error_from_rpc_error(exc)
                if not self._started and isinstance(error, SessionBusyError) \
                        and time.monotonic() + BUSY_RETRY_S < self._deadline:
                    time.sleep(BUSY_RETRY_S)
                    self._call = self._start()
                    continue
                raise error from None
            self._started = True
            return tracked_frame_from_proto(message.frame)

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> PropagationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class Sam2TrackingClient(Sam2Client):
    """``Sam2Client`` plus video tracking: frames are embedded by the encoder tier
    (video preprocessing), sessions run in the decoder tier (``sam2.v1.TrackingService``).

    Same arguments as ``Sam2Client``; ``decoder`` is required. Calls that change a session
    are not retried (a retry could apply a prompt twice).
    """

    def __init__(self, encoder: str | None = None, decoder: str | None = None,
                 **kwargs: Any) -> None:
        if decoder is None:
            raise ValueError("tracking needs the decoder address (host:port)")
        super().__init__(encoder, decoder, **kwargs)

        self._tracking = tracking_pb2_grpc.TrackingServiceStub(self._channels[-1])

    def _once(self, method: Any, request: Any) -> Any:
        """A session call: not retried on transport errors (it could apply twice), but asked
        again while the session is busy (a refused call applied nothing)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()),
                              metadata=self._metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc_error(exc)
                if isinstance(error, SessionBusyError) \
                        and time.monotonic() + BUSY_RETRY_S < deadline:
                    time.sleep(BUSY_RETRY_S)
                    continue
                raise error from None

    def embed_frames(self, frames: Sequence[np.ndarray], frames_per_call: int = 4) -> list[str]:
        """Embed HxWx3 uint8 RGB frames as video frames; returns their embedding ids in
        order. Frames already stored cost no encoder work."""
        return [ref.embedding_id for ref in self.embed_video_frames(frames, frames_per_call)]

    def start_session(self, frame_embedding_ids: Sequence[str] | None = None, *,
                      video: str | os.PathLike | bytes | None = None,
                      frames: Iterable[np.ndarray | bytes] | None = None) -> TrackingSession:
        """A new session over one of:

        - ``frame_embedding_ids``: frames already embedded (``embed_frames``), in video order;
        - ``video``: a video file (a path or its bytes: MP4, WebM, MOV ...) that the decoder
          has its encoder embed in the background (prompts and propagation wait for frames
          not embedded yet);
        - ``frames``: the frames in order, streamed to the decoder one per message
          (``StartSessionFromFrames``): HxWx3 uint8 RGB arrays or encoded images (JPEG/PNG
          bytes; smaller on the wire), from any iterable (a generator is read as it is
          sent); the decoder has its encoder embed them as they arrive, as for ``video``.

        The session's ``frame_embedding_ids`` can start later sessions."""

        if sum(source is not None for source in (frame_embedding_ids, video, frames)) != 1:
            raise ValueError("pass exactly one of frame_embedding_ids, video or frames")
        if frames is not None:
            return self._stream_frames(frames)
        request = tracking_pb2.StartSessionRequest(model_id=self.model_id)
        if video is None:
            request.frame_embedding_ids.extend(frame_embedding_ids or ())
        else:
            request.video = video if isinstance(video, bytes) else Path(video).read_bytes()
        return _session_from_proto(self._once(self._tracking.StartSession, request))

    def _stream_frames(self, frames: Iterable[np.ndarray | bytes]) -> TrackingSession:
        """``StartSessionFromFrames``: not retried (the frames may come from a generator)."""

        def messages() -> Iterator[tracking_pb2.StartSessionFromFramesRequest]:
            yield tracking_pb2.StartSessionFromFramesRequest(model_id=self.model_id)
            for frame in frames:
                image = frame if isinstance(frame, bytes) else np.ascontiguousarray(frame)
                self.stats.add(images_uploaded=1)
                yield tracking_pb2.StartSessionFromFramesRequest(
                    frame=wire.image_to_proto(image, "rgb"))

        try:
            response = self._tracking.StartSessionFromFrames(
                messages(), timeout=max(self.timeout_s, UPLOAD_TIMEOUT_S),
                metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None
        return _session_from_proto(response)

    def add_prompt(
        self,
        session_id: str,
        frame_index: int,
        object_id: int,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask: np.ndarray | None = None,
        keep_old_points: bool = False,
    ) -> TrackedFrame:
        """Clicks (``points`` [N, 2] (x, y) pixels, ``labels`` [N] 1/0) and/or a box
        [x0, y0, x1, y1], or an HxW binary ``mask``, for an object on a frame; returns every
        object's mask on that frame."""

        request = tracking_pb2.AddPromptRequest(
            session_id=session_id, frame_index=int(frame_index), object_id=int(object_id),
            keep_old_points=keep_old_points)
        tracking_prompt_to_proto(request, points, labels, box, mask)
        return tracked_frame_from_proto(self._once(self._tracking.AddPrompt, request).frame)

    def propagate(self, session_id: str, start_frame_index: int | None = None,
                  reverse: bool = False, max_frames: int | None = None,
                  timeout_s: float | None = None) -> PropagationStream:
        """Track every object frame by frame; iterate for ``TrackedFrame``s, ``cancel()``
        to stop early. ``timeout_s`` is the deadline of the whole stream (default
        ``PROPAGATE_TIMEOUT_S``: a video takes about a second per frame and object on a
        CPU, so the client's per-call ``timeout_s`` would cut long videos off)."""

        request = tracking_pb2.PropagateRequest(session_id=session_id, reverse=reverse)
        if start_frame_index is not None:
            request.start_frame_index = int(start_frame_index)
        if max_frames is not None:
            request.max_frames = int(max_frames)
        deadline = time.monotonic() + (PROPAGATE_TIMEOUT_S if timeout_s is None else timeout_s)

        def start() -> Any:
            return self._tracking.Propagate(
                request, timeout=max(0.001, deadline - time.monotonic()),
                metadata=self._metadata)

        return PropagationStream(start, deadline)

    def remove_object(self, session_id: str, object_id: int) -> list[int]:
        """Drop an object; returns the remaining object ids."""

        response = self._once(self._tracking.RemoveObject, tracking_pb2.RemoveObjectRequest(
            session_id=session_id, object_id=int(object_id)))
        return list(response.remaining_object_ids)

    def reset_session(self, session_id: str) -> None:

        self._once(self._tracking.ResetSession,
                   tracking_pb2.ResetSessionRequest(session_id=session_id))

    def close_session(self, session_id: str) -> None:

        self._once(self._tracking.CloseSession,
                   tracking_pb2.CloseSessionRequest(session_id=session_id))
