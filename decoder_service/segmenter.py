"""The decoder tier's logic, ``Segmenter`` (the tier is "the decoder", the network half
``Sam2DecoderPart``): embeddings from the tiers of caches, batched prompt decoding, logits
handles. Plain asyncio + torch through ``Sam2Model``; no grpc here.

Embedding lookup, fastest first:
    1. the hot tier, a bytes-bounded in-process LRU of decoded embeddings;
    2. the shared store (every replica and the encoder see the same entries);
    3. the encoder, only when the request carries the image and an encoder is configured:
       it computes and stores the embedding, then the store is read again.
Concurrent misses for one id load it once.

Prompt batching: the shared ``MicroBatcher`` runs the model on ``decode_workers`` worker
threads. Requests that queue while they are busy form the next batch, and within it the prompts
of all requests on the same embedding go into one ``decode_prompts`` call. With the default
``batch_wait_s=0`` there is no gather window, so no added latency when idle, and batches grow
with load (see ``bench/bench_grpc.py`` for what it buys). On a CPU, a batch running alone uses
all of torch's threads and batches running together split them: on 2 cores two one-thread
forwards keep both busy where one two-thread forward left ~17 % idle (its small ops wait on
each other and on the GIL). A free worker starts on whatever is queued, even one click, and
each running batch holds its own forward's memory (~25 MiB a prompt).

Masks: the model thread makes no full-size mask. Predictions carry ``DeferredMasks`` (the
low-res logits); the servicer's wire encoding upsamples, encodes and drops them one candidate at
a time, off the event loop, so a request holds one full-size mask at a time, not all of them
(``bench/decoder_output_memory.py`` measures it).

Logits handles: the low-res logits of every prompt's candidates are written to the shared store
as one entry under a token with a TTL; candidate ``c`` gets the handle ``"<token>.<c>"``.
Any replica can resolve it; a small local LRU spares the store read on the replica that made it.
The store write happens behind the response, on one writer thread (it is not on the click's
path). The token starts with its creation time, so a replica that misses a handle younger than
``logits_write_grace_s`` waits for the write to land instead of answering LOGITS_NOT_FOUND;
an unknown old handle is answered at once. Too many writes pending make the click wait for its
own (back-pressure, bounded memory).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from sam2_shared.counters import Counters
from sam2_shared.embedding import (
    NAMESPACE_SEPARATOR,
    EmbeddingRef,
    ImageEmbedding,
    check_id_namespace,
    namespaced_content_id,
    scope_id,
)
from sam2_shared.errors import (
    EmbeddingNotFoundError,
    InvalidInputError,
    LogitsNotFoundError,
    UnknownModelError,
)
from sam2_shared.inference import imaging
from sam2_shared.inference.caches import LruCache
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.prompts import Prompt, Sam2BatchedPrediction
from sam2_shared.serving.batching import MicroBatcher
from sam2_shared.store import EmbeddingStore, StoreUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_HOT_CACHE_BYTES = 512 * 1024 * 1024  # 32 fp32 embeddings of 16 MiB
DEFAULT_LOGITS_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_LOGITS_TTL_S = 600.0
DEFAULT_MAX_PROMPTS = 64
DEFAULT_MAX_POINTS = 64
# 64 multimask prompts on a 1080p image (398 M): bounds a request's upsampling work and
# response size (the masks are made one at a time, so not its memory).
DEFAULT_MAX_MASK_PIXELS = 400_000_000
DEFAULT_MAX_BATCH_PROMPTS = 16
DEFAULT_MAX_BATCH_REQUESTS = 32
DEFAULT_MAX_QUEUE = 256
# A store write lands well within this under load; a replica missing a younger handle waits.
DEFAULT_LOGITS_WRITE_GRACE_S = 2.0
MAX_PENDING_LOGITS_WRITES = 64  # beyond: the click waits for its own write (~48 MiB queued)
_LOGITS_POLL_S = 0.02
_TOKEN_TIME_DIGITS = 11  # hex milliseconds since the epoch (until the year 4000)


class EncoderClient(Protocol):
    """What the decoder needs from the encoder tier (``sam2_shared.client.AsyncEncoderClient``)."""

    async def embed_image(
        self, image: bytes | np.ndarray, input_color_format: str, model_id: str
    ) -> str:
        """Have the encoder compute and store the embedding of ``image``; return its id."""
        ...


@dataclass(frozen=True)
class ImageInput:
    """An image attached to a request, as ``wire.image_from_proto`` returns it."""

    data: bytes | np.ndarray
    input_color_format: str = "rgb"


@dataclass
class SegmentResult:
    """One ``Sam2BatchedPrediction`` (P = 1) and one logits handle per candidate, per prompt
    (None when the caller asked for no handles); its ``masks`` are ``DeferredMasks``, made one
    candidate at a time when indexed."""

    embedding: EmbeddingRef
    predictions: list[Sam2BatchedPrediction]
    logits_handles: list[list[str]] | None


@dataclass
class DecoderStats(Counters):
    """Counters for metrics and for judging the batching."""

    requests: int = 0
    model_calls: int = 0
    prompts_decoded: int = 0
    store_hits: int = 0
    encoder_calls: int = 0


@dataclass
class _Job:
    embedding: ImageEmbedding
    prompts: list[Prompt]


def mask_pixels(prompts: Sequence[Prompt], original_hw: tuple[int, int]) -> int:
    """Full-size mask pixels a request produces: candidates (3 multimask, else 1) x H x W."""
    candidates = sum(3 if prompt.multimask_output else 1 for prompt in prompts)
    return candidates * int(original_hw[0]) * int(original_hw[1])


class _BatchDecoder:
    """The batch function of the decode ``MicroBatcher`` (runs on its worker thread).

    A batch holds the requests that queued while the previous one ran, maybe for several
    embeddings: requests on one embedding are merged into ``decode_prompts`` calls of at most
    ``max_batch_prompts`` prompts; with ``batching`` off, each request is its own call. The
    calls return low-res logits only (``deferred_masks``): no full-size mask is made here.
    """

    def __init__(self, model: Sam2Model, max_batch_prompts: int, batching: bool,
                 stats: DecoderStats, threads: int | None = None) -> None:
        """``threads``: torch's threads for a batch running alone (None: this thread's
        count now)."""
        self._model = model
        self._max_batch_prompts = max_batch_prompts
        self._batching = batching
        self._stats = stats
        self._threads = threads if threads is not None else torch.get_num_threads()
        self._running = 0  # batches in calls now, on as many worker threads
        self._running_lock = threading.Lock()

    def __call__(self, jobs: list[_Job]) -> list[list[Sam2BatchedPrediction] | Exception]:
        with self._running_lock:
            self._running += 1
        try:
            outcomes: list[list[Sam2BatchedPrediction] | Exception | None] = [None] * len(jobs)
            groups: dict[str, list[int]] = {}
            for index, job in enumerate(jobs):
                groups.setdefault(job.embedding.embedding_id, []).append(index)
            for indices in groups.values():
                for chunk in self._chunks(indices, jobs):
                    for index, outcome in zip(chunk, self._run([jobs[i] for i in chunk])):
                        outcomes[index] = outcome
            return outcomes  # type: ignore[return-value]
        finally:
            with self._running_lock:
                self._running -= 1
            # torch also hands the last count set to threads that start using it later.
            if torch.get_num_threads() != self._threads:
                torch.set_num_threads(self._threads)

    def _share_threads(self) -> None:
        """Give this worker thread its share of the CPU threads before a forward: all of them
        while its batch runs alone, an equal part while several do."""
        share = max(1, self._threads // max(1, self._running))
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)

    def _chunks(self, indices: list[int], jobs: list[_Job]) -> list[list[int]]:
        chunks: list[list[int]] = []
        prompts = 0
        for index in indices:
            size = len(jobs[index].prompts)
            if not chunks or not self._batching or prompts + size > self._max_batch_prompts:
                chunks.append([])
                prompts = 0
            chunks[-1].append(index)
            prompts += size
        return chunks

    def _run(self, jobs: list[_Job]) -> list[list[Sam2BatchedPrediction] | Exception]:
        """Decode ``jobs`` (one embedding) in one call; on failure, job by job so that one
        request's error is not blamed on the others."""
        if len(jobs) > 1:
            merged = [prompt for job in jobs for prompt in job.prompts]
            try:
                rows = self._decode(jobs[0].embedding, merged)
            except Exception:
                logger.warning("merged decode of %d requests failed; retrying one by one",
                               len(jobs))
            else:
                outcomes: list[list[Sam2BatchedPrediction] | Exception] = []
                start = 0
                for job in jobs:
                    outcomes.append(rows[start : start + len(job.prompts)])
                    start += len(job.prompts)
                return outcomes
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(self._decode(job.embedding, job.prompts))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


    def _decode(self, embedding: ImageEmbedding, prompts: list[Prompt]
                ) -> list[Sam2BatchedPrediction]:
        """``decode_prompts`` in forwards of at most ``max_batch_prompts`` prompts: the
        decoder repeats the image features for every prompt of a forward (~25 MiB each at
        fp32), so one request of 64 prompts in one forward would need ~1.5 GiB."""
        rows: list[Sam2BatchedPrediction] = []
        for start in range(0, len(prompts), self._max_batch_prompts):
            part = prompts[start : start + self._max_batch_prompts]
            if self._model.device.type == "cpu":
                self._share_threads()
            rows.extend(self._model.decode_prompts(embedding, part, deferred_masks=True))
            self._stats.add(model_calls=1, prompts_decoded=len(part))
        return rows


class Segmenter:
    """Segments stored embeddings with prompts, for the decoder tier.

    Arguments:
        model (Sam2Model): built with ``parts="decoder"`` (or ``"all"``).
        store (EmbeddingStore): the shared store the encoder writes to.
        hot_cache_bytes (int): bound of the in-process embedding LRU (fp32 tensors).
        encoder_client (EncoderClient | None): used on a miss when the request has the image.
        logits_ttl_s (float): how long logits handles stay resolvable.
        max_prompts (int): most prompts per request.
        max_points (int): most points per prompt.
        max_mask_pixels (int): most full-size mask pixels (candidates x H x W) one request
            may produce (upsampling work and response size; they are made one at a time).
        max_pixels (int): largest attached image (H * W).
        batching (bool): merge concurrent requests' prompts on one embedding into one call.
        max_batch_prompts (int): most prompts in one merged call.
        max_batch_requests (int): most requests taken from the queue at once.
        batch_wait_s (float): how long a batch may wait to fill; 0 takes what queued while
            the previous batch ran, which adds no latency when idle.
        decode_workers (int): most batches decoded at once, each on its own thread. On a CPU
            a batch running alone uses all of torch's threads, and batches running together
            share them (two one-thread forwards beat one two-thread forward on small ops).
        max_queue (int): most requests waiting for the model; beyond it RESOURCE_EXHAUSTED.
        logits_cache_bytes (int): local LRU of recently written or read logits.
        logits_write_grace_s (float): how long after a handle was made another replica waits
            for its store write before answering LOGITS_NOT_FOUND.
    """

    def __init__(
        self,
        model: Sam2Model,
        store: EmbeddingStore,
        *,
        hot_cache_bytes: int = DEFAULT_HOT_CACHE_BYTES,
        encoder_client: EncoderClient | None = None,
        logits_ttl_s: float = DEFAULT_LOGITS_TTL_S,
        max_prompts: int = DEFAULT_MAX_PROMPTS,
        max_points: int = DEFAULT_MAX_POINTS,
        max_mask_pixels: int = DEFAULT_MAX_MASK_PIXELS,
        max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
        batching: bool = True,
        max_batch_prompts: int = DEFAULT_MAX_BATCH_PROMPTS,
        max_batch_requests: int = DEFAULT_MAX_BATCH_REQUESTS,
        batch_wait_s: float = 0.0,
        decode_workers: int = 1,
        max_queue: int = DEFAULT_MAX_QUEUE,
        logits_cache_bytes: int = DEFAULT_LOGITS_CACHE_BYTES,
        logits_write_grace_s: float = DEFAULT_LOGITS_WRITE_GRACE_S,
    ) -> None:
        if model.decoder is None:
            raise ValueError("the decoder tier needs a Sam2Model with the decoder part")
        self.model = model
        self.store = store
        self.encoder_client = encoder_client
        self.logits_ttl_s = logits_ttl_s
        self.max_prompts = max_prompts
        self.max_points = max_points
        self.max_mask_pixels = max_mask_pixels
        self.max_pixels = max_pixels
        self.stats = DecoderStats()
        self.hot_cache: LruCache[str, ImageEmbedding] = LruCache(
            1_000_000, max_bytes=hot_cache_bytes, size_of=lambda e: e.nbytes
        )
        # token -> (monotonic expiry, [C, 256, 256]): honours the TTL like the store does
        self.logits_cache: LruCache[str, tuple[float, np.ndarray]] = LruCache(
            1_000_000, max_bytes=logits_cache_bytes, size_of=lambda entry: entry[1].nbytes
        )
        self.logits_write_grace_s = logits_write_grace_s
        self._logits_writer = ThreadPoolExecutor(1, thread_name_prefix="sam2-logits-writer")
        self._pending_writes: set[asyncio.Future[None]] = set()
        self._loads: dict[str, asyncio.Task[ImageEmbedding]] = {}
        self._batcher: MicroBatcher[_Job, list[Sam2BatchedPrediction]] = MicroBatcher(
            _BatchDecoder(model, max_batch_prompts, batching, self.stats),
            max_batch_size=max_batch_requests if batching else 1,
            workers=decode_workers,
            # A free worker starts on whatever waits, even one click: a lone click made to
            # wait for company kept two workers in lock-step at 25 clicks/s (p99 median 364
            # -> 130 ms over seven alternated runs; BENCHMARKS.md, "A free worker takes a
            # lone click").
            weight=lambda job: len(job.prompts),
            max_wait_s=batch_wait_s,
            max_queue=max_queue,
            name="sam2-decode",
        )

    @property
    def model_id(self) -> str:
        return self.model.model_id

    # ------------------------------------------------------------------ requests

    def check_model(self, model_id: str) -> None:
        """Empty means this server's model; anything else must name it."""
        if model_id and model_id != self.model_id:
            raise UnknownModelError(
                f"this decoder serves model {self.model_id!r}, not {model_id!r}; leave model_id "
                "empty or send the request to a decoder of that model",
                model_id=model_id,
            )

    def check_prompt_count(self, count: int) -> None:
        """Called before the prompts are converted, so oversized requests cost nothing."""
        if count == 0:
            raise InvalidInputError("no prompts: give at least one prompt")
        if count > self.max_prompts:
            raise InvalidInputError(
                f"{count} prompts in one request; the limit is {self.max_prompts}: split the "
                "request", limit=str(self.max_prompts),
            )

    def check_mask_pixels(self, prompts: Sequence[Prompt], original_hw: tuple[int, int]) -> None:
        """Refuse a request whose masks would not fit the bound, before any is made."""
        pixels = mask_pixels(prompts, original_hw)
        if pixels > self.max_mask_pixels:
            candidates = pixels // (int(original_hw[0]) * int(original_hw[1]))
            raise InvalidInputError(
                f"{len(prompts)} prompts with {candidates} mask candidates on a "
                f"{original_hw[1]}x{original_hw[0]} image make {pixels:,} mask pixels; the "
                f"limit is {self.max_mask_pixels:,}: send fewer prompts per request, or "
                "multimask_output=false", mask_pixels=str(pixels),
                limit=str(self.max_mask_pixels),
            )

    async def segment(
        self,
        prompts: Sequence[Prompt],
        *,
        embedding_id: str = "",
        image: ImageInput | None = None,
        model_id: str = "",
        namespace: str = "",
        logits_handles: bool = True,
    ) -> SegmentResult:
        """Decode ``prompts`` on the embedding named by ``embedding_id`` and/or ``image``.

        ``namespace``: the caller's tenant (``sam2_shared.serving.auth``); ids and logits handles
        of other namespaces are NOT_FOUND, new handles are made in it.
        ``logits_handles=False``: make no handles (no cache entry, no store write).

        Raises ``InvalidInputError`` (bad prompt, limits, id not matching the image),
        ``UnknownModelError``, ``EmbeddingNotFoundError`` (in no tier and no way to compute it).
        """
        self.stats.add(requests=1)
        self.check_model(model_id)
        self.check_prompt_count(len(prompts))
        for index, prompt in enumerate(prompts):
            self._check_points(index, prompt)
        if not embedding_id and image is None:
            raise InvalidInputError("give embedding_id or image")
        if embedding_id:
            check_id_namespace(embedding_id, namespace)
        if image is not None:
            image_id = await asyncio.to_thread(self._image_id, image, namespace)
            if embedding_id and embedding_id != image_id:
                raise InvalidInputError(
                    f"embedding_id {embedding_id!r} is not the id of the attached image "
                    f"({image_id!r}); send one of them, or the image's own id",
                )
            embedding_id = image_id
        embedding = await self.embedding(embedding_id, image)
        self.check_mask_pixels(prompts, embedding.original_hw)
        for index, prompt in enumerate(prompts):
            _validate(index, prompt, embedding.original_hw)
        predictions = await self._batcher.submit(_Job(embedding, list(prompts)))
        handles = await self._share_logits(predictions, namespace) if logits_handles else None
        ref = EmbeddingRef(embedding.embedding_id, embedding.model_id, embedding.original_hw)
        return SegmentResult(ref, predictions, handles)

    def _check_points(self, index: int, prompt: Prompt) -> None:
        count = 0 if prompt.point_coords is None else len(np.asarray(prompt.point_coords))
        if count > self.max_points:
            raise InvalidInputError(
                f"prompt {index} has {count} points; the limit is {self.max_points}",
                prompt_index=str(index), limit=str(self.max_points),
            )

    def _image_id(self, image: ImageInput, namespace: str = "") -> str:
        rgb = imaging.decode_image(image.data, image.input_color_format, self.max_pixels)
        return namespaced_content_id(rgb, self.model_id, namespace)

    # ------------------------------------------------------------------ embeddings

    async def embedding(self, embedding_id: str, image: ImageInput | None = None
                        ) -> ImageEmbedding:
        """The embedding from the hot tier, the store, or (with ``image``) the encoder."""
        found = self.hot_cache.get(embedding_id)
        if found is not None:
            return found
        task = self._loads.get(embedding_id)
        if task is None:
            task = asyncio.create_task(self._load(embedding_id, image))
            self._loads[embedding_id] = task
            task.add_done_callback(lambda done: self._load_finished(embedding_id, done))
        elif image is not None and self.encoder_client is not None:
            # Someone else's load may give up without an image; ours can still encode.
            try:
                return await asyncio.shield(task)
            except EmbeddingNotFoundError:
                return await self._load(embedding_id, image)
        return await asyncio.shield(task)  # one caller's cancellation must not stop the load

    def _load_finished(self, embedding_id: str, task: asyncio.Task) -> None:
        self._loads.pop(embedding_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so that no waiter left is no warning either

    async def _load(self, embedding_id: str, image: ImageInput | None) -> ImageEmbedding:
        embedding = await asyncio.to_thread(self._from_store, embedding_id)
        if embedding is None and image is not None and self.encoder_client is not None:
            self.stats.add(encoder_calls=1)
            computed_id = await self.encoder_client.embed_image(
                image.data, image.input_color_format, self.model_id
            )
            if computed_id != embedding_id:  # different preprocessing version or decoder
                raise InvalidInputError(
                    f"the encoder computed id {computed_id!r} for this image, the decoder "
                    f"{embedding_id!r}: the tiers run different versions"
                )
            embedding = await asyncio.to_thread(self._from_store, embedding_id)
        if embedding is None:
            hint = (
                "call EncoderService.EmbedImages with the image first, or attach the image to "
                "this request" if self.encoder_client is not None else
                "call EncoderService.EmbedImages with the image first (this decoder has no "
                "encoder configured, so it cannot compute embeddings itself)"
            )
            raise EmbeddingNotFoundError(
                f"embedding {embedding_id!r} of model {self.model_id} is not stored; {hint}",
                embedding_id=embedding_id,
            )
        self.hot_cache.put(embedding_id, embedding)
        return embedding

    def _from_store(self, embedding_id: str) -> ImageEmbedding | None:
        try:
            embedding = self.store.get_embedding(embedding_id, self.model_id)
        except InvalidInputError:  # not even a well-formed id
            raise InvalidInputError(
                f"embedding_id {embedding_id!r} is not a valid id; use the id EmbedImages "
                "returned", embedding_id=embedding_id,
            ) from None
        if embedding is not None:
            self.stats.add(store_hits=1)
            # Hot-cache the decoder-ready form (device, dtype, channels_last) so clicks
            # don't redo the layout conversion.
            embedding = self.model.prepare_embedding(embedding)
        return embedding

    @property
    def batcher(self) -> MicroBatcher:
        """The prompt batcher (for metrics)."""
        return self._batcher

    # ------------------------------------------------------------------ logits

    async def _share_logits(self, predictions: list[Sam2BatchedPrediction], namespace: str = ""
                            ) -> list[list[str]]:
        """Each prompt's candidate logits under a new token (in the caller's namespace): into
        the local LRU now, into the shared store behind the response. Returns the handles."""
        handles = []
        now_ms = int(time.time() * 1000)
        loop = asyncio.get_running_loop()
        for prediction in predictions:
            token = scope_id(namespace, f"{now_ms:0{_TOKEN_TIME_DIGITS}x}{secrets.token_hex(12)}")
            logits = np.ascontiguousarray(prediction.logits[0], dtype=np.float32)  # [C, 256, 256]
            self.logits_cache.put(token, (time.monotonic() + self.logits_ttl_s, logits))
            write = asyncio.ensure_future(
                loop.run_in_executor(self._logits_writer, self._write_logits, token, logits))
            self._pending_writes.add(write)
            write.add_done_callback(self._pending_writes.discard)
            handles.append([f"{token}.{c}" for c in range(logits.shape[0])])
        if len(self._pending_writes) > MAX_PENDING_LOGITS_WRITES:
            await asyncio.wait(set(self._pending_writes))  # back-pressure: the store is slow
        return handles

    def _write_logits(self, token: str, logits: np.ndarray) -> None:
        try:
            self.store.put_logits(token, logits, self.logits_ttl_s)
        except StoreUnavailableError as exc:
            # The handle still resolves on this replica (local LRU); other replicas will
            # say LOGITS_NOT_FOUND.
            logger.warning("logits not shared, store unavailable: %s", exc)
        except Exception:  # behind the response: nobody else would see it
            logger.exception("logits write of %s failed", token)

    def _write_deadline(self, token: str) -> float:
        """Wall-clock time until which a store miss of ``token`` may be a write not landed
        yet (0: not a recent token of ours)."""
        head, separator, tail = token.partition(NAMESPACE_SEPARATOR)
        local = tail if separator else head
        stamp = local[:_TOKEN_TIME_DIGITS]
        if len(local) <= _TOKEN_TIME_DIGITS or not all(ch in "0123456789abcdef" for ch in stamp):
            return 0.0
        made_s = int(stamp, 16) / 1000
        if made_s > time.time() + 1.0:  # from the future: not a token of ours
            return 0.0
        return made_s + min(self.logits_write_grace_s, self.logits_ttl_s)  # not once expired

    def resolve_logits(self, handle: str, namespace: str = "") -> np.ndarray:
        """[256, 256] logits of a handle from an earlier response (blocking store read).

        Raises ``LogitsNotFoundError`` when it is malformed, unknown, expired or another
        namespace's.
        """
        check_id_namespace(handle, namespace, what="logits")
        token, _, candidate = handle.rpartition(".")
        logits = None
        # ASCII digits only: "²".isdigit() is True, and int() of it raises.
        if token and candidate.isascii() and candidate.isdigit() and len(candidate) <= 3:
            cached = self.logits_cache.get(token)
            if cached is not None and cached[0] > time.monotonic():
                logits = cached[1]
            else:
                logits = self._logits_from_store(token)
        if logits is None or int(candidate) >= logits.shape[0]:
            raise LogitsNotFoundError(
                f"logits handle {handle!r} is unknown or expired (handles live "
                f"{self.logits_ttl_s:g} s); send the logits inline or start again from points "
                "or a box", logits_handle=handle,
            )
        return logits[int(candidate)]

    def _logits_from_store(self, token: str) -> np.ndarray | None:
        """The store's logits of ``token``; a miss on a token made in the last
        ``logits_write_grace_s`` is retried until then (its write may not have landed)."""
        deadline = self._write_deadline(token)
        while True:
            try:
                logits = self.store.get_logits(token)
            except InvalidInputError:  # a token no handle of ours can have
                return None
            if logits is not None or time.time() >= deadline:
                return logits
            time.sleep(min(_LOGITS_POLL_S, max(0.0, deadline - time.time())))

    # ------------------------------------------------------------------ lifecycle

    async def warm_up(self) -> float:
        """Decode once on a dummy embedding (not stored); return the seconds it took."""
        dummy = ImageEmbedding(
            image_embed=torch.zeros(1, 256, 64, 64),
            high_res_feats=(torch.zeros(1, 32, 256, 256), torch.zeros(1, 64, 128, 128)),
            original_hw=(480, 640),
            model_id=self.model_id,
            embedding_id="warm-up",
        ).to(self.model.device)
        point = np.array([[320.0, 240.0]], np.float32), np.array([1], np.int32)
        # Both output kinds: with compile_decoder each is a compile of its own (3 masks made
        # or 4), which must not land on a live click.
        prompts = [Prompt(*point), Prompt(*point, multimask_output=False)]
        started = time.perf_counter()
        await self._batcher.submit(_Job(dummy, prompts))
        return time.perf_counter() - started

    async def close(self) -> None:
        """Finish queued requests and logits writes, then stop the model and writer threads."""
        await self._batcher.close()
        if self._pending_writes:
            await asyncio.wait(set(self._pending_writes))
        self._logits_writer.shutdown(wait=True)


def _validate(index: int, prompt: Prompt, original_hw: tuple[int, int]) -> None:
    """Validate before queueing, so a bad prompt fails only its own request."""
    try:
        imaging.validate_prompt(prompt, original_hw)
    except InvalidInputError as exc:
        raise InvalidInputError(f"prompt {index}: {exc}", prompt_index=str(index)) from None


__all__ = [
    "Segmenter",
    "EmbeddingRef",
    "EncoderClient",
    "ImageInput",
    "SegmentResult",
]
