"""How much does storing embeddings in float16 / bfloat16 change the masks?

Embeds the parity test images with a model, round-trips each embedding through the
store codec in each storage dtype, decodes the same prompts, and reports mask IoU and
max |logit| difference against the float32 embedding, plus bytes per entry.

    python bench/bench_store_dtype.py --models sam2.1/hiera_tiny,sam2.1/hiera_b_plus

Uses random official-format weights (tests/helpers/checkpoints.py): real weights give
smoother logits, so these IoUs are a pessimistic bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam2_shared import Sam2Model  # noqa: E402
from sam2_shared.prompts import Prompt  # noqa: E402
from sam2_shared.store.codec import decode_embedding, encode_embedding  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.synthetic_images import pixel_box, pixel_point, synthetic_rgb  # noqa: E402

SHAPES = [(512, 512), (600, 800), (1080, 1920), (64, 2048)]
DTYPES = ("float16", "bfloat16")


def prompts_for(height: int, width: int) -> list[Prompt]:
    return [
        Prompt(np.array([pixel_point((0.3, 0.4), height, width)]), np.array([1])),
        Prompt(
            np.array(
                [pixel_point((0.6, 0.5), height, width), pixel_point((0.2, 0.2), height, width)]
            ),
            np.array([1, 0]),
        ),
        Prompt(box=np.array(pixel_box((0.2, 0.2, 0.7, 0.8), height, width))),
        Prompt(np.array([pixel_point((0.5, 0.5), height, width)]), np.array([1]),
               multimask_output=False),
    ]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sam2.1/hiera_tiny")
    parser.add_argument("--out", help="append the markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [
        "### Embedding storage dtype vs float32 (store codec round trip)",
        "",
        "| model | dtype | bytes per entry | mean mask IoU | min mask IoU | max abs logit diff |",
        "|---|---|---|---|---|---|",
    ]
    for model_id in args.models.split(","):
        model = Sam2Model.from_pretrained(model_id, checkpoint=make_random_checkpoint(model_id))
        rgbs = [synthetic_rgb(h, w, seed=i) for i, (h, w) in enumerate(SHAPES)]
        embeddings = model.encode_rgb(rgbs)
        for dtype in DTYPES:
            ious, diffs, size = [], [], 0
            for rgb, embedding in zip(rgbs, embeddings):
                blob = encode_embedding(embedding, dtype)
                size = len(blob)
                stored = decode_embedding(blob)
                prompts = prompts_for(*rgb.shape[:2])
                want = model.decode_prompts(embedding, prompts)
                got = model.decode_prompts(stored, prompts)
                for a, b in zip(want, got):
                    ious += [iou(a.masks[0, c], b.masks[0, c]) for c in range(a.masks.shape[1])]
                    diffs.append(float(np.abs(a.logits - b.logits).max()))
            lines.append(
                f"| {model_id} | {dtype} | {size:,} | {np.mean(ious):.5f} | {min(ious):.5f} | "
                f"{max(diffs):.4f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
