"""End to end across tiers: one encoder and two decoder replicas on a real shared store (Redis,
an S3 server, the diskcache default), all real processes on 127.0.0.1, plus a bounded
concurrent load test that checks no request failed or got another image's masks."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from sam2_shared import wire
from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from sam2_shared.client import Sam2Client
from sam2_shared.client.channels import channel_options
from sam2_shared.errors import EmbeddingNotFoundError
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.wire.status import error_from_rpc_error
from tests.helpers.servers import RcloneS3Server, RedisServer
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, exact_upscaling

MODEL_ID = "sam2.1/hiera_tiny"
FOREGROUND = common_pb2.POINT_LABEL_FOREGROUND


@dataclass
class Fleet:
    """One encoder; replica A may call it on a miss, replica B may not."""

    encoder: TierProcess
    decoder_a: TierProcess
    decoder_b: TierProcess

    def stub(self, process: TierProcess) -> decoder_pb2_grpc.DecoderServiceStub:
        channel = grpc.insecure_channel(process.address, options=channel_options())
        return decoder_pb2_grpc.DecoderServiceStub(channel)

    def stop(self) -> None:
        for process in (self.decoder_b, self.decoder_a, self.encoder):
            process.stop()


def start_fleet(checkpoint: Path, store: str | None, env: dict[str, str] | None = None,
                *extra: str) -> Fleet:
    """``store`` None: the tiers' own default store (diskcache)."""
    store_args = [] if store is None else ["--store", store]
    encoder = TierProcess("encoder_service", ["--model", MODEL_ID, "--checkpoint",
                                              str(checkpoint), "--store-dtype", "float32",
                                              *store_args], env).start()
    processes = [encoder]
    try:
        common = ["--model", MODEL_ID, "--checkpoint", str(checkpoint), *store_args,
                  *exact_upscaling(extra), *extra]
        decoder_a = TierProcess("decoder_service",
                                [*common, "--encoder-address", encoder.address], env).start()
        processes.append(decoder_a)
        decoder_b = TierProcess("decoder_service", common, env).start()
    except BaseException:
        for process in processes:
            process.stop()
        raise
    return Fleet(encoder, decoder_a, decoder_b)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained(MODEL_ID, tiny_checkpoint)


def point_request(embedding_id: str, x: float, y: float, **fields
                  ) -> decoder_pb2.SegmentRequest:
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=x, y_px=y, label=FOREGROUND)])
    return decoder_pb2.SegmentRequest(embedding_id=embedding_id, prompts=[prompt], **fields)


def check_shared_store(fleet: Fleet, model: Sam2Model, seed: int) -> None:
    """Both replicas see what the encoder stored, handles resolve across replicas, and a
    miss is NOT_FOUND without an encoder address and computed with one."""
    rgb = synthetic_rgb(160, 200, seed=seed)
    with Sam2Client(encoder=fleet.encoder.address, model_id=MODEL_ID) as client:
        [embedding] = client.embed_images(rgb, input_color_format="rgb")
    [want] = model.segment_images(rgb, point_coordinates=[[80, 90]], point_labels=[1],
                                  input_color_format="rgb", use_mask_input_cache=False)
    stub_a, stub_b = fleet.stub(fleet.decoder_a), fleet.stub(fleet.decoder_b)
    responses = {}
    for name, stub in (("A", stub_a), ("B", stub_b)):
        responses[name] = stub.Segment(point_request(embedding.embedding_id, 80, 90,
                                                     include_logits=True), timeout=60)
        [got], _ = wire.predictions_from_proto(responses[name].results)
        np.testing.assert_array_equal(got.masks, want.batched.masks[:1])
        np.testing.assert_allclose(got.scores, want.batched.scores[:1], atol=1e-5)

    # a handle made on replica A refines on replica B exactly like the inline logits
    best = responses["A"].results[0].candidates[responses["A"].results[0].best_index]
    by_handle = point_request(embedding.embedding_id, 60, 70)
    by_handle.prompts[0].logits_handle = best.logits_handle
    inline = point_request(embedding.embedding_id, 60, 70)
    inline.prompts[0].mask_logits = best.logits
    [on_b], _ = wire.predictions_from_proto(stub_b.Segment(by_handle, timeout=60).results)
    [inline_b], _ = wire.predictions_from_proto(stub_b.Segment(inline, timeout=60).results)
    np.testing.assert_array_equal(on_b.masks, inline_b.masks)
    np.testing.assert_allclose(on_b.scores, inline_b.scores, atol=1e-6)

    # a miss: replica B (no encoder address) says NOT_FOUND even with the image attached...
    fresh = synthetic_rgb(160, 200, seed=seed + 1000)
    request = point_request(model.embedding_id(fresh), 20, 20)
    request.image.CopyFrom(wire.image_to_proto(fresh, "rgb"))
    with pytest.raises(grpc.RpcError) as caught:
        stub_b.Segment(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    error = error_from_rpc_error(caught.value)
    assert isinstance(error, EmbeddingNotFoundError) and "EmbedImages" in str(error)
    # ...replica A asks the encoder and proceeds; then B finds it in the store too
    [got_a], _ = wire.predictions_from_proto(stub_a.Segment(request, timeout=120).results)
    request.ClearField("image")
    [got_b], _ = wire.predictions_from_proto(stub_b.Segment(request, timeout=60).results)
    np.testing.assert_array_equal(got_a.masks, got_b.masks)


def test_two_replicas_share_a_real_redis(tiny_checkpoint: Path, model: Sam2Model) -> None:
    with RedisServer() as redis:
        fleet = start_fleet(tiny_checkpoint, redis.url)
        try:
            check_shared_store(fleet, model, seed=1)
        finally:
            fleet.stop()


def test_two_replicas_share_a_real_s3_server(tiny_checkpoint: Path, model: Sam2Model) -> None:
    with RcloneS3Server() as s3:
        fleet = start_fleet(tiny_checkpoint, s3.store_url("sam2-e2e", "embeddings"), s3.aws_env)
        try:
            check_shared_store(fleet, model, seed=2)
        finally:
            fleet.stop()


@pytest.fixture(scope="module")
def default_fleet(tiny_checkpoint: Path) -> Iterator[Fleet]:
    """The tiers with no --store: the diskcache default, in a private temporary directory."""
    tmp = tempfile.mkdtemp(prefix="sam2-default-store-")
    fleet = start_fleet(tiny_checkpoint, None, {"TMPDIR": tmp})
    try:
        yield fleet
    finally:
        fleet.stop()
    assert os.listdir(tmp)  # the default store lived there


def test_diskcache_default_store(default_fleet: Fleet, model: Sam2Model) -> None:
    check_shared_store(default_fleet, model, seed=3)


LOAD_REQUESTS = 200
LOAD_CONCURRENCY = 16
LOAD_TIME_LIMIT_S = 60.0


def test_concurrent_load_no_failures_no_crossed_masks(default_fleet: Fleet,
                                                      model: Sam2Model) -> None:
    images = [synthetic_rgb(180, 240, seed=100 + i) for i in range(3)]
    points = [(60.0 + 40 * i, 80.0 + 20 * i) for i in range(3)]
    with Sam2Client(encoder=default_fleet.encoder.address, model_id=MODEL_ID) as client:
        ids = [e.embedding_id for e in client.embed_images(images, input_color_format="rgb")]
    expected = [
        model.segment_images(rgb, point_coordinates=[p], point_labels=[1],
                             input_color_format="rgb", use_mask_input_cache=False)[0].masks.numpy()
        for rgb, p in zip(images, points, strict=True)
    ]
    assert all(not np.array_equal(expected[0], other) for other in expected[1:])

    async def run() -> tuple[list[int], list[str], float]:
        addresses = [default_fleet.decoder_a.address, default_fleet.decoder_b.address]
        channels = [grpc.aio.insecure_channel(a, options=channel_options()) for a in addresses]
        stubs = [decoder_pb2_grpc.DecoderServiceStub(c) for c in channels]
        semaphore = asyncio.Semaphore(LOAD_CONCURRENCY)
        mismatched: list[int] = []
        failures: list[str] = []

        async def one(i: int) -> None:
            which = i % 3
            async with semaphore:
                try:
                    response = await stubs[i % 2].Segment(
                        point_request(ids[which], *points[which]), timeout=LOAD_TIME_LIMIT_S)
                except grpc.RpcError as exc:
                    failures.append(f"{i}: {exc.code().name} {exc.details()}")
                    return
            [got], _ = wire.predictions_from_proto(response.results)
            if response.embedding.embedding_id != ids[which] or not np.array_equal(
                    got.masks[0], expected[which]):
                mismatched.append(i)

        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(LOAD_REQUESTS))),
                                   LOAD_TIME_LIMIT_S)
        finally:
            for channel in channels:
                await channel.close()
        return mismatched, failures, time.monotonic() - started

    mismatched, failures, elapsed = asyncio.run(run())
    assert failures == []
    assert mismatched == []
    assert elapsed < LOAD_TIME_LIMIT_S, f"{LOAD_REQUESTS} requests took {elapsed:.1f} s"
