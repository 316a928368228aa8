"""Tracked masks to files: a folder of PNG masks, or the video with the masks drawn on it.

``frames`` are what ``Sam2TrackingClient.propagate`` (or ``add_prompt``) answered; frames of the
video without an answer are written without masks. OpenCV (a base dependency, used for the
MP4) is imported only when a video is written: the client itself imports without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from sam2_shared.wire.tracking import TrackedFrame

# Distinct colours (RGB) for objects, by position in the session's object order.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
                    (250, 190, 212)], dtype=np.uint8)


def write_mask_pngs(frames: Iterable[TrackedFrame], folder: str | os.PathLike) -> list[Path]:
    """One single-channel PNG per frame and object, ``<frame:05d>_obj<id>.png``: 255 on the
    mask, 0 elsewhere. Returns the paths written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for frame in frames:
        for object_id, mask in zip(frame.object_ids, frame.masks, strict=True):
            path = out / f"{frame.frame_index:05d}_obj{object_id}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(path)
            written.append(path)
    return written


def overlay(rgb: np.ndarray, frame: TrackedFrame, alpha: float = 0.5) -> np.ndarray:
    """``rgb`` [H, W, 3] uint8 with each object's mask tinted in its palette colour."""
    if frame.masks.size and frame.masks.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"masks of {frame.masks.shape[1:]} on a frame of {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    for index, mask in enumerate(frame.masks):
        colour = PALETTE[index % len(PALETTE)].astype(np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.round().astype(np.uint8)


def write_annotated_video(video: str | os.PathLike, frames: Iterable[TrackedFrame],
                          out_path: str | os.PathLike, alpha: float = 0.5) -> Path:
    """The ``video`` file's frames with the tracked masks drawn on them, as an MP4 (MPEG-4
    part 2) at the source's frame rate. Returns ``out_path``."""
    import cv2  # only here: the client imports without OpenCV

    by_index = {frame.frame_index: frame for frame in frames}
    source = cv2.VideoCapture(str(video))
    if not source.isOpened():
        raise ValueError(f"cannot read the video {video}")
    fps = source.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    try:
        index = 0
        while True:
            ok, bgr = source.read()
            if not ok:
                break
            if writer is None:
                height, width = bgr.shape[:2]
                writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (width, height))
                if not writer.isOpened():
                    raise ValueError(f"cannot write an MP4 to {out_path}")
            if index in by_index:
                rgb = overlay(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), by_index[index], alpha)
                bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            writer.write(bgr)
            index += 1
    finally:
        source.release()
        if writer is not None:
            writer.release()
    return Path(out_path)
