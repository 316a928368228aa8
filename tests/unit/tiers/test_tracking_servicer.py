"""The tracking servicer frees a session even when its stream outlives the worker pool, and
starts sessions over client-streamed frames within its upload slots."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pytest

from decoder_service.cli import DecoderSettings
from decoder_service.tracking_servicer import TrackingServicer
from decoder_service.video_upload import FrameSpool, FrameUpload
from sam2_shared import wire
from sam2_shared.api.v1 import tracking_pb2
from sam2_shared.embedding import video_frame_id
from sam2_shared.errors import (
    CorruptEntryError,
    FailedPreconditionError,
    InvalidInputError,
    ResourceExhaustedError,
    StreamIdleError,
    UnknownModelError,
)
from sam2_shared.serving import auth
from sam2_shared.serving.settings import load_settings
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

    def __init__(self) -> None:
        self.spools: list[FrameSpool] = []

    def frame_spool(self, model_id: str, namespace: str) -> FrameSpool:
        if model_id != self.model_id:
            raise UnknownModelError(f"not {model_id!r}")
        self.spools.append(FrameSpool(model_id, namespace, max_frames=3, max_pixels=48 * 64))
        return self.spools[-1]

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
    tracker = _FrameTracker()
    servicer = TrackingServicer(tracker, encoder_client=_Encoder(),  # type: ignore[arg-type]
                                max_video_uploads=1, stream_idle_timeout_s=2.0)

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
        assert not servicer._receiving
        stall = asyncio.Event()
        slow = asyncio.create_task(start(frame_message(rgb, MODEL_ID), stall=stall))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhaustedError, match="1 videos are being received"):
            await start(frame_message(rgb, MODEL_ID))
        with pytest.raises(StreamIdleError):  # the slow one never sent its next message
            await slow
        assert not servicer._receiving and not servicer._uploads
        assert tracker.spools and not any(Path(s.path).exists() for s in tracker.spools)
        response = await start(frame_message(rgb, MODEL_ID))  # serving on
        assert response.frame_count == 1
        await asyncio.gather(*servicer._uploads)
        await servicer.close()

    asyncio.run(scenario())

    no_encoder = TrackingServicer(_FrameTracker())  # type: ignore[arg-type]
    with pytest.raises(FailedPreconditionError, match="no encoder"):
        asyncio.run(no_encoder.StartSessionFromFrames(
            stream_of(frame_message(rgb, MODEL_ID)), None))


class _WatchedEncoder(_Encoder):
    """Records when each frame is asked for and answers once ``release`` is set; a call
    cancelled meanwhile is recorded too."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0
        self.calls = 0

    async def embed_image(self, rgb, color_format, model_id, video_frame=False) -> str:
        self.events.append(f"embed {self.calls}")
        self.calls += 1
        self.asked.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().embed_image(rgb, color_format, model_id, video_frame)


async def watched_stream(frames, events: list[str], encoder: _WatchedEncoder):
    """The model, then each frame; before the last one, waits (10 s at most: the old
    behaviour never embeds a frame before the stream ends) until the encoder was asked."""
    yield frame_message(model_id=MODEL_ID)
    for index, frame in enumerate(frames):
        if index == len(frames) - 1:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(encoder.asked.wait(), 10)
        events.append(f"send {index}")
        yield frame_message(frame)


def test_streamed_frames_are_embedded_while_the_stream_still_arrives() -> None:
    frames = [synthetic_rgb(48, 64, seed=s) for s in range(3)]
    events: list[str] = []
    encoder = _WatchedEncoder(events)
    encoder.release.set()
    servicer = TrackingServicer(_FrameTracker(), encoder_client=encoder)  # type: ignore[arg-type]

    async def scenario() -> tracking_pb2.StartSessionFromFramesResponse:
        response = await servicer.StartSessionFromFrames(
            watched_stream(frames, events, encoder), None)
        await asyncio.gather(*servicer._uploads)
        await servicer.close()
        return response

    response = asyncio.run(scenario())
    assert events.index("embed 0") < events.index("send 2")  # before the last was sent
    assert [e for e in events if e.startswith("send")] == ["send 0", "send 1", "send 2"]
    ids = [video_frame_id(f, MODEL_ID) for f in frames]
    assert list(response.frame_embedding_ids) == ids == encoder.embedded  # in order
    assert servicer.video_frames_embedded == 3


def test_a_stream_that_fails_midway_cancels_the_embedding_it_started() -> None:
    """Frame 0 is being embedded when a frame of another size arrives: the stream fails
    with INVALID_ARGUMENT, the encoder call in flight is cancelled, the spool is gone and
    the slot is free."""
    rgb = synthetic_rgb(48, 64)
    events: list[str] = []
    encoder = _WatchedEncoder(events)  # never released: frame 0 stays in flight
    tracker = _FrameTracker()
    servicer = TrackingServicer(tracker, encoder_client=encoder,  # type: ignore[arg-type]
                                max_video_uploads=1)

    async def scenario() -> None:
        with pytest.raises(InvalidInputError, match="same size"):
            await servicer.StartSessionFromFrames(
                watched_stream([rgb, rgb, synthetic_rgb(32, 64)], events, encoder), None)
        assert events.index("embed 0") < events.index("send 2")  # the bad frame
        assert encoder.cancelled >= 1 and not servicer._uploads
        assert not servicer._receiving and servicer.video_frames_embedded == 0
        assert len(tracker.spools) == 1 and not Path(tracker.spools[0].path).exists()
        encoder.release.set()
        response = await servicer.StartSessionFromFrames(  # the slot is free again
            stream_of(frame_message(rgb, MODEL_ID)), None)
        assert response.frame_count == 1
        await asyncio.gather(*servicer._uploads)
        await servicer.close()

    asyncio.run(scenario())


def test_an_encoder_failure_while_the_stream_arrives_fails_the_stream() -> None:
    """A frame the encoder stores under another id (or any failure after the retries) ends
    the stream with that error at the next frame; no session starts."""
    frames = [synthetic_rgb(48, 64, seed=s) for s in range(3)]
    events: list[str] = []

    class _WrongIds(_WatchedEncoder):
        async def embed_image(self, *args, **kwargs) -> str:
            await super().embed_image(*args, **kwargs)
            return "someone-elses-id"

    encoder = _WrongIds(events)
    encoder.release.set()
    tracker = _FrameTracker()
    servicer = TrackingServicer(tracker, encoder_client=encoder)  # type: ignore[arg-type]

    async def scenario() -> None:
        with pytest.raises(CorruptEntryError, match="disagree on ids"):
            await servicer.StartSessionFromFrames(
                watched_stream(frames, events, encoder), None)
        assert not servicer._uploads and not Path(tracker.spools[0].path).exists()
        await servicer.close()

    asyncio.run(scenario())


class _GatedEncoder(_Encoder):
    """Answers each frame once ``gate`` is set; with ``wrong_ids`` under an id that is not
    the frame's (the upload fails after its session started)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.wrong_ids = False

    async def embed_image(self, rgb, color_format, model_id, video_frame=False) -> str:
        await self.gate.wait()
        frame_id = await super().embed_image(rgb, color_format, model_id, video_frame)
        return "someone-elses-id" if self.wrong_ids else frame_id


def test_one_api_key_holds_at_most_its_share_of_the_upload_slots() -> None:
    """Key A at its share (2 of 4 slots, its videos still being embedded) is refused with
    TOO_MANY_VIDEO_UPLOADS while key B is served; A's count goes back down when its uploads
    finish and when they fail, and then A is served again."""
    rgb = synthetic_rgb(48, 64)
    encoder = _GatedEncoder()
    servicer = TrackingServicer(_FrameTracker(), encoder_client=encoder,  # type: ignore[arg-type]
                                max_video_uploads=4, max_video_uploads_per_key=2)

    async def as_caller(key: str) -> tracking_pb2.StartSessionFromFramesResponse:
        auth._current_caller.set(auth.Caller(api_key=key))  # this task's own context
        return await servicer.StartSessionFromFrames(
            stream_of(frame_message(rgb, MODEL_ID)), None)

    async def start(key: str) -> tracking_pb2.StartSessionFromFramesResponse:
        return await asyncio.create_task(as_caller(key))

    async def scenario() -> None:
        for _ in range(2):  # sessions start; their frames wait for the encoder
            assert (await start("key-a")).frame_count == 1
        assert servicer.uploads_of("key-a") == 2 and len(servicer._uploads) == 2
        with pytest.raises(ResourceExhaustedError, match="this API key already has 2") as a:
            await start("key-a")
        assert a.value.reason == "TOO_MANY_VIDEO_UPLOADS" and a.value.metadata["limit"] == "2"
        for _ in range(2):  # B is still served, up to its own share
            assert (await start("key-b")).frame_count == 1
        with pytest.raises(ResourceExhaustedError, match="4 videos are being") as full:
            await start("key-c")  # every slot taken: the global bound
        assert full.value.reason == "RESOURCE_EXHAUSTED"
        assert servicer.uploads_of("key-a") == servicer.uploads_of("key-b") == 2

        encoder.gate.set()  # the uploads finish
        await asyncio.gather(*servicer._uploads)
        assert servicer.uploads_of("key-a") == 0 and not servicer._uploads
        assert servicer.video_frames_embedded == 4

        encoder.gate, encoder.wrong_ids = asyncio.Event(), True
        for _ in range(2):  # A's share again, its uploads fail in the background
            await start("key-a")
        with pytest.raises(ResourceExhaustedError) as again:
            await start("key-a")
        assert again.value.reason == "TOO_MANY_VIDEO_UPLOADS"
        encoder.gate.set()
        results = await asyncio.gather(*servicer._uploads, return_exceptions=True)
        assert len(results) == 2 and servicer.uploads_of("key-a") == 0
        assert servicer.video_frames_embedded == 4  # the failed ones stored nothing
        encoder.wrong_ids = False
        assert (await start("key-a")).frame_count == 1  # A served again
        await asyncio.gather(*servicer._uploads)
        await servicer.close()

    asyncio.run(scenario())
    assert not servicer._receiving and not servicer._uploads


@pytest.mark.parametrize(("flags", "share"), [
    (["--api-keys-file", "keys.txt"], 2),  # half of the default 4
    (["--api-keys-file", "keys.txt", "--max-video-uploads", "5"], 3),  # rounded up
    (["--api-keys-file", "keys.txt", "--max-video-uploads-per-key", "1"], 1),
    (["--api-keys-file", "keys.txt", "--max-video-uploads-per-key", "9"], 4),  # <= global
    ([], 0),  # no keys: callers are one identity, only --max-video-uploads applies
    (["--max-video-uploads-per-key", "1"], 0),
])
def test_the_per_key_upload_share_setting(flags: list[str], share: int) -> None:
    settings = load_settings(DecoderSettings, flags, env={})
    assert settings.video_uploads_per_key() == share
    env = {"SAM2_MAX_VIDEO_UPLOADS_PER_KEY": "1", "SAM2_API_KEYS_FILE": "keys.txt"}
    assert load_settings(DecoderSettings, [], env=env).video_uploads_per_key() == 1
