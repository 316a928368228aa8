"""The encoder tier refuses an EmbedImages request with too many images before decoding any
of them, and decodes at most a few images of one request at a time."""

from __future__ import annotations

import asyncio

import pytest

from encoder_service.servicer import DECODES_PER_REQUEST, EncoderServicer
from sam2_shared.api.v1 import common_pb2, encoder_pb2
from sam2_shared.errors import InvalidInputError


class CountingEncoder:
    """Just what the servicer calls; counts images decoded at once."""

    model_id = "sam2.1/hiera_tiny"

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.most_at_once = 0

    def check_model(self, model_id: str) -> None:
        pass

    async def embed(self, pixels, color_format, namespace, video_frame):  # noqa: ANN001, ANN201
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        raise InvalidInputError("not a real image")  # per-image status, not the RPC's


def request(count: int) -> encoder_pb2.EmbedImagesRequest:
    image = common_pb2.Image(encoded_bytes=b"x")
    return encoder_pb2.EmbedImagesRequest(model_id="sam2.1/hiera_tiny", images=[image] * count)


def test_too_many_images_are_refused_before_any_work() -> None:
    encoder = CountingEncoder()
    servicer = EncoderServicer(encoder, max_images_per_request=8)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="9 images in one request; the limit is 8"):
        asyncio.run(servicer.EmbedImages(request(9), None))
    assert encoder.calls == 0


def test_one_request_decodes_a_few_images_at_a_time() -> None:
    encoder = CountingEncoder()
    servicer = EncoderServicer(encoder, max_images_per_request=32)  # type: ignore[arg-type]
    response = asyncio.run(servicer.EmbedImages(request(20), None))
    assert len(response.results) == 20 and all(r.status.code != 0 for r in response.results)
    assert encoder.calls == 20 and encoder.most_at_once == DECODES_PER_REQUEST
