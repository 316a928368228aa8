"""``AsyncEncoderClient``: the decoder tier's ``grpc.aio`` client of the encoder tier, used
to compute an embedding on a miss."""

from __future__ import annotations

import grpc
import numpy as np

from sam2_shared.api.v1 import encoder_pb2, encoder_pb2_grpc
from sam2_shared.client.channels import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    auth_metadata,
    channel_options,
    credentials,
)
from sam2_shared.client.retry import DEFAULT_POLICY, RetryPolicy, async_call_with_retry
from sam2_shared.serving.auth import current_caller
from sam2_shared.wire import image_to_proto
from sam2_shared.wire.status import error_from_rpc_error, error_from_status


class AsyncEncoderClient:
    """``grpc.aio`` client of ``EncoderService.EmbedImages`` for the decoder tier's misses.

    Create inside the event loop that uses it. Inside an RPC served by a tier, each call
    forwards the caller's API key (so the encoder sees the same tenant) or else ``api_key``,
    and its deadline is the smaller of ``timeout_s`` and what is left of the caller's
    deadline (``sam2_shared.serving.auth.current_caller``). UNAVAILABLE / RESOURCE_EXHAUSTED are
    retried within that deadline (``retry``).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        api_key: str | None = None,
        tls: bool = False,
        tls_root_certs: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
        retry: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.retry = retry
        options = channel_options(max_message_bytes)
        channel_credentials = credentials(tls, tls_root_certs, tls_client_cert,
                                          tls_client_key)
        self._channel = (
            grpc.aio.insecure_channel(address, options=options) if channel_credentials is None
            else grpc.aio.secure_channel(address, channel_credentials, options=options))
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)

    def _call_settings(self) -> tuple[float, tuple[tuple[str, str], ...]]:
        """(timeout, metadata) of a call made now, on behalf of the current caller."""
        caller = current_caller()
        remaining = caller.time_remaining()
        timeout = self.timeout_s if remaining is None else max(0.0, min(self.timeout_s,
                                                                        remaining))
        return timeout, auth_metadata(caller.api_key or self.api_key)

    async def embed_image(
        self, image: bytes | np.ndarray, input_color_format: str, model_id: str,
        video_frame: bool = False,
    ) -> str:
        """Have the encoder compute and store ``image``'s embedding (with the video
        preprocessing for a ``video_frame``); return its id."""
        request = encoder_pb2.EmbedImagesRequest(
            model_id=model_id, images=[image_to_proto(image, input_color_format)],
            video_frame=video_frame,
        )
        timeout, metadata = self._call_settings()
        try:
            response = await async_call_with_retry(
                lambda remaining: self._stub.EmbedImages(request, timeout=remaining,
                                                         metadata=metadata),
                self.retry, timeout_s=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None
        result = response.results[0]
        if result.status.code != 0:
            raise error_from_status(result.status)
        return result.embedding.embedding_id

    async def close(self) -> None:
        await self._channel.close()
