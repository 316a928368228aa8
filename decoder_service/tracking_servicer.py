"""``sam2.v1.TrackingService`` over ``grpc.aio``: translates protos to ``Tracker`` calls.

No model code here. Tracking runs on its own bounded pool of worker threads (never the
event loop's default executor, so busy tracking cannot starve segmentation's conversions);
``Propagate`` steps one frame per thread hop, so a cancelled call (the client went away
or cancelled) stops after the frame in flight, and the propagation is closed (state
saved, session freed) either way. Errors are domain exceptions, mapped to rich status by
the shared interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from decoder_service.servicer import next_request
from decoder_service.tracking import Tracker
from decoder_service.video_upload import (
    FrameStream,
    FrameUpload,
    VideoFile,
    embed_frames,
)
from sam2_shared import wire
from sam2_shared.api.v1 import tracking_pb2, tracking_pb2_grpc
from sam2_shared.errors import (
    FailedPreconditionError,
    InvalidInputError,
    NotReadyError,
    ResourceExhaustedError,
)
from sam2_shared.serving.auth import current_caller, current_namespace, outlive_the_call
from sam2_shared.serving.encoder_client import AsyncEncoderClient
from sam2_shared.wire.tracking import frame_to_proto, tracking_prompt_from_proto

SERVICE_NAME = tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")


class TrackingServicer(tracking_pb2_grpc.TrackingServiceServicer):
    """Serves ``tracker`` once it is set (the model loads after the server starts)."""

    def __init__(self, tracker: Tracker | None = None, workers: int = 2,
                 encoder_client: AsyncEncoderClient | None = None,
                 max_video_uploads: int = 4, upload_window: int = 2,
                 stream_idle_timeout_s: float = 0.0, max_video_uploads_per_key: int = 0,
                 thread_initializer: Callable[[], None] | None = None) -> None:
        """``thread_initializer`` runs on each tracking thread as it starts (the tier pins
        torch's thread count there)."""
        self.tracker = tracker
        self.encoder_client = encoder_client
        self.max_video_uploads = max(1, int(max_video_uploads))
        self.max_video_uploads_per_key = max(0, int(max_video_uploads_per_key))  # 0: no bound
        self.upload_window = max(1, int(upload_window))
        self.stream_idle_timeout_s = stream_idle_timeout_s  # frame streams; 0: no limit
        self.propagations_cancelled = 0
        self.frames_tracked = 0  # frames answered by Propagate
        self.frame_seconds = 0.0  # their tracking time (the step, not the answer's encoding)
        self.video_frames_embedded = 0  # uploaded videos' frames the encoder stored
        self._executor = ThreadPoolExecutor(max(1, int(workers)),
                                            thread_name_prefix="tracking",
                                            initializer=thread_initializer)
        # Upload slots, each held by the caller's API key (see _upload_slot): one entry per
        # video being received (before its embedding starts), then per video being embedded.
        self._receiving: list[str] = []
        self._uploads: dict[asyncio.Task[None], str] = {}

    async def _run(self, function: Callable[..., _Result], *args: Any, **kwargs: Any
                   ) -> _Result:
        """``function(*args, **kwargs)`` on a tracking worker thread."""
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _close_propagation(self, propagation: Any) -> None:
        """Save and free the session, also when the pool has already stopped (a stream the
        shutdown's grace period cut off ends after the pool's shutdown)."""
        try:
            await self._run(propagation.close)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            await asyncio.to_thread(propagation.close)

    async def close(self) -> None:
        """Stop the uploads and the worker threads once the server no longer takes calls."""
        for task in list(self._uploads):
            task.cancel()
        await asyncio.gather(*self._uploads, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def uploads_in_progress(self) -> int:
        return len(self._uploads)

    def register(self, server: grpc.aio.Server) -> None:
        tracking_pb2_grpc.add_TrackingServiceServicer_to_server(self, server)

    def _ready(self) -> Tracker:
        if self.tracker is None:
            raise NotReadyError("the decoder is still loading its model; retry shortly")
        return self.tracker

    async def StartSession(self, request, context) -> tracking_pb2.StartSessionResponse:
        tracker = self._ready()
        if request.video:
            return await self._start_video(tracker, request)
        ids = list(request.frame_embedding_ids)
        session_id, frame_count, (height, width) = await self._run(
            tracker.start, request.model_id, ids, current_namespace(),
        )
        return tracking_pb2.StartSessionResponse(
            session_id=session_id, frame_count=frame_count, height_px=height, width_px=width,
            frame_embedding_ids=ids,
        )

    async def _start_video(self, tracker: Tracker, request: Any
                           ) -> tracking_pb2.StartSessionResponse:
        """A session over an uploaded video; its frames go to the encoder in the background."""
        if request.frame_embedding_ids:
            raise InvalidInputError("send either frame_embedding_ids or a video, not both")
        with self._upload_slot() as caller:
            session_id, frame_count, (height, width), video, upload = await self._run(
                tracker.start_video, request.model_id, request.video, current_namespace())
            self._embed_in_background(video, upload, request.model_id, caller)
        return tracking_pb2.StartSessionResponse(
            session_id=session_id, frame_count=frame_count, height_px=height, width_px=width,
            frame_embedding_ids=upload.ids,
        )

    async def StartSessionFromFrames(self, request_iterator, context
                                     ) -> tracking_pb2.StartSessionFromFramesResponse:
        tracker = self._ready()
        requests = aiter(request_iterator)
        first = await next_request(requests, self.stream_idle_timeout_s)
        if first is None or not first.model_id:
            raise InvalidInputError("the stream's first message must name the model (model_id)")
        # A slot from here (the client sets the pace of the stream) until the embedding of
        # the frames, which starts with the first one, holds it.
        with self._upload_slot() as caller:
            spool = await self._run(tracker.frame_spool, first.model_id, current_namespace())
            stream = FrameStream(spool, self._run)
            upload = FrameUpload(spool.ids)  # grows as frames arrive
            embedding = self._embed_in_background(stream, upload, first.model_id, caller)
        try:
            message: Any = first
            while message is not None:
                if message.model_id not in ("", first.model_id):
                    raise InvalidInputError(
                        f"model_id {message.model_id!r} in a later message differs from "
                        f"the first message's {first.model_id!r}")
                if message.HasField("frame"):
                    await stream.add(*wire.image_from_proto(message.frame))
                if upload.error is not None:  # the encoder failed: no session to start
                    raise upload.error
                message = await next_request(requests, self.stream_idle_timeout_s)
            stream.end()
            session_id, frame_count, (height, width) = await self._run(
                tracker.start_frames, spool, upload)
        except BaseException:
            # No embedding left running for a stream that failed (nor its frames kept).
            stream.end()
            embedding.cancel()
            await asyncio.wait({embedding})
            stream.close()
            raise
        return tracking_pb2.StartSessionFromFramesResponse(
            session_id=session_id, frame_count=frame_count, height_px=height, width_px=width,
            frame_embedding_ids=upload.ids,
        )

    def uploads_of(self, caller: str) -> int:
        """Videos of the caller with this API key being received or embedded."""
        return self._receiving.count(caller) + sum(
            1 for holder in self._uploads.values() if holder == caller)

    @contextlib.contextmanager
    def _upload_slot(self) -> Iterator[str]:
        """Take an upload slot for the caller (refused before the video is read) and hold it
        until the embedding task started inside takes it over; yields the caller's key."""
        caller = current_caller().api_key or ""  # "" for every caller without a key
        self._check_upload_slot(caller)
        self._receiving.append(caller)
        try:
            yield caller
        finally:
            self._receiving.remove(caller)

    def _check_upload_slot(self, caller: str) -> None:
        """Refuse a video when the caller has its share of the slots, or all are taken."""
        if self.encoder_client is None:
            raise FailedPreconditionError(
                "this decoder has no encoder (--encoder-address) to embed a video's frames; "
                "embed them with EmbedImages (video_frame set) and send their ids")
        share = self.max_video_uploads_per_key
        if share and self.uploads_of(caller) >= share:
            raise ResourceExhaustedError(
                f"this API key already has {share} videos being received or embedded here, "
                f"its share of the {self.max_video_uploads} upload slots; retry when one "
                "has finished", reason="TOO_MANY_VIDEO_UPLOADS", limit=str(share))
        busy = len(self._uploads) + len(self._receiving)
        if busy >= self.max_video_uploads:
            raise ResourceExhaustedError(
                f"{busy} videos are being received or embedded here, the most at once; "
                "retry shortly", limit=str(self.max_video_uploads))

    def _embed_in_background(self, frames: VideoFile | FrameStream, upload: FrameUpload,
                             model_id: str, caller: str) -> asyncio.Task[None]:
        """Have the encoder embed the session's frames in order, also after the call answers
        (a stream's, while it arrives); the task holds the caller's upload slot until done."""
        encoder = self.encoder_client
        assert encoder is not None  # _check_upload_slot refused the call otherwise

        async def embed(rgb: Any) -> str:
            return await encoder.embed_image(rgb, "rgb", model_id, video_frame=True)

        async def next_frame(frame_iterator: Iterator[Any]) -> Any:
            return await self._run(next, frame_iterator, None)

        async def upload_frames() -> None:
            outlive_the_call()  # the frames are embedded after the call has answered
            read = frames.next_frame if isinstance(frames, FrameStream) else next_frame
            try:
                await embed_frames(frames, upload, embed, read, self.upload_window)
            finally:
                self.video_frames_embedded += upload.frames_stored
            logger.info("video of session %s: %d/%d frames embedded%s",
                        upload.session_id or "(not started)",
                        upload.frames_stored, len(upload.ids),
                        " (failed)" if upload.failed else "")

        task = asyncio.create_task(upload_frames())
        self._uploads[task] = caller
        task.add_done_callback(self._uploads.pop)  # frees the slot, for the caller too
        return task

    async def AddPrompt(self, request, context) -> tracking_pb2.AddPromptResponse:
        tracker = self._ready()
        encoding = wire.mask_encoding_from_proto(request.mask_format)
        # The session first (NOT_FOUND before anything is decoded), then the mask, which
        # must be at the session's video size: checked before it is decoded.
        video_hw = (await self._run(tracker.video_size, request.session_id, current_namespace())
                    if request.HasField("mask") else None)
        prompt = await self._run(tracking_prompt_from_proto, request, video_hw)
        result = await self._run(
            tracker.add_prompt, request.session_id, request.frame_index, request.object_id,
            points=prompt.points, labels=prompt.labels, box=prompt.box,
            keep_old_points=request.keep_old_points, mask=prompt.mask,
            namespace=current_namespace(),
        )
        frame = await self._run(frame_to_proto, result, encoding)
        return tracking_pb2.AddPromptResponse(frame=frame)

    async def Propagate(self, request, context) -> AsyncIterator[tracking_pb2.PropagateResponse]:
        tracker = self._ready()
        encoding = wire.mask_encoding_from_proto(request.mask_format)
        propagation = await self._run(
            tracker.propagate, request.session_id,
            request.start_frame_index if request.HasField("start_frame_index") else None,
            request.max_frames if request.HasField("max_frames") else None,
            request.reverse, current_namespace(),
        )
        finished = False
        try:
            while True:
                started = time.perf_counter()
                result = await self._run(propagation.step)
                if result is None:
                    finished = True
                    return
                self.frames_tracked += 1
                self.frame_seconds += time.perf_counter() - started
                frame = await self._run(frame_to_proto, result, encoding)
                yield tracking_pb2.PropagateResponse(frame=frame)
        finally:
            if not finished:
                self.propagations_cancelled += 1
                logger.info("propagation of %s stopped after %d frames (cancelled)",
                            request.session_id, propagation.frames_done)
            await self._close_propagation(propagation)

    async def RemoveObject(self, request, context) -> tracking_pb2.RemoveObjectResponse:
        remaining = await self._run(
            self._ready().remove_object, request.session_id, request.object_id,
            current_namespace(),
        )
        return tracking_pb2.RemoveObjectResponse(remaining_object_ids=remaining)

    async def ResetSession(self, request, context) -> tracking_pb2.ResetSessionResponse:
        await self._run(self._ready().reset, request.session_id, current_namespace())
        return tracking_pb2.ResetSessionResponse()

    async def CloseSession(self, request, context) -> tracking_pb2.CloseSessionResponse:
        await self._run(self._ready().close, request.session_id, current_namespace())
        return tracking_pb2.CloseSessionResponse()
