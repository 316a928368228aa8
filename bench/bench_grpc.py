"""Clicks through the tiers next to the same work in process, on one machine.

Starts the encoder and one decoder (real CLIs, loopback, diskcache store in a temp dir), embeds
one 1080x1920 image, then, one phase after another:

* ``client``: ``Sam2Client.segment_images`` (one click, multimask, COCO RLE, logits included)
  interleaved call by call with the same work in process: ``Sam2Model.segment_images`` on the
  same stored embedding plus pycocotools RLE encode and decode of its 3 masks. The difference
  of the medians is the serving path's overhead.
* ``curve``: closed loop, ``--concurrency`` calls in flight (grpc.aio), one point, multimask,
  per ``--formats`` (``raw_bits``: packed bits, whose cost does not depend on the mask;
  ``coco_rle``: the default format; random weights give speckled masks, far costlier to
  encode than object masks).
* ``open``: open loop at ``--rate`` clicks/s (a call starts every 1/rate s whether or not
  earlier ones finished), packed bits.

``--profile-svg PATH`` records the decoder with py-spy during the curve's
``--profile-concurrency`` run (a flame graph).

    python bench/bench_grpc.py [--requests 200] [--concurrency 1,4,16,64] \\
        [--formats raw_bits,coco_rle] [--rate 25] [--phases client,curve,open] \\
        [--profile-svg bench/profiles/decoder.svg]

Without ``--checkpoint`` a random sam2.1/hiera_tiny checkpoint is made (speed does not depend
on the weights; mask content, and so RLE cost, does). Its masks are speckled, far costlier to
encode than object masks; ``--masks objects`` makes them smooth-edged instead: the decoder's
upscaling kernels are made position-invariant (``object_mask_checkpoint``) and the stored
embedding is replaced by smooth features (the same shapes and FLOPs). The run prints the
masks' COCO RLE size, to show which kind it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from pycocotools import mask as coco_mask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decoder_service.cli import resolve_upscaling_dtype  # noqa: E402
from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from sam2_shared.client import Sam2Client  # noqa: E402
from sam2_shared.client.channels import channel_options  # noqa: E402
from sam2_shared.inference.sam2_model import Sam2Model  # noqa: E402
from sam2_shared.store import open_store  # noqa: E402
from tests.helpers.checkpoints import (  # noqa: E402
    make_random_checkpoint,
    object_mask_checkpoint,
    smooth_features,
)
from tests.helpers.scratch import use_scratch_tempdir  # noqa: E402
from tests.helpers.synthetic_images import synthetic_rgb  # noqa: E402
from tests.helpers.tier_processes import TierProcess  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH = 1080, 1920
FORMATS = {"raw_bits": common_pb2.MASK_FORMAT_RAW_BITS,
           "coco_rle": common_pb2.MASK_FORMAT_COCO_RLE,
           "png": common_pb2.MASK_FORMAT_PNG}


def summary(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in ms."""
    ms = np.asarray(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def points(count: int, seed: int = 0) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return [(float(x), float(y)) for x, y in zip(rng.uniform(0, WIDTH, count),
                                                  rng.uniform(0, HEIGHT, count))]


def request(embedding_id: str, x: float, y: float, mask_format: int) -> decoder_pb2.SegmentRequest:
    return decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, mask_format=mask_format,
        prompts=[decoder_pb2.Prompt(points=[common_pb2.Point(
            x_px=x, y_px=y, label=common_pb2.POINT_LABEL_FOREGROUND)])])


async def closed_loop(address: str, embedding_id: str, requests: int, concurrency: int,
                      mask_format: int) -> tuple[list[float], float]:
    """Latencies and clicks/s with ``concurrency`` calls in flight."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        for x, y in points(4, seed=1):  # warm the connection
            await stub.Segment(request(embedding_id, x, y, mask_format), timeout=120)
        todo = iter(points(requests))
        latencies: list[float] = []

        async def worker() -> None:
            for x, y in todo:
                started = time.perf_counter()
                await stub.Segment(request(embedding_id, x, y, mask_format), timeout=120)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, requests / (time.perf_counter() - started)


async def open_loop(address: str, embedding_id: str, requests: int, rate: float,
                    mask_format: int) -> tuple[list[float], float]:
    """Latencies and achieved clicks/s when a call starts every ``1 / rate`` s."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        for x, y in points(4, seed=1):
            await stub.Segment(request(embedding_id, x, y, mask_format), timeout=120)
        latencies: list[float] = []

        async def one(x: float, y: float) -> None:
            started = time.perf_counter()
            await stub.Segment(request(embedding_id, x, y, mask_format), timeout=120)
            latencies.append(time.perf_counter() - started)

        tasks = []
        started = time.perf_counter()
        for index, (x, y) in enumerate(points(requests)):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(x, y)))
        await asyncio.gather(*tasks)
        return latencies, requests / (time.perf_counter() - started)


async def rle_chars(address: str, embedding_id: str) -> float:
    """Mean COCO RLE characters of one click's candidates: ~100 k speckled, a few k objects."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        response = await stub.Segment(request(embedding_id, WIDTH / 2, HEIGHT / 2,
                                              FORMATS["coco_rle"]), timeout=120)
    return float(np.mean([len(candidate.mask.coco_rle_counts)
                          for candidate in response.results[0].candidates]))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_overhead(model: Sam2Model, embedding, client: Sam2Client, ref, requests: int
                    ) -> dict[str, list[float]]:
    """Interleaved, call by call: the client vs in-process segment_images (+ RLE out and
    back with pycocotools)."""
    times: dict[str, list[float]] = {"in-process segment_images": [],
                                     "in-process + pycocotools RLE encode+decode": [],
                                     "Sam2Client.segment_images (COCO RLE)": []}
    for index, (x, y) in enumerate(points(requests + 3)):
        coords, labels = np.array([[x, y]], np.float32), np.array([1], np.int32)
        started = time.perf_counter()
        [prediction] = model.segment_images(embeddings=embedding, point_coordinates=coords,
                                            point_labels=labels, use_mask_input_cache=False)
        middle = time.perf_counter()
        masks = prediction.masks.numpy()
        rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        coco_mask.decode(rles)
        ended = time.perf_counter()
        client.segment_images(embeddings=ref, point_coordinates=coords, point_labels=labels)
        remote = time.perf_counter() - ended
        if index >= 3:  # warm-up
            times["in-process segment_images"].append(middle - started)
            times["in-process + pycocotools RLE encode+decode"].append(ended - started)
            times["Sam2Client.segment_images (COCO RLE)"].append(remote)
    return times


class PySpy:
    """``py-spy record`` of one process for as long as the block: a flame graph SVG, and the
    same samples as collapsed stacks (``.txt`` next to it) for ``top_costs``."""

    def __init__(self, pid: int, svg: Path) -> None:
        self.pid, self.svg = pid, svg
        self.raw = svg.with_suffix(".txt")
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> PySpy:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.svg.parent.mkdir(parents=True, exist_ok=True)
        for output, kind in ((self.svg, "flamegraph"), (self.raw, "raw")):
            self.processes.append(subprocess.Popen(
                [spy, "record", "--pid", str(self.pid), "--rate", "100", "--nonblocking",
                 "--output", str(output), "--format", kind],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # attached
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for process in self.processes:
            process.wait(timeout=120)


def top_costs(collapsed: Path, count: int = 15) -> list[tuple[str, float, float]]:
    """(function, self %, total %) of the busiest functions in py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit(
            "/", 1)[-1] + ")" for frame in stack.split(";")]
        weight = int(number)
        samples += weight
        own[frames[-1]] = own.get(frames[-1], 0) + weight
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + weight
    ranked = sorted(own, key=own.__getitem__, reverse=True)[:count]
    return [(name, 100 * own[name] / samples, 100 * total[name] / samples) for name in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: a random sam2.1 tiny")
    parser.add_argument("--requests", type=int, default=200, help="calls per curve point")
    parser.add_argument("--concurrency", default="1,4,16,64", help="calls in flight, a list")
    parser.add_argument("--formats", default="raw_bits,coco_rle", help=f"of {sorted(FORMATS)}")
    parser.add_argument("--rate", type=float, default=25.0, help="open-loop clicks/s")
    parser.add_argument("--open-requests", type=int, default=250)
    parser.add_argument("--client-requests", type=int, default=40)
    parser.add_argument("--phases", default="client,curve,open")
    parser.add_argument("--decoder-args", default="", help="extra decoder flags, one string")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the decoder's and the in-process baseline's")
    parser.add_argument("--upscaling-dtype", default="auto",
                        choices=("auto", "float32", "bfloat16"),
                        help="the decoder's and the in-process baseline's (auto: the "
                        "decoder's default on this machine)")
    parser.add_argument("--masks", default="speckled", choices=("speckled", "objects"),
                        help="what the random weights' masks look like (objects: smooth "
                        "features and position-invariant upscaling kernels)")
    parser.add_argument("--profile-svg", type=Path, help="py-spy flame graph of the decoder")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    parser.add_argument("--profile-format", default="raw_bits")
    args = parser.parse_args()
    use_scratch_tempdir("sam2-bench-", remove_at_exit=True)
    phases = set(args.phases.split(","))
    profile: list[tuple[str, float, float]] = []
    checkpoint = args.checkpoint or make_random_checkpoint(MODEL_ID)
    if args.masks == "objects":
        checkpoint = object_mask_checkpoint(
            checkpoint, Path(tempfile.mkdtemp(prefix="sam2-bench-")) / "objects.pt")
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-bench-")
    common = ["--model", MODEL_ID, "--checkpoint", str(checkpoint), "--store", store]
    with TierProcess("encoder_service", common) as encoder:
        with Sam2Client(encoder=encoder.address, model_id=MODEL_ID) as client:
            [ref] = client.embed_images(synthetic_rgb(HEIGHT, WIDTH), input_color_format="rgb")
    if args.masks == "objects":  # the same id, smooth features (before the decoder caches it)
        with open_store(store) as opened:
            embedding = opened.get_embedding(ref.embedding_id, MODEL_ID)
            opened.delete_embedding(ref.embedding_id)
            opened.put_embedding(smooth_features(embedding))
    upscaling = resolve_upscaling_dtype(args.upscaling_dtype, "cpu")
    print(f"machine: {os.cpu_count()} CPUs; decoder OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '2')}; {MODEL_ID}, {args.precision} (upscaling "
          f"{upscaling}), one point, multimask (3 masks), {WIDTH}x{HEIGHT}, loopback. Medians "
          f"of interleaved runs.", flush=True)
    decoder_args = [*common, "--precision", args.precision, "--upscaling-dtype", upscaling,
                    *args.decoder_args.split()]
    with TierProcess("decoder_service", decoder_args) as decoder:
        chars = asyncio.run(rle_chars(decoder.address, ref.embedding_id))
        print(f"masks: {args.masks}, {chars:,.0f} COCO RLE characters per candidate", flush=True)
        if "client" in phases:
            with open_store(store) as opened:
                embedding = opened.get_embedding(ref.embedding_id, MODEL_ID)
            model = Sam2Model.from_pretrained(MODEL_ID, checkpoint, parts="decoder",
                                              precision=args.precision,
                                              upscaling_dtype=upscaling)
            with Sam2Client(decoder=decoder.address, model_id=MODEL_ID) as remote:
                times = client_overhead(model, embedding, remote, ref, args.client_requests)
            print("\n| path | p50 ms | p99 ms |\n|---|---|---|")
            for label, samples in times.items():
                print(f"| {label} | {statistics.median(samples) * 1000:.1f} | "
                      f"{summary(samples)[1]:.1f} |")
            del model
        if "curve" in phases:
            print("\n| mask format | in flight | clicks/s | p50 ms | p99 ms | decoder CPU "
                  "ms/click | load generator CPU ms/click |\n|---|---|---|---|---|---|---|")
            for name in args.formats.split(","):
                for concurrency in map(int, args.concurrency.split(",")):
                    profiled = (args.profile_svg is not None and name == args.profile_format
                                and concurrency == args.profile_concurrency)
                    run = closed_loop(decoder.address, ref.embedding_id, args.requests,
                                      concurrency, FORMATS[name])
                    decoder_cpu, own_cpu = cpu_seconds(decoder.process.pid), time.process_time()
                    if profiled:
                        with PySpy(decoder.process.pid, args.profile_svg) as spy:
                            latencies, rate = asyncio.run(run)
                        profile = top_costs(spy.raw)
                    else:
                        latencies, rate = asyncio.run(run)
                    # per click, including the connection's warm-up calls (4 per run)
                    decoder_cpu = (cpu_seconds(decoder.process.pid) - decoder_cpu) * 1000
                    own_cpu = (time.process_time() - own_cpu) * 1000
                    clicks = args.requests + 4
                    p50, p99 = summary(latencies)
                    print(f"| {name} | {concurrency} | {rate:.1f} | {p50:.1f} | {p99:.1f} | "
                          f"{decoder_cpu / clicks:.1f} | {own_cpu / clicks:.1f} |", flush=True)
        if args.profile_svg is not None and "curve" in phases:
            print(f"\ndecoder profile ({args.profile_format}, {args.profile_concurrency} in "
                  f"flight, {args.profile_svg}):\n| function | self % | total % |\n|---|---|---|")
            for name, own, total in profile:
                print(f"| {name} | {own:.1f} | {total:.1f} |")
        if "open" in phases:
            latencies, rate = asyncio.run(open_loop(
                decoder.address, ref.embedding_id, args.open_requests, args.rate,
                FORMATS["raw_bits"]))
            p50, p99 = summary(latencies)
            print(f"\nopen loop at {args.rate:g} clicks/s (raw_bits, {args.open_requests} calls):"
                  f" achieved {rate:.1f}/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
