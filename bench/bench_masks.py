"""Mask wire cost per 1080p candidate: the decoder's side (upsample the low-res logits, encode,
area, box, proto) and the client's (decode with validation), for object-like and speckled masks.

Object-like: smooth low-res logits of two overlapping blobs (what trained weights give);
speckled: Gaussian noise logits (what random weights give; thousands of runs per mask).
One prompt, multimask (3 candidates), through ``wire.prompt_results_to_proto`` with the
decoder's ``DeferredMasks`` and back through ``wire.predictions_from_proto``.

    python bench/bench_masks.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_shared import wire  # noqa: E402
from sam2_shared.inference.sam2_model import DeferredMasks  # noqa: E402
from sam2_shared.prompts import Sam2BatchedPrediction  # noqa: E402
from sam2_shared.wire import masks as mask_codec  # noqa: E402
from sam2_shared.wire.masks import MaskEncoding  # noqa: E402

HW = (1080, 1920)


def low_res_logits() -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    blob = 8 * (1 - ((x - 110) / 60) ** 2 - ((y - 120) / 45) ** 2)
    second = 8 * (1 - ((x - 180) / 30) ** 2 - ((y - 90) / 50) ** 2)
    smooth = np.maximum(blob, second)
    noise = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    return {"object-like": np.stack([smooth, smooth - 2, smooth + 2])[None],
            "speckled": np.stack([noise, noise - 0.3, noise + 0.3])[None]}


def median_ms(function, repeats: int) -> float:
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print("| masks | format | decoder: 3 candidates to protos (ms) | client: protos to masks (ms) "
          "| COCO RLE encode of one mask (ms) |\n|---|---|---|---|---|")
    for name, logits in low_res_logits().items():
        prediction = Sam2BatchedPrediction(
            DeferredMasks(logits, HW), np.zeros((1, 3), np.float32),
            np.clip(logits, -32, 32), np.zeros(1, np.float32))
        deferred = DeferredMasks(logits, HW)
        # As the decoder makes it for COCO RLE (column-major where the code can).
        one_mask = deferred.candidate(0, 0, column_major=True) \
            if hasattr(deferred, "candidate") else deferred[0, 0]
        for encoding in (MaskEncoding.COCO_RLE, MaskEncoding.RAW_BITS):
            results = wire.prompt_results_to_proto([prediction], encoding)
            server = median_ms(functools.partial(wire.prompt_results_to_proto, [prediction],
                                                 encoding), args.repeats)
            client = median_ms(functools.partial(wire.predictions_from_proto, results),
                               args.repeats)
            rle = median_ms(functools.partial(mask_codec.encode_coco_rle, one_mask),
                            args.repeats) if encoding is MaskEncoding.COCO_RLE else float("nan")
            print(f"| {name} | {encoding.value} | {server:.2f} | {client:.2f} | {rle:.2f} |")


if __name__ == "__main__":
    main()
