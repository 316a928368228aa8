"""The decoder network's forward alone (prompt encoder + mask decoder, no upsampling to the
image size), ms per prompt for forwards of several sizes, on a worker thread as the decoder
tier runs it (torch ops on the main thread measured several times slower on a loaded
2-core machine). fp32 (or ``--precision bf16``), one-point prompts, multimask, the embedding
of a 1080x1920 image.
Also the kernel's share: system CPU time per prompt and minor page faults per forward (a
buffer the allocator maps afresh is faulted in and zeroed page by page).

Compare two checkouts by running this from each, alternately:

    python bench/bench_forward.py [--prompts 1,16] [--repeats 15] [--threads 2] \
        [--precision fp32] [--upscaling-dtype float32]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_image import HEIGHT, WIDTH, bench_image, cpu_name  # noqa: E402
from sam2_shared import ImageEmbedding, Sam2Model  # noqa: E402
from sam2_shared.inference.imaging import points_to_model_frame  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402


def time_forwards(model: Sam2Model, embedding: ImageEmbedding, prompts: int, repeats: int
                  ) -> tuple[float, float, float]:
    """Median seconds of one forward of ``prompts`` one-point prompts (after a warm-up),
    and per forward, on average: system CPU seconds and minor page faults."""
    rng = np.random.default_rng(0)
    points = rng.uniform((0, 0), (WIDTH, HEIGHT), size=(prompts, 1, 2)).astype(np.float32)
    coords = torch.from_numpy(np.stack([points_to_model_frame(p, embedding.original_hw)
                                        for p in points]))
    labels = torch.ones(prompts, 1, dtype=torch.int32)
    decoder = model.decoder
    times: list[float] = []
    kernel: list[resource.struct_rusage] = []

    def run() -> None:
        with torch.inference_mode():
            for attempt in range(repeats + 1):
                if attempt == 1:
                    kernel.append(resource.getrusage(resource.RUSAGE_SELF))
                started = time.perf_counter()
                decoder(embedding.image_embed, embedding.high_res_feats, coords, labels, None,
                        True, batch_size=prompts)
                if attempt:  # the first one warms up (and fills the per-image memo)
                    times.append(time.perf_counter() - started)
            kernel.append(resource.getrusage(resource.RUSAGE_SELF))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    before, after = kernel
    return (statistics.median(times), (after.ru_stime - before.ru_stime) / repeats,
            (after.ru_minflt - before.ru_minflt) / repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2.1/hiera_tiny")
    parser.add_argument("--prompts", default="1,16", help="forward sizes, a list")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the decoder's (the embedding is made in fp32 either way)")
    parser.add_argument("--upscaling-dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = make_random_checkpoint(args.model)
    encoder = Sam2Model.from_pretrained(args.model, checkpoint=checkpoint, parts="encoder")
    model = Sam2Model.from_pretrained(args.model, checkpoint=checkpoint, parts="decoder",
                                      precision=args.precision,
                                      upscaling_dtype=args.upscaling_dtype)
    embedding = model.prepare_embedding(encoder.encode_rgb([bench_image()])[0])
    del encoder
    print(f"{args.model}, {args.precision} (upscaling {model.upscaling_dtype}), {cpu_name()}, "
          f"{args.threads} threads, torch {torch.__version__}, {WIDTH}x{HEIGHT}; medians of "
          f"{args.repeats}\n")
    print("| prompts per forward | ms per forward | ms per prompt | system CPU ms per prompt "
          "| page faults per forward |\n|---|---|---|---|---|")
    for prompts in (int(p) for p in args.prompts.split(",")):
        seconds, system, faults = time_forwards(model, embedding, prompts, args.repeats)
        print(f"| {prompts} | {seconds * 1e3:.1f} | {seconds * 1e3 / prompts:.1f} | "
              f"{system * 1e3 / prompts:.2f} | {faults:,.0f} |")


if __name__ == "__main__":
    main()
