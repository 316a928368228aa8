"""The encoder tier: ``Encoder`` logic with a fake model, settings, and the real
``python -m encoder_service`` through real gRPC (one server process for the module)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import torch
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from encoder_service.cli import EncoderSettings
from encoder_service.encoder import EXPORT_FORMAT, Encoder
from encoder_service.servicer import SERVICE_NAME
from sam2_shared.api.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc
from sam2_shared.embedding import ImageEmbedding, content_id
from sam2_shared.errors import InvalidInputError, ResourceExhaustedError, UnknownModelError
from sam2_shared.inference import imaging
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.serving.settings import describe_settings, load_settings
from sam2_shared.store import codec, open_store
from tests.helpers import REPO_ROOT

MODEL_ID = "sam2.1/hiera_tiny"
MAX_PIXELS = 1_000_000  # the server's --max-image-pixels, small to test the limit cheaply


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return data.tobytes()


def noise_image(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------- fake-model units


class FakeModel:
    """Just enough of ``Sam2Model`` for ``Encoder``: real decoding and ids, fake tensors."""

    model_id = MODEL_ID
    device = "cpu"
    precision = "fp32"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[str]] = []

    def decode_image(self, image, input_color_format: str = "rgb") -> np.ndarray:
        return imaging.decode_image(image, input_color_format, max_pixels=MAX_PIXELS)

    def embedding_id(self, rgb: np.ndarray) -> str:
        return content_id(rgb, self.model_id)

    def encode_rgb(self, rgbs, ids) -> list[ImageEmbedding]:
        time.sleep(self.delay_s)
        self.batches.append(list(ids))
        out = []
        for rgb, embedding_id in zip(rgbs, ids):
            tensors = [torch.full(shape, float(rgb.mean())) for _, shape in
                       codec.EMBEDDING_SHAPES]
            out.append(ImageEmbedding(tensors[0], (tensors[1], tensors[2]),
                                      (rgb.shape[0], rgb.shape[1]), self.model_id, embedding_id))
        return out


def test_encoder_is_idempotent_and_batches_distinct_images() -> None:
    async def main() -> None:
        model = FakeModel(delay_s=0.05)
        # The batch fills at 3 images: no race against a short wait on a loaded machine.
        encoder = Encoder(model, open_store("memory://"), max_batch_size=3, max_wait_s=10)
        images = [png_bytes(noise_image(i)) for i in range(3)]
        first = await asyncio.gather(*(encoder.embed(img) for img in images))
        assert [stored for _, stored in first] == [False, False, False]
        assert encoder.images_encoded == 3 and len(model.batches) == 1  # one forward
        again = await asyncio.gather(*(encoder.embed(img) for img in images))
        assert [stored for _, stored in again] == [True, True, True]
        assert [i for i, _ in again] == [i for i, _ in first]
        assert encoder.images_encoded == 3  # nothing recomputed
        await encoder.close()

    asyncio.run(main())


def test_encoder_computes_identical_concurrent_requests_once() -> None:
    async def main() -> None:
        # The encode lasts long enough for all six to arrive while it runs (a call that
        # came after the write would find the embedding stored, not coalesce).
        model = FakeModel(delay_s=2.0)
        encoder = Encoder(model, open_store("memory://"), max_batch_size=4, max_wait_s=0.01)
        image = png_bytes(noise_image(7))
        results = await asyncio.gather(*(encoder.embed(image) for _ in range(6)))
        assert len({info.embedding_id for info, _ in results}) == 1
        assert encoder.images_encoded == 1
        assert encoder.batcher.stats.coalesced == 5
        assert encoder.store.has_embedding(results[0][0].embedding_id)
        await encoder.close()

    asyncio.run(main())


def test_encoder_queue_full_is_resource_exhausted() -> None:
    async def main() -> None:
        encoder = Encoder(FakeModel(delay_s=0.3), open_store("memory://"), max_batch_size=1,
                          max_wait_s=0.0, max_queue=1)
        images = [png_bytes(noise_image(i)) for i in range(4)]
        outcomes = await asyncio.gather(*(encoder.embed(img) for img in images),
                                        return_exceptions=True)
        rejected = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
        assert rejected and all(o.reason == "QUEUE_FULL" for o in rejected)
        assert any(isinstance(o, tuple) for o in outcomes)
        await encoder.close()

    asyncio.run(main())


def test_encoder_export_import_into_a_second_store_and_rejects_bad_uploads() -> None:
    async def main() -> None:
        source = Encoder(FakeModel(), open_store("memory://"))
        target = Encoder(FakeModel(), open_store("memory://"))
        info, _ = await source.embed(png_bytes(noise_image(3)))
        exported = await source.export(info.embedding_id)
        assert exported.format == EXPORT_FORMAT and exported.info == info
        imported, existed = await target.import_(
            exported.data, MODEL_ID, sha256=exported.sha256, size_bytes=len(exported.data),
            embedding_id=info.embedding_id,
        )
        # stored under an import id, never under the content id the upload claims
        assert imported.embedding_id.startswith("imp-") and not existed
        assert (imported.model_id, imported.original_hw) == (info.model_id, info.original_hw)
        assert not target.store.has_embedding(info.embedding_id)
        again = await target.import_(exported.data, MODEL_ID)
        assert again == (imported, True)  # the same upload, the same id
        stored = target.store.get_embedding(imported.embedding_id, MODEL_ID)
        original = source.store.get_embedding(info.embedding_id, MODEL_ID)
        assert torch.equal(stored.image_embed, original.image_embed)

        damaged = bytearray(exported.data)
        damaged[-10] ^= 0xFF
        with pytest.raises(InvalidInputError) as bad_checksum:
            await target.import_(bytes(damaged), MODEL_ID, sha256=exported.sha256)
        assert bad_checksum.value.reason == "EMBEDDING_CORRUPT"
        with pytest.raises(InvalidInputError) as bad_payload:  # no header hash: codec catches it
            await Encoder(FakeModel(), open_store("memory://")).import_(bytes(damaged), MODEL_ID)
        assert bad_payload.value.reason == "EMBEDDING_CORRUPT"
        with pytest.raises(UnknownModelError):
            await target.import_(exported.data, "sam2.1/hiera_large")
        with pytest.raises(InvalidInputError) as bad_format:
            await target.import_(exported.data, MODEL_ID, format="npz")
        assert bad_format.value.reason == "UNSUPPORTED_FORMAT"

    asyncio.run(main())


def test_an_upload_cannot_stand_in_for_an_image() -> None:
    """A client that knows an image cannot plant forged tensors under that image's content
    id: the upload lands in the import space, and embedding the image computes it."""
    async def main() -> None:
        encoder = Encoder(FakeModel(), open_store("memory://"))
        rgb = noise_image(77)
        victim_id = content_id(rgb, MODEL_ID)
        forged = ImageEmbedding(*(lambda t: (t[0], (t[1], t[2])))(
            [torch.zeros(shape) for _, shape in codec.EMBEDDING_SHAPES]),
            original_hw=rgb.shape[:2], model_id=MODEL_ID, embedding_id=victim_id)
        data = codec.encode_embedding(forged, "float16")
        planted, _ = await encoder.import_(data, MODEL_ID, embedding_id=victim_id)
        assert planted.embedding_id != victim_id
        assert not encoder.store.has_embedding(victim_id)
        info, existed = await encoder.embed(png_bytes(rgb))
        assert info.embedding_id == victim_id and existed is False  # computed, not planted
        stored = encoder.store.get_embedding(victim_id, MODEL_ID)
        assert float(stored.image_embed.abs().sum()) > 0  # the encoder's, not the zeros
        await encoder.close()

    asyncio.run(main())


# --------------------------------------------------------------------- settings


def test_settings_from_flags_and_env_with_secrets_masked() -> None:
    env = {"SAM2_STORE": "redis://user:hunter2@cache:6379/0", "SAM2_MAX_BATCH_SIZE": "8",
           "SAM2_REFLECTION": "false"}
    settings = load_settings(EncoderSettings, ["--max-batch-size", "2", "--port", "0"], env=env)
    assert settings.max_batch_size == 2  # the flag wins over the variable
    assert settings.store == "redis://user:hunter2@cache:6379/0"
    assert settings.reflection is False and settings.port == 0 and settings.checkpoint is None
    text = describe_settings(settings)
    assert "hunter2" not in text and "redis://user:***@cache:6379/0" in text


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--max-batch-size", "0"], {}),
        (["--precision", "fp8"], {}),
        ([], {"SAM2_PORT": "not-a-port"}),
        (["--model", "sam3/huge"], {}),
    ],
)
def test_settings_reject_bad_values(argv: list[str], env: dict[str, str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(EncoderSettings, argv, env=env)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


# --------------------------------------------------------------------- the real server


@dataclass
class RunningEncoder:
    process: subprocess.Popen
    port: int
    store_url: str
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _read_port(process: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if line.startswith("SAM2_LISTENING port="):
                return int(line.split("=", 1)[1])
        if process.poll() is not None:
            break
    raise AssertionError(f"encoder did not report its port (exit code {process.poll()})")


def _wait_serving(address: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                    timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("encoder never became SERVING")


@pytest.fixture(scope="module")
def encoder_server(tiny_checkpoint: Path, tmp_path_factory) -> Iterator[RunningEncoder]:
    workdir = tmp_path_factory.mktemp("encoder")  # never a folder with a sam2/ package
    store_url = f"diskcache://{workdir / 'store'}"
    log_path = workdir / "encoder.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SAM2_STORE": store_url}
    command = [sys.executable, "-m", "encoder_service", "--port", "0", "--host", "127.0.0.1",
               "--metrics-port", "0", "--checkpoint", str(tiny_checkpoint),
               "--max-image-pixels", str(MAX_PIXELS), "--grace-s", "20",
               "--max-batch-size", "4", "--max-wait-ms", "20"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    try:
        port = _read_port(process, timeout_s=60)
        _wait_serving(f"127.0.0.1:{port}", timeout_s=120)
        yield RunningEncoder(process, port, store_url, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def stub(encoder_server: RunningEncoder) -> Iterator[encoder_pb2_grpc.EncoderServiceStub]:
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(encoder_server.address, options=options) as channel:
        yield encoder_pb2_grpc.EncoderServiceStub(channel)


@pytest.fixture(scope="module")
def local_model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained(MODEL_ID, tiny_checkpoint, parts="encoder",
                                     max_pixels=MAX_PIXELS)


def embed(stub, *images: common_pb2.Image, model_id: str = MODEL_ID):
    return stub.EmbedImages(encoder_pb2.EmbedImagesRequest(model_id=model_id, images=images),
                            timeout=60).results


def png_image(rgb: np.ndarray) -> common_pb2.Image:
    return common_pb2.Image(encoded_bytes=png_bytes(rgb))


def error_reason(status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def test_embed_png_matches_in_process_model_and_is_idempotent(
    stub, encoder_server: RunningEncoder, local_model: Sam2Model, synthetic_image
) -> None:
    rgb = synthetic_image(180, 240, seed=11)
    (result,) = embed(stub, png_image(rgb))
    assert result.status.code == code_pb2.OK, result.status.message
    assert result.already_stored is False
    assert result.embedding.embedding_id == local_model.embedding_id(rgb)
    assert (result.embedding.model_id, result.embedding.height_px, result.embedding.width_px) == (
        MODEL_ID, 180, 240)

    store = open_store(encoder_server.store_url)
    stored = store.get_embedding(result.embedding.embedding_id, MODEL_ID)
    assert stored is not None
    (expected,) = local_model.encode_rgb([rgb])
    for got, want in zip((stored.image_embed, *stored.high_res_feats),
                         (expected.image_embed, *expected.high_res_feats)):
        scale = float(want.abs().max())
        # float16 storage: ~2^-11 relative, plus batch-vs-single CPU kernel noise.
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * scale)

    # Same pixels sent as raw BGR: same id, already stored, nothing recomputed.
    raw = common_pb2.Image(raw=common_pb2.RawImage(
        pixels=np.ascontiguousarray(rgb[:, :, ::-1]).tobytes(), height_px=180, width_px=240,
        channel_count=3, color_format=common_pb2.COLOR_FORMAT_BGR))
    (again,) = embed(stub, raw)
    assert again.status.code == code_pb2.OK and again.already_stored is True
    assert again.embedding.embedding_id == result.embedding.embedding_id
    store.close()


def test_one_bad_image_fails_only_itself(stub) -> None:
    good = noise_image(21)
    bad_channels = common_pb2.Image(raw=common_pb2.RawImage(
        pixels=bytes(4 * 4 * 2), height_px=4, width_px=4, channel_count=2))
    too_big = common_pb2.Image(encoded_bytes=png_bytes(np.zeros((1001, 1000, 3), np.uint8)))
    results = embed(stub, png_image(good), common_pb2.Image(encoded_bytes=b"not an image"),
                    common_pb2.Image(encoded_bytes=b""), bad_channels, too_big)
    assert results[0].status.code == code_pb2.OK and results[0].embedding.embedding_id
    for result in results[1:]:
        assert result.status.code == code_pb2.INVALID_ARGUMENT
        assert error_reason(result.status) == "INVALID_ARGUMENT"
        assert not result.embedding.embedding_id
    assert "could not decode" in results[1].status.message
    assert "empty" in results[2].status.message
    assert "channel_count" in results[3].status.message
    assert "exceeds the limit" in results[4].status.message


def test_request_level_errors(stub) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        embed(stub, png_image(noise_image(1)), model_id="sam2.1/hiera_large")
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(rpc_status.from_call(unknown.value)) == "UNKNOWN_MODEL"
    with pytest.raises(grpc.RpcError) as empty:
        embed(stub)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.GetEmbedding(encoder_pb2.GetEmbeddingRequest(embedding_id="0" * 64),
                               timeout=10))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(rpc_status.from_call(missing.value)) == "EMBEDDING_NOT_FOUND"


def test_get_and_put_embedding_round_trip(stub, encoder_server: RunningEncoder) -> None:
    (result,) = embed(stub, png_image(noise_image(31)))
    embedding_id = result.embedding.embedding_id
    chunks = list(stub.GetEmbedding(
        encoder_pb2.GetEmbeddingRequest(embedding_id=embedding_id, chunk_size_bytes=1), timeout=30))
    header = chunks[0].header
    data = b"".join(c.chunk for c in chunks)
    assert len(chunks) > 2  # clamped to 64 KiB chunks: several messages
    assert all(not c.HasField("header") for c in chunks[1:])
    assert header.size_bytes == len(data) and header.format == EXPORT_FORMAT
    assert header.embedding == result.embedding

    store = open_store(encoder_server.store_url)
    original = store.export_embedding(embedding_id, MODEL_ID)
    assert original == data
    store.delete_embedding(embedding_id)  # as if the target were another store

    def upload(payload: bytes, blob_header=header, size: int = 256 << 10):
        messages = [encoder_pb2.PutEmbeddingRequest(header=blob_header, chunk=payload[:size])]
        messages += [encoder_pb2.PutEmbeddingRequest(chunk=payload[i:i + size])
                     for i in range(size, len(payload), size)]
        return stub.PutEmbedding(iter(messages), timeout=30)

    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x01
    with pytest.raises(grpc.RpcError) as corrupt:
        upload(bytes(damaged))
    assert corrupt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(rpc_status.from_call(corrupt.value)) == "EMBEDDING_CORRUPT"
    assert not store.has_embedding(embedding_id)

    put = upload(data)
    assert put.already_stored is False
    assert put.embedding.embedding_id.startswith("imp-")  # the server's id for an upload
    assert put.embedding.height_px == result.embedding.height_px
    assert not store.has_embedding(embedding_id)  # never under the claimed content id
    assert store.get_embedding(put.embedding.embedding_id, MODEL_ID) is not None
    assert upload(data).already_stored is True

    wrong_model = encoder_pb2.EmbeddingBlobHeader()
    wrong_model.CopyFrom(header)
    wrong_model.embedding.model_id = "sam2.1/hiera_small"
    with pytest.raises(grpc.RpcError) as mismatch:
        upload(data, wrong_model)
    assert error_reason(rpc_status.from_call(mismatch.value)) == "UNKNOWN_MODEL"
    store.close()


def test_concurrent_identical_requests_share_one_encode(stub) -> None:
    image = png_image(noise_image(41, 64, 64))
    futures = [stub.EmbedImages.future(
        encoder_pb2.EmbedImagesRequest(model_id=MODEL_ID, images=[image]), timeout=60)
        for _ in range(4)]
    results = [f.result().results[0] for f in futures]
    assert all(r.status.code == code_pb2.OK for r in results)
    assert len({r.embedding.embedding_id for r in results}) == 1
    # Computed once: every caller saw it as new (coalesced) or as stored, and the
    # encode count is covered by test_encoder_computes_identical_concurrent_requests_once.
    assert sum(not r.already_stored for r in results) >= 1


def test_health_and_reflection(encoder_server: RunningEncoder) -> None:
    with grpc.insecure_channel(encoder_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        method = database.FindFileContainingSymbol(SERVICE_NAME)
        assert method.package == "sam2.v1"


def test_latency_grpc_vs_in_process(stub, local_model: Sam2Model) -> None:
    """Median embed latency of new 480x640 images: through gRPC (decode, encode, store
    write) vs ``encode_rgb`` in process. Printed for the report; bounded loosely."""
    grpc_s, local_s = [], []
    for seed in range(3):
        rgb = noise_image(100 + seed, 480, 640)
        image = png_image(rgb)
        started = time.perf_counter()
        (result,) = embed(stub, image)
        grpc_s.append(time.perf_counter() - started)
        assert result.status.code == code_pb2.OK and not result.already_stored
        started = time.perf_counter()
        local_model.encode_rgb([rgb])
        local_s.append(time.perf_counter() - started)
    grpc_median, local_median = statistics.median(grpc_s), statistics.median(local_s)
    print(f"\nembed 480x640 median: gRPC {grpc_median * 1e3:.0f} ms, "
          f"in-process encode_rgb {local_median * 1e3:.0f} ms")
    assert grpc_median < 10 * local_median + 2.0


def test_sigterm_drains_in_flight_requests(stub, encoder_server: RunningEncoder) -> None:
    """Runs last: stops the module's server."""
    image = png_image(noise_image(51, 320, 320))
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["result"] = embed(stub, image)[0]
        except grpc.RpcError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)  # the request is in the encoder (an encode takes ~1 s on CPU)
    encoder_server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.status.code == code_pb2.OK and result.embedding.embedding_id
    assert encoder_server.process.wait(30) == 0
    with pytest.raises(grpc.RpcError) as refused:
        embed(stub, image)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
