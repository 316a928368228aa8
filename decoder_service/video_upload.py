"""Videos sent to ``StartSession``: decoded with OpenCV's FFmpeg backend within bounds, their
frames embedded by the encoder tier in order, a few at a time, in the background.

The session starts as soon as the video has been read once: frame ids are content hashes the
decoder computes itself (``embedding.video_frame_id``, the encoder's own function), so the
session knows every frame's id before any frame is embedded. Tracking that needs a frame not
stored yet waits for it (``FrameUpload.wait``); a failed upload fails those waits with the
encoder's error. Decoded frames are never all held: one pass hashes them, a second streams them
to the encoder with at most ``window`` in flight.

Frames a client streams (``StartSessionFromFrames``) take the same path: ``FrameSpool`` checks
and hashes each as it arrives and keeps it as sent in a temporary file, and ``embed_frames``
reads the spool as it reads a video file, but already while the stream arrives
(``FrameStream`` hands it each frame once it is spooled), so that most frames are embedded
when the stream ends and the session starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import cv2
import numpy as np

from sam2_shared.embedding import video_frame_id
from sam2_shared.errors import CorruptEntryError, InvalidInputError, NotReadyError, Sam2Error
from sam2_shared.inference.imaging import decode_image
from sam2_shared.units import MIB

logger = logging.getLogger(__name__)

DEFAULT_MAX_VIDEO_FRAMES = 2_000  # frames per uploaded video (~67 s at 30 fps)
# Decoded pixels per video, all frames together: 2,000 frames of 1080p. A small file can
# declare many huge frames (video compresses still scenes extremely well); decoding and
# hashing cost grows with pixels, so they are bounded as a whole, not only per frame.
DEFAULT_MAX_VIDEO_PIXELS = 2_000 * 1920 * 1080
# Bytes of frames one client-streamed upload keeps on disk until they are embedded (as sent:
# ~3,000 1080p JPEGs, or ~170 raw RGB 1080p frames).
DEFAULT_MAX_UPLOAD_BYTES = 1024 * MIB
DEFAULT_FRAME_WAIT_S = 600.0  # longest tracking waits for one frame's embedding


class FrameBounds:
    """A video's frames counted as they come, each checked before it is decoded: at most
    ``max_frames`` frames of at most ``max_pixels`` pixels, ``max_total_pixels`` in all,
    every frame the first one's size."""

    def __init__(self, *, max_frames: int, max_pixels: int, max_total_pixels: int) -> None:
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.max_total_pixels = max_total_pixels
        self.count = 0
        self.total_pixels = 0
        self.size: tuple[int, int] | None = None  # (H, W) of the first frame

    def check_pixels(self, height: int, width: int) -> None:
        if height * width > self.max_pixels:
            raise InvalidInputError(
                f"video frames of {width}x{height} pixels, more than the {self.max_pixels} "
                "this server takes", reason="IMAGE_TOO_LARGE", limit=str(self.max_pixels))

    def admit(self, height: int, width: int) -> None:
        """Count one more frame of (height, width), or raise naming the bound it breaks."""
        if self.count >= self.max_frames:
            raise InvalidInputError(
                f"the video has more than {self.max_frames} frames, the most this server "
                "takes; cut it or send frame embeddings", reason="VIDEO_TOO_LONG",
                limit=str(self.max_frames))
        self.check_pixels(height, width)
        if self.size is None:
            self.size = (height, width)
        elif self.size != (height, width):
            raise InvalidInputError(
                f"frame {self.count} is {width}x{height} pixels, the video's first frame "
                f"{self.size[1]}x{self.size[0]}: every frame must have the same size")
        if self.total_pixels + height * width > self.max_total_pixels:
            raise InvalidInputError(
                f"the video has more than {self.max_total_pixels} pixels in all its frames, "
                "the most this server decodes; send fewer or smaller frames",
                reason="VIDEO_TOO_LARGE", limit=str(self.max_total_pixels))
        self.total_pixels += height * width
        self.count += 1


class VideoFile:
    """An uploaded video in a private temporary file (OpenCV reads files, not bytes).

    ``frames()`` decodes it from the start each time, within ``FrameBounds`` (the frame
    size is checked from the container before any frame is decoded).
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
        bounds = FrameBounds(max_frames=self.max_frames, max_pixels=self.max_pixels,
                             max_total_pixels=self.max_total_pixels)
        capture = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG)
        try:
            if not capture.isOpened():
                raise InvalidInputError(
                    "the video cannot be decoded (MP4, WebM, MOV ... that FFmpeg reads)",
                    reason="VIDEO_UNREADABLE")
            bounds.check_pixels(int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                                int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                bounds.admit(*bgr.shape[:2])
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if bounds.count == 0:
                raise InvalidInputError("the video has no decodable frame",
                                        reason="VIDEO_UNREADABLE")
        finally:
            capture.release()


def read_frame_ids(video: VideoFile, model_id: str, namespace: str
                   ) -> tuple[list[str], tuple[int, int]]:
    """Every frame's embedding id (as the encoder will store it) and the video's (H, W)."""
    ids: list[str] = []
    size: tuple[int, int] | None = None
    for rgb in video.frames():
        size = (int(rgb.shape[0]), int(rgb.shape[1]))  # every frame's (FrameBounds)
        ids.append(video_frame_id(rgb, model_id, namespace))
    assert size is not None  # frames() raises for a video without frames
    return ids, size


class FrameSpool:
    """Frames a client streams (``StartSessionFromFrames``), checked and hashed as they
    arrive and kept as sent (encoded bytes, or raw RGB) in a private temporary file, so that
    the session can start before any frame is embedded, without holding decoded frames.

    ``add`` admits one frame within ``FrameBounds`` and ``max_bytes`` kept in all;
    ``frames()`` decodes them again in order for the encoder (what ``embed_frames`` reads,
    like a ``VideoFile``), also while more are added (on another thread: the file is used
    under a lock). Where each frame lies in the file is kept here, not read back.
    """

    def __init__(self, model_id: str, namespace: str, *, max_frames: int, max_pixels: int,
                 max_total_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
                 max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        self.model_id = model_id
        self.namespace = namespace
        self.max_bytes = max_bytes
        self.bounds = FrameBounds(max_frames=max_frames, max_pixels=max_pixels,
                                  max_total_pixels=max_total_pixels)
        self.ids: list[str] = []
        self._records: list[tuple[int, int, bool]] = []  # (offset, length, encoded)
        self._bytes = 0
        self._file_lock = threading.Lock()  # one seek-and-read/write at a time
        handle, self.path = tempfile.mkstemp(prefix="sam2-frames-", suffix=".bin")
        self._file = os.fdopen(handle, "w+b")

    def add(self, image: bytes | np.ndarray, input_color_format: str = "rgb") -> None:
        """Admit the next frame: encoded bytes, or an HxW[xC] uint8 array in
        ``input_color_format`` (``wire.image_from_proto``'s result)."""
        index = self.bounds.count
        if isinstance(image, np.ndarray):
            self.bounds.check_pixels(*image.shape[:2])  # before converting it
        try:
            rgb = decode_image(image, input_color_format, max_pixels=self.bounds.max_pixels)
        except InvalidInputError as exc:
            raise InvalidInputError(f"frame {index}: {exc}", reason=exc.reason,
                                    **exc.metadata) from None
        self.bounds.admit(*rgb.shape[:2])
        encoded = not isinstance(image, np.ndarray)
        payload = memoryview(image) if encoded else memoryview(rgb).cast("B")
        if self._bytes + payload.nbytes > self.max_bytes:
            raise InvalidInputError(
                f"the frames sent so far take more than {self.max_bytes} bytes, the most this "
                "server keeps for one upload; send fewer frames, or encode them (JPEG/PNG)",
                reason="VIDEO_TOO_LARGE", limit=str(self.max_bytes))
        with self._file_lock:
            self._file.seek(self._bytes)
            self._file.write(payload)
        self._records.append((self._bytes, payload.nbytes, encoded))
        self._bytes += payload.nbytes
        self.ids.append(video_frame_id(rgb, self.model_id, self.namespace))

    @property
    def size(self) -> tuple[int, int]:
        if self.bounds.size is None:
            raise InvalidInputError("the stream sent no frame: send at least one")
        return self.bounds.size

    def frames(self) -> Iterator[np.ndarray]:
        """The frames as HxWx3 uint8 RGB, in order (decoded again from the file): those added
        so far, and those added before the iterator gets there."""
        index = 0
        while index < len(self._records):
            offset, length, encoded = self._records[index]
            with self._file_lock:
                self._file.seek(offset)
                data = self._file.read(length)
            if encoded:
                yield decode_image(data, "rgb", max_pixels=self.bounds.max_pixels)
            else:
                height, width = self.size
                yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
            index += 1

    def close(self) -> None:
        with self._file_lock:  # not while a frame is being written or read
            self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class FrameStream:
    """A client's frame stream while it is received into ``spool`` and embedded at once.

    The receiver ``add``s frames and ``end``s the stream (also when it fails);
    ``embed_frames`` reads ``spool`` with ``next_frame``, which waits for the next frame
    until the stream ended. ``run(function, *args)`` runs a call off the event loop.
    ``close()`` (``embed_frames`` calls it when it stops) closes the spool once the stream
    ended; before that, the receiver still writes to it, and closes it when it fails.
    """

    def __init__(self, spool: FrameSpool, run: Callable[..., Awaitable[Any]]) -> None:
        self.spool = spool
        self._run = run
        self._spooled = 0  # frames the embedding may read
        self._read = 0  # frames handed to the embedding
        self.ended = False
        self._changed = asyncio.Event()

    async def add(self, image: bytes | np.ndarray, input_color_format: str = "rgb") -> None:
        await self._run(self.spool.add, image, input_color_format)
        self._spooled += 1
        self._changed.set()

    def end(self) -> None:
        self.ended = True
        self._changed.set()

    def frames(self) -> Iterator[np.ndarray]:
        return self.spool.frames()

    async def next_frame(self, frames: Iterator[np.ndarray]) -> np.ndarray | None:
        """The next frame of ``frames()`` once it is spooled; None when the stream ended."""
        while self._read >= self._spooled and not self.ended:
            self._changed.clear()
            await self._changed.wait()
        if self._read >= self._spooled:
            return None
        self._read += 1
        return await self._run(next, frames, None)

    def close(self) -> None:
        if self.ended:
            self.spool.close()


class FrameUpload:
    """Which of a video's frames are stored, or why they will not be.

    ``ids`` may still grow while the frames are embedded (a ``FrameSpool``'s, while the
    stream arrives); a frame is embedded only once its id is there.
    """

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.session_id = ""  # the session that waits for the frames, once there is one
        self._stored: set[int] = set()
        self._error: Sam2Error | None = None
        self._done = False
        self._changed = threading.Condition()

    @property
    def frames_stored(self) -> int:
        return len(self._stored)

    @property
    def finished(self) -> bool:
        """All frames stored, or failed."""
        return self._done

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> Sam2Error | None:
        """Why the frames will not all be stored (None: no failure so far)."""
        return self._error

    def stored(self, index: int) -> None:
        with self._changed:
            self._stored.add(index)
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
                    lambda: index in self._stored or self._error is not None, timeout_s):
                raise NotReadyError(f"frame {index} of the video was not embedded within "
                                    f"{timeout_s:.0f} s; the encoder tier is overloaded or down")
            if index not in self._stored and self._error is not None:
                raise self._error


async def embed_frames(
    video: VideoFile | FrameSpool | FrameStream,
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
    decodes the next frame off the event loop (None at the end): a ``FrameStream``'s
    ``next_frame`` waits for frames still arriving.
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
        # Cancelled while a frame is decoded on a worker thread, the iterator cannot be
        # closed here ("generator already executing"); it ends when it is collected.
        with contextlib.suppress(ValueError):
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
