"""Per-click decoder cost vs image size and prompts per request, for sizing replicas.

What one decoder replica spends on a Segment request, without the network: the batched decode
(``Sam2Model.decode_prompts`` with deferred masks, as the decoder tier runs it, in forwards of
at most 16 prompts) plus the wire encoding of every candidate (upsampling to the image size,
packed bits or COCO RLE, protos), as the servicer runs it. One point per prompt, multimask
(3 masks each). Sizes and prompt counts are interleaved, medians over ``--repeats``.

    python bench/bench_sizing.py [--sizes 0.3,2,12] [--prompts 1,4,16,64] [--repeats 3] \\
        [--format raw_bits]

Random sam2.1/hiera_tiny weights (speed does not depend on them; RLE cost does: random weights
give speckled masks, hence packed bits by default).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decoder_service.segmenter import DEFAULT_MAX_BATCH_PROMPTS  # noqa: E402
from sam2_shared import wire  # noqa: E402
from sam2_shared.embedding import ImageEmbedding  # noqa: E402
from sam2_shared.inference.sam2_model import Sam2Model  # noqa: E402
from sam2_shared.prompts import Prompt  # noqa: E402
from sam2_shared.wire.masks import MaskEncoding  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"


def image_hw(megapixels: float) -> tuple[int, int]:
    """A 4:3 landscape size of about ``megapixels``."""
    height = int(round(math.sqrt(megapixels * 1e6 * 3 / 4)))
    return height, int(round(height * 4 / 3))


def embedding_of(model: Sam2Model, hw: tuple[int, int]) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(0)
    embedding = ImageEmbedding(
        image_embed=torch.randn(1, 256, 64, 64, generator=generator),
        high_res_feats=(torch.randn(1, 32, 256, 256, generator=generator),
                        torch.randn(1, 64, 128, 128, generator=generator)),
        original_hw=hw, model_id=model.model_id, embedding_id=f"bench-{hw[0]}x{hw[1]}")
    return model.prepare_embedding(embedding)


def one_request(model: Sam2Model, embedding: ImageEmbedding, prompts: list[Prompt],
                encoding: MaskEncoding) -> None:
    rows = []
    for start in range(0, len(prompts), DEFAULT_MAX_BATCH_PROMPTS):
        rows.extend(model.decode_prompts(
            embedding, prompts[start : start + DEFAULT_MAX_BATCH_PROMPTS], deferred_masks=True))
    wire.prompt_results_to_proto(rows, encoding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.3,2,12", help="megapixels, a list")
    parser.add_argument("--prompts", default="1,4,16,64", help="prompts per request, a list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", default="raw_bits", choices=[e.value for e in MaskEncoding])
    args = parser.parse_args()
    model = Sam2Model.from_pretrained(MODEL_ID, make_random_checkpoint(MODEL_ID),
                                      parts="decoder")
    encoding = MaskEncoding(args.format)
    sizes = [image_hw(float(mp)) for mp in args.sizes.split(",")]
    counts = [int(c) for c in args.prompts.split(",")]
    embeddings = {hw: embedding_of(model, hw) for hw in sizes}
    rng = np.random.default_rng(0)
    cases = [(hw, count) for hw in sizes for count in counts]
    prompts = {(hw, count): [Prompt(rng.uniform((0, 0), hw[::-1], (1, 2)).astype(np.float32),
                                    np.ones(1, np.int32)) for _ in range(count)]
               for hw, count in cases}
    for case in cases:  # warm-up
        one_request(model, embeddings[case[0]], prompts[case][:1], encoding)
    times: dict[tuple[tuple[int, int], int], list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            started = time.perf_counter()
            one_request(model, embeddings[case[0]], prompts[case], encoding)
            times[case].append(time.perf_counter() - started)
    print(f"{MODEL_ID}, one point per prompt, multimask, {args.format}, "
          f"{torch.get_num_threads()} threads; ms per request (ms per prompt)\n")
    print("| image | " + " | ".join(f"{c} prompts" for c in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for hw in sizes:
        cells = []
        for count in counts:
            ms = statistics.median(times[(hw, count)]) * 1000
            cells.append(f"{ms:.0f} ({ms / count:.1f})")
        print(f"| {hw[1]}x{hw[0]} ({hw[0] * hw[1] / 1e6:.1f} MP) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
