"""Uploaded videos and streamed frames: bounded decoding, frame ids, and the background
embedding's order, window, retries and failures (no network: the encoder is a coroutine)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from decoder_service.video_upload import (
    FrameSpool,
    FrameStream,
    FrameUpload,
    VideoFile,
    embed_frames,
    read_frame_ids,
)
from sam2_shared.embedding import video_frame_id
from sam2_shared.errors import (
    CorruptEntryError,
    InvalidInputError,
    NotReadyError,
    ResourceExhaustedError,
)
from tests.helpers.synthetic_images import synthetic_rgb

MODEL_ID = "sam2.1/hiera_tiny"


def video_bytes(tmp_path: Path, frames: int, height: int = 48, width: int = 64) -> bytes:
    path = tmp_path / f"v{frames}x{height}x{width}.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for t in range(frames):
        frame = np.full((height, width, 3), 20 * t % 255, np.uint8)
        frame[: height // 2, : width // 2] = (250, 10, 10)
        writer.write(frame)
    writer.release()
    return path.read_bytes()


def test_frames_are_decoded_within_bounds(tmp_path: Path) -> None:
    data = video_bytes(tmp_path, 5)
    video = VideoFile(data, max_frames=5, max_pixels=64 * 48)
    frames = list(video.frames())
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    blue = frames[0][4, 4]  # written as OpenCV's BGR (250, 10, 10): blue, so RGB ~(10, 10, 250)
    assert blue[2] > 200 > 50 > blue[0]
    ids, size = read_frame_ids(video, MODEL_ID, "tenant")
    assert size == (48, 64)
    assert ids == [video_frame_id(f, MODEL_ID, "tenant") for f in frames]
    path = Path(video.path)
    video.close()
    assert not path.exists()

    with pytest.raises(InvalidInputError) as long:
        list(VideoFile(data, max_frames=4, max_pixels=10**6).frames())
    assert long.value.reason == "VIDEO_TOO_LONG"
    with pytest.raises(InvalidInputError) as large:
        list(VideoFile(data, max_frames=10, max_pixels=64 * 48 - 1).frames())
    assert large.value.reason == "IMAGE_TOO_LARGE"
    with pytest.raises(InvalidInputError) as total:
        list(VideoFile(data, max_frames=10, max_pixels=10**6,
                       max_total_pixels=4 * 64 * 48 + 1).frames())
    assert total.value.reason == "VIDEO_TOO_LARGE"
    assert len(list(VideoFile(data, max_frames=10, max_pixels=10**6,
                              max_total_pixels=5 * 64 * 48).frames())) == 5
    for garbage in (b"not a video" * 100, data[: len(data) // 3]):
        with pytest.raises(InvalidInputError):
            read_frame_ids(VideoFile(garbage, max_frames=10, max_pixels=10**6), MODEL_ID, "")
    with pytest.raises(InvalidInputError):
        VideoFile(b"", max_frames=10, max_pixels=10**6)


def test_waiting_for_a_frame(tmp_path: Path) -> None:
    upload = FrameUpload(["a", "b"])
    threading.Timer(0.05, upload.stored, args=(1,)).start()
    started = time.monotonic()
    upload.wait(1, timeout_s=5)
    assert time.monotonic() - started < 2
    with pytest.raises(NotReadyError):
        upload.wait(0, timeout_s=0.05)
    upload.fail(ResourceExhaustedError("encoder full"))
    upload.wait(1)  # stored before the failure: still usable
    with pytest.raises(ResourceExhaustedError):
        upload.wait(0)


def run_upload(tmp_path: Path, frames: int, embed, window: int = 2) -> tuple[FrameUpload, list]:
    video = VideoFile(video_bytes(tmp_path, frames), max_frames=50, max_pixels=10**6)
    ids, _ = read_frame_ids(video, MODEL_ID, "")
    upload = FrameUpload(ids)
    order: list[int] = []

    async def next_frame(it):
        return next(it, None)

    async def main() -> None:
        await embed_frames(video, upload, lambda rgb: embed(rgb, order), next_frame, window)

    asyncio.run(main())
    assert not Path(video.path).exists()
    return upload, order


def test_frames_go_in_order_with_a_bounded_window(tmp_path: Path) -> None:
    in_flight = peak = 0

    async def embed(rgb, order):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        order.append(video_frame_id(rgb, MODEL_ID))
        await asyncio.sleep(0.01)
        in_flight -= 1
        return video_frame_id(rgb, MODEL_ID)

    upload, order = run_upload(tmp_path, 7, embed, window=3)
    assert upload.finished and not upload.failed and upload.frames_stored == 7
    assert order == upload.ids  # sent in video order
    assert peak == 3


def test_a_busy_encoder_is_retried_and_a_wrong_id_fails_the_upload(tmp_path: Path) -> None:
    calls = 0

    async def flaky(rgb, order):
        nonlocal calls
        calls += 1
        if calls % 2:
            raise NotReadyError("busy")
        return video_frame_id(rgb, MODEL_ID)

    upload, _ = run_upload(tmp_path, 3, flaky)
    assert upload.frames_stored == 3 and not upload.failed

    async def wrong(rgb, order):
        return "someone-elses-id"

    upload, _ = run_upload(tmp_path, 3, wrong)
    assert upload.failed
    with pytest.raises(CorruptEntryError):
        upload.wait(0)


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes()


def spool_of(**bounds: int) -> FrameSpool:
    return FrameSpool(MODEL_ID, "tenant", **{"max_frames": 10, "max_pixels": 10**6, **bounds})


def test_streamed_frames_are_hashed_kept_as_sent_and_read_back_in_order() -> None:
    frames = [synthetic_rgb(48, 64, seed=s) for s in range(4)]
    spool = spool_of()
    spool.add(png(frames[0]))                                 # encoded
    spool.add(frames[1], "rgb")                               # raw RGB
    spool.add(np.ascontiguousarray(frames[2][:, :, ::-1]), "bgr")  # raw BGR
    spool.add(np.dstack([frames[3], np.full((48, 64), 255, np.uint8)]), "rgb")  # RGBA
    assert spool.size == (48, 64)
    assert spool.ids == [video_frame_id(f, MODEL_ID, "tenant") for f in frames]
    assert [f.tobytes() for f in spool.frames()] == [f.tobytes() for f in frames]
    assert Path(spool.path).stat().st_size == len(png(frames[0])) + 3 * 48 * 64 * 3
    spool.close()
    assert not Path(spool.path).exists()


@pytest.mark.parametrize(("bounds", "frame", "reason"), [
    ({"max_frames": 2}, None, "VIDEO_TOO_LONG"),
    ({"max_pixels": 48 * 64 - 1}, "raw", "IMAGE_TOO_LARGE"),
    ({"max_pixels": 48 * 64 - 1}, "png", "INVALID_ARGUMENT"),  # from the header, undecoded
    ({"max_total_pixels": 2 * 48 * 64 + 1}, None, "VIDEO_TOO_LARGE"),
    ({"max_bytes": 2 * 48 * 64 * 3 + 1}, None, "VIDEO_TOO_LARGE"),
])
def test_streamed_frames_are_bounded(bounds: dict, frame: str | None, reason: str) -> None:
    """Every bound refuses the first frame past it, naming the bound; nothing after it is
    kept (the stream fails) and the file goes with close()."""
    rgb = synthetic_rgb(48, 64)
    spool = spool_of(**bounds)
    with pytest.raises(InvalidInputError) as refused:
        for _ in range(3):
            spool.add(png(rgb) if frame == "png" else rgb, "rgb")
    assert refused.value.reason == reason
    assert "frame" in str(refused.value) or "frames" in str(refused.value)
    spool.close()


def test_streamed_frames_must_be_images_of_one_size() -> None:
    spool = spool_of()
    with pytest.raises(InvalidInputError, match="frame 0: could not decode"):
        spool.add(b"not an image" * 10)
    with pytest.raises(InvalidInputError, match="send at least one"):
        _ = spool.size
    spool.add(synthetic_rgb(48, 64), "rgb")
    with pytest.raises(InvalidInputError, match="frame 1 is 48x64 pixels, the video's first "
                                                "frame 64x48"):
        spool.add(synthetic_rgb(64, 48), "rgb")
    spool.close()


def test_streamed_frames_go_to_the_encoder_like_a_video_file() -> None:
    frames = [synthetic_rgb(32, 40, seed=s) for s in range(5)]
    spool = FrameSpool(MODEL_ID, "", max_frames=10, max_pixels=10**6)
    for frame in frames:
        spool.add(png(frame))
    upload = FrameUpload(list(spool.ids))
    sent: list[str] = []

    async def embed(rgb):
        sent.append(video_frame_id(rgb, MODEL_ID))
        return sent[-1]

    async def next_frame(it):
        return next(it, None)

    asyncio.run(embed_frames(spool, upload, embed, next_frame, 2))
    assert sent == upload.ids and upload.frames_stored == 5 and not upload.failed
    assert not Path(spool.path).exists()  # embed_frames closes what it read


def test_a_frame_stream_is_embedded_as_it_arrives_and_closed_once_both_ends_are_done() -> None:
    """``embed_frames`` over a ``FrameStream`` sends each frame once it is spooled, waits
    for the next until the stream ends, and leaves the spool to the receiver while it is
    still receiving (the receiver closes it if it fails)."""
    frames = [synthetic_rgb(32, 40, seed=s) for s in range(3)]
    spool = FrameSpool(MODEL_ID, "", max_frames=10, max_pixels=10**6)
    events: list[str] = []

    async def run(function, *args):
        return function(*args)

    async def embed(rgb):
        events.append(f"embed {len([e for e in events if e.startswith('embed')])}")
        return video_frame_id(rgb, MODEL_ID)

    async def main() -> FrameUpload:
        stream = FrameStream(spool, run)
        upload = FrameUpload(spool.ids)
        embedding = asyncio.create_task(embed_frames(stream, upload, embed, stream.next_frame))
        for index, frame in enumerate(frames):
            await stream.add(png(frame))
            events.append(f"added {index}")
            for _ in range(5):  # let the embedding run (no thread hop here)
                await asyncio.sleep(0)
        stream.close()  # still receiving: not closed yet
        assert Path(spool.path).exists() and not embedding.done()
        stream.end()
        await embedding
        return upload

    upload = asyncio.run(main())
    assert events == ["added 0", "embed 0", "added 1", "embed 1", "added 2", "embed 2"]
    assert upload.finished and not upload.failed and upload.frames_stored == 3
    assert not Path(spool.path).exists()  # the stream ended: embed_frames closed it
