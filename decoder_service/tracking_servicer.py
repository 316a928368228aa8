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
import numpy as np

from decoder_service.tracking import Tracker
from sam2_shared import wire
from sam2_shared.api.v1 import common_pb2, tracking_pb2, tracking_pb2_grpc
from sam2_shared.errors import InvalidInputError, NotReadyError
from sam2_shared.masks import MaskEncoding, encode_masks, mask_areas, mask_bboxes
from sam2_shared.security import current_namespace
from sam2_shared.video import FrameResult

SERVICE_NAME = tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name
_LABELS = {common_pb2.POINT_LABEL_FOREGROUND: 1, common_pb2.POINT_LABEL_BACKGROUND: 0}
_MASK_FIELD = {MaskEncoding.COCO_RLE: "coco_rle_counts", MaskEncoding.PNG: "png_data",
               MaskEncoding.RAW_BITS: "packed_bits"}

logger = logging.getLogger(__name__)


def frame_to_proto(result: FrameResult, encoding: MaskEncoding) -> tracking_pb2.FrameMasks:
    """Every object's mask of one frame, encoded."""
    masks = np.asarray(result.masks)
    frame = tracking_pb2.FrameMasks(frame_index=int(result.frame_idx))
    if masks.shape[0] == 0:
        return frame
    height, width = masks.shape[1:]
    encoded = encode_masks(masks, encoding)
    areas, boxes = mask_areas(masks), mask_bboxes(masks)
    for k, obj_id in enumerate(result.obj_ids):
        mask = common_pb2.EncodedMask(height_px=height, width_px=width, area_px=int(areas[k]))
        setattr(mask, _MASK_FIELD[encoding], encoded[k])
        x_min, y_min, x_max, y_max = boxes[k].tolist()
        mask.bbox.CopyFrom(common_pb2.Box(x_min_px=x_min, y_min_px=y_min, x_max_px=x_max,
                                          y_max_px=y_max))
        frame.objects.add(object_id=int(obj_id), mask=mask,
                          object_score_logit=float(result.object_score_logits[k]))
    return frame


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
        points = labels = box = mask = None
        if request.points:
            points = np.array([[p.x_px, p.y_px] for p in request.points], dtype=np.float32)
            try:
                labels = np.array([_LABELS[p.label] for p in request.points], dtype=np.int32)
            except KeyError:
                raise InvalidInputError("every point needs a label: FOREGROUND or BACKGROUND",
                                        reason="INVALID_POINT_LABEL") from None
        if request.HasField("box"):
            b = request.box
            box = np.array([b.x_min_px, b.y_min_px, b.x_max_px, b.y_max_px], dtype=np.float32)
        if request.HasField("mask"):
            mask = wire.mask_from_proto(request.mask)
        result = await asyncio.to_thread(
            tracker.add_prompt, request.session_id, request.frame_index, request.object_id,
            points=points, labels=labels, box=box, keep_old_points=request.keep_old_points,
            mask=mask, namespace=current_namespace(),
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
