"""Fake servicers for tests of the serving layer (interceptors, the HTTP port) without a
model."""

from __future__ import annotations

import asyncio

from sam2_shared.api.v1 import tracking_pb2, tracking_pb2_grpc


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
