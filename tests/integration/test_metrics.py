"""Metrics: the metric objects on their own, the gRPC interceptor on a real aio server, then
the real encoder tier scraped by a real Prometheus server (Debian package ``prometheus``)."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import urllib.request
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)
from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import EmbeddingNotFoundError, ResourceExhaustedError
from sam2_shared.inference.caches import LruCache
from sam2_shared.serving.auth import AuthInterceptor
from sam2_shared.serving.batching import MicroBatcher
from sam2_shared.serving.metrics import GpuMemoryCollector, Sam2Metrics
from sam2_shared.serving.server import build_server
from sam2_shared.store import open_store
from sam2_shared.wire.masks import MaskEncoding
from tests.helpers import REPO_ROOT
from tests.helpers.servers import PrometheusServer, free_port
from tests.helpers.tier_processes import decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
DOCS = REPO_ROOT / "docs" / "metrics.md"


def scrape_until(port: int, needle: str, timeout_s: float = 15.0) -> str:
    """/metrics text once it contains ``needle`` (the last scrape if it never does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        url = f"http://127.0.0.1:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def value(metrics: Sam2Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def make_embedding(seed: int = 0) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return ImageEmbedding(
        image_embed=torch.randn(1, 256, 64, 64, generator=generator),
        high_res_feats=(torch.randn(1, 32, 256, 256, generator=generator),
                        torch.randn(1, 64, 128, 128, generator=generator)),
        original_hw=(480, 640), model_id=MODEL_ID, embedding_id=secrets.token_hex(32),
    )


# --------------------------------------------------------------------------- units


def test_interceptor_counts_every_rpc_kind_by_status_code() -> None:
    """Unary (health Check), coroutine server-stream (health Watch), async-generator
    server-stream with a domain error mid-stream, and bidi (reflection)."""
    metrics = Sam2Metrics(process_collectors=False)

    async def numbers(request: bytes, context):  # noqa: ANN001, ANN202 - raw bytes RPC
        yield b"1"
        yield b"2"
        raise EmbeddingNotFoundError("gone", embedding_id="x")

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(numbers)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Numbers", {"Count": handler}),))

    async def main() -> None:
        server, port = build_server([register], ["test.Numbers"], port=0, host="127.0.0.1",
                                    interceptors=[metrics.interceptor()], grace_s=0)
        await server.start()
        await server.mark_serving()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await health.Check(health_pb2.HealthCheckRequest())
                await health.Check(health_pb2.HealthCheckRequest(service="test.Numbers"))
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await health.Check(health_pb2.HealthCheckRequest(service="nope"))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                watch = health.Watch(health_pb2.HealthCheckRequest())
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
                count = channel.unary_stream("/test.Numbers/Count")
                call = count(b"")
                got: list[bytes] = []
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for reply in call:
                        got.append(reply)
                assert got == [b"1", b"2"]
                assert failed.value.code() == grpc.StatusCode.NOT_FOUND
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)

                async def ask():  # noqa: ANN202
                    yield reflection_pb2.ServerReflectionRequest(list_services="")

                replies = [r async for r in stub.ServerReflectionInfo(ask())]
                assert replies and replies[0].list_services_response.service
            for _ in range(100):  # the server finishes the cancelled Watch on its own time
                if value(metrics, "sam2_grpc_server_in_flight_requests",
                         grpc_service="grpc.health.v1.Health", grpc_method="Watch",
                         grpc_type="server_stream", protocol="grpc") == 0:
                    break
                await asyncio.sleep(0.02)
        finally:
            await server.stop(0)

    asyncio.run(main())
    health = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check",
              "grpc_type": "unary", "protocol": "grpc"}
    assert value(metrics, "sam2_grpc_server_handled_total", **health, grpc_code="OK") == 2
    assert value(metrics, "sam2_grpc_server_handled_total", **health, grpc_code="NOT_FOUND") == 1
    assert value(metrics, "sam2_grpc_server_started_total", **health) == 3
    assert value(metrics, "sam2_grpc_server_handling_seconds_count", **health,
                 grpc_code="OK") == 2
    watch = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch",
             "grpc_type": "server_stream", "protocol": "grpc"}
    assert value(metrics, "sam2_grpc_server_handled_total", **watch, grpc_code="CANCELLED") == 1
    assert value(metrics, "sam2_grpc_server_in_flight_requests", **watch) == 0
    stream = {"grpc_service": "test.Numbers", "grpc_method": "Count",
              "grpc_type": "server_stream", "protocol": "grpc"}
    assert value(metrics, "sam2_grpc_server_handled_total", **stream, grpc_code="NOT_FOUND") == 1
    bidi = {"grpc_service": "grpc.reflection.v1alpha.ServerReflection",
            "grpc_method": "ServerReflectionInfo", "grpc_type": "bidi_stream", "protocol": "grpc"}
    assert value(metrics, "sam2_grpc_server_handled_total", **bidi, grpc_code="OK") == 1


def test_batcher_metrics_follow_batches_queue_and_rejections() -> None:
    metrics = Sam2Metrics(process_collectors=False)
    encoder_metrics = metrics.encoder(MODEL_ID)

    async def main() -> None:
        release = asyncio.Event()

        async def work(items: list[int]) -> list[int | Exception]:
            await release.wait()
            return [ValueError("odd") if item % 2 else item for item in items]

        batcher: MicroBatcher[int, int] = MicroBatcher(work, max_batch_size=4, max_wait_s=0,
                                                       max_queue=3)
        encoder_metrics.attach_batcher(batcher)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch runs alone and blocks
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert value(metrics, "sam2_encoder_queue_depth", model=MODEL_ID) == 3
        with pytest.raises(ResourceExhaustedError):
            await batcher.submit(4)
        release.set()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        assert [isinstance(r, Exception) for r in results] == [False, True, False, True]
        await batcher.close()

    asyncio.run(main())
    labels = {"model": MODEL_ID}
    assert value(metrics, "sam2_encoder_batch_size_count", **labels) == 2
    assert value(metrics, "sam2_encoder_batch_size_sum", **labels) == 4
    assert value(metrics, "sam2_encoder_batch_size_bucket", **labels, le="1.0") == 1
    assert value(metrics, "sam2_encoder_queue_wait_seconds_count", **labels) == 4
    assert value(metrics, "sam2_encoder_embed_seconds_count", **labels) == 2
    assert value(metrics, "sam2_encoder_batch_failed_items_total", **labels) == 2
    assert value(metrics, "sam2_encoder_queue_rejected_total", **labels) == 1
    assert value(metrics, "sam2_encoder_queue_submitted_total", **labels) == 5  # rejected too
    assert value(metrics, "sam2_encoder_queue_depth", **labels) == 0


def test_encoder_image_outcomes_count_reasons() -> None:
    metrics = Sam2Metrics(process_collectors=False)
    encoder_metrics = metrics.encoder(MODEL_ID)
    encoder_metrics.observe_images([("info", False), ("info", True),
                                    EmbeddingNotFoundError("x", embedding_id="y"),
                                    RuntimeError("bug")])
    labels = {"model": MODEL_ID}
    assert value(metrics, "sam2_encoder_images_total", **labels, outcome="embedded") == 1
    assert value(metrics, "sam2_encoder_images_total", **labels, outcome="already_stored") == 1
    assert value(metrics, "sam2_encoder_images_total", **labels, outcome="error") == 2
    assert value(metrics, "sam2_encoder_image_errors_total", **labels,
                 reason="EMBEDDING_NOT_FOUND") == 1
    assert value(metrics, "sam2_encoder_image_errors_total", **labels, reason="INTERNAL") == 1


def test_store_metrics_latency_hits_misses_and_corrupt_entries() -> None:
    metrics = Sam2Metrics(process_collectors=False)
    store = open_store("memory://")
    metrics.watch_store(store)
    embedding = make_embedding()
    assert store.put_embedding(embedding) is False
    assert store.get_embedding(embedding.embedding_id, MODEL_ID) is not None
    assert store.get_embedding("0" * 64, MODEL_ID) is None
    store.blobs.put(store.embedding_key("1" * 64), b"not an embedding")
    assert store.get_embedding("1" * 64, MODEL_ID) is None
    store.put_logits("handle", np.zeros((3, 256, 256), np.float32), ttl_s=60)
    assert store.get_logits("handle") is not None

    def seconds_count(op: str, kind: str, outcome: str) -> float | None:
        return value(metrics, "sam2_store_operation_seconds_count", op=op, kind=kind,
                     outcome=outcome)

    assert seconds_count("put", "embedding", "written") == 1
    assert seconds_count("get", "embedding", "hit") == 1
    assert seconds_count("get", "embedding", "miss") == 1
    assert seconds_count("get", "embedding", "corrupt") == 1
    assert seconds_count("put", "logits", "written") == 1
    assert value(metrics, "sam2_store_corrupt_entries_total", kind="embedding") == 1
    assert value(metrics, "sam2_store_written_bytes_total", kind="embedding") > 4_000_000
    assert value(metrics, "sam2_store_read_bytes_total", kind="logits") > 0
    assert value(metrics, "sam2_cache_hits_total", tier="store", kind="embedding") == 1
    assert value(metrics, "sam2_cache_misses_total", tier="store", kind="embedding") == 2
    assert value(metrics, "sam2_cache_hits_total", tier="store", kind="logits") == 1
    assert value(metrics, "sam2_store_info", backend="memory") == 1


def test_decoder_metrics_caches_stats_and_mask_encoding() -> None:
    metrics = Sam2Metrics(process_collectors=False)
    decoder_metrics = metrics.decoder(MODEL_ID)
    hot: LruCache[str, bytes] = LruCache(10, max_bytes=10, size_of=len)
    decoder_metrics.attach_hot_cache(hot)
    hot.put("a", b"12345")
    hot.put("b", b"12345")
    hot.put("c", b"123")  # evicts "a"
    assert hot.get("a") is None and hot.get("c") == b"123"

    class Stats:
        requests, model_calls, prompts_decoded, encoder_calls = 5, 2, 9, 1

    decoder_metrics.attach_stats(Stats())
    decoder_metrics.observe_mask_encoding(MaskEncoding.COCO_RLE, 0.002, 300)
    decoder_metrics.observe_mask_encoding("WebP", 0.002, 300)  # unknown -> "other"
    cache = {"tier": "decoder_memory", "kind": "embedding"}
    assert value(metrics, "sam2_cache_hits_total", **cache) == 1
    assert value(metrics, "sam2_cache_misses_total", **cache) == 1
    assert value(metrics, "sam2_cache_evictions_total", **cache) == 1
    assert value(metrics, "sam2_cache_entries", **cache) == 2
    assert value(metrics, "sam2_cache_bytes", **cache) == 8
    assert value(metrics, "sam2_decoder_prompts_decoded_total", model=MODEL_ID) == 9
    assert value(metrics, "sam2_decoder_forwards_total", model=MODEL_ID) == 2
    assert value(metrics, "sam2_decoder_mask_bytes_sum", format="coco_rle") == 300
    assert value(metrics, "sam2_decoder_mask_encode_seconds_count", format="other") == 1


def test_registries_are_per_process_object_and_served_over_http() -> None:
    first, second = Sam2Metrics(), Sam2Metrics()  # no duplicate-name clash between them
    first.observe_model_load(MODEL_ID, "encoder", 1.5, 0.25, "cpu", "fp32")
    port = first.serve(0, "127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'sam2_model_load_seconds{model="sam2.1/hiera_tiny",part="encoder"} 1.5' in text
    assert "process_resident_memory_bytes" in text
    assert second.registry.get_sample_value(
        "sam2_model_load_seconds", {"model": MODEL_ID, "part": "encoder"}) is None


def test_gpu_collector_reports_only_an_initialised_cuda() -> None:
    families = list(GpuMemoryCollector().collect())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        assert {f.name for f in families} >= {"sam2_gpu_memory_allocated_bytes"}
    else:
        assert families == []


def test_docs_list_every_metric_family() -> None:
    """docs/metrics.md is the reference: every family a fully wired process exports is in it."""
    metrics = Sam2Metrics(process_collectors=False)
    metrics.watch_store(open_store("memory://"))

    class Stats:
        requests = model_calls = prompts_decoded = encoder_calls = 0

    async def wire() -> None:
        def identity(items: list[int]) -> list[int]:
            return items

        for tier in (metrics.encoder(MODEL_ID), metrics.decoder(MODEL_ID)):
            batcher: MicroBatcher[int, int] = MicroBatcher(identity)
            tier.attach_batcher(batcher)
            await batcher.close()

    asyncio.run(wire())
    metrics.decoder(MODEL_ID).attach_stats(Stats())

    class Tracker:
        sessions_loaded = 0
        sessions_evicted = 0

        def live_session_count(self) -> int:
            return 0

        def held_bytes(self) -> int:
            return 0

        def stored_bytes(self) -> int:
            return 0

    class TrackingServicer:
        propagations_cancelled = frames_tracked = video_frames_embedded = 0
        frame_seconds = 0.0

        def uploads_in_progress(self) -> int:
            return 0

    metrics.watch_tracking(MODEL_ID, Tracker(), TrackingServicer())
    metrics.watch_auth(AuthInterceptor(None))
    documented = set(re.findall(r"`(sam2_[a-z0-9_]+)`", DOCS.read_text()))
    exported = set()
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exported.add(name)
    exported |= {"sam2_gpu_memory_allocated_bytes", "sam2_gpu_memory_reserved_bytes",
                 "sam2_gpu_memory_max_allocated_bytes", "sam2_gpu_memory_total_bytes"}
    assert exported - documented == set()
    assert documented - exported == set()


# --------------------------------------------------------------------------- real Prometheus


def png(seed: int) -> common_pb2.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), np.uint8)
    return common_pb2.Image(encoded_bytes=cv2.imencode(".png", rgb)[1].tobytes())


def test_real_prometheus_scrapes_the_encoder_tier(tiny_checkpoint: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    store = f"diskcache://{tmp_path / 'store'}"
    requests = [
        [png(1), png(2)],  # one batch of two
        [png(1), common_pb2.Image(encoded_bytes=b"not an image")],  # stored + a bad image
        [],  # no images: INVALID_ARGUMENT
    ]
    sent: dict[str, int] = {}
    with encoder_process(tiny_checkpoint, store, "--metrics-port", str(metrics_port),
                         "--max-wait-ms", "50") as encoder:
        with grpc.insecure_channel(encoder.address) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            for images in requests:
                try:
                    stub.EmbedImages(encoder_pb2.EmbedImagesRequest(model_id=MODEL_ID,
                                                                    images=images), timeout=300)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                sent[code] = sent.get(code, 0) + 1
            with pytest.raises(grpc.RpcError) as unknown_model:
                stub.EmbedImages(encoder_pb2.EmbedImagesRequest(model_id="sam2.1/nope",
                                                                images=[png(3)]), timeout=60)
            code = unknown_model.value.code().name
            sent[code] = sent.get(code, 0) + 1
        assert sent["OK"] == 2 and sum(sent.values()) == 4
        with PrometheusServer({"encoder": [f"127.0.0.1:{metrics_port}"]}) as prometheus:
            def per_code(result: list[dict]) -> dict[str, int]:
                return {r["metric"]["grpc_code"]: int(float(r["value"][1])) for r in result}

            handled = prometheus.wait_for(
                'sam2_grpc_server_handled_total{job="encoder",grpc_method="EmbedImages"}',
                lambda result: per_code(result) == sent)
            assert per_code(handled) == sent
            assert all(r["metric"]["grpc_service"] == "sam2.v1.EncoderService" for r in handled)
            latency = prometheus.query(
                'sam2_grpc_server_handling_seconds_count{grpc_method="EmbedImages"}')
            assert per_code(latency) == sent
            health_ok = prometheus.query(
                'sam2_grpc_server_handled_total{grpc_method="Check",grpc_code="OK"}')
            assert health_ok and float(health_ok[0]["value"][1]) >= 1  # the start-up probes

            def scalar(promql: str) -> float:
                result = prometheus.query(promql)
                return float(result[0]["value"][1]) if result else 0.0

            assert scalar('sam2_encoder_batch_size_count{model="sam2.1/hiera_tiny"}') > 0
            assert scalar('sam2_encoder_batch_size_sum{model="sam2.1/hiera_tiny"}') == 2
            assert scalar('sum(sam2_store_operation_seconds_count'
                          '{op="put",kind="embedding",outcome="written"})') == 2
            assert scalar('sam2_store_written_bytes_total{kind="embedding"}') > 0
            assert scalar('sam2_encoder_images_total{outcome="embedded"}') == 2
            assert scalar('sam2_encoder_images_total{outcome="already_stored"}') == 1
            assert scalar('sam2_encoder_images_total{outcome="error"}') == 1
            assert scalar("sam2_encoder_queue_depth") == 0
            assert scalar('sam2_model_load_seconds{part="encoder"}') > 0
            assert scalar('process_resident_memory_bytes{job="encoder"}') > 100e6
            assert scalar('up{job="encoder"}') == 1


def test_decoder_tier_exports_its_metrics(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The decoder CLI serves the same registry layout: RPC codes, store lookups, model load,
    and its own families (read straight from /metrics; the Prometheus path is shown above)."""
    metrics_port = free_port()
    store = f"diskcache://{tmp_path / 'store'}"
    stored_id = "ab" * 32
    with open_store(store) as embeddings:  # one stored embedding, so a Segment succeeds
        embeddings.put_embedding(ImageEmbedding(
            torch.randn(1, 256, 64, 64), (torch.randn(1, 32, 256, 256),
                                          torch.randn(1, 64, 128, 128)),
            (100, 120), MODEL_ID, stored_id))
    with decoder_process(tiny_checkpoint, store, "--metrics-port", str(metrics_port)) as decoder:
        with grpc.insecure_channel(decoder.address) as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            point = common_pb2.Point(x_px=1, y_px=1, label=common_pb2.POINT_LABEL_FOREGROUND)
            found = stub.Segment(decoder_pb2.SegmentRequest(
                model_id=MODEL_ID, embedding_id=stored_id,
                prompts=[decoder_pb2.Prompt(points=[point])]), timeout=60)
            assert len(found.results[0].candidates) == 3
            with pytest.raises(grpc.RpcError) as missing:
                stub.Segment(decoder_pb2.SegmentRequest(
                    model_id=MODEL_ID, embedding_id="0" * 64,
                    prompts=[decoder_pb2.Prompt(points=[point])]), timeout=60)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # The client has its status before the server's interceptor records the call (gRPC
        # sends an abort's status first): wait for the observation, never assume it is there.
        not_found = ('sam2_grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="Segment",'
                     'grpc_service="sam2.v1.DecoderService",grpc_type="unary",protocol="grpc"} 1.0')
        text = scrape_until(metrics_port, not_found)
    assert not_found in text
    assert 'sam2_cache_misses_total{kind="embedding",tier="store"} 1.0' in text
    assert 'sam2_cache_misses_total{kind="embedding",tier="decoder_memory"}' in text
    assert re.search(r'sam2_model_load_seconds\{model="sam2.1/hiera_tiny",part="decoder"\} '
                     r'[0-9.e-]+', text)
    assert 'sam2_decoder_requests_total{model="sam2.1/hiera_tiny"}' in text
    assert "sam2_decoder_queue_depth" in text
    assert re.search(r'sam2_decoder_mask_encode_seconds_count\{[^}]*format="coco_rle"[^}]*\} 1\.0',
                     text)
    assert re.search(r'sam2_decoder_mask_bytes_sum\{[^}]*format="coco_rle"[^}]*\} [1-9]', text)
