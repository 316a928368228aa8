"""The main job: both tiers on the embedded diskcache store, one image segmented.

Starts ``sam2-encoder`` and ``sam2-decoder`` on 127.0.0.1 (free ports), segments
``samples/scene.jpg`` through ``Sam2Client`` with one positive click, writes the mask
overlay to ``out/overlay.png`` and stops both tiers.

The checkpoint: ``--checkpoint PATH``, or ``$SAM2_CHECKPOINT``, or the official file in
``$SAM2_CHECKPOINT_DIR`` (default ``~/.cache/sam2``), downloaded from Meta when a network
exists. Without any, it stops and says where to put the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam2_shared.client import Sam2Client  # noqa: E402
from sam2_shared.errors import CheckpointError  # noqa: E402
from sam2_shared.inference.checkpoints import resolve_checkpoint  # noqa: E402
from sam2_shared.model import get_config  # noqa: E402
from tests.helpers.tier_processes import TierProcess  # noqa: E402


def overlay(bgr: np.ndarray, mask: np.ndarray, point: tuple[float, float]) -> np.ndarray:
    """The image with the mask tinted blue, its outline, and the click."""
    out = bgr.copy()
    tint = np.array([255, 144, 30], np.float32)
    out[mask] = (0.45 * out[mask] + 0.55 * tint).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 2)
    cv2.drawMarker(out, (int(point[0]), int(point[1])), (0, 255, 0), cv2.MARKER_STAR, 24, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("SAM2_MODEL", "sam2.1/hiera_tiny"))
    parser.add_argument("--checkpoint", default=os.environ.get("SAM2_CHECKPOINT"))
    parser.add_argument("--image", default=str(ROOT / "samples" / "scene.jpg"))
    parser.add_argument("--point", default="900,560", help="x,y of the click in pixels")
    parser.add_argument("--out", default=str(ROOT / "out" / "overlay.png"))
    args = parser.parse_args()

    try:
        checkpoint = resolve_checkpoint(get_config(args.model), args.checkpoint)
    except CheckpointError as error:
        print(f"sam2-serving demo: {error}", file=sys.stderr)
        return 2
    print(f"checkpoint: {checkpoint}")
    store = f"diskcache://{tempfile.mkdtemp(prefix='sam2-demo-store-')}"
    common = ["--model", args.model, "--checkpoint", str(checkpoint), "--store", store]
    x, y = (float(v) for v in args.point.split(","))

    with TierProcess("encoder_service", common) as encoder, TierProcess(
        "decoder_service", [*common, "--encoder-address", encoder.address]
    ) as decoder:
        print(f"encoder on {encoder.address}, decoder on {decoder.address}")
        bgr = cv2.imread(args.image)
        if bgr is None:
            print(f"cannot read {args.image}", file=sys.stderr)
            return 2
        with Sam2Client(encoder=encoder.address, decoder=decoder.address,
                        model_id=args.model) as client:
            start = time.perf_counter()
            first = client.segment_images(bgr, point_coordinates=[[x, y]], point_labels=[1])[0]
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            again = client.segment_images(bgr, point_coordinates=[[x, y]], point_labels=[1])[0]
            again_s = time.perf_counter() - start
        best = int(first.scores.argmax())
        best_mask = first.masks[best]  # (H, W): one prompt gives masks (3, H, W)
        print(f"first click (embeds the image): {first_s:.2f} s; "
              f"same click again (embedding cached): {again_s * 1e3:.0f} ms")
        print(f"scores {np.round(np.asarray(first.scores), 3).tolist()}, best candidate {best}, "
              f"mask area {int(best_mask.sum())} px")
        assert np.array_equal(np.asarray(first.masks), np.asarray(again.masks))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), overlay(bgr, np.asarray(best_mask), (x, y)))
        print(f"overlay written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
