"""Peak memory of the decoder tier for one large Segment request.

Starts the real decoder tier (``python -m decoder_service``) of this checkout, and of
``--baseline`` (another checkout, e.g. main) when given, on one diskcache store holding the
embedding of a 640x480 and of a ``--width`` x ``--height`` image, sends one request of
``--prompts`` box prompts (multimask: 3 candidates each) on each, small first, and reports the
decoder process's peak RSS (VmHWM from /proc/PID/status) after each. The batched decoder forward
costs the same on both (it works at 256 x 256); the growth from the first to the second is the
full-size masks'.

    python bench/decoder_output_memory.py --baseline /work/main

``--masks objects`` makes the masks object-like (smooth stored features and position-invariant
upscaling kernels: ``object_mask_checkpoint``, ``smooth_features``); the default (``random``)
leaves the random-weight decoder's speckled masks, which make far larger COCO RLE answers.
Random official-format weights (tests/helpers/checkpoints.py), CPU. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam2_shared import Sam2Model  # noqa: E402
from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from sam2_shared.client.channels import channel_options  # noqa: E402
from sam2_shared.store import open_store  # noqa: E402
from tests.helpers import tier_processes  # noqa: E402
from tests.helpers.checkpoints import (  # noqa: E402
    make_random_checkpoint,
    object_mask_checkpoint,
    smooth_features,
)
from tests.helpers.scratch import use_scratch_tempdir  # noqa: E402
from tests.helpers.synthetic_images import synthetic_rgb  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"
MIB = 1024 * 1024
SMALL_HW = (480, 640)  # same prompts on a small image first: the forward's own memory


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def store_embedding(checkpoint: Path, store_url: str, height: int, width: int,
                    object_masks: bool) -> str:
    """Embed a synthetic image in process and put it in the store (its features made smooth
    with ``object_masks``); return its id."""
    model = Sam2Model.from_pretrained(MODEL_ID, checkpoint)
    [embedding] = model.embed_images(synthetic_rgb(height, width, seed=5),
                                     input_color_format="rgb")
    open_store(store_url).put_embedding(smooth_features(embedding) if object_masks
                                        else embedding)
    return embedding.embedding_id


def box_prompts(count: int, height: int, width: int) -> list[decoder_pb2.Prompt]:
    """``count`` boxes spread over the image."""
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(count):
        x0, y0 = rng.uniform(0, 0.6) * width, rng.uniform(0, 0.6) * height
        x1 = x0 + rng.uniform(0.1, 0.4) * width
        y1 = y0 + rng.uniform(0.1, 0.4) * height
        prompts.append(decoder_pb2.Prompt(multimask_output=True, box=common_pb2.Box(
            x_min_px=x0, y_min_px=y0, x_max_px=x1, y_max_px=y1)))
    return prompts


def measure(repo: Path, checkpoint: Path, store_url: str,
            requests: tuple[decoder_pb2.SegmentRequest, decoder_pb2.SegmentRequest],
            max_mask_pixels: int) -> dict[str, float]:
    """Start ``repo``'s decoder tier and send it the small-image then the large-image request;
    its peak RSS after each. The small one pays the decoder forward's own memory (the same
    prompts, so the same batch: it does not depend on the image size), so the large one's
    growth over it is what its full-size masks cost."""
    process = tier_processes.decoder_process(
        checkpoint, store_url, "--max-mask-pixels", str(max_mask_pixels),
        "--max-message-mb", "1024",
    )
    original_root = tier_processes.REPO_ROOT
    tier_processes.REPO_ROOT = repo  # start() puts it first on the tier's PYTHONPATH
    try:
        process.start()
    finally:
        tier_processes.REPO_ROOT = original_root
    try:
        assert process.process is not None
        pid = process.process.pid
        peaks = [peak_rss_bytes(pid)]
        options = channel_options(max_message_bytes=1024 * MIB)
        with grpc.insecure_channel(process.address, options=options) as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            for request in requests:
                started = time.perf_counter()
                response = stub.Segment(request, timeout=600)
                seconds = time.perf_counter() - started
                peaks.append(peak_rss_bytes(pid))
    finally:
        process.stop()
    started_mib, small_mib, large_mib = (peak / MIB for peak in peaks)
    return {"started_mib": started_mib, "small_mib": small_mib, "large_mib": large_mib,
            "seconds": seconds, "candidates": sum(len(r.candidates) for r in response.results),
            "response_mib": response.ByteSize() / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to measure first")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--masks", choices=("random", "objects"), default="random")
    parser.add_argument("--format", choices=("coco_rle", "png", "raw_bits"), default="coco_rle")
    args = parser.parse_args()
    use_scratch_tempdir("sam2-bench-", remove_at_exit=True)
    torch.set_num_threads(2)

    checkpoint = make_random_checkpoint(MODEL_ID)
    objects = args.masks == "objects"
    if objects:
        checkpoint = object_mask_checkpoint(
            checkpoint, Path(tempfile.mkdtemp(prefix="sam2-bench-mem-")) / "objects.pt")
    store_url = "diskcache://" + tempfile.mkdtemp(prefix="sam2-bench-mem-")
    mask_format = {"coco_rle": common_pb2.MASK_FORMAT_COCO_RLE,
                   "png": common_pb2.MASK_FORMAT_PNG,
                   "raw_bits": common_pb2.MASK_FORMAT_RAW_BITS}[args.format]
    requests = tuple(
        decoder_pb2.SegmentRequest(
            embedding_id=store_embedding(checkpoint, store_url, height, width, objects),
            mask_format=mask_format,
            prompts=box_prompts(args.prompts, height, width),
        )
        for height, width in (SMALL_HW, (args.height, args.width))
    )
    max_mask_pixels = args.prompts * 3 * args.height * args.width
    all_at_once_mib = max_mask_pixels / MIB  # 1 byte per bool mask pixel

    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"request: {args.prompts} box prompts x 3 candidates on {args.width}x{args.height}, "
          f"{args.masks} masks, {args.format}; all masks at once = {all_at_once_mib:,.0f} MiB "
          f"(bool), one float32 candidate = {args.height * args.width * 4 / MIB:,.0f} MiB")
    checkouts = [("baseline", args.baseline)] if args.baseline else []
    checkouts.append(("this checkout", ROOT))
    for name, repo in checkouts:
        r = measure(repo.resolve(), checkpoint, store_url, requests, max_mask_pixels)
        print(f"{name} ({repo}): decoder VmHWM {r['started_mib']:,.0f} MiB started, "
              f"{r['small_mib']:,.0f} MiB after the request on {SMALL_HW[1]}x{SMALL_HW[0]}, "
              f"{r['large_mib']:,.0f} MiB after the one on {args.width}x{args.height}: masks "
              f"+{r['large_mib'] - r['small_mib']:,.0f} MiB; {r['candidates']} masks, response "
              f"{r['response_mib']:,.1f} MiB, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
