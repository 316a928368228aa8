"""Tracked masks written as PNG files and as an annotated MP4 (no network)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sam2_shared.client.video_output import (
    PALETTE,
    overlay,
    write_annotated_video,
    write_mask_pngs,
)
from sam2_shared.wire.tracking import TrackedFrame

SAMPLE = Path(__file__).resolve().parents[3] / "samples" / "clip.mp4"
HEIGHT, WIDTH = 180, 320


def tracked(frame_index: int) -> TrackedFrame:
    masks = np.zeros((2, HEIGHT, WIDTH), dtype=bool)
    masks[0, 20:60, 30 + 10 * frame_index : 90 + 10 * frame_index] = True
    masks[1, 120:170, 200:300] = True
    return TrackedFrame(frame_index, [3, 7], masks, np.array([2.0, 1.0], np.float32))


def test_mask_pngs_hold_every_object_of_every_frame(tmp_path: Path) -> None:
    frames = [tracked(i) for i in range(3)]
    paths = write_mask_pngs(frames, tmp_path / "masks")
    assert [p.name for p in paths] == [f"{i:05d}_obj{o}.png" for i in range(3) for o in (3, 7)]
    for path, (frame, obj) in zip(paths, [(f, o) for f in frames for o in range(2)],
                                  strict=True):
        read = np.asarray(Image.open(path))
        assert read.dtype == np.uint8 and set(np.unique(read)) <= {0, 255}
        np.testing.assert_array_equal(read == 255, frame.masks[obj])


def test_the_annotated_video_has_the_masks_drawn_where_they_are(tmp_path: Path) -> None:
    frames = [tracked(i) for i in (0, 1, 2)]  # frames 3.. have no answer: left as they are
    out = write_annotated_video(SAMPLE, frames, tmp_path / "tracked.mp4", alpha=0.6)
    source, written = (cv2.VideoCapture(str(p)) for p in (SAMPLE, out))
    count = 0
    while True:
        ok_a, original = source.read()
        ok_b, annotated = written.read()
        if not ok_a:
            assert not ok_b
            break
        assert annotated.shape == original.shape == (HEIGHT, WIDTH, 3)
        expected = cv2.cvtColor(original, cv2.COLOR_BGR2RGB)
        if count < 3:
            expected = overlay(expected, frames[count], alpha=0.6)
        got = cv2.cvtColor(annotated, cv2.COLOR_BGR2RGB).astype(np.float32)
        # Lossy MPEG-4 both ways: compare region means, not pixels.
        inside = frames[0].masks[1]
        assert np.abs(got[inside].mean(0) - expected[inside].mean(0)).max() < 12
        if count < 3:
            tint = np.abs(expected[inside].astype(np.float32).mean(0)
                          - cv2.cvtColor(original, cv2.COLOR_BGR2RGB)[inside].mean(0))
            assert tint.max() > 20  # the second object's colour is visibly there
        count += 1
    assert count == 8
    assert tuple(PALETTE[1]) == (60, 180, 75)
