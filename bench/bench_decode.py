"""In-process decode against Meta's predictor: one point with multimask, and 16 boxes on one
image (multimask), fp32, 1080x1920, masks upsampled and thresholded at the image size.

Calls alternate (ours, reference, ours, ...) so background load hits both alike; medians.
Each image is embedded once by each implementation first (not timed). ``--compile`` adds
ours with ``compile_decoder=True`` (one-prompt decodes through torch.compile; compiled before
timing) to the 1-point case.

    python bench/bench_decode.py [--threads 2] [--repeats 15] [--model sam2.1/hiera_tiny] \\
        [--compile]

Needs Meta's ``sam2==1.1.0`` (a test dependency, see scripts/setup_env.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_image import HEIGHT, WIDTH, alternate, bench_image, cpu_name  # noqa: E402
from sam2_shared import Sam2Model  # noqa: E402
from sam2_shared.prompts import Prompt  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.reference import ReferenceImage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2.1/hiera_tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true",
                        help="also time compile_decoder=True on the 1-point case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = make_random_checkpoint(args.model)
    rgb = bench_image()
    predictor = ReferenceImage(args.model, checkpoint).predictor
    ours = Sam2Model.from_pretrained(args.model, checkpoint=checkpoint)
    embedding = ours.encode_rgb([rgb])[0]
    predictor.set_image(rgb)

    point, label = np.array([[800.0, 450.0]], np.float32), np.array([1], np.int32)
    rng = np.random.default_rng(0)
    corners = rng.uniform((0, 0), (WIDTH - 500, HEIGHT - 400), size=(16, 2))
    sizes = rng.uniform((60, 60), (500, 400), size=(16, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    one = [Prompt(point, label)]
    sixteen = [Prompt(box=box) for box in boxes]
    single_calls = {
        "ours": lambda: ours.decode_prompts(embedding, one),
        "ref": lambda: predictor.predict(point, label, multimask_output=True),
    }
    if args.compile:
        compiled = Sam2Model.from_pretrained(args.model, checkpoint=checkpoint, parts="decoder",
                                             compile_decoder=True)
        compiled.decode_prompts(embedding, one)  # compiles
        single_calls["compiled"] = lambda: compiled.decode_prompts(embedding, one)
    single = alternate(single_calls, args.repeats)
    many = alternate({
        "ours": lambda: ours.decode_prompts(embedding, sixteen),
        "ref": lambda: predictor.predict(box=boxes, multimask_output=True),
    }, max(3, args.repeats // 3))
    print(f"{args.model}, fp32, {cpu_name()}, {args.threads} threads, torch {torch.__version__},"
          f" {WIDTH}x{HEIGHT}; medians of alternated calls\n")
    print("| case | reference (ms) | ours (ms) | prompts/s ratio |\n|---|---|---|---|")
    for name, timing in (("1 point, multimask", single), ("16 boxes, multimask", many)):
        print(f"| {name} | {timing['ref'] * 1e3:.1f} | {timing['ours'] * 1e3:.1f} | "
              f"{timing['ref'] / timing['ours']:.2f}x |")
    if "compiled" in single:
        print(f"| 1 point, multimask, compile_decoder=True | {single['ref'] * 1e3:.1f} | "
              f"{single['compiled'] * 1e3:.1f} | {single['ref'] / single['compiled']:.2f}x |")


if __name__ == "__main__":
    main()
