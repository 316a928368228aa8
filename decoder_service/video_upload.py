"""Videos sent to ``StartSession``: decoded with OpenCV's FFmpeg backend within bounds, their
frames embedded by the encoder tier in order, a few at a time, in the background.

The session starts as soon as the video has been read once: frame ids are content hashes the
decoder computes itself (``embedding.video_frame_id``, the encoder's own function), so the
session knows every frame's id before any frame is embedded. Tracking that needs a frame not
stored yet waits for it (``FrameUpload.wait``); a failed upload fails those waits with the
encoder's error. Decoded frames are never all held: one pass hashes them, a second streams them
to the encoder with at most ``window`` in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator

import cv2
import numpy as np

from sam2_shared.embedding import video_frame_id
from sam2_shared.errors import CorruptEntryError, InvalidInputError, NotReadyError, Sam2Error

logger = logging.getLogger(__name__)

DEFAULT_MAX_VIDEO_FRAMES = 2_000  # frames per uploaded video (~67 s at 30 fps)
# Decoded pixels per video, all frames together: 2,000 frames of 1080p. A small file can
# declare many huge frames (video compresses still scenes extremely well); decoding and
# hashing cost grows with pixels, so they are bounded as a whole, not only per frame.
DEFAULT_MAX_VIDEO_PIXELS = 2_000 * 1920 * 1080
DEFAULT_FRAME_WAIT_S = 600.0  # longest tracking waits for one frame's embedding


class VideoFile:
    """An uploaded video in a private temporary file (OpenCV reads files, not bytes).

    ``frames()`` decodes it from the start each time, refusing more than ``max_frames``
    frames, frames of more than ``max_pixels`` pixels (before they are decoded) and more than
    ``max_total_pixels`` decoded pixels in all.
    """

    def __init__(self, data: bytes, *, max_frames: int, max_pixels: int,
                 max_total_pixels: int = DEFAULT_MAX_VIDEO_PIXELS) -> None:
        if not data:
            raise InvalidInputError("the video is empty")
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.max_total_pixels = max_total_pixels
        handle, self.path = tempfile.mkstemp(prefix="sam2-video-", suffix=".bin")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def frames(self) -> Iterator[np.ndarray]:
        """HxWx3 uint8 RGB frames in order."""
        capture = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG)
        try:
            if not capture.isOpened():
                raise InvalidInputError(
                    "the video cannot be decoded (MP4, WebM, MOV ... that FFmpeg reads)",
                    reason="VIDEO_UNREADABLE")
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            self._check_pixels(height, width)  # from the container, before any frame
            index = total = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                if index >= self.max_frames:
                    raise InvalidInputError(
                        f"the video has more than {self.max_frames} frames, the most this "
                        "server takes; cut it or send frame embeddings", reason="VIDEO_TOO_LONG",
                        limit=str(self.max_frames))
                self._check_pixels(*bgr.shape[:2])
                total += bgr.shape[0] * bgr.shape[1]
                if total > self.max_total_pixels:
                    raise InvalidInputError(
                        f"the video has more than {self.max_total_pixels} pixels in all its "
                        "frames, the most this server decodes; send fewer or smaller frames",
                        reason="VIDEO_TOO_LARGE", limit=str(self.max_total_pixels))
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
            if index == 0:
                raise InvalidInputError("the video has no decodable frame",
                                        reason="VIDEO_UNREADABLE")
        finally:
            capture.release()

    def _check_pixels(self, height: int, width: int) -> None:
        if height * width > self.max_pixels:
            raise InvalidInputError(
                f"video frames of {width}x{height} pixels, more than the {self.max_pixels} "
                "this server takes", reason="IMAGE_TOO_LARGE", limit=str(self.max_pixels))


def read_frame_ids(video: VideoFile, model_id: str, namespace: str
                   ) -> tuple[list[str], tuple[int, int]]:
    """Every frame's embedding id (as the encoder will store it) and the video's (H, W)."""
    ids: list[str] = []
    size: tuple[int, int] | None = None
    for rgb in video.frames():
        if size is None:
            size = (int(rgb.shape[0]), int(rgb.shape[1]))
        elif rgb.shape[:2] != size:
            raise InvalidInputError(f"frame {len(ids)} is {rgb.shape[:2]}, the video {size}")
        ids.append(video_frame_id(rgb, model_id, namespace))
    assert size is not None  # frames() raises for a video without frames
    return ids, size


class FrameUpload:
    """Which of a video's frames are stored, or why they will not be."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self._stored = [False] * len(ids)
        self._error: Sam2Error | None = None
        self._done = False
        self._changed = threading.Condition()

    @property
    def frames_stored(self) -> int:
        return sum(self._stored)

    @property
    def finished(self) -> bool:
        """All frames stored, or failed."""
        return self._done

    @property
    def failed(self) -> bool:
        return self._error is not None

    def stored(self, index: int) -> None:
        with self._changed:
            self._stored[index] = True
            self._changed.notify_all()

    def fail(self, error: Sam2Error) -> None:
        with self._changed:
            self._error, self._done = error, True
            self._changed.notify_all()

    def finish(self) -> None:
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait(self, index: int, timeout_s: float = DEFAULT_FRAME_WAIT_S) -> None:
        """Block until frame ``index`` is stored; the upload's error if it failed."""
        with self._changed:
            if not self._changed.wait_for(
                    lambda: self._stored[index] or self._error is not None, timeout_s):
                raise NotReadyError(f"frame {index} of the video was not embedded within "
                                    f"{timeout_s:.0f} s; the encoder tier is overloaded or down")
            if not self._stored[index] and self._error is not None:
                raise self._error


async def embed_frames(
    video: VideoFile,
    upload: FrameUpload,
    embed: Callable[[np.ndarray], Awaitable[str]],
    next_frame: Callable[[Iterator[np.ndarray]], Awaitable[np.ndarray | None]],
    window: int = 2,
    attempts: int = 3,
) -> None:
    """Send the frames to the encoder in order, at most ``window`` in flight; mark each
    stored, or fail the upload with the first error (a frame whose call fails for a reason
    other than its input is tried ``attempts`` times: a busy encoder must not end a video
    session). Closes ``video`` in the end.

    ``embed(rgb)`` returns the id the encoder stored the frame under; ``next_frame(it)``
    decodes the next frame off the event loop (None at the end).
    """
    slots = asyncio.Semaphore(max(1, window))
    pending: set[asyncio.Task[None]] = set()

    async def one(index: int, rgb: np.ndarray) -> None:
        try:
            stored_id = await _embed_with_retries(embed, rgb, attempts)
            if stored_id != upload.ids[index]:
                raise CorruptEntryError(
                    f"the encoder stored frame {index} as {stored_id!r}, not "
                    f"{upload.ids[index]!r}: the tiers disagree on ids (API keys of "
                    "different tenants?)")
            upload.stored(index)
        except Exception as exc:  # noqa: BLE001 - fails the session's waits, not the server
            upload.fail(_as_error(exc))
        finally:
            slots.release()

    frames = video.frames()
    try:
        index = 0
        while not upload.finished:
            await slots.acquire()
            try:
                rgb = await next_frame(frames)
            except Exception:
                slots.release()
                raise
            if rgb is None:
                slots.release()
                break
            task = asyncio.create_task(one(index, rgb))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
        if pending:
            await asyncio.gather(*pending)
        upload.finish()
    except asyncio.CancelledError:
        upload.fail(NotReadyError("the decoder stopped before the video was embedded; "
                                  "start the session again"))
        raise
    except Exception as exc:  # noqa: BLE001
        upload.fail(_as_error(exc))
    finally:
        for task in list(pending):
            task.cancel()
        frames.close()
        video.close()


async def _embed_with_retries(embed: Callable[[np.ndarray], Awaitable[str]], rgb: np.ndarray,
                              attempts: int) -> str:
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return await embed(rgb)
        except (InvalidInputError, CorruptEntryError):
            raise  # the frame itself is wrong: trying again cannot help
        except Sam2Error:
            if attempt >= attempts:
                raise
            logger.warning("embedding a video frame failed (attempt %d of %d); retrying",
                           attempt, attempts)
    raise AssertionError("unreachable")


def _as_error(exc: Exception) -> Sam2Error:
    if isinstance(exc, Sam2Error):
        return exc
    return NotReadyError(f"embedding the video's frames failed: {exc!r}")
