"""``sam2.v1.TrackingService`` over ``grpc.aio``: translates protos to ``Tracker`` calls.

No model code here. Tracking runs on worker threads; ``Propagate`` steps one frame per
thread hop, so a cancelled call (the client went away or cancelled) stops after the frame
in flight, and the propagation is closed (state saved, session freed) either way. Errors
are domain exceptions, mapped to rich status by the shared interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from decoder_service.tracking import Tracker
from sam2_shared import wire
from sam2_shared.api.v1 import tracking_pb2, tracking_pb2_grpc
from sam2_shared.errors import NotReadyError
from sam2_shared.serving.auth import current_namespace
from sam2_shared.wire.tracking import frame_to_proto, tracking_prompt_from_proto

SERVICE_NAME = tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name

logger = logging.getLogger(__name__)


class TrackingServicer(tracking_pb2_grpc.TrackingServiceServicer):
    """Serves ``tracker`` once it is set (the model loads after the server starts)."""

    def __init__(self, tracker: Tracker | None = None) -> None:
        self.tracker = tracker
        self.propagations_cancelled = 0

    def register(self, server: grpc.aio.Server) -> None:
        tracking_pb2_grpc.add_TrackingServiceServicer_to_server(self, server)

    def _ready(self) -> Tracker:
        if self.tracker is None:
            raise NotReadyError("the decoder is still loading its model; retry shortly")
        return self.tracker

    async def StartSession(self, request, context) -> tracking_pb2.StartSessionResponse:
        tracker = self._ready()
        session_id, frame_count, (height, width) = await asyncio.to_thread(
            tracker.start, request.model_id, list(request.frame_embedding_ids),
            current_namespace(),
        )
        return tracking_pb2.StartSessionResponse(
            session_id=session_id, frame_count=frame_count, height_px=height, width_px=width
        )

    async def AddPrompt(self, request, context) -> tracking_pb2.AddPromptResponse:
        tracker = self._ready()
        encoding = wire.mask_encoding_from_proto(request.mask_format)
        prompt = await asyncio.to_thread(tracking_prompt_from_proto, request)
        result = await asyncio.to_thread(
            tracker.add_prompt, request.session_id, request.frame_index, request.object_id,
            points=prompt.points, labels=prompt.labels, box=prompt.box,
            keep_old_points=request.keep_old_points, mask=prompt.mask,
            namespace=current_namespace(),
        )
        frame = await asyncio.to_thread(frame_to_proto, result, encoding)
        return tracking_pb2.AddPromptResponse(frame=frame)

    async def Propagate(self, request, context) -> AsyncIterator[tracking_pb2.PropagateResponse]:
        tracker = self._ready()
        encoding = wire.mask_encoding_from_proto(request.mask_format)
        propagation = await asyncio.to_thread(
            tracker.propagate, request.session_id,
            request.start_frame_index if request.HasField("start_frame_index") else None,
            request.max_frames if request.HasField("max_frames") else None,
            request.reverse, current_namespace(),
        )
        finished = False
        try:
            while True:
                result = await asyncio.to_thread(propagation.step)
                if result is None:
                    finished = True
                    return
                frame = await asyncio.to_thread(frame_to_proto, result, encoding)
                yield tracking_pb2.PropagateResponse(frame=frame)
        finally:
            if not finished:
                self.propagations_cancelled += 1
                logger.info("propagation of %s stopped after %d frames (cancelled)",
                            request.session_id, propagation.frames_done)
            await asyncio.to_thread(propagation.close)

    async def RemoveObject(self, request, context) -> tracking_pb2.RemoveObjectResponse:
        remaining = await asyncio.to_thread(
            self._ready().remove_object, request.session_id, request.object_id,
            current_namespace(),
        )
        return tracking_pb2.RemoveObjectResponse(remaining_object_ids=remaining)

    async def ResetSession(self, request, context) -> tracking_pb2.ResetSessionResponse:
        await asyncio.to_thread(self._ready().reset, request.session_id, current_namespace())
        return tracking_pb2.ResetSessionResponse()

    async def CloseSession(self, request, context) -> tracking_pb2.CloseSessionResponse:
        await asyncio.to_thread(self._ready().close, request.session_id, current_namespace())
        return tracking_pb2.CloseSessionResponse()
