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

Embeddings returned by ``embed_images`` are ``RemoteEmbedding`` references (id, size, model):
the tensors stay in the shared store. ``segment_images(embeddings=...)`` accepts them (and
in-process ``ImageEmbedding``s, by their id).

``AsyncEncoderClient`` is the small ``grpc.aio`` client the decoder tier uses to compute an
embedding on a miss.

Errors come back as the domain exceptions of ``sam2_shared.errors`` (same class and reason as
the server raised), e.g. ``EmbeddingNotFoundError``, ``InvalidInputError``.

Security and reliability (``sam2_shared.security``, ``sam2_shared.retry``):

- ``api_key=`` is sent on every call as ``authorization: Bearer <key>``; ``namespace=`` must
  be the tenant namespace of that key (the id computed locally has to match the server's).
- ``tls_root_certs=`` (PEM path; ``tls=True`` for the system roots) switches to TLS;
  ``tls_client_cert=`` / ``tls_client_key=`` add a client certificate for mutual TLS.
- Idempotent calls (EmbedImages, Segment) are retried on UNAVAILABLE / RESOURCE_EXHAUSTED with
  exponential backoff and jitter, waiting at least the server's ``RetryInfo`` hint, all within
  ``timeout_s`` (``retry=sam2_shared.retry.NO_RETRY`` turns it off).

Channel options (``channel_options``): message size limits for real images; keepalive pings
every 30 s (``grpc.keepalive_time_ms``, also without calls in flight) so that a silently dropped
connection (a load balancer's idle timeout, a dead pod) is noticed before the next call, not by
it; and the ``round_robin`` load-balancing policy, so that a target resolving to several
addresses spreads calls over all of them instead of pinning one (gRPC's default is
``pick_first``). For several decoder replicas give ``decoder="dns:///decoder.ns.svc:50052"``
with a headless Kubernetes Service (one A record per pod), or ``"ipv4:10.0.0.1:50052,10.0.0.2:
50052"``; behind an L4 Service (one virtual IP) all calls of a channel go to one pod.
"""

from __future__ import annotations

import importlib
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
from sam2_shared.errors import EmbeddingNotFoundError, InvalidInputError
from sam2_shared.grpc_errors import error_from_rpc_error, error_from_status
from sam2_shared.model.config import canonical_model_id
from sam2_shared.prompts import (
    Prompt,
    Sam2BatchedPrediction,
    Sam2Prediction,
    prompts_per_image,
)
from sam2_shared.retry import DEFAULT_POLICY, RetryPolicy, async_call_with_retry, call_with_retry
from sam2_shared.security import (
    auth_metadata,
    channel_credentials,
    current_caller,
    namespaced_content_id,
)

DEFAULT_MODEL_ID = "sam2.1/hiera_tiny"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                    ) -> list[tuple[str, int | str]]:
    """Channel arguments: message limits for real images and masks (the 4 MiB gRPC default is
    too small), keepalive, and round-robin over every address the target resolves to (see the
    module docstring)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.lb_policy_name", "round_robin"),
    ]


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


def _credentials(tls: bool, root_certs: str | None, client_cert: str | None,
                 client_key: str | None) -> grpc.ChannelCredentials | None:
    if not (tls or root_certs or client_cert or client_key):
        return None
    return channel_credentials(root_certs, client_cert, client_key)


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
        max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
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
        credentials = _credentials(tls, tls_root_certs, tls_client_cert, tls_client_key)
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
            channel = (grpc.insecure_channel(address, options=options) if credentials is None
                       else grpc.secure_channel(address, credentials, options=options))
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
        rgb = imaging.decode_image(image, input_color_format, self.max_pixels)
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

        Same arguments, shapes and rules as ``Sam2Model.segment_images``. ``embeddings`` are
        ``RemoteEmbedding``s (or anything with ``embedding_id``); with ``images`` instead, an
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
            rows, _ = self.segment_prompts(target, prompts, include_logits=include_logits)
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
    ) -> tuple[list[Sam2BatchedPrediction], list[list[str]]]:
        """Lower level: one image (embedding id, reference or image input) and its prompts.

        Returns one numpy ``Sam2BatchedPrediction`` (P = 1) and the candidates' logits
        handles per prompt.
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

    Create inside the event loop that uses it. Inside an RPC served by a tier, each call
    forwards the caller's API key (so the encoder sees the same tenant) or else ``api_key``,
    and its deadline is the smaller of ``timeout_s`` and what is left of the caller's
    deadline (``sam2_shared.security.current_caller``). UNAVAILABLE / RESOURCE_EXHAUSTED are
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
        credentials = _credentials(tls, tls_root_certs, tls_client_cert, tls_client_key)
        self._channel = (grpc.aio.insecure_channel(address, options=options)
                         if credentials is None
                         else grpc.aio.secure_channel(address, credentials, options=options))
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)

    def _call_settings(self) -> tuple[float, tuple[tuple[str, str], ...]]:
        """(timeout, metadata) of a call made now, on behalf of the current caller."""
        caller = current_caller()
        remaining = caller.time_remaining()
        timeout = self.timeout_s if remaining is None else max(0.0, min(self.timeout_s,
                                                                        remaining))
        return timeout, auth_metadata(caller.api_key or self.api_key)

    async def embed_image(
        self, image: bytes | np.ndarray, input_color_format: str, model_id: str
    ) -> str:
        """Have the encoder compute and store ``image``'s embedding; return its id."""
        request = encoder_pb2.EmbedImagesRequest(
            model_id=model_id, images=[wire.image_to_proto(image, input_color_format)]
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


# ---------------------------------------------------------------------------------------
# video tracking


@dataclass(frozen=True)
class TrackingSession:
    """A tracking session as ``StartSession`` answered it."""

    session_id: str
    frame_count: int
    video_hw: tuple[int, int]


@dataclass(frozen=True)
class TrackedFrame:
    """Every object's mask on one frame.

    Attributes:
        frame_index: 0-based frame index.
        object_ids: object ids, in the session's order.
        masks: [O, H, W] bool at the video's size.
        object_score_logits: [O] float32 presence logits (> 0: visible).
    """

    frame_index: int
    object_ids: list[int]
    masks: np.ndarray
    object_score_logits: np.ndarray


def _tracked_frame(frame: Any) -> TrackedFrame:
    masks = [wire.mask_from_proto(o.mask) for o in frame.objects]
    return TrackedFrame(
        frame_index=int(frame.frame_index),
        object_ids=[int(o.object_id) for o in frame.objects],
        masks=np.stack(masks) if masks else np.zeros((0, 0, 0), dtype=bool),
        object_score_logits=np.array([o.object_score_logit for o in frame.objects],
                                     dtype=np.float32),
    )


class PropagationStream:
    """Iterator over ``Propagate``'s frames; ``cancel()`` (or leaving the iteration early
    through ``close()`` / a ``with`` block) cancels the call, and the server stops."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> PropagationStream:
        return self

    def __next__(self) -> TrackedFrame:
        try:
            return _tracked_frame(next(self._call).frame)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> PropagationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class Sam2TrackingClient(Sam2Client):
    """``Sam2Client`` plus video tracking: frames are embedded by the encoder tier
    (video preprocessing), sessions run in the decoder tier (``sam2.v1.TrackingService``).

    Same arguments as ``Sam2Client``; ``decoder`` is required. Calls that change a session
    are not retried (a retry could apply a prompt twice).
    """

    def __init__(self, encoder: str | None = None, decoder: str | None = None,
                 **kwargs: Any) -> None:
        if decoder is None:
            raise ValueError("tracking needs the decoder address (host:port)")
        super().__init__(encoder, decoder, **kwargs)
        from sam2_shared.api.v1 import tracking_pb2_grpc

        self._tracking = tracking_pb2_grpc.TrackingServiceStub(self._channels[-1])

    def _once(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc_error(exc) from None

    def embed_frames(self, frames: Sequence[np.ndarray], frames_per_call: int = 4) -> list[str]:
        """Embed HxWx3 uint8 RGB frames as video frames; returns their embedding ids in
        order. Frames already stored cost no encoder work."""
        if self._encoder is None:
            raise ValueError("this client has no encoder address")
        ids: list[str] = []
        for start in range(0, len(frames), max(1, frames_per_call)):
            chunk = frames[start : start + max(1, frames_per_call)]
            request = encoder_pb2.EmbedImagesRequest(
                model_id=self.model_id, video_frame=True,
                images=[wire.image_to_proto(np.ascontiguousarray(f), "rgb") for f in chunk],
            )
            self.stats.add(embed_calls=1, images_uploaded=len(chunk))
            response = self._call(self._encoder.EmbedImages, request)
            for index, result in enumerate(response.results, start=start):
                if result.status.code != 0:
                    error = error_from_status(result.status)
                    raise type(error)(f"frame {index}: {error}", reason=error.reason,
                                      **error.metadata)
                ids.append(result.embedding.embedding_id)
        return ids

    def start_session(self, frame_embedding_ids: Sequence[str]) -> TrackingSession:
        """A new session over embedded frames (``embed_frames``), in video order."""
        from sam2_shared.api.v1 import tracking_pb2

        response = self._once(self._tracking.StartSession, tracking_pb2.StartSessionRequest(
            model_id=self.model_id, frame_embedding_ids=list(frame_embedding_ids)))
        return TrackingSession(response.session_id, response.frame_count,
                               (response.height_px, response.width_px))

    def add_prompt(
        self,
        session_id: str,
        frame_index: int,
        object_id: int,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask: np.ndarray | None = None,
        keep_old_points: bool = False,
    ) -> TrackedFrame:
        """Clicks (``points`` [N, 2] (x, y) pixels, ``labels`` [N] 1/0) and/or a box
        [x0, y0, x1, y1], or an HxW binary ``mask``, for an object on a frame; returns every
        object's mask on that frame."""
        from sam2_shared import masks as mask_codec
        from sam2_shared.api.v1 import common_pb2, tracking_pb2

        request = tracking_pb2.AddPromptRequest(
            session_id=session_id, frame_index=int(frame_index), object_id=int(object_id),
            keep_old_points=keep_old_points)
        if points is not None:
            coords = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            point_labels = np.ones(len(coords)) if labels is None else np.asarray(labels)
            if len(point_labels) != len(coords):
                raise InvalidInputError(f"{len(coords)} points but {len(point_labels)} labels")
            for (x, y), label in zip(coords.tolist(), point_labels.tolist(), strict=True):
                request.points.add(x_px=x, y_px=y, label=common_pb2.POINT_LABEL_FOREGROUND
                                   if label == 1 else common_pb2.POINT_LABEL_BACKGROUND)
        if box is not None:
            x0, y0, x1, y1 = np.asarray(box, dtype=np.float32).reshape(4).tolist()
            request.box.CopyFrom(common_pb2.Box(x_min_px=x0, y_min_px=y0, x_max_px=x1,
                                                y_max_px=y1))
        if mask is not None:
            binary = np.asarray(mask).astype(bool)
            if binary.ndim != 2:
                raise InvalidInputError(f"mask must be HxW, got {binary.shape}")
            request.mask.height_px, request.mask.width_px = binary.shape
            request.mask.coco_rle_counts = mask_codec.encode_coco_rle(binary)[0]
        return _tracked_frame(self._once(self._tracking.AddPrompt, request).frame)

    def propagate(self, session_id: str, start_frame_index: int | None = None,
                  reverse: bool = False, max_frames: int | None = None) -> PropagationStream:
        """Track every object frame by frame; iterate for ``TrackedFrame``s, ``cancel()``
        to stop early. The deadline is ``timeout_s`` for the whole stream."""
        from sam2_shared.api.v1 import tracking_pb2

        request = tracking_pb2.PropagateRequest(session_id=session_id, reverse=reverse)
        if start_frame_index is not None:
            request.start_frame_index = int(start_frame_index)
        if max_frames is not None:
            request.max_frames = int(max_frames)
        call = self._tracking.Propagate(request, timeout=self.timeout_s, metadata=self._metadata)
        return PropagationStream(call)

    def remove_object(self, session_id: str, object_id: int) -> list[int]:
        """Drop an object; returns the remaining object ids."""
        from sam2_shared.api.v1 import tracking_pb2

        response = self._once(self._tracking.RemoveObject, tracking_pb2.RemoveObjectRequest(
            session_id=session_id, object_id=int(object_id)))
        return list(response.remaining_object_ids)

    def reset_session(self, session_id: str) -> None:
        from sam2_shared.api.v1 import tracking_pb2

        self._once(self._tracking.ResetSession,
                   tracking_pb2.ResetSessionRequest(session_id=session_id))

    def close_session(self, session_id: str) -> None:
        from sam2_shared.api.v1 import tracking_pb2

        self._once(self._tracking.CloseSession,
                   tracking_pb2.CloseSessionRequest(session_id=session_id))
