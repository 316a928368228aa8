"""Mask encodings: round trips, pycocotools interoperability, edge shapes, bad input."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from sam2_shared.errors import InvalidInputError
from sam2_shared.wire import masks
from sam2_shared.wire.masks import MaskEncoding
from tests.helpers import hostile_payloads as payloads

SHAPES = [(1, 1), (1, 7), (7, 1), (13, 17), (64, 64), (101, 203)]


def _random_masks(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.random((count, height, width)) < 0.4
    out[0] = False  # empty
    if count > 1:
        out[1] = True  # full
    return out


@pytest.mark.parametrize("encoding", list(MaskEncoding))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(encoding: MaskEncoding, shape: tuple[int, int]) -> None:
    batch = _random_masks(4, *shape, seed=shape[0] * 31 + shape[1])
    encoded = masks.encode_masks(batch, encoding)
    assert len(encoded) == 4
    for original, data in zip(batch, encoded, strict=True):
        decoded = masks.decode_mask(data, encoding, *shape)
        assert decoded.dtype == bool and decoded.shape == shape
        np.testing.assert_array_equal(decoded, original)


def test_coco_rle_interoperates_with_pycocotools() -> None:
    mask = np.zeros((37, 53), dtype=bool)
    cv2.circle(mask.view(np.uint8), (20, 15), 9, 1, -1)
    mask[30:, 40:] = True
    (counts,) = masks.encode_coco_rle(mask)
    assert isinstance(counts, str)
    rle = {"size": [37, 53], "counts": counts}
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), mask)
    assert coco_mask.area(rle) == mask.sum() == masks.mask_areas(mask)[0]
    # COCO's bbox is [x, y, w, h]; ours has exclusive max edges.
    x, y, w, h = coco_mask.toBbox(rle)
    assert masks.mask_bboxes(mask)[0].tolist() == [x, y, x + w, y + h]
    # And the reverse: pycocotools' own encoding decodes with ours.
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    assert theirs.decode() == counts
    np.testing.assert_array_equal(masks.decode_coco_rle(theirs, 37, 53), mask)


def test_empty_and_full_counts() -> None:
    empty, full = masks.encode_coco_rle(np.stack([np.zeros((3, 4), bool), np.ones((3, 4), bool)]))
    # Counts start with a background run: an empty mask is one run, a full one is "0, 12".
    assert masks._coco_rle_runs(empty.encode(), 12).tolist() == [12]
    assert masks._coco_rle_runs(full.encode(), 12).tolist() == [0, 12]


def _runs_one_by_one(counts: bytes) -> list[int] | None:
    """The varint format read one character at a time: what the vectorised reader must match."""
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        digit = char - 48
        if not 0 <= digit < 64:
            return None
        value |= (digit & 0x1F) << shift
        shift += 5
        if digit & 0x20:
            continue
        if digit & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        value = shift = 0
    return runs if shift == 0 and runs else None


def test_vectorised_run_reader_matches_the_format_one_character_at_a_time() -> None:
    rng = np.random.default_rng(7)
    checked = valid = 0
    for trial in range(400):
        if trial % 2:  # real encodings of speckled and blocky masks
            mask = _random_masks(1, 13, 17)[0] if trial % 4 == 1 else \
                np.kron(rng.random((3, 4)) > 0.5, np.ones((5, 5), bool))[:13, :17]
            (text,) = masks.encode_coco_rle(mask)
            counts = text.encode()
        else:  # arbitrary strings of valid and invalid characters
            counts = bytes(rng.integers(40, 120, size=int(rng.integers(1, 12))).tolist())
        expected = _runs_one_by_one(counts)
        total = 13 * 17
        if expected is not None and (min(expected) < 0 or sum(expected) != total):
            expected = None
        got = masks._coco_rle_runs(counts, total)
        assert (None if got is None else got.tolist()) == expected, counts
        checked += 1
        valid += expected is not None
    assert valid >= 200 and checked == 400  # both outcomes were exercised


def test_every_digit_in_every_run_position_matches_the_format() -> None:
    # Each of the 64 digits at each position of a 1..12-character run, read as a delta
    # (4th run) on top of run 1 = 2**59 - 1, so nearly all are valid: a wrong digit value
    # or sign then changes the accepted runs instead of hiding behind None.
    head = payloads.coco_rle_counts([0, 2**59 - 1, 0]).encode()
    for length in range(1, 13):
        for position in range(length):
            for digit in range(64):
                run = [0x25] * (length - 1) + [0x03]
                run[position] = digit | 0x20 if position < length - 1 else digit & 0x1F
                counts = head + bytes(d + 48 for d in run)
                expected = _runs_one_by_one(counts)
                assert expected is not None
                got = masks._coco_rle_runs(counts, sum(expected))
                if min(expected) < 0:
                    assert got is None, counts
                else:
                    assert got is not None and got.tolist() == expected, counts


def test_runs_whose_int64_sum_wraps_to_the_total_are_rejected() -> None:
    # Runs all >= 0 that sum to total + 2**64 (an int64 sum wraps round to total): accepted,
    # decode_coco_rle's np.repeat wrote far past its buffer (a segfault).
    total, step = (2**31 - 1) ** 2, 2**59 - 1  # int32 height * width; largest 12-char run
    deltas = [0] + [step] * 10 + [41 - 2**32, 0]  # two chains climbing to 5 * step
    chains: list[int] = []
    for index, delta in enumerate(deltas):
        chains.append(delta + (chains[index - 2] if index > 2 else 0))
    counts = payloads.coco_rle_counts(chains).encode()
    runs = _runs_one_by_one(counts)
    assert runs is not None and min(runs) >= 0 and sum(runs) == total + 2**64
    assert masks._coco_rle_runs(counts, total) is None


def test_png_is_one_bit_grayscale() -> None:
    mask = _random_masks(2, 20, 30)[1]
    mask[5:9, 3:25] = False
    data = masks.encode_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR: width, height (4 bytes each), bit depth, colour type 0 = grayscale.
    assert int.from_bytes(data[16:20], "big") == 30
    assert int.from_bytes(data[20:24], "big") == 20
    assert data[24] == 1 and data[25] == 0
    np.testing.assert_array_equal(masks.decode_png(data, 20, 30), mask)


def test_packed_bits_layout_is_row_major_msb_first() -> None:
    mask = np.zeros((2, 5), dtype=bool)
    mask[0, 0] = True  # bit 0 -> 0x80 of byte 0
    mask[1, 2] = True  # flat index 7 -> 0x01 of byte 0
    mask[1, 3] = True  # flat index 8 -> 0x80 of byte 1
    assert masks.encode_packed_bits(mask) == bytes([0x81, 0x80])


def test_area_and_bbox() -> None:
    batch = np.zeros((3, 10, 12), dtype=bool)
    batch[1, 7, 5] = True
    batch[2, 2:5, 3:9] = True
    batch[2, 8, 11] = True
    assert masks.mask_areas(batch).tolist() == [0, 1, 19]
    assert masks.mask_bboxes(batch).tolist() == [[0, 0, 0, 0], [5, 7, 6, 8], [3, 2, 12, 9]]


@pytest.mark.parametrize("counts", ["", "1", "zzzz", "\x7f", "52", "5220300"], ids=repr)
def test_malformed_coco_rle_is_rejected(counts: str) -> None:
    # "" and "1" make pycocotools return uninitialised memory; we must refuse them.
    with pytest.raises(InvalidInputError):
        masks.decode_coco_rle(counts, 4, 4)


def test_wrong_sizes_are_rejected() -> None:
    mask = np.ones((4, 4), dtype=bool)
    (counts,) = masks.encode_coco_rle(mask)
    with pytest.raises(InvalidInputError):
        masks.decode_coco_rle(counts, 5, 5)
    with pytest.raises(InvalidInputError):
        masks.decode_packed_bits(masks.encode_packed_bits(mask), 5, 5)
    with pytest.raises(InvalidInputError):
        masks.decode_png(masks.encode_png(mask), 5, 4)
    with pytest.raises(InvalidInputError):
        masks.decode_png(b"not a png", 4, 4)


def test_full_hd_encoding_is_fast() -> None:
    # A blob with a smooth edge, like a real mask; guards against an accidental
    # per-pixel Python loop. Budgets are generous for a shared 2-core machine.
    mask = np.zeros((1080, 1920), dtype=np.uint8)
    cv2.ellipse(mask, (900, 500), (400, 250), 15, 0, 360, 1, -1)
    batch = mask.astype(bool)[None].repeat(3, axis=0)
    for encoding, budget_s in [
        (MaskEncoding.COCO_RLE, 0.25),
        (MaskEncoding.PNG, 0.5),
        (MaskEncoding.RAW_BITS, 0.25),
    ]:
        start = time.perf_counter()
        encoded = masks.encode_masks(batch, encoding)
        elapsed = time.perf_counter() - start
        assert elapsed < budget_s, (encoding, elapsed)
        decoded = masks.decode_mask(encoded[0], encoding, 1080, 1920)
        np.testing.assert_array_equal(decoded, batch[0])


def test_a_png_bomb_is_refused_by_its_header_before_decoding(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    # A 16384x16384 all-black PNG is a few KiB; decoding it would allocate 256 MiB.
    bomb = masks.encode_png(np.zeros((16384, 16384), dtype=bool))
    assert len(bomb) < 200_000
    assert masks.png_size(bomb) == (16384, 16384)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the PNG was decoded")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(InvalidInputError, match="16384x16384, expected 80x64"):
        masks.decode_png(bomb, 64, 80)
    with pytest.raises(InvalidInputError, match="no PNG header"):
        masks.decode_png(b"GIF89a" + bytes(40), 64, 80)
