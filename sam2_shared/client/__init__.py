"""``Sam2Client``: the remote twin of ``Sam2Model`` over the encoder and decoder tiers.

Switching from in-process to remote is one line::

    model = Sam2Model.from_pretrained("sam2.1/hiera_tiny")            # in process
    model = Sam2Client(encoder="enc:50051", decoder="dec:50052")     # remote
    [prediction] = model.segment_images(image, point_coordinates=[[x, y]], point_labels=[1])

``segment_images`` takes the same arguments and returns the same ``Sam2Prediction`` values
(masks, all candidates' scores, low-res logits, object scores), as CPU torch tensors where
torch is installed and as numpy arrays of the same shapes and dtypes where it is not
(``array_type=`` chooses). This module never needs torch: services that only want masks
can use it with numpy, grpcio, protobuf, OpenCV and Pillow. It computes the image's
content id locally and asks the decoder first; the image is uploaded to the encoder only when
the decoder answers EMBEDDING_NOT_FOUND (or, without an encoder address, attached to a second
Segment call for a decoder that has one).

Embeddings returned by ``embed_images`` are ``EmbeddingRef`` references (id, size, model):
the tensors stay in the shared store. ``segment_images(embeddings=...)`` accepts them (and
in-process ``ImageEmbedding``s, by their id).

Errors come back as the domain exceptions of ``sam2_shared.errors`` (same class and reason as
the server raised), e.g. ``EmbeddingNotFoundError``, ``InvalidInputError``.

Security and reliability (``client.channels``, ``client.retry``):

- ``api_key=`` is sent on every call as ``authorization: Bearer <key>``; ``namespace=`` must
  be the tenant namespace of that key (the id computed locally has to match the server's).
- ``tls_root_certs=`` (PEM path; ``tls=True`` for the system roots) switches to TLS;
  ``tls_client_cert=`` / ``tls_client_key=`` add a client certificate for mutual TLS.
- Idempotent calls (EmbedImages, Segment) are retried on UNAVAILABLE / RESOURCE_EXHAUSTED with
  exponential backoff and jitter, waiting at least the server's ``RetryInfo`` hint, all within
  ``timeout_s`` (``retry=sam2_shared.client.retry.NO_RETRY`` turns it off).

For several decoder replicas give ``decoder="dns:///decoder.ns.svc:50052"`` with a headless
Kubernetes Service (one A record per pod), or ``"ipv4:10.0.0.1:50052,10.0.0.2:50052"``: the
channels round-robin over every address (``client.channels``). Video tracking:
``sam2_shared.client.tracking.Sam2TrackingClient``.

Importable with numpy, grpcio, protobuf, OpenCV and Pillow only: no torch, no server code.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sam2_shared import wire
from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from sam2_shared.client.channels import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    auth_metadata,
    channel_options,
    credentials,
)
from sam2_shared.client.retry import DEFAULT_POLICY, RetryPolicy, call_with_retry
from sam2_shared.counters import Counters
from sam2_shared.embedding import EmbeddingRef, namespaced_content_id
from sam2_shared.errors import EmbeddingNotFoundError, InvalidInputError
from sam2_shared.model.config import canonical_model_id
from sam2_shared.prompts import (
    Prompt,
    Sam2BatchedPrediction,
    Sam2Prediction,
    prompts_per_image,
)
from sam2_shared.wire.status import error_from_rpc_error, error_from_status

DEFAULT_MODEL_ID = "sam2.1/hiera_tiny"



def _array_converter(array_type: str) -> Any:
    """numpy -> the caller's array type: CPU torch tensors (imported only when asked for or,
    with ``"auto"``, when torch is installed) or numpy arrays as they are."""
    if array_type not in ("auto", "torch", "numpy"):
        raise ValueError(f"array_type must be 'auto', 'torch' or 'numpy', got {array_type!r}")
    if array_type == "numpy":
        return lambda array: array
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        if array_type == "torch":
            raise
        return lambda array: array
    return torch.from_numpy


@dataclass
class ClientStats(Counters):
    """Calls made, to check that uploads happen only on a miss."""

    embed_calls: int = 0
    images_uploaded: int = 0
    segment_calls: int = 0


@dataclass
class _Image:
    """One caller image: decoded for its id, and what to upload if needed."""

    rgb: np.ndarray | None  # None for video frames (only the encoder decodes them)
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
        max_pixels (int | None): largest image accepted locally (H * W); None: the
            library's default (100 M).
        api_key (str | None): sent as ``authorization: Bearer <key>`` on every call.
        namespace (str): the tenant namespace of ``api_key`` ("" for none).
        tls (bool): TLS with the system's root certificates.
        tls_root_certs (str | None): PEM file of the CA that signed the servers' certificates.
        tls_client_cert, tls_client_key (str | None): client certificate for mutual TLS.
        retry (RetryPolicy): retries of idempotent calls (``retry.NO_RETRY``: none).
        array_type (str): what ``segment_images`` returns: ``"torch"`` (CPU tensors, as
            ``Sam2Model``), ``"numpy"``, or ``"auto"``: torch when it is installed.
    """

    def __init__(
        self,
        encoder: str | None = None,
        decoder: str | None = None,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_pixels: int | None = None,
        api_key: str | None = None,
        namespace: str = "",
        tls: bool = False,
        tls_root_certs: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
        retry: RetryPolicy = DEFAULT_POLICY,
        array_type: str = "auto",
    ) -> None:
        if encoder is None and decoder is None:
            raise ValueError("give the encoder and/or decoder address (host:port)")
        self._to_array = _array_converter(array_type)
        options = channel_options(max_message_bytes)
        channel_credentials = credentials(tls, tls_root_certs, tls_client_cert,
                                          tls_client_key)
        self.model_id = canonical_model_id(model_id)
        self.timeout_s = timeout_s
        self.max_pixels = max_pixels
        self.namespace = namespace
        self.retry = retry
        self._metadata = auth_metadata(api_key)
        self.stats = ClientStats()
        self._channels: list[grpc.Channel] = []
        self._encoder: encoder_pb2_grpc.EncoderServiceStub | None = None
        self._decoder: decoder_pb2_grpc.DecoderServiceStub | None = None
        for address, is_encoder in ((encoder, True), (decoder, False)):
            if address is None:
                continue
            channel = (
                grpc.insecure_channel(address, options=options) if channel_credentials is None
                else grpc.secure_channel(address, channel_credentials, options=options))
            self._channels.append(channel)
            if is_encoder:
                self._encoder = encoder_pb2_grpc.EncoderServiceStub(channel)
            else:
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
        # OpenCV decodes only here, on first use: importing the client needs no OpenCV.
        from sam2_shared.inference import imaging

        max_pixels = imaging.DEFAULT_MAX_PIXELS if self.max_pixels is None else self.max_pixels
        rgb = imaging.decode_image(image, input_color_format, max_pixels)
        upload = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else rgb
        return _Image(rgb, upload, namespaced_content_id(rgb, self.model_id, self.namespace))

    def _call(self, method: Any, request: Any) -> Any:
        """An idempotent unary call, retried per ``self.retry`` within ``timeout_s``."""
        try:
            return call_with_retry(
                lambda remaining: method(request, timeout=remaining, metadata=self._metadata),
                self.retry, timeout_s=self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None

    def _embed(self, images: Sequence[_Image], *, video_frame: bool = False,
               first_index: int = 0) -> list[EmbeddingRef]:
        if self._encoder is None:
            raise ValueError("this client has no encoder address")
        request = encoder_pb2.EmbedImagesRequest(
            model_id=self.model_id, video_frame=video_frame,
            images=[wire.image_to_proto(image.upload, "rgb") for image in images],
        )
        self.stats.add(embed_calls=1, images_uploaded=len(images))
        response = self._call(self._encoder.EmbedImages, request)
        out = []
        what = "frame" if video_frame else "image"
        for index, result in enumerate(response.results, start=first_index):
            if result.status.code != 0:
                error = error_from_status(result.status)
                raise type(error)(f"{what} {index}: {error}", reason=error.reason,
                                  **error.metadata)
            e = result.embedding
            out.append(EmbeddingRef(e.embedding_id, e.model_id, (e.height_px, e.width_px),
                                       result.already_stored))
        return out

    def embed_images(
        self, images: Any, input_color_format: str = "bgr"
    ) -> list[EmbeddingRef]:
        """Embed one image or a list (same inputs as ``Sam2Model.embed_images``) in the
        encoder tier; returns references, one per image. Already stored images cost no
        encoder work."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidInputError("no images given")
        return self._embed([self._image(item, input_color_format) for item in items])

    def embed_video_frames(self, frames: Sequence[np.ndarray | bytes],
                           frames_per_call: int = 4) -> list[EmbeddingRef]:
        """Embed video frames (HxWx3 uint8 RGB arrays, or encoded images) with the video
        preprocessing, a few per call; returns references in order, whose ids are
        ``embedding.video_frame_id`` of the decoded frames (what ``TrackingService``
        sessions take). Frames already stored cost no encoder work."""
        step = max(1, frames_per_call)
        refs: list[EmbeddingRef] = []
        for start in range(0, len(frames), step):
            uploads = [_Image(None, frame if isinstance(frame, bytes)
                              else np.ascontiguousarray(frame), "")
                       for frame in frames[start : start + step]]
            refs += self._embed(uploads, video_frame=True, first_index=start)
        return refs

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

        Same arguments, shapes and rules as ``Sam2Model.segment_images``. ``embeddings`` are
        ``EmbeddingRef``s (or anything with ``embedding_id``); with ``images`` instead, an
        image not yet embedded is uploaded once. ``include_logits=False`` skips the low-res
        logits on the wire (``logits`` is then (C, 0, 0)).
        """
        if self._decoder is None:
            raise ValueError("this client has no decoder address")
        if embeddings is not None:
            refs = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
            targets: list[str | _Image] = [ref.embedding_id for ref in refs]
        elif images is not None:
            items = list(images) if isinstance(images, (list, tuple)) else [images]
            targets = [self._image(item, input_color_format) for item in items]
        else:
            raise InvalidInputError("give images or embeddings")
        per_image = prompts_per_image(
            len(targets), point_coordinates, point_labels, boxes, mask_input, multimask_output,
        )
        predictions = []
        for target, prompts in zip(targets, per_image):
            # The logits come back inline (or are not wanted): no server-side handles, which
            # spares the decoder a store write per click.
            rows, _ = self.segment_prompts(target, prompts, include_logits=include_logits,
                                           logits_handles=False)
            batched = Sam2BatchedPrediction.concatenate(rows)
            predictions.append(Sam2Prediction.from_batched(batched.converted(self._to_array)))
        return predictions

    def segment_prompts(
        self,
        target: str | _Image | Any,
        prompts: Sequence[Prompt],
        *,
        include_logits: bool = True,
        input_color_format: str = "bgr",
        logits_handles: bool = True,
    ) -> tuple[list[Sam2BatchedPrediction], list[list[str]]]:
        """Lower level: one image (embedding id, reference or image input) and its prompts.

        Returns one numpy ``Sam2BatchedPrediction`` (P = 1) and the candidates' logits
        handles per prompt (empty strings with ``logits_handles=False``: the server then
        keeps no copy of the logits).
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
            omit_logits_handles=not logits_handles,
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
