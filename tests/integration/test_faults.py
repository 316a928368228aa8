"""Faults against real processes on 127.0.0.1: the store (Redis, an S3 server) killed and
restarted while requests flow, the encoder SIGKILLed mid-batch, a corrupted store entry, and
a full disk under the diskcache store (a 2 MiB tmpfs)."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sam2_shared import wire
from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)
from sam2_shared.client import Sam2Client
from sam2_shared.client.channels import channel_options
from sam2_shared.client.retry import NO_RETRY
from sam2_shared.embedding import namespaced_content_id
from sam2_shared.store import open_store
from sam2_shared.wire.status import error_from_rpc_error, error_from_status
from tests.helpers.servers import RcloneS3Server, RedisServer
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
FOREGROUND = common_pb2.POINT_LABEL_FOREGROUND


def _segment_request(embedding_id: str) -> decoder_pb2.SegmentRequest:
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=30, y_px=20, label=FOREGROUND)])
    return decoder_pb2.SegmentRequest(embedding_id=embedding_id, prompts=[prompt])


def _outcome(stub: decoder_pb2_grpc.DecoderServiceStub, embedding_id: str) -> str:
    """"OK" or the ErrorInfo reason of one Segment call."""
    try:
        stub.Segment(_segment_request(embedding_id), timeout=30)
        return "OK"
    except grpc.RpcError as exc:
        error = error_from_rpc_error(exc)
        assert "Traceback" not in str(error)
        return error.reason


def _store_outage(store_server, store_url: str, checkpoint: Path,  # noqa: ANN001
                  env: dict[str, str] | None, reappears: bool) -> None:
    """Shared scenario: hot stays answerable, cold gets STORE_UNAVAILABLE, then recovery."""
    encoder = encoder_process(checkpoint, store_url, env=env).start()
    decoder = decoder_process(checkpoint, store_url, env=env).start()
    try:
        with Sam2Client(encoder=encoder.address, retry=NO_RETRY) as client, \
                grpc.insecure_channel(decoder.address, options=channel_options()) as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            hot_rgb, cold_rgb = synthetic_rgb(64, 80, seed=1), synthetic_rgb(64, 80, seed=2)
            [hot, cold] = client.embed_images([hot_rgb, cold_rgb], input_color_format="rgb")
            assert _outcome(stub, hot.embedding_id) == "OK"  # now in the decoder's hot cache

            # requests keep flowing from a thread while the store goes away and comes back
            flowing: list[str] = []
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    flowing.append(_outcome(stub, hot.embedding_id))
                    time.sleep(0.05)

            worker = threading.Thread(target=traffic)
            worker.start()
            try:
                store_server.stop()
                assert _outcome(stub, hot.embedding_id) == "OK"
                assert _outcome(stub, cold.embedding_id) == "STORE_UNAVAILABLE"
                store_server.start()  # same port
                deadline = time.monotonic() + 30
                want = {"OK"} if reappears else {"OK", "EMBEDDING_NOT_FOUND"}
                while _outcome(stub, cold.embedding_id) not in want:
                    assert time.monotonic() < deadline, "decoder never recovered"
                    time.sleep(0.2)
            finally:
                stop.set()
                worker.join()
            assert flowing and set(flowing) == {"OK"}, set(flowing)
            # the encoder's store client reconnected too: embed again, segment the cold id
            [again] = client.embed_images(cold_rgb, input_color_format="rgb")
            assert again.embedding_id == cold.embedding_id
            assert _outcome(stub, cold.embedding_id) == "OK"
    finally:
        decoder.stop()
        encoder.stop()


def test_redis_killed_and_restarted(tiny_checkpoint: Path) -> None:
    with RedisServer() as redis_server:  # in-memory: entries are gone after the restart
        _store_outage(redis_server, redis_server.url, tiny_checkpoint, None, reappears=False)


def test_s3_server_killed_and_restarted(tiny_checkpoint: Path) -> None:
    with RcloneS3Server() as s3:  # directory-backed: entries come back with the server
        _store_outage(s3, s3.store_url("faults"), tiny_checkpoint, s3.aws_env, reappears=True)


def test_corrupted_redis_entry_is_a_miss(tiny_checkpoint: Path) -> None:
    with RedisServer() as redis_server:
        encoder = encoder_process(tiny_checkpoint, redis_server.url).start()
        decoder = decoder_process(tiny_checkpoint, redis_server.url).start()
        try:
            rgb = synthetic_rgb(64, 80, seed=3)
            with Sam2Client(encoder=encoder.address) as client:
                [ref] = client.embed_images(rgb, input_color_format="rgb")
            import redis

            raw = redis.Redis.from_url(redis_server.url)
            [key] = [k for k in raw.keys("*") if ref.embedding_id.encode() in k]
            value = bytearray(raw.get(key))
            value[len(value) // 2] ^= 0xFF  # one flipped byte in the tensor data
            raw.set(key, bytes(value))
            with grpc.insecure_channel(decoder.address, options=channel_options()) as channel:
                stub = decoder_pb2_grpc.DecoderServiceStub(channel)
                assert _outcome(stub, ref.embedding_id) == "EMBEDDING_NOT_FOUND"
                with Sam2Client(encoder=encoder.address) as client:  # re-embedding heals it
                    [again] = client.embed_images(rgb, input_color_format="rgb")
                assert not again.already_stored
                assert _outcome(stub, ref.embedding_id) == "OK"
        finally:
            decoder.stop()
            encoder.stop()


def test_encoder_killed_mid_batch_then_retry_succeeds(tiny_checkpoint: Path) -> None:
    store_url = "diskcache://" + tempfile.mkdtemp(prefix="sam2-faults-")
    images = [synthetic_rgb(480, 640, seed=10 + i) for i in range(4)]
    ids = [namespaced_content_id(rgb, MODEL_ID) for rgb in images]
    encoder = encoder_process(tiny_checkpoint, store_url, "--max-batch-size", "4").start()
    try:
        with grpc.insecure_channel(encoder.address, options=channel_options()) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            request = encoder_pb2.EmbedImagesRequest(
                model_id=MODEL_ID, images=[wire.image_to_proto(rgb, "rgb") for rgb in images])
            future = stub.EmbedImages.future(request, timeout=60)
            time.sleep(0.6)  # decoded and queued: the batch is in the forward pass
            assert not future.done()
            assert encoder.process is not None
            encoder.process.kill()  # SIGKILL: no drain, no cleanup
            encoder.process.wait()
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # nothing half-written is ever read back: each id is a miss or a whole embedding
        with open_store(store_url) as store:
            for embedding_id in ids:
                embedding = store.get_embedding(embedding_id, MODEL_ID)
                assert embedding is None or tuple(embedding.image_embed.shape) == (1, 256, 64, 64)
        encoder.process = None
        encoder = encoder_process(tiny_checkpoint, store_url).start()  # the restarted one
        with Sam2Client(encoder=encoder.address) as client:  # with retries (the default)
            refs = client.embed_images(images, input_color_format="rgb")
        assert [ref.embedding_id for ref in refs] == ids
        with open_store(store_url) as store:
            assert all(store.get_embedding(i, MODEL_ID) is not None for i in ids)
    finally:
        encoder.stop()


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A 2 MiB tmpfs (an fp16 embedding is ~8 MiB): needs root, as in CI's container."""
    directory = Path(tempfile.mkdtemp(prefix="sam2-full-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_disk_full_under_diskcache_is_a_clear_error(tiny_checkpoint: Path,
                                                    tiny_tmpfs: Path) -> None:
    encoder = encoder_process(tiny_checkpoint, f"diskcache://{tiny_tmpfs}/store").start()
    try:
        with grpc.insecure_channel(encoder.address, options=channel_options()) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            for seed in (20, 21):  # and again: the server keeps serving
                request = encoder_pb2.EmbedImagesRequest(model_id=MODEL_ID, images=[
                    wire.image_to_proto(synthetic_rgb(64, 80, seed=seed), "rgb")])
                [result] = stub.EmbedImages(request, timeout=60).results
                assert result.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
                error = error_from_status(result.status)
                assert error.reason == "STORE_UNAVAILABLE"
                assert "Traceback" not in result.status.message
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert encoder.process is not None and encoder.process.poll() is None
    finally:
        encoder.stop()
