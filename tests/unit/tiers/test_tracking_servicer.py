"""The tracking servicer frees a session even when its stream outlives the worker pool, and
starts sessions over client-streamed frames within its upload slots."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np
import pytest

from decoder_service.tracking_servicer import TrackingServicer
from decoder_service.video_upload import FrameSpool, FrameUpload
from sam2_shared import wire
from sam2_shared.api.v1 import tracking_pb2
from sam2_shared.embedding import video_frame_id
from sam2_shared.errors import (
    FailedPreconditionError,
    InvalidInputError,
    ResourceExhaustedError,
    StreamIdleError,
    UnknownModelError,
)
from tests.helpers.synthetic_images import synthetic_rgb

MODEL_ID = "sam2.1/hiera_tiny"


class _Propagation:
    """Two frames, then the end; records whether it was closed."""

    def __init__(self) -> None:
        self.frames_done = 0
        self.closed = False

    def step(self) -> object | None:
        self.frames_done += 1
        return None if self.frames_done > 2 else object()

    def close(self) -> None:
        self.closed = True


class _Tracker:
    def __init__(self) -> None:
        self.propagation = _Propagation()

    def propagate(self, *args: object) -> _Propagation:
        return self.propagation


class _Request:
    session_id = "s"
    reverse = False
    mask_format = 0

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        return False


def test_a_stream_cut_off_after_the_pool_stopped_still_closes_its_propagation(
    monkeypatch,
) -> None:
    tracker = _Tracker()
    servicer = TrackingServicer(tracker, workers=1)  # type: ignore[arg-type]
    monkeypatch.setattr("decoder_service.tracking_servicer.frame_to_proto",
                        lambda result, encoding: None)

    async def scenario() -> None:
        stream = servicer.Propagate(_Request(), None)
        await stream.__anext__()          # one frame out, the stream is suspended
        await servicer.close()            # shutdown stops the pool first ...
        await stream.aclose()             # ... then the grace period cancels the stream

    asyncio.run(scenario())
    assert tracker.propagation.closed
    assert servicer.propagations_cancelled == 1
    assert servicer.frames_tracked == 1 and servicer.frame_seconds > 0


class _FrameTracker:
    """Real spools and uploads, no model: what StartSessionFromFrames needs of a tracker."""

    model_id = MODEL_ID

    def frame_spool(self, model_id: str, namespace: str) -> FrameSpool:
        if model_id != self.model_id:
            raise UnknownModelError(f"not {model_id!r}")
        return FrameSpool(model_id, namespace, max_frames=3, max_pixels=48 * 64)

    def start_frames(self, spool: FrameSpool, upload: FrameUpload) -> tuple:
        return "session", len(spool.ids), spool.size


class _Encoder:
    def __init__(self) -> None:
        self.embedded: list[str] = []

    async def embed_image(self, rgb, color_format, model_id, video_frame=False) -> str:
        assert video_frame and color_format == "rgb" and model_id == MODEL_ID
        self.embedded.append(video_frame_id(rgb, model_id))
        return self.embedded[-1]


def frame_message(rgb: np.ndarray | None = None, model_id: str = ""
                  ) -> tracking_pb2.StartSessionFromFramesRequest:
    message = tracking_pb2.StartSessionFromFramesRequest(model_id=model_id)
    if rgb is not None:
        message.frame.CopyFrom(wire.image_to_proto(rgb, "rgb"))
    return message


async def stream_of(*messages, stall: asyncio.Event | None = None):
    for message in messages:
        yield message
    if stall is not None:
        await stall.wait()


def test_streamed_frames_start_a_session_and_are_embedded_in_order() -> None:
    frames = [synthetic_rgb(48, 64, seed=s) for s in range(3)]
    encoder = _Encoder()
    servicer = TrackingServicer(_FrameTracker(), encoder_client=encoder)  # type: ignore[arg-type]

    async def scenario() -> tracking_pb2.StartSessionFromFramesResponse:
        response = await servicer.StartSessionFromFrames(
            stream_of(frame_message(model_id=MODEL_ID), *map(frame_message, frames)), None)
        await asyncio.gather(*servicer._uploads)
        await servicer.close()
        return response

    response = asyncio.run(scenario())
    ids = [video_frame_id(f, MODEL_ID) for f in frames]
    assert list(response.frame_embedding_ids) == ids == encoder.embedded
    assert (response.frame_count, response.height_px, response.width_px) == (3, 48, 64)
    assert servicer.video_frames_embedded == 3


def test_a_frame_stream_is_refused_cleanly_and_frees_its_slot() -> None:
    """Bad streams fail with the bound they break; a stream being received holds an upload
    slot (the client sets its pace), an idle one is ended, and every failure frees it."""
    rgb = synthetic_rgb(48, 64)
    servicer = TrackingServicer(_FrameTracker(), encoder_client=_Encoder(),  # type: ignore
                                max_video_uploads=1, stream_idle_timeout_s=0.2)

    async def start(*messages, stall: asyncio.Event | None = None):
        return await servicer.StartSessionFromFrames(stream_of(*messages, stall=stall), None)

    async def scenario() -> None:
        with pytest.raises(InvalidInputError, match="first message must name the model"):
            await start(frame_message(rgb))
        with pytest.raises(UnknownModelError):
            await start(frame_message(model_id="other"))
        with pytest.raises(InvalidInputError, match="send at least one"):
            await start(frame_message(model_id=MODEL_ID))
        with pytest.raises(InvalidInputError) as long:
            await start(frame_message(model_id=MODEL_ID), *[frame_message(rgb)] * 4)
        assert long.value.reason == "VIDEO_TOO_LONG"
        with pytest.raises(InvalidInputError) as large:
            await start(frame_message(synthetic_rgb(64, 64), MODEL_ID))
        assert large.value.reason == "IMAGE_TOO_LARGE"
        with pytest.raises(InvalidInputError, match="differs"):
            await start(frame_message(rgb, MODEL_ID), frame_message(rgb, "other"))
        assert servicer._receiving == 0
        stall = asyncio.Event()
        slow = asyncio.create_task(start(frame_message(rgb, MODEL_ID), stall=stall))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhaustedError, match="1 videos are being received"):
            await start(frame_message(rgb, MODEL_ID))
        with pytest.raises(StreamIdleError):  # the slow one never sent its next message
            await slow
        assert servicer._receiving == 0 and not list(Path(tempfile.gettempdir()).glob(
            "sam2-frames-*"))
        response = await start(frame_message(rgb, MODEL_ID))  # serving on
        assert response.frame_count == 1
        await asyncio.gather(*servicer._uploads)
        await servicer.close()

    asyncio.run(scenario())

    no_encoder = TrackingServicer(_FrameTracker())  # type: ignore[arg-type]
    with pytest.raises(FailedPreconditionError, match="no encoder"):
        asyncio.run(no_encoder.StartSessionFromFrames(
            stream_of(frame_message(rgb, MODEL_ID)), None))
