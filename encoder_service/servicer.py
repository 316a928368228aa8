"""``EncoderServicer``: translates ``sam2.v1.EncoderService`` protos to ``Encoder`` calls.

No torch here and no logic beyond the wire: errors raised by the ``Encoder`` become rich
status in ``sam2_shared.wire.status`` (per image inside ``EmbedImages``, per RPC otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from google.rpc import status_pb2

from sam2_shared import wire
from sam2_shared.api.v1 import encoder_pb2, encoder_pb2_grpc
from sam2_shared.errors import InvalidInputError, NotReadyError
from sam2_shared.serving.auth import current_namespace
from sam2_shared.store import codec
from sam2_shared.wire.status import to_rpc_status

if TYPE_CHECKING:
    from encoder_service.encoder import Encoder
    from sam2_shared.embedding import EmbeddingRef
    from sam2_shared.serving.tier_metrics import EncoderMetrics

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 4 << 20
# One float32 embedding entry with the most metadata a valid one may carry (~16.1 MiB).
MAX_IMPORT_BYTES = codec.MAX_EMBEDDING_ENTRY_NBYTES
DEFAULT_MAX_IMAGES_PER_REQUEST = 32
# Images of one request decoded at a time: one request cannot take every worker thread.
DECODES_PER_REQUEST = 4


def _embedding_proto(info: EmbeddingRef):
    return wire.embedding_to_proto(info.embedding_id, info.model_id, info.original_hw)


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    """Serves an ``Encoder``; until ``encoder`` is set (model loading), RPCs get UNAVAILABLE."""

    def __init__(self, encoder: Encoder | None = None,
                 metrics: EncoderMetrics | None = None,
                 max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST) -> None:
        self.encoder = encoder
        self.max_images_per_request = max_images_per_request
        self.metrics = metrics  # per-image outcomes; None in tests that need no metrics

    def register(self, server: grpc.aio.Server) -> None:
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(self, server)

    def _ready(self) -> Encoder:
        if self.encoder is None:
            raise NotReadyError("the encoder is still loading its model; retry shortly")
        return self.encoder

    async def EmbedImages(self, request, context) -> encoder_pb2.EmbedImagesResponse:
        encoder = self._ready()
        encoder.check_model(request.model_id)
        if not request.images:
            raise InvalidInputError("no images: send at least one image")
        if len(request.images) > self.max_images_per_request:
            raise InvalidInputError(
                f"{len(request.images)} images in one request; the limit is "
                f"{self.max_images_per_request}: split the request",
                images=str(len(request.images)), limit=str(self.max_images_per_request),
            )
        turns = asyncio.Semaphore(DECODES_PER_REQUEST)

        async def one(image) -> tuple[EmbeddingRef, bool]:  # noqa: ANN001
            async with turns:
                return await self._embed_one(encoder, image, current_namespace(),
                                             request.video_frame)

        outcomes = await asyncio.gather(*(one(image) for image in request.images),
                                        return_exceptions=True)
        if self.metrics is not None:
            self.metrics.observe_images(outcomes)
        return encoder_pb2.EmbedImagesResponse(results=[_result(o) for o in outcomes])

    @staticmethod
    async def _embed_one(encoder: Encoder, image, namespace: str,
                         video_frame: bool = False) -> tuple[EmbeddingRef, bool]:
        pixels, color_format = wire.image_from_proto(image)
        return await encoder.embed(pixels, color_format, namespace, video_frame)

    async def GetEmbedding(
        self, request, context
    ) -> AsyncIterator[encoder_pb2.GetEmbeddingResponse]:
        exported = await self._ready().export(request.embedding_id, current_namespace())
        chunk = request.chunk_size_bytes or DEFAULT_CHUNK_BYTES
        chunk = min(max(chunk, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
        header = encoder_pb2.EmbeddingBlobHeader(
            embedding=_embedding_proto(exported.info),
            size_bytes=len(exported.data),
            sha256=exported.sha256,
            format=exported.format,
        )
        data = memoryview(exported.data)
        yield encoder_pb2.GetEmbeddingResponse(header=header, chunk=bytes(data[:chunk]))
        for start in range(chunk, len(data), chunk):
            yield encoder_pb2.GetEmbeddingResponse(chunk=bytes(data[start : start + chunk]))

    async def PutEmbedding(self, request_iterator, context) -> encoder_pb2.PutEmbeddingResponse:
        encoder = self._ready()
        header = None
        parts: list[bytes] = []
        received = 0
        async for message in request_iterator:
            if header is None:
                if not message.HasField("header"):
                    raise InvalidInputError("the first PutEmbedding message must carry the header")
                header = message.header
                if not 0 < header.size_bytes <= MAX_IMPORT_BYTES:
                    raise InvalidInputError(
                        f"header size_bytes must be in 1..{MAX_IMPORT_BYTES}, "
                        f"got {header.size_bytes}"
                    )
            received += len(message.chunk)
            if received > header.size_bytes:
                raise InvalidInputError(
                    f"upload is longer than the {header.size_bytes} bytes its header announced",
                    reason="EMBEDDING_CORRUPT",
                )
            parts.append(message.chunk)
        if header is None:
            raise InvalidInputError("empty PutEmbedding stream: send a header and the data")
        info, existed = await encoder.import_(
            b"".join(parts),
            header.embedding.model_id,
            sha256=header.sha256,
            size_bytes=header.size_bytes,
            embedding_id=header.embedding.embedding_id or None,
            format=header.format,
            namespace=current_namespace(),
        )
        return encoder_pb2.PutEmbeddingResponse(
            embedding=_embedding_proto(info), already_stored=existed
        )


def _result(outcome: tuple[EmbeddingRef, bool] | BaseException) -> encoder_pb2.EmbedImageResult:
    if isinstance(outcome, BaseException):
        if not isinstance(outcome, Exception):  # cancellation and exits are not per-image
            raise outcome
        return encoder_pb2.EmbedImageResult(status=to_rpc_status(outcome))
    info, existed = outcome
    return encoder_pb2.EmbedImageResult(
        status=status_pb2.Status(code=0),
        embedding=_embedding_proto(info),
        already_stored=existed,
    )
