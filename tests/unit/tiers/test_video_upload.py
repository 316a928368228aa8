"""Uploaded videos: bounded decoding, frame ids, and the background embedding's order,
window, retries and failures (no network: the encoder is a coroutine here)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from decoder_service.video_upload import FrameUpload, VideoFile, embed_frames, read_frame_ids
from sam2_shared.embedding import video_frame_id
from sam2_shared.errors import (
    CorruptEntryError,
    InvalidInputError,
    NotReadyError,
    ResourceExhaustedError,
)

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
