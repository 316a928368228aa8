"""bf16 decode against fp32 decode on the parity images: mask IoU, logit and IoU-score
differences, and whether the best candidate is the same, for the same fp32 embedding.

Two bf16 decoders: all of it (``--precision bf16``) and only its mask upscaling
(``--upscaling-dtype bfloat16``). The bar for a bf16 default is a mean mask IoU >= 0.99
against fp32 (issue 12). Each image is encoded once in fp32 (the encoder tier's store holds
fp32 or fp16 embeddings); every decoder gets that embedding, rounded to bf16 where the decoder
is bf16, as the tier does. Masks are compared at the image's full size, every candidate of
every prompt.

    python bench/bench_bf16_decode.py [--model sam2.1/hiera_tiny] [--prompts 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_image import cpu_name, mask_iou  # noqa: E402
from sam2_shared import Sam2Model  # noqa: E402
from sam2_shared.inference.sam2_model import cpu_has_native_bf16  # noqa: E402
from sam2_shared.prompts import Prompt  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.parity.support import TEST_IMAGES  # noqa: E402

# The decoders compared with fp32: all in bf16 (``--precision bf16``), and fp32 with the mask
# upscaling in bf16 (``--upscaling-dtype bfloat16``, the tier's default on native-bf16 CPUs).
VARIANTS: dict[str, dict[str, str]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "bf16 upscaling": {"upscaling_dtype": "bfloat16"},
}


def prompts_for(height: int, width: int, count: int, seed: int) -> list[Prompt]:
    """``count`` one-point prompts (multimask), ``count`` boxes (one mask) and ``count``
    two-point prompts (multimask), uniformly placed."""
    rng = np.random.default_rng(seed)
    size = np.array([width, height], np.float32)
    prompts = []
    for _ in range(count):
        prompts.append(Prompt(point_coords=(rng.random((1, 2)) * size).astype(np.float32),
                              point_labels=np.array([1], np.int64), multimask_output=True))
        corners = np.sort(rng.random((2, 2)) * size, axis=0).reshape(-1).astype(np.float32)
        prompts.append(Prompt(box=corners, multimask_output=False))
        prompts.append(Prompt(point_coords=(rng.random((2, 2)) * size).astype(np.float32),
                              point_labels=np.array([1, 0], np.int64), multimask_output=True))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2.1/hiera_tiny")
    parser.add_argument("--prompts", type=int, default=8, help="of each kind, per image")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = make_random_checkpoint(args.model)
    encoder = Sam2Model.from_pretrained(args.model, checkpoint=checkpoint, parts="encoder")
    decoders = {name: Sam2Model.from_pretrained(args.model, checkpoint=checkpoint,
                                                parts="decoder", **options)
                for name, options in VARIANTS.items()}
    print(f"{args.model}, random weights, {cpu_name()} (native bf16: {cpu_has_native_bf16()}),"
          f" {args.threads} threads, torch {torch.__version__}; {3 * args.prompts} prompts "
          f"per image\n")
    print("| image | decoder | mask IoU mean / min | mean IoU: 1 point / box / 2 points | max abs "
          "low-res logit diff | max IoU-score diff | same best candidate |\n"
          "|---|---|---|---|---|---|---|")
    all_ious: dict[str, list[float]] = {name: [] for name in VARIANTS if name != "fp32"}
    for seed, (name, image) in enumerate(TEST_IMAGES.items()):
        [embedding] = encoder.encode_rgb([image.rgb])
        height, width = image.rgb.shape[:2]
        prompts = prompts_for(height, width, args.prompts, seed)
        exact = decoders["fp32"].decode_prompts(embedding, prompts)
        for variant in all_ious:
            low = decoders[variant].decode_prompts(embedding, prompts)
            per_prompt = [[mask_iou(a.masks[0, c], b.masks[0, c])
                           for c in range(a.masks.shape[1])] for a, b in zip(exact, low)]
            ious = [value for values in per_prompt for value in values]
            by_kind = " / ".join(
                f"{statistics.mean(v for values in per_prompt[kind::3] for v in values):.4f}"
                for kind in range(3))
            logits = max(float(np.abs(a.logits - b.logits).max()) for a, b in zip(exact, low))
            scores = max(float(np.abs(a.scores - b.scores).max()) for a, b in zip(exact, low))
            same_best = sum(int(a.scores[0].argmax() == b.scores[0].argmax())
                            for a, b in zip(exact, low))
            all_ious[variant] += ious
            print(f"| {name} ({width}x{height}) | {variant} | {statistics.mean(ious):.4f} / "
                  f"{min(ious):.4f} | {by_kind} | {logits:.3f} | {scores:.4f} | {same_best} of "
                  f"{len(prompts)} |", flush=True)
    for variant, ious in all_ious.items():
        print(f"| all ({len(ious)} masks) | {variant} | {statistics.mean(ious):.4f} / "
              f"{min(ious):.4f} | | | | |")


if __name__ == "__main__":
    main()
