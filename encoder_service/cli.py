"""``sam2-encoder``: the encoder tier's entry point.

Every flag is also an environment variable (``--max-batch-size`` / ``SAM2_MAX_BATCH_SIZE``).
Start-up: settings are printed (secrets masked), the gRPC server starts with health
NOT_SERVING, the model loads and warms up, then health turns SERVING. Once the port is
bound a line ``SAM2_LISTENING port=N`` goes to stdout, so ``--port 0`` can be used by
tests and supervisors. SIGTERM/SIGINT: health NOT_SERVING, in-flight RPCs drain for
``--grace-s``, queued encodes finish, the store closes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sam2_shared.serving.auth import auth_interceptor
from sam2_shared.serving.metrics import Sam2Metrics
from sam2_shared.serving.server import build_server, run_tier
from sam2_shared.serving.settings import PRECISIONS, TierSettings, setting

logger = logging.getLogger("encoder_service")

STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class EncoderSettings(TierSettings):
    port: int = setting(50051, "gRPC port (0 picks a free one)", minimum=0)
    metrics_port: int = setting(9101, "Prometheus metrics port (0 disables)", minimum=0)
    precision: str = setting("auto", "encoder precision (auto: bf16 on CUDA, fp32 on CPU)",
                             choices=PRECISIONS)
    store_dtype: str = setting("float16", "dtype embeddings are stored in",
                               choices=STORAGE_DTYPES)
    max_batch_size: int = setting(4, "most images per encoder forward", minimum=1)
    max_wait_ms: float = setting(10.0, "longest an image waits for its batch to fill",
                                 minimum=0)
    max_queue: int = setting(64, "most images waiting; beyond, RESOURCE_EXHAUSTED", minimum=1)
    max_images_per_request: int = setting(
        32, "most images in one EmbedImages request (checked before any is decoded)",
        minimum=1)


async def serve(settings: EncoderSettings, metrics: Sam2Metrics | None = None) -> None:
    """Run the encoder tier until SIGTERM/SIGINT."""
    from encoder_service.servicer import SERVICE_NAME, EncoderServicer
    from sam2_shared.store import open_store

    metrics = metrics if metrics is not None else Sam2Metrics()
    store = open_store(settings.store, storage_dtype=settings.store_dtype,  # type: ignore[arg-type]
                       max_image_pixels=settings.max_image_pixels)
    metrics.watch_store(store)
    servicer = EncoderServicer(max_images_per_request=settings.max_images_per_request)
    auth = auth_interceptor(settings.api_keys_file)
    metrics.watch_auth(auth)
    server, port = build_server(
        [servicer.register],
        [SERVICE_NAME],
        interceptors=[metrics.interceptor(), auth],
        **settings.server_options(),
    )
    server.add_close_callback(store.close)
    await server.start()
    print(f"SAM2_LISTENING port={port}", flush=True)
    if server.http_port:
        print(f"SAM2_HTTP_LISTENING port={server.http_port}", flush=True)
    try:
        started = time.perf_counter()
        encoder = await asyncio.to_thread(_load_encoder, settings, store)
        load_s = time.perf_counter() - started
        server.add_close_callback(encoder.close)  # runs before store.close
        await encoder.warm_up()
        metrics.observe_model_load(encoder.model_id, "encoder", load_s,
                                   time.perf_counter() - started - load_s,
                                   str(encoder.model.device), encoder.model.precision)
    except BaseException:
        await server.stop(0)
        raise
    servicer.encoder = encoder
    servicer.metrics = metrics.encoder(encoder.model_id)
    servicer.metrics.attach_batcher(encoder.batcher)
    await server.mark_serving()
    logger.info("encoder ready: %s on %s (%s), store %s", encoder.model_id,
                encoder.model.device, encoder.model.precision, store.url)
    await server.serve()


def _load_encoder(settings: EncoderSettings, store):  # -> Encoder, imported lazily (torch)
    from encoder_service.encoder import Encoder
    from sam2_shared.inference.sam2_model import Sam2Model, resolve_device_and_precision

    device, precision = resolve_device_and_precision(settings.device, settings.precision,
                                                     cuda_precision="bf16")
    model = Sam2Model.from_pretrained(
        settings.model,
        settings.checkpoint,
        device=device,
        parts="encoder",
        precision=precision,
        max_pixels=settings.max_image_pixels,
    )
    return Encoder(
        model,
        store,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_tier(
        EncoderSettings, argv, prog="sam2-encoder",
        description="SAM 2 encoder tier: embeds images into the shared store over gRPC.",
        serve=serve,
    )


if __name__ == "__main__":
    sys.exit(main())
