"""What ``sam2-embed`` reads: SOURCE arguments expanded lazily into image items.

A SOURCE is a file (taken whatever its name), a folder (walked recursively, files with an
image extension, in sorted order), a glob pattern (``**`` recursive; each match taken like a
SOURCE), ``s3://bucket/prefix`` (objects with an image extension under the prefix, or the one
object of that exact key), or ``-``: one SOURCE per line of stdin.

Nothing here reads image bytes until ``SourceItem.read`` is called, so a dataset is never held
in memory: a folder is walked and an S3 prefix is listed page by page as the consumer pulls.
A SOURCE that names nothing (a missing path, a glob without matches, an S3 listing that fails)
becomes one item whose ``read`` raises, so that it is reported like any bad file.

S3 sources take the store's URL options (``?endpoint_url=URL&region=R&addressing_style=path``,
see ``sam2_shared.store``) and credentials from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, profiles, instance roles), never from the URL. boto3 is imported
only for S3 sources: the client installs without it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

# What ``sam2_shared.inference.imaging.decode_image`` accepts: JPEG, PNG, WebP, TIFF, BMP.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
S3_OPTIONS = ("endpoint_url", "region", "addressing_style")
STDIN_SOURCE = "-"
_GLOB_CHARACTERS = frozenset("*?[")


class SourceError(OSError):
    """A file or object is missing (``NOT_FOUND``), unreadable (``UNREADABLE``) or too large
    to send (``TOO_LARGE``); ``reason`` goes to the manifest."""

    def __init__(self, message: str, reason: str = "UNREADABLE") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourceItem:
    """One image to embed: ``path`` as the manifest records it, and how to get its bytes.

    ``read(max_bytes)`` raises ``SourceError`` when the item is missing, unreadable or larger
    than ``max_bytes`` (checked before its bytes are read where the size is known).
    """

    path: str
    read: Callable[[int], bytes]


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _too_large(path: str, size: int, max_bytes: int) -> SourceError:
    return SourceError(f"{path} has {size} bytes; the limit is {max_bytes} "
                       "(--max-image-mb): downscale it or raise the limit", "TOO_LARGE")


def _file_item(path: str) -> SourceItem:
    def read(max_bytes: int) -> bytes:
        try:
            size = os.stat(path).st_size
            if size > max_bytes:
                raise _too_large(path, size, max_bytes)
            with open(path, "rb") as file:
                data = file.read(max_bytes + 1)  # the file may have grown since stat
        except SourceError:
            raise
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > max_bytes:
            raise _too_large(path, len(data), max_bytes)
        return data

    return SourceItem(path, read)


def _failed_item(path: str, message: str, reason: str = "NOT_FOUND") -> SourceItem:
    def read(max_bytes: int) -> bytes:
        raise SourceError(message, reason)

    return SourceItem(path, read)


def _walk_folder(folder: str) -> Iterator[SourceItem]:
    """Image files under ``folder``, depth first in sorted order (stable across reruns)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if has_image_extension(name):
                yield _file_item(os.path.join(root, name))


def _local(source: str) -> Iterator[SourceItem]:
    if os.path.isdir(source):
        yield from _walk_folder(source)
    elif os.path.exists(source):
        yield _file_item(source)
    elif _GLOB_CHARACTERS & set(source):
        matches = sorted(glob.iglob(source, recursive=True))
        if not matches:
            yield _failed_item(source, f"the pattern {source!r} matches no file")
        for match in matches:
            yield from _local(match)
    else:
        yield _failed_item(source, f"no such file or folder: {source}")


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix?options`` split; ``options`` are the store URL's (``S3_OPTIONS``)."""

    bucket: str
    prefix: str
    options: dict[str, str]

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"an S3 source is s3://bucket/prefix, got {url!r}")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - set(S3_OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} in {parts.scheme}://"
                             f"{parts.netloc}{parts.path}; allowed: {', '.join(S3_OPTIONS)}")
        return cls(parts.netloc, parts.path.lstrip("/"), options)

    def selects(self, key: str) -> bool:
        """The object of exactly this key, or an image under the prefix as a folder."""
        if key == self.prefix:
            return True
        under = not self.prefix or self.prefix.endswith("/") or key.startswith(self.prefix + "/")
        return under and has_image_extension(key)

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


S3ClientFactory = Callable[[S3Location], Any]


def boto3_client(location: S3Location) -> Any:
    """A boto3 S3 client with the store's URL options (path addressing with an endpoint)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SourceError("s3:// sources need boto3: pip install boto3") from None
    endpoint_url = location.options.get("endpoint_url") or None
    region = location.options.get("region") or None
    style = location.options.get("addressing_style") or ("path" if endpoint_url else "auto")
    config = Config(region_name=region, retries={"max_attempts": 4, "mode": "standard"},
                    s3={"addressing_style": style},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                          config=config)


def _s3_item(client: Any, location: S3Location, key: str, size: int) -> SourceItem:
    url = location.url_of(key)

    def read(max_bytes: int) -> bytes:
        if size > max_bytes:
            raise _too_large(url, size, max_bytes)
        try:
            body = client.get_object(Bucket=location.bucket, Key=key)["Body"]
            try:
                data = body.read(max_bytes + 1)
            finally:
                body.close()
        except Exception as exc:  # botocore's errors: any failure is this object's
            raise SourceError(f"cannot read {url}: {exc}") from None
        if len(data) > max_bytes:
            raise _too_large(url, len(data), max_bytes)
        return data

    return SourceItem(url, read)


def _s3(url: str, client_factory: S3ClientFactory) -> Iterator[SourceItem]:
    try:
        location = S3Location.parse(url)
        client = client_factory(location)
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=location.prefix)
        found = False
        for page in pages:
            for entry in page.get("Contents", ()):
                if location.selects(entry["Key"]):
                    found = True
                    yield _s3_item(client, location, entry["Key"], int(entry.get("Size", 0)))
        if not found:
            yield _failed_item(url, f"no image under {url}")
    except Exception as exc:  # a listing that fails is reported like a bad file, not a crash
        yield _failed_item(url, f"cannot list {url}: {exc}", "UNREADABLE")


def iter_sources(sources: Iterable[str], stdin: TextIO | None = None,
                 s3_client: S3ClientFactory = boto3_client) -> Iterator[SourceItem]:
    """Every image item of ``sources`` in order, each path once (see the module docstring)."""
    seen: set[str] = set()
    for item in _expand(sources, stdin, s3_client):
        if item.path not in seen:
            seen.add(item.path)
            yield item


def _expand(sources: Iterable[str], stdin: TextIO | None,
            s3_client: S3ClientFactory) -> Iterator[SourceItem]:
    for source in sources:
        if source == STDIN_SOURCE:
            if stdin is None:
                raise ValueError("'-' reads paths from stdin, but no stdin was given")
            lines = (line.strip() for line in stdin)
            yield from _expand((line for line in lines if line and line != STDIN_SOURCE),
                               None, s3_client)
        elif source.startswith("s3://"):
            yield from _s3(source, s3_client)
        else:
            yield from _local(str(Path(source)) if source else source)


def video_frame_items(sources: Iterable[str], max_pixels: int) -> Iterator[SourceItem]:
    """Every frame of the local video files ``sources`` (MP4, WebM, MOV ... that OpenCV's
    FFmpeg reads), in order, as ``PATH#frame=N`` items of lossless PNG bytes: the encoder
    decodes them to the very pixels decoded here, so their ids are ``video_frame_id`` of the
    video's frames. Frames are decoded one at a time as the consumer pulls (at most
    ``max_pixels`` each, else that frame fails); a video that cannot be opened is one failed
    item."""
    import cv2  # only for videos: the client installs without OpenCV

    for path in sources:
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        try:
            if not capture.isOpened():
                yield _failed_item(path, f"{path} is not a video OpenCV's FFmpeg can read",
                                   "UNREADABLE" if os.path.exists(path) else "NOT_FOUND")
                continue
            index = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                yield _frame_item(f"{path}#frame={index}", bgr, max_pixels)
                index += 1
            if index == 0:
                yield _failed_item(path, f"{path} has no decodable frame", "UNREADABLE")
        finally:
            capture.release()


def _frame_item(path: str, bgr: Any, max_pixels: int) -> SourceItem:
    import cv2

    height, width = bgr.shape[:2]
    if height * width > max_pixels:
        return _failed_item(path, f"{path} is {width}x{height} pixels, more than "
                            f"{max_pixels} (--max-image-pixels)", "TOO_LARGE")
    ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast, lossless
    data = png.tobytes() if ok else b""

    def read(max_bytes: int) -> bytes:
        if not data:
            raise SourceError(f"{path} could not be encoded as PNG")
        if len(data) > max_bytes:
            raise _too_large(path, len(data), max_bytes)
        return data

    return SourceItem(path, read)
