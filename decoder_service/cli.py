"""``sam2-decoder``: the decoder tier's entry point.

Every flag is also an environment variable (``--hot-cache-mb`` / ``SAM2_HOT_CACHE_MB``).
Start-up: settings are printed (secrets masked), the gRPC server starts with health
NOT_SERVING and prints ``SAM2_LISTENING port=N`` to stdout (so ``--port 0`` works for tests
and supervisors), the decoder half of the model loads (never the Hiera weights) and decodes
once on a dummy embedding, then health turns SERVING. SIGTERM/SIGINT: health NOT_SERVING,
in-flight RPCs drain for ``--grace-s``, queued decodes finish, the encoder channel and the
store close.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam2_shared.serving.auth import auth_interceptor
from sam2_shared.serving.metrics import Sam2Metrics
from sam2_shared.serving.server import build_server, run_tier
from sam2_shared.serving.settings import (
    DEFAULT_STORE,
    MIB,
    PRECISIONS,
    TierSettings,
    setting,
)

logger = logging.getLogger("decoder_service")

# The click-to-segment page, served at / of the HTTP port.
WEB_STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"



@dataclass(frozen=True)
class DecoderSettings(TierSettings):
    store: str = setting(
        DEFAULT_STORE, "embedding store URL (the encoder's): diskcache:///path, "
        "redis://host:port/db or s3://bucket/prefix?endpoint_url=...", secret=True
    )
    port: int = setting(50052, "gRPC port (0 picks a free one)", minimum=0)
    metrics_port: int = setting(9102, "Prometheus metrics port (0 disables)", minimum=0)
    precision: str = setting("auto", "decoder precision (auto: fp32; see --upscaling-dtype)",
                             choices=PRECISIONS)
    upscaling_dtype: str = setting(
        "auto", "dtype of the mask upscaling (0.8 of a prompt's 1.9 GFLOP of matmuls) when "
        "the precision is fp32 (auto: bfloat16 on a CPU with native bf16 matmuls, "
        "AVX512-BF16 or AMX, else float32; bfloat16 masks are near but not equal to "
        "float32's, mask IoU 0.994 on the parity images: BENCHMARKS.md; pin it in a fleet of "
        "mixed CPUs; video tracking is not affected)", choices=("auto", "float32", "bfloat16"))
    max_image_pixels: int = setting(100_000_000, "largest attached image (pixels)", minimum=1)
    encoder_address: str | None = setting(
        None, "host:port of the encoder tier, asked on a miss when the request has the image"
    )
    encoder_timeout_s: float = setting(60.0, "deadline of a call to the encoder", minimum=0)
    hot_cache_mb: float = setting(512.0, "in-process embedding LRU in MiB (16 MiB each)",
                                  minimum=0)
    logits_ttl_s: float = setting(600.0, "how long logits handles stay valid", minimum=1)
    max_prompts: int = setting(64, "most prompts per request", minimum=1)
    max_points: int = setting(64, "most points per prompt", minimum=1)
    max_mask_pixels: int = setting(
        400_000_000, "most full-size mask pixels (candidates x height x width) one request "
        "may produce (bounds its work and response; masks are made one at a time)", minimum=1)
    batching: bool = setting(True, "decode concurrent requests on one image in one forward")
    compile_decoder: bool = setting(
        False, "one-prompt decodes through torch.compile (compiled at start-up, seconds; "
        "needs a C++ compiler on CPU, else decodes eagerly with a warning)")
    max_batch_prompts: int = setting(
        16, "most prompts in one decoder forward (a bigger request is decoded in several; "
        "each prompt of a forward costs ~25 MiB)", minimum=1)
    batch_wait_ms: float = setting(0.0, "longest a request waits for its batch to fill "
                                   "(0: batch only what queued while the model was busy)",
                                   minimum=0)
    decode_workers: int = setting(
        0, "most batches decoded at once, sharing the CPU threads; each holds its forward's "
        "memory (0: 2 on a CPU with 2 or more threads and no --compile-decoder, else 1)",
        minimum=0)
    max_queue: int = setting(256, "most requests waiting; beyond, RESOURCE_EXHAUSTED",
                             minimum=1)
    max_sessions_per_key: int = setting(
        16, "most concurrent streaming calls (SegmentStream, Propagate, "
        "StartSessionFromFrames) per API key (per client address without keys); 0: no limit",
        minimum=0)
    stream_idle_timeout_s: float = setting(
        600.0, "a SegmentStream or StartSessionFromFrames stream that sends no request for "
        "this long is ended "
        "(DEADLINE_EXCEEDED, reason STREAM_IDLE); 0: never", minimum=0)
    encoder_api_key: str | None = setting(
        None, "API key for calls to the encoder when the caller sent none (one that starts "
        "with '-': --encoder-api-key=KEY)", secret=True)
    encoder_tls: bool = setting(False, "call the encoder over TLS (system roots unless "
                                "--encoder-tls-ca)")
    encoder_tls_ca: str | None = setting(None, "PEM CA that signed the encoder's certificate")
    encoder_tls_cert: str | None = setting(None, "PEM client certificate for mutual TLS to "
                                           "the encoder")
    encoder_tls_key: str | None = setting(None, "PEM key of --encoder-tls-cert")
    session_ttl_s: float = setting(1800.0, "tracking sessions expire after this idle time "
                                   "(seconds; in the store and in memory)", minimum=1)
    tracking_workers: int = setting(
        2, "threads that run tracking (their own pool: tracking never starves segmentation)",
        minimum=1)
    max_prompted_frames: int = setting(
        64, "most frames one tracked object may have prompts on", minimum=1)
    max_live_sessions: int = setting(16, "most tracking sessions held in memory (others are "
                                     "reloaded from the store)", minimum=1)
    tracking_memory_budget_mib: int = setting(
        1024, "most MiB of cached frame features and state live tracking sessions hold; "
        "beyond, idle sessions leave memory (they reload from the store)", minimum=1)
    max_video_frames: int = setting(
        2000, "most frames of a video sent to StartSession (its frames are embedded by the "
        "encoder; a video's frame size is bounded by --max-image-pixels)", minimum=1)
    tracking_dtype: str = setting(
        "float32", "dtype of tracking's memory attention, most of a tracked frame's work "
        "(bfloat16: faster on CPUs with AVX512-BF16/AMX, masks near but not equal to float32's; "
        "see BENCHMARKS.md)", choices=("float32", "bfloat16"))
    max_video_uploads: int = setting(
        4, "most videos whose frames are being embedded at once; beyond, RESOURCE_EXHAUSTED",
        minimum=1)
    max_video_uploads_per_key: int | None = setting(
        None, "most of those uploads (received or still being embedded) one API key holds at "
        "once; beyond, RESOURCE_EXHAUSTED reason TOO_MANY_VIDEO_UPLOADS (default: half of "
        "--max-video-uploads, rounded up; without --api-keys-file every caller is one "
        "identity and only --max-video-uploads applies)", minimum=1)

    def video_uploads_per_key(self) -> int:
        """The per-key upload bound the servicer applies; 0 (none) without API keys, where
        callers cannot be told apart and any bound below the global one would only lower it."""
        if not self.api_keys_file:
            return 0
        share = self.max_video_uploads_per_key or -(-self.max_video_uploads // 2)
        return min(share, self.max_video_uploads)


async def serve(settings: DecoderSettings, metrics: Sam2Metrics | None = None) -> None:
    """Run the decoder tier until SIGTERM/SIGINT."""
    from decoder_service.servicer import SERVICE_NAME, DecoderServicer
    from decoder_service.tracking_servicer import SERVICE_NAME as TRACKING_SERVICE_NAME
    from decoder_service.tracking_servicer import TrackingServicer
    from sam2_shared.serving.encoder_client import AsyncEncoderClient
    from sam2_shared.store import open_store

    metrics = metrics if metrics is not None else Sam2Metrics()
    store = open_store(settings.store, max_image_pixels=settings.max_image_pixels)
    metrics.watch_store(store)
    servicer = DecoderServicer(stream_idle_timeout_s=settings.stream_idle_timeout_s)
    tracking_servicer = TrackingServicer(workers=settings.tracking_workers,
                                         max_video_uploads=settings.max_video_uploads,
                                         max_video_uploads_per_key=(
                                             settings.video_uploads_per_key()),
                                         stream_idle_timeout_s=settings.stream_idle_timeout_s,
                                         thread_initializer=_pin_torch_threads)
    # Threads that start using torch while decode workers share the CPU would keep their
    # reduced count: the default executor's threads pin the full one too.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=_pin_torch_threads))
    auth = auth_interceptor(settings.api_keys_file,
                            max_streams_per_key=settings.max_sessions_per_key)
    metrics.watch_auth(auth)
    server, port = build_server(
        [servicer.register, tracking_servicer.register],
        [SERVICE_NAME, TRACKING_SERVICE_NAME],
        interceptors=[metrics.interceptor(), auth],
        static_dir=WEB_STATIC_DIR,
        **settings.server_options(),
    )
    server.add_close_callback(store.close)
    # Close callbacks run last-added first: tracking's threads stop before the store closes.
    server.add_close_callback(tracking_servicer.close)
    encoder_client = None
    if settings.encoder_address:
        encoder_client = AsyncEncoderClient(
            settings.encoder_address,
            timeout_s=settings.encoder_timeout_s,
            max_message_bytes=settings.max_message_mb * MIB,
            api_key=settings.encoder_api_key,
            tls=settings.encoder_tls,
            tls_root_certs=settings.encoder_tls_ca,
            tls_client_cert=settings.encoder_tls_cert,
            tls_client_key=settings.encoder_tls_key,
        )
        server.add_close_callback(encoder_client.close)
        tracking_servicer.encoder_client = encoder_client
    await server.start()
    print(f"SAM2_LISTENING port={port}", flush=True)
    if server.http_port:
        print(f"SAM2_HTTP_LISTENING port={server.http_port}", flush=True)
    try:
        started = time.perf_counter()
        decoder = await asyncio.to_thread(_load_decoder, settings, store, encoder_client)
        load_s = time.perf_counter() - started
        server.add_close_callback(decoder.close)  # runs before the client and store close
        warm_s = await decoder.warm_up()
        tracker = await asyncio.to_thread(_load_tracker, settings, store,
                                          str(decoder.model.device))
    except BaseException:
        await server.stop(0)
        raise
    servicer.decoder = decoder
    tracking_servicer.tracker = tracker
    metrics.observe_model_load(decoder.model_id, "decoder", load_s, warm_s,
                               str(decoder.model.device), decoder.model.precision)
    decoder_metrics = metrics.decoder(decoder.model_id)
    decoder_metrics.attach_batcher(decoder.batcher)
    decoder_metrics.attach_hot_cache(decoder.hot_cache)
    decoder_metrics.attach_logits_cache(decoder.logits_cache)
    decoder_metrics.attach_stats(decoder.stats)
    servicer.metrics = decoder_metrics
    metrics.watch_tracking(decoder.model_id, tracker, tracking_servicer)
    await server.mark_serving()
    logger.info("decoder ready: %s on %s (%s, upscaling %s), warm-up %.3f s, store %s, "
                "encoder %s", decoder.model_id, decoder.model.device, decoder.model.precision,
                decoder.model.upscaling_dtype, warm_s,
                store.url, settings.encoder_address or "none")
    await server.serve()


def resolve_upscaling_dtype(upscaling_dtype: str, device: str) -> str:
    """``--upscaling-dtype auto`` -> bfloat16 on a CPU that multiplies bf16 natively (+13 %
    clicks/s at 16 in flight on a 2-core AVX512-BF16 CPU, mask IoU 0.994 against float32:
    BENCHMARKS.md, "bf16 decode"; AMX was not measured), float32 elsewhere (CUDA: not
    measured)."""
    from sam2_shared.inference.sam2_model import cpu_has_native_bf16

    if upscaling_dtype != "auto":
        return upscaling_dtype
    native = device.split(":")[0] == "cpu" and cpu_has_native_bf16()
    return "bfloat16" if native else "float32"


_torch_threads = 0  # torch's thread count before any decode worker changed it


def _pin_torch_threads() -> None:
    """Thread initializer: this thread runs torch on the process's full thread count. torch
    hands a thread that starts using it the count last set anywhere, which is a decode
    worker's share while several batches run."""
    if _torch_threads:
        import torch

        torch.set_num_threads(_torch_threads)


def resolve_decode_workers(decode_workers: int, device_type: str, compile_decoder: bool,
                           threads: int) -> int:
    """``--decode-workers 0`` -> 2 on a CPU with 2 or more torch threads (two batches of
    one-thread forwards decoded ~30 % more prompts/s than one two-thread forward at a time
    on a 2-core CPU), 1 on CUDA and with ``--compile-decoder`` (not measured there)."""
    if decode_workers:
        return decode_workers
    return 2 if device_type == "cpu" and threads >= 2 and not compile_decoder else 1


def _load_decoder(settings: DecoderSettings, store: Any, encoder_client: Any) -> Any:
    """Build the ``Segmenter`` (imported here: torch loads in the worker thread)."""
    import torch

    from decoder_service.segmenter import Segmenter

    global _torch_threads
    _torch_threads = torch.get_num_threads()
    from sam2_shared.inference.sam2_model import Sam2Model, resolve_device_and_precision

    device, precision = resolve_device_and_precision(settings.device, settings.precision,
                                                     cuda_precision="fp32")
    if settings.upscaling_dtype != "auto" and precision != "fp32":
        logger.warning("--upscaling-dtype %s has no effect with --precision %s: the whole "
                       "decoder runs in %s", settings.upscaling_dtype, precision, precision)
    model = Sam2Model.from_pretrained(
        settings.model, settings.checkpoint, device=device, parts="decoder",
        precision=precision, max_pixels=settings.max_image_pixels,
        compile_decoder=settings.compile_decoder,
        upscaling_dtype=resolve_upscaling_dtype(settings.upscaling_dtype, device),
    )
    return Segmenter(
        model,
        store,
        hot_cache_bytes=int(settings.hot_cache_mb * MIB),
        encoder_client=encoder_client,
        logits_ttl_s=settings.logits_ttl_s,
        max_prompts=settings.max_prompts,
        max_points=settings.max_points,
        max_mask_pixels=settings.max_mask_pixels,
        max_pixels=settings.max_image_pixels,
        batching=settings.batching,
        max_batch_prompts=settings.max_batch_prompts,
        batch_wait_s=settings.batch_wait_ms / 1000.0,
        decode_workers=resolve_decode_workers(settings.decode_workers, model.device.type,
                                              settings.compile_decoder, torch.get_num_threads()),
        max_queue=settings.max_queue,
    )


def _load_tracker(settings: DecoderSettings, store: Any, device: str) -> Any:
    """The video tracker (decoder + memory parts, no Hiera: frames come from the store)."""
    from decoder_service.tracking import Tracker
    from sam2_shared.inference.video import Sam2VideoModel

    model = Sam2VideoModel.from_pretrained(settings.model, settings.checkpoint, device=device,
                                           with_encoder=False,
                                           tracking_dtype=settings.tracking_dtype)
    return Tracker(model, store, session_ttl_s=settings.session_ttl_s,
                   max_live_sessions=settings.max_live_sessions,
                   max_prompted_frames=settings.max_prompted_frames,
                   memory_budget_bytes=settings.tracking_memory_budget_mib * MIB,
                   max_video_frames=settings.max_video_frames,
                   # Frames go to the encoder as raw RGB, one per message.
                   max_video_pixels=min(settings.max_image_pixels,
                                        settings.max_message_mb * MIB // 4))


def main(argv: Sequence[str] | None = None) -> int:
    return run_tier(
        DecoderSettings, argv, prog="sam2-decoder",
        description="SAM 2 decoder tier: segments stored embeddings with prompts over gRPC.",
        serve=serve,
    )


if __name__ == "__main__":
    sys.exit(main())
