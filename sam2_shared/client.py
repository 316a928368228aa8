"""``Sam2Client``: the remote twin of ``Sam2Model`` over the encoder and decoder tiers.

Switching from in-process to remote is one line::

    model = Sam2Model.from_pretrained("sam2.1/hiera_tiny")            # in process
    model = Sam2Client(encoder="enc:50051", decoder="dec:50052")     # remote
    [prediction] = model.segment_images(image, point_coordinates=[[x, y]], point_labels=[1])

``segment_images`` takes the same arguments and returns the same ``Sam2Prediction`` values
(masks, all candidates' scores, low-res logits, object scores). It computes the image's
content id locally and asks the decoder first; the image is uploaded to the encoder only when
the decoder answers EMBEDDING_NOT_FOUND (or, without an encoder address, attached to a second
Segment call for a decoder that has one).

Embeddings returned by ``embed_images`` are ``RemoteEmbedding`` references (id, size, model):
the tensors stay in the shared store. ``segment_images(embeddings=...)`` accepts them (and
in-process ``ImageEmbedding``s, by their id).

``AsyncEncoderClient`` is the small ``grpc.aio`` client the decoder tier uses to compute an
embedding on a miss.

Errors come back as the domain exceptions of ``sam2_shared.errors`` (same class and reason as
the server raised), e.g. ``EmbeddingNotFoundError``, ``InvalidInputError``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sam2_shared import imaging, wire
from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from sam2_shared.embedding import content_id
from sam2_shared.errors import EmbeddingNotFoundError, InvalidInputError
from sam2_shared.grpc_errors import error_from_rpc_error, error_from_status
from sam2_shared.predictor import prompts_from_arrays, stack_predictions
from sam2_shared.prompts import Prompt, Sam2Prediction

DEFAULT_MODEL_ID = "sam2.1/hiera_tiny"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel arguments for real images and masks (the 4 MiB gRPC default is too small)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class RemoteEmbedding:
    """A stored embedding, by reference: no tensors (they stay in the shared store).

    Attributes:
        embedding_id: content-addressed id, as the decoder expects it.
        model_id: model that produced it.
        original_hw: (H, W) of the image in pixels.
        already_stored: the encoder found it stored and computed nothing.
    """

    embedding_id: str
    model_id: str
    original_hw: tuple[int, int]
    already_stored: bool = False


@dataclass
class ClientStats:
    """Calls made, to check that uploads happen only on a miss."""

    embed_calls: int = 0
    images_uploaded: int = 0
    segment_calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


@dataclass
class _Image:
    """One caller image: decoded for its id, and what to upload if needed."""

    rgb: np.ndarray
    upload: bytes | np.ndarray  # encoded bytes as given, else the decoded RGB pixels
    embedding_id: str


class Sam2Client:
    """Synchronous client of both tiers; thread-safe, one channel per tier.

    Arguments:
        encoder (str | None): ``host:port`` of the encoder tier; None to never upload
            directly (then a miss attaches the image to the Segment call instead).
        decoder (str | None): ``host:port`` of the decoder tier (needed for segmenting).
        model_id (str): the model both tiers run; part of every embedding id.
        timeout_s (float): deadline of each call.
        max_message_bytes (int): send and receive limit per message.
        max_pixels (int): largest image accepted locally (H * W).
    """

    def __init__(
        self,
        encoder: str | None = None,
        decoder: str | None = None,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
    ) -> None:
        if encoder is None and decoder is None:
            raise ValueError("give the encoder and/or decoder address (host:port)")
        options = channel_options(max_message_bytes)
        self.model_id = model_id
        self.timeout_s = timeout_s
        self.max_pixels = max_pixels
        self.stats = ClientStats()
        self._channels: list[grpc.Channel] = []
        self._encoder: encoder_pb2_grpc.EncoderServiceStub | None = None
        self._decoder: decoder_pb2_grpc.DecoderServiceStub | None = None
        if encoder is not None:
            channel = grpc.insecure_channel(encoder, options=options)
            self._channels.append(channel)
            self._encoder = encoder_pb2_grpc.EncoderServiceStub(channel)
        if decoder is not None:
            channel = grpc.insecure_channel(decoder, options=options)
            self._channels.append(channel)
            self._decoder = decoder_pb2_grpc.DecoderServiceStub(channel)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Sam2Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ images

    def _image(self, image: Any, input_color_format: str) -> _Image:
        if isinstance(image, (str, os.PathLike)):  # upload the file's bytes, not its pixels
            try:
                image = Path(image).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"cannot read image file {image!r}: {exc}") from None
        rgb = imaging.decode_image(image, input_color_format, self.max_pixels)
        upload = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else rgb
        return _Image(rgb, upload, content_id(rgb, self.model_id))

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None

    def _embed(self, images: Sequence[_Image]) -> list[RemoteEmbedding]:
        if self._encoder is None:
            raise ValueError("this client has no encoder address")
        request = encoder_pb2.EmbedImagesRequest(
            model_id=self.model_id,
            images=[wire.image_to_proto(image.upload, "rgb") for image in images],
        )
        self.stats.add(embed_calls=1, images_uploaded=len(images))
        response = self._call(self._encoder.EmbedImages, request)
        out = []
        for index, result in enumerate(response.results):
            if result.status.code != 0:
                error = error_from_status(result.status)
                raise type(error)(f"image {index}: {error}", reason=error.reason,
                                  **error.metadata)
            e = result.embedding
            out.append(RemoteEmbedding(e.embedding_id, e.model_id, (e.height_px, e.width_px),
                                       result.already_stored))
        return out

    def embed_images(
        self, images: Any, input_color_format: str = "bgr"
    ) -> list[RemoteEmbedding]:
        """Embed one image or a list (same inputs as ``Sam2Model.embed_images``) in the
        encoder tier; returns references, one per image. Already stored images cost no
        encoder work."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidInputError("no images given")
        return self._embed([self._image(item, input_color_format) for item in items])

    # ------------------------------------------------------------------ segmenting

    def segment_images(
        self,
        images: Any = None,
        embeddings: Any = None,
        point_coordinates: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        input_color_format: str = "bgr",
        include_logits: bool = True,
    ) -> list[Sam2Prediction]:
        """Segment one image or a list of images; one ``Sam2Prediction`` per image.

        Same arguments and results as ``Sam2Model.segment_images``. ``embeddings`` are
        ``RemoteEmbedding``s (or anything with ``embedding_id``); with ``images`` instead, an
        image not yet embedded is uploaded once. ``include_logits=False`` skips the low-res
        logits on the wire (``logits`` is then [P, C, 0, 0]).
        """
        if self._decoder is None:
            raise ValueError("this client has no decoder address")
        batched = isinstance(embeddings, (list, tuple)) or (
            embeddings is None and isinstance(images, (list, tuple))
        )
        if embeddings is not None:
            refs = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
            targets: list[str | _Image] = [ref.embedding_id for ref in refs]
        elif images is not None:
            items = list(images) if batched else [images]
            targets = [self._image(item, input_color_format) for item in items]
        else:
            raise InvalidInputError("give images or embeddings")
        per_image = {
            "point_coordinates": point_coordinates,
            "point_labels": point_labels,
            "boxes": boxes,
            "mask_input": mask_input,
        }
        n = len(targets)
        for name, value in per_image.items():
            if not batched:
                per_image[name] = [value]
            elif value is None:
                per_image[name] = [None] * n
            elif not isinstance(value, (list, tuple)) or len(value) != n:
                raise InvalidInputError(f"{name} must be a list with one entry per image ({n})")
        predictions = []
        for i, target in enumerate(targets):
            prompts = prompts_from_arrays(
                per_image["point_coordinates"][i],
                per_image["point_labels"][i],
                per_image["boxes"][i],
                per_image["mask_input"][i],
                multimask_output,
            )
            rows, _ = self.segment_prompts(target, prompts, include_logits=include_logits)
            predictions.append(stack_predictions(rows))
        return predictions

    def segment_prompts(
        self,
        target: str | _Image | Any,
        prompts: Sequence[Prompt],
        *,
        include_logits: bool = True,
        input_color_format: str = "bgr",
    ) -> tuple[list[Sam2Prediction], list[list[str]]]:
        """Lower level: one image (embedding id, reference or image input) and its prompts.

        Returns one ``Sam2Prediction`` (P = 1) and the candidates' logits handles per prompt.
        """
        if isinstance(target, _Image):
            image: _Image | None = target
            embedding_id = target.embedding_id
        elif isinstance(target, str):
            image, embedding_id = None, target
        elif hasattr(target, "embedding_id"):
            image, embedding_id = None, target.embedding_id
        else:
            image = self._image(target, input_color_format)
            embedding_id = image.embedding_id
        request = decoder_pb2.SegmentRequest(
            embedding_id=embedding_id,
            model_id=self.model_id,
            prompts=[wire.prompt_to_proto(p) for p in prompts],
            include_logits=include_logits,
        )
        try:
            response = self._segment(request)
        except EmbeddingNotFoundError as exc:
            if image is None or exc.reason != EmbeddingNotFoundError.reason:
                raise
            if self._encoder is not None:  # upload, then ask again by id
                request.embedding_id = self._embed([image])[0].embedding_id
            else:  # let the decoder ask its encoder
                request.image.CopyFrom(wire.image_to_proto(image.upload, "rgb"))
            response = self._segment(request)
        return wire.predictions_from_proto(response.results)

    def _segment(self, request: decoder_pb2.SegmentRequest) -> decoder_pb2.SegmentResponse:
        assert self._decoder is not None
        self.stats.add(segment_calls=1)
        return self._call(self._decoder.Segment, request)


class AsyncEncoderClient:
    """``grpc.aio`` client of ``EncoderService.EmbedImages`` for the decoder tier's misses.

    Create inside the event loop that uses it.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(
            max_message_bytes))
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)

    async def embed_image(
        self, image: bytes | np.ndarray, input_color_format: str, model_id: str
    ) -> str:
        """Have the encoder compute and store ``image``'s embedding; return its id."""
        request = encoder_pb2.EmbedImagesRequest(
            model_id=model_id, images=[wire.image_to_proto(image, input_color_format)]
        )
        try:
            response = await self._stub.EmbedImages(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None
        result = response.results[0]
        if result.status.code != 0:
            raise error_from_status(result.status)
        return result.embedding.embedding_id

    async def close(self) -> None:
        await self._channel.close()
