"""Sustained-rate load against two decoder replicas behind client-side round robin.

Starts an encoder and two decoders (real CLIs, loopback, one diskcache store), embeds a few
images, computes the expected masks of every (image, prompt) in process with ``Sam2Model``,
then sends Segment calls at a fixed rate (open loop: a call starts every ``1/rate`` s whether
or not earlier ones finished, so a slow server shows up as latency and errors, not as a lower
rate) over ONE ``grpc.aio`` channel whose target lists both replicas
(``ipv4:127.0.0.1:P1,127.0.0.1:P2``) with the ``round_robin`` policy and keepalive from
``sam2_shared.client.channel_options``. Bounded by a request count and a wall-clock limit.

Every response's masks are compared with the in-process masks for that image and prompt:
a wrong answer is counted apart from errors.

    python bench/bench_load.py [--rate 20] [--requests 400] [--max-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_shared import wire  # noqa: E402
from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from sam2_shared.client.channels import channel_options  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"
POINTS = ((0.25, 0.3), (0.5, 0.5), (0.7, 0.4), (0.4, 0.75))  # fractions of (W, H)


@dataclass(frozen=True)
class LoadCase:
    """One request the load generator may send, and the masks it must get back."""

    embedding_id: str
    x: float
    y: float
    expected_masks: np.ndarray  # [C, H, W] bool


@dataclass
class LoadReport:
    target: str
    rate_hz: float
    sent: int = 0
    ok: int = 0
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    throughput_hz: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    def summary(self) -> str:
        return json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                           for k, v in asdict(self).items()})


def make_cases(model, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[LoadCase]:  # noqa: ANN001
    """Expected masks of every (image, point) from the in-process model."""
    cases = []
    for rgb, embedding_id in zip(images, ids):
        height, width = rgb.shape[:2]
        for fx, fy in POINTS:
            x, y = fx * width, fy * height
            [want] = model.segment_images(rgb, point_coordinates=[[x, y]], point_labels=[1],
                                          input_color_format="rgb", use_mask_input_cache=False)
            cases.append(LoadCase(embedding_id, x, y, np.asarray(want.masks)))  # (C, H, W)
    return cases


async def run_load(target: str, cases: Sequence[LoadCase], *, rate_hz: float, count: int,
                   max_seconds: float, max_in_flight: int = 256,
                   timeout_s: float = 30.0) -> LoadReport:
    """Send ``count`` Segment calls at ``rate_hz`` (stop early after ``max_seconds``)."""
    report = LoadReport(target, rate_hz)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    in_flight = asyncio.Semaphore(max_in_flight)
    async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=10)

        async def one(case: LoadCase) -> None:
            prompt = decoder_pb2.Prompt(points=[common_pb2.Point(
                x_px=case.x, y_px=case.y, label=common_pb2.POINT_LABEL_FOREGROUND)])
            request = decoder_pb2.SegmentRequest(embedding_id=case.embedding_id,
                                                 prompts=[prompt])
            async with in_flight:
                started = time.perf_counter()
                try:
                    response = await stub.Segment(request, timeout=timeout_s)
                except grpc.RpcError as exc:
                    errors[exc.code().name] += 1
                    return
                latencies.append(time.perf_counter() - started)
            [got], _ = wire.predictions_from_proto(response.results)
            if got.masks.shape[1:] == case.expected_masks.shape and np.array_equal(
                    got.masks[0], case.expected_masks):
                report.ok += 1
            else:
                report.wrong += 1

        started = time.perf_counter()
        tasks = []
        for index in range(count):
            due = started + index / rate_hz
            now = time.perf_counter()
            if now - started > max_seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(cases[index % len(cases)])))
        report.sent = len(tasks)
        await asyncio.gather(*tasks)
        report.duration_s = time.perf_counter() - started
    report.errors = dict(errors)
    report.throughput_hz = report.ok / report.duration_s if report.duration_s else 0.0
    if latencies:
        ordered = np.sort(np.array(latencies)) * 1000
        report.p50_ms = float(np.percentile(ordered, 50))
        report.p99_ms = float(np.percentile(ordered, 99))
        report.max_ms = float(ordered[-1])
    return report


def round_robin_target(addresses: Sequence[str]) -> str:
    """One channel target over several ``host:port`` replicas (static list, no DNS)."""
    return "ipv4:" + ",".join(addresses)


def main() -> None:
    from sam2_shared.client import Sam2Client
    from sam2_shared.inference.sam2_model import Sam2Model
    from tests.helpers.checkpoints import make_random_checkpoint
    from tests.helpers.scratch import use_scratch_tempdir
    from tests.helpers.synthetic_images import synthetic_rgb
    from tests.helpers.tier_processes import decoder_process, encoder_process

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    use_scratch_tempdir("sam2-bench-", remove_at_exit=True)
    checkpoint = args.checkpoint or make_random_checkpoint(MODEL_ID)
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-bench-load-")
    encoder = encoder_process(checkpoint, store, "--store-dtype", "float32").start()
    decoders = [decoder_process(checkpoint, store).start() for _ in range(2)]
    try:
        images = [synthetic_rgb(480, 640, seed=100 + i) for i in range(args.images)]
        with Sam2Client(encoder=encoder.address) as client:
            ids = [ref.embedding_id for ref in client.embed_images(images,
                                                                    input_color_format="rgb")]
        cases = make_cases(Sam2Model.from_pretrained(MODEL_ID, checkpoint), images, ids)
        target = round_robin_target([d.address for d in decoders])
        report = asyncio.run(run_load(target, cases, rate_hz=args.rate, count=args.requests,
                                      max_seconds=args.max_seconds))
        print(report.summary())
    finally:
        for process in (*decoders, encoder):
            process.stop()


if __name__ == "__main__":
    main()
