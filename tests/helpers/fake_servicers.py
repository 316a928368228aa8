"""Fake servicers for tests of the serving layer (interceptors, the HTTP port) without a
model."""

from __future__ import annotations

import asyncio

from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
)
from sam2_shared.serving.auth import current_namespace


class FakeDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    """Segment and SegmentStream without a model.

    An ``embedding_id`` that is a key of ``failures`` raises that exception (unary and per
    stream request); ``"slow"`` sets ``entered`` and waits for ``release``. Otherwise the answer
    echoes what the servicer saw: the id, the caller's namespace (in ``model_id``) and the
    prompt count (in ``height_px``).
    """

    def __init__(self, failures: dict[str, Exception] | None = None) -> None:
        self.failures = dict(failures or {})
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def Segment(self, request, context):  # type: ignore[no-untyped-def]
        if request.embedding_id in self.failures:
            raise self.failures[request.embedding_id]
        if request.embedding_id == "slow":
            self.entered.set()
            await self.release.wait()
        embedding = common_pb2.Embedding(embedding_id=request.embedding_id,
                                         model_id=current_namespace(),
                                         height_px=len(request.prompts))
        return decoder_pb2.SegmentResponse(embedding=embedding)

    async def SegmentStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            if request.segment.embedding_id in self.failures:
                raise self.failures[request.segment.embedding_id]
            yield decoder_pb2.SegmentStreamResponse(request_id=request.request_id)


class FrameCountingTracking(tracking_pb2_grpc.TrackingServiceServicer):
    """StartSessionFromFrames (client-streaming) counts the frames until the client closes
    its stream; ``receiving`` is set once a stream has its first message (the call is open
    on the server)."""

    def __init__(self) -> None:
        self.receiving = asyncio.Event()

    async def StartSessionFromFrames(self, request_iterator, context  # type: ignore[no-untyped-def]
                                     ) -> tracking_pb2.StartSessionFromFramesResponse:
        frames = 0
        async for _message in request_iterator:
            frames += 1
            self.receiving.set()
        return tracking_pb2.StartSessionFromFramesResponse(frame_count=frames)
