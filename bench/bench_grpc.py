"""Decode latency through gRPC next to in-process decode, on one machine.

Starts the encoder and a decoder (real CLIs, loopback, diskcache store in a temp dir), embeds
one 1080x1920 image, then times one-point multimask Segment calls at concurrency 1 and 16
(grpc.aio client, COCO RLE masks) and ``Sam2Model.decode_prompts`` in process on the same
embedding. Optionally also with the decoder's cross-request batching off.

    python bench/bench_grpc.py [--checkpoint PATH] [--requests 200] [--no-batching-too]

Without ``--checkpoint`` a random sam2.1/hiera_tiny checkpoint is made (speed does not depend
on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from sam2_shared.client import Sam2Client  # noqa: E402
from sam2_shared.client.channels import channel_options  # noqa: E402
from sam2_shared.inference.sam2_model import Sam2Model  # noqa: E402
from sam2_shared.prompts import Prompt  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.synthetic_images import synthetic_rgb  # noqa: E402
from tests.helpers.tier_processes import TierProcess  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH = 1080, 1920


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.mean())


def points(count: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(0)
    return [(float(x), float(y)) for x, y in zip(rng.uniform(0, WIDTH, count),
                                                  rng.uniform(0, HEIGHT, count))]


async def grpc_latencies(address: str, embedding_id: str, requests: int,
                         concurrency: int) -> tuple[list[float], float]:
    channel = grpc.aio.insecure_channel(address, options=channel_options())
    stub = decoder_pb2_grpc.DecoderServiceStub(channel)
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(x: float, y: float) -> None:
        request = decoder_pb2.SegmentRequest(embedding_id=embedding_id, prompts=[
            decoder_pb2.Prompt(points=[common_pb2.Point(
                x_px=x, y_px=y, label=common_pb2.POINT_LABEL_FOREGROUND)])])
        async with semaphore:
            started = time.perf_counter()
            await stub.Segment(request, timeout=120)
            latencies.append(time.perf_counter() - started)

    for x, y in points(5):  # warm the hot cache and the connection
        await one(x, y)
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one(x, y) for x, y in points(requests)))
    wall = time.perf_counter() - started
    await channel.close()
    return latencies, requests / wall


def in_process_latencies(model: Sam2Model, embedding, requests: int) -> list[float]:
    latencies = []
    for x, y in points(5) + points(requests):
        prompt = Prompt(np.array([[x, y]], np.float32), np.array([1], np.int32))
        started = time.perf_counter()
        model.decode_prompts(embedding, [prompt])
        latencies.append(time.perf_counter() - started)
    return latencies[5:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-batching-too", action="store_true",
                        help="also run concurrency 16 against a decoder with --no-batching")
    args = parser.parse_args()
    checkpoint = args.checkpoint or make_random_checkpoint(MODEL_ID)
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-bench-")
    common = ["--model", MODEL_ID, "--checkpoint", str(checkpoint), "--store", store]
    rgb = synthetic_rgb(HEIGHT, WIDTH)
    rows = []
    with TierProcess("encoder_service", common) as encoder:
        with Sam2Client(encoder=encoder.address, model_id=MODEL_ID) as client:
            [ref] = client.embed_images(rgb, input_color_format="rgb")
    # the store holds fp16 (the default); in process, decode the same stored embedding
    from sam2_shared.store import open_store

    with open_store(store) as opened:
        embedding = opened.get_embedding(ref.embedding_id, MODEL_ID)
    model = Sam2Model.from_pretrained(MODEL_ID, checkpoint, parts="decoder")
    rows.append(("in-process decode_prompts", 1, *percentiles(
        in_process_latencies(model, embedding, args.requests)), float("nan")))
    variants = [("gRPC Segment", [])]
    if args.no_batching_too:
        variants.append(("gRPC Segment, --no-batching", ["--no-batching"]))
    for label, extra in variants:
        with TierProcess("decoder_service", [*common, *extra]) as decoder:
            for concurrency in (1, 16):
                if extra and concurrency == 1:
                    continue
                latencies, throughput = asyncio.run(grpc_latencies(
                    decoder.address, ref.embedding_id, args.requests, concurrency))
                rows.append((label, concurrency, *percentiles(latencies), throughput))
    print(f"\nsam2.1/hiera_tiny, one point, multimask (3 masks), {WIDTH}x{HEIGHT}, COCO RLE, "
          f"{args.requests} requests, loopback")
    print(f"{'path':32} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>7}")
    for label, concurrency, p50, p99, mean, throughput in rows:
        print(f"{label:32} {concurrency:>4} {p50:8.1f} {p99:8.1f} {mean:8.1f} {throughput:7.1f}")


if __name__ == "__main__":
    main()
