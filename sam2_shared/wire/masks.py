"""Binary mask encodings for the wire: COCO RLE, 1-bit PNG and packed bits.

Masks are bool arrays [H, W] (one mask) or [N, H, W] (a batch) at the original
image size. No grpc here: ``sam2_shared.wire`` puts the results into protos.

Formats:
    COCO RLE: pycocotools' compressed counts string, column-major runs starting with
        a background run; ``{"size": [H, W], "counts": counts}`` decodes with
        ``pycocotools.mask.decode``.
    PNG: a 1-bit grayscale PNG file (bilevel), 1 = mask. Decoding accepts any
        grayscale PNG and takes every nonzero pixel as mask.
    Raw bits: the row-major flattened mask, 8 pixels per byte, most significant bit
        first (``np.packbits`` with its default ``bitorder="big"``), the last byte
        zero-padded: ``ceil(H * W / 8)`` bytes.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from pycocotools import mask as coco_mask

from sam2_shared.errors import InvalidInputError


class MaskEncoding(str, Enum):
    """How a mask is serialised (mirrors ``sam2.v1.MaskFormat``)."""

    COCO_RLE = "coco_rle"
    PNG = "png"
    RAW_BITS = "raw_bits"


def _as_batch(masks: np.ndarray) -> np.ndarray:
    """[H, W] or [N, H, W] bool-like -> [N, H, W] bool."""
    array = np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"masks must have shape [H, W] or [N, H, W], got {array.shape}")
    return array.astype(bool, copy=False)


def encode_coco_rle(masks: np.ndarray) -> list[str]:
    """[N, H, W] (or [H, W]) masks -> N COCO RLE compressed counts strings."""
    batch = _as_batch(masks)
    if batch.shape[0] == 0:
        return []
    # pycocotools wants H x W x N, column-major uint8 (bool viewed as uint8 is free). A
    # column-major mask, as the decoder tier makes them for this encoding, is not copied.
    fortran = np.asfortranarray(batch.transpose(1, 2, 0)).view(np.uint8)
    return [rle["counts"].decode("ascii") for rle in coco_mask.encode(fortran)]


def decode_coco_rle(counts: str | bytes, height: int, width: int) -> np.ndarray:
    """COCO RLE compressed counts of an (H, W) mask -> [H, W] bool (column-major: pycocotools'
    own layout, no copy; ``np.ascontiguousarray`` it for row-major work)."""
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    # The runs must be checked anyway (pycocotools' decode trusts them: too few leave pixels
    # uninitialised, too many write past its buffer); expanding the checked runs with
    # np.repeat then costs about half of pycocotools' decode of the same string.
    runs = _coco_rle_runs(raw, height * width)
    if runs is None:
        raise InvalidInputError(f"invalid COCO RLE counts for a {width}x{height} mask")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True  # runs alternate, starting with background
    return np.repeat(values, runs).reshape(width, height).T  # column-major, as pycocotools


# A run takes at most 12 characters (60 bits); any valid run is far shorter, and the
# bound keeps the arithmetic inside int64.
_MAX_RUN_CHARS = 12

# A character's digit (0..63) -> its 5-bit payload, signed for a run's last character (bit
# 0x20 clear), whose bit 0x10 is the run's sign. Summing the payloads << 5k then gives the
# sign-extended run with no separate pass over the negative runs.
_SIGNED_PAYLOAD = np.array([d - 32 if 16 <= d < 32 else d & 0x1F for d in range(64)],
                           dtype=np.int64)


def _coco_rle_runs(counts: bytes, total: int) -> np.ndarray | None:
    """Run lengths (int64) of COCO compressed counts, or None when malformed or when the
    runs are not all >= 0 summing to ``total`` pixels.

    Each run is a little-endian base-32 varint in characters 48..111: 5 value bits,
    bit 0x20 = more characters follow, bit 0x10 of the last character = negative;
    from the fourth run on, the value is a delta to the run two before. Vectorised:
    a speckled 1080p mask has hundreds of thousands of runs (~2.3 ms here).
    """
    digits = np.frombuffer(counts, dtype=np.uint8) - np.uint8(48)  # wraps below 48
    if digits.size == 0 or digits[-1] >= 32 or digits.max() >= 64:  # last must end a run
        return None
    ends = np.flatnonzero(digits < 32)  # the character that ends its run
    starts = np.empty_like(ends)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    extra = ends - starts  # characters after a run's first
    longest = int(extra.max()) + 1
    if longest > _MAX_RUN_CHARS:
        return None
    payload = _SIGNED_PAYLOAD[digits]
    # Character k of every run at once; most runs have one or two characters.
    values = payload[starts]
    for k in range(1, longest):
        longer = np.flatnonzero(extra >= k)
        values[longer] += payload[starts[longer] + k] << (5 * k)
    if np.abs(values).max() > total:  # no run or delta of a valid mask is that large
        return None
    runs = values.copy()
    # runs[i] = values[i] + runs[i - 2] for i >= 3: a running sum along each parity chain.
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.min() < 0 or runs.max() > total:
        return None
    # With every run in [0, total] an int64 sum can wrap only when size * total >= 2**63.
    # Runs summing to total + 2**64 would then wrap round to total and be accepted (np.repeat
    # then writes far past its buffer), so such a sum is checked step by step: the running
    # total turns negative as it passes int64's range.
    if runs.size * total < 2**63:
        return runs if int(runs.sum()) == total else None
    pixels = np.cumsum(runs)
    return runs if pixels[-1] == total and pixels.min() >= 0 else None


def encode_png(mask: np.ndarray) -> bytes:
    """[H, W] mask -> 1-bit grayscale PNG bytes."""
    import cv2  # only for PNG: the client imports this module without OpenCV

    (single,) = _as_batch(mask)
    pixels = single.astype(np.uint8) * np.uint8(255)
    # Low zlib effort: masks compress well anyway and this is on the request path.
    params = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buffer = cv2.imencode(".png", pixels, params)
    if not ok:
        raise RuntimeError(f"PNG encoding of a {single.shape} mask failed")
    return buffer.tobytes()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, without decoding; None if not a PNG.

    (The client imports this module without PIL or OpenCV, hence this small reader.)
    """
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width


def decode_png(data: bytes, height: int | None = None, width: int | None = None) -> np.ndarray:
    """PNG bytes -> [H, W] bool (nonzero = mask); checks the size when given.

    With a size given, the size the PNG's header states is checked before any decoding, so
    a small file declaring a huge image costs nothing.
    """
    import cv2

    if height is not None and width is not None:
        stated = png_size(data)
        if stated is None:
            raise InvalidInputError("mask PNG could not be decoded (no PNG header)")
        if stated != (height, width):
            raise InvalidInputError(
                f"mask PNG is {stated[1]}x{stated[0]}, expected {width}x{height}"
            )
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise InvalidInputError("mask PNG could not be decoded")
    if (height is not None and pixels.shape[0] != height) or (
        width is not None and pixels.shape[1] != width
    ):
        raise InvalidInputError(
            f"mask PNG is {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height}"
        )
    return pixels > 0


def encode_packed_bits(mask: np.ndarray) -> bytes:
    """[H, W] mask -> row-major packed bits, MSB first, ``ceil(H*W/8)`` bytes."""
    (single,) = _as_batch(mask)
    return np.packbits(single.reshape(-1)).tobytes()


def decode_packed_bits(data: bytes, height: int, width: int) -> np.ndarray:
    """Row-major packed bits of an (H, W) mask -> [H, W] bool."""
    expected = -(-height * width // 8)
    if len(data) != expected:
        raise InvalidInputError(
            f"packed mask has {len(data)} bytes, a {width}x{height} mask needs {expected}"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).view(bool)  # 0/1 bytes: a free view


def encode_masks(masks: np.ndarray, encoding: MaskEncoding) -> list[str] | list[bytes]:
    """[N, H, W] masks -> N encoded masks (str for COCO RLE, bytes otherwise)."""
    batch = _as_batch(masks)
    if encoding is MaskEncoding.COCO_RLE:
        return encode_coco_rle(batch)
    if encoding is MaskEncoding.PNG:
        return [encode_png(m) for m in batch]
    if encoding is MaskEncoding.RAW_BITS:
        return [encode_packed_bits(m) for m in batch]
    raise ValueError(f"unknown mask encoding {encoding!r}")


def decode_mask(data: str | bytes, encoding: MaskEncoding, height: int, width: int) -> np.ndarray:
    """One encoded mask -> [H, W] bool (COCO RLE: column-major, others row-major)."""
    if encoding is MaskEncoding.COCO_RLE:
        return decode_coco_rle(data, height, width)
    if encoding is MaskEncoding.PNG:
        return decode_png(bytes(data), height, width)  # type: ignore[arg-type]
    if encoding is MaskEncoding.RAW_BITS:
        return decode_packed_bits(bytes(data), height, width)  # type: ignore[arg-type]
    raise ValueError(f"unknown mask encoding {encoding!r}")


def mask_areas(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] (or [H, W]) masks -> [N] int64 pixel counts."""
    batch = _as_batch(masks)
    return np.array([np.count_nonzero(mask) for mask in batch], dtype=np.int64)


def mask_bboxes(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] (or [H, W]) masks -> [N, 4] int64 ``[x_min, y_min, x_max, y_max]``.

    Max edges are exclusive (pixel edges, as COCO's ``x + w``); all zero for an
    empty mask.
    """
    batch = _as_batch(masks)
    boxes = np.zeros((batch.shape[0], 4), dtype=np.int64)
    columns = batch.any(axis=1)  # [N, W]
    rows = batch.any(axis=2)  # [N, H]
    for i in np.flatnonzero(columns.any(axis=1)):
        xs = np.flatnonzero(columns[i])
        ys = np.flatnonzero(rows[i])
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes
