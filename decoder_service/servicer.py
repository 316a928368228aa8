"""``sam2.v1.DecoderService`` over ``grpc.aio``: translates protos to ``Segmenter`` calls and back.

No model code here. Errors are raised as domain exceptions and mapped to rich status by the
shared interceptor (``sam2_shared.wire.status``); ``SegmentStream`` instead answers a failing
request with its ``google.rpc.Status`` and keeps the stream open, as the proto documents;
a stream that sends no request for ``stream_idle_timeout_s`` is ended with DEADLINE_EXCEEDED,
reason STREAM_IDLE (an abandoned session must not hold a slot of the per-key and per-server
limits forever).
CPU-heavy or blocking conversions (resolving logits handles; upsampling and encoding the masks,
one candidate at a time so that only one full-size mask exists per request) run in threads, off
the event loop; prompts without handles are converted on it (cheaper than a thread hop).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc

from decoder_service.segmenter import ImageInput, Segmenter
from sam2_shared import wire
from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc
from sam2_shared.errors import NotReadyError, StreamIdleError
from sam2_shared.serving.auth import current_namespace
from sam2_shared.serving.tier_metrics import DecoderMetrics
from sam2_shared.wire.status import to_rpc_status

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name

_Request = TypeVar("_Request")


async def next_request(requests: AsyncIterator[_Request], idle_timeout_s: float
                       ) -> _Request | None:
    """A client stream's next request, None at its end; DEADLINE_EXCEEDED (STREAM_IDLE)
    after ``idle_timeout_s`` without one (0: wait forever)."""
    try:
        return await asyncio.wait_for(anext(requests), idle_timeout_s or None)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise StreamIdleError(
            f"no request on this stream for {idle_timeout_s:g} s, so the server ended it; "
            "open a new stream to go on", idle_timeout_s=f"{idle_timeout_s:g}") from None


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    """Serves ``decoder`` once it is set (the model loads after the server starts)."""

    def __init__(self, decoder: Segmenter | None = None, *,
                 stream_idle_timeout_s: float = 0.0) -> None:
        self.decoder = decoder
        self.metrics: DecoderMetrics | None = None  # set by the CLI when metrics are on
        self.stream_idle_timeout_s = stream_idle_timeout_s  # 0: streams may idle forever

    def register(self, server: grpc.aio.Server) -> None:
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server(self, server)

    async def Segment(
        self, request: decoder_pb2.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> decoder_pb2.SegmentResponse:
        return await self._segment(request)

    async def SegmentStream(
        self,
        request_iterator: AsyncIterator[decoder_pb2.SegmentStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[decoder_pb2.SegmentStreamResponse]:
        last_embedding_id = ""
        requests = aiter(request_iterator)
        while True:
            message = await next_request(requests, self.stream_idle_timeout_s)
            if message is None:
                return
            segment = message.segment
            if not segment.embedding_id and not segment.HasField("image"):
                segment.embedding_id = last_embedding_id  # the session's image
            try:
                response = await self._segment(segment)
            except Exception as exc:  # answered per request; the stream goes on
                yield decoder_pb2.SegmentStreamResponse(
                    request_id=message.request_id, error=to_rpc_status(exc)
                )
                continue
            last_embedding_id = response.embedding.embedding_id
            yield decoder_pb2.SegmentStreamResponse(
                request_id=message.request_id, segment=response
            )

    async def _segment(self, request: decoder_pb2.SegmentRequest) -> decoder_pb2.SegmentResponse:
        decoder = self._ready()
        namespace = current_namespace()  # the caller's tenant, set by the auth interceptor
        decoder.check_model(request.model_id)
        decoder.check_prompt_count(len(request.prompts))  # before resolving any handle
        encoding = wire.mask_encoding_from_proto(request.mask_format)
        image = ImageInput(*wire.image_from_proto(request.image)) if request.HasField(
            "image") else None
        resolve = functools.partial(decoder.resolve_logits, namespace=namespace)
        if any(prompt.logits_handle for prompt in request.prompts):  # may read the store
            prompts = await asyncio.to_thread(wire.prompts_from_proto, request.prompts, resolve)
        else:  # a few numbers: a thread hop would cost more than it saves
            prompts = wire.prompts_from_proto(request.prompts, resolve)
        result = await decoder.segment(
            prompts, embedding_id=request.embedding_id, image=image, model_id=request.model_id,
            namespace=namespace, logits_handles=not request.omit_logits_handles,
        )
        started = time.perf_counter()
        results = await asyncio.to_thread(
            wire.prompt_results_to_proto,
            result.predictions, encoding, result.logits_handles, request.include_logits,
        )
        if self.metrics is not None:
            self.metrics.observe_mask_encoding(
                encoding, time.perf_counter() - started, sum(r.ByteSize() for r in results)
            )
        ref = result.embedding
        return decoder_pb2.SegmentResponse(
            embedding=wire.embedding_to_proto(ref.embedding_id, ref.model_id, ref.original_hw),
            results=results,
        )

    def _ready(self) -> Segmenter:
        if self.decoder is None:
            raise NotReadyError("the decoder is still loading its model; retry shortly")
        return self.decoder
