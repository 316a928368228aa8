"""Prometheus metrics of both tiers, on one ``CollectorRegistry`` per process.

Nothing here touches ``prometheus_client.REGISTRY``: a tier builds one ``Sam2Metrics`` at
start-up and passes it around, so tests can run several servers in one process. Counters that
other modules already keep (``BatcherStats``, ``StoreStats``, ``LruCache``) are read through
observers or at scrape time; those modules know nothing of Prometheus.

A tier wires it like this (the encoder's ``cli.py`` is the worked example)::

    metrics = Sam2Metrics()
    metrics.serve(settings.metrics_port, settings.host)        # GET /metrics
    server, port = build_server(..., interceptors=[metrics.interceptor()])
    metrics.watch_store(store)                                  # store latency, hits, corrupt
    metrics.observe_model_load(model_id, "encoder", load_s, warmup_s, device, precision)
    metrics.encoder(model_id).attach_batcher(encoder.batcher)   # batch size, queue, embed time

The decoder tier uses ``metrics.decoder(model_id)`` (see ``DecoderMetrics``). Names follow
the Prometheus conventions: ``sam2_`` prefix, base units in the name, ``_total`` counters, and
only bounded label values (gRPC service/method/code, model id, tier, format, outcome).
``docs/metrics.md`` lists every family.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Buckets in base units (seconds, bytes, items), chosen for where each quantity lives.
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0, 60.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                      2.5, 5.0)
EMBED_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECODE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5)
STORE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                         2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MASK_BYTES_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)

MASK_FORMATS = ("coco_rle", "png", "raw_bits")  # MaskEncoding values; else "other"
STORE_OUTCOMES = ("hit", "miss", "corrupt", "written", "exists", "error")


# --------------------------------------------------------------------------- shapes we read


class _BatcherLike(Protocol):
    """What ``MicroBatcher`` offers (``sam2_shared.serving.batching``)."""

    stats: Any  # BatcherStats: counters and ``observers`` of BatchRecord
    queue_depth: int


class _CacheLike(Protocol):
    """What ``LruCache`` offers (``sam2_shared.inference.caches``)."""

    hits: int
    misses: int
    evictions: int
    nbytes: int

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class CacheReading:
    """One cache tier's figures at scrape time; None where the tier cannot tell."""

    hits: int
    misses: int
    evictions: int | None = None
    entries: int | None = None
    nbytes: int | None = None


# --------------------------------------------------------------------------- gRPC


def _code_name(code: Any) -> str:
    """``grpc.StatusCode`` / int / None (OK) -> "OK", "NOT_FOUND", ..."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return "UNKNOWN"


def _split_method(full_method: str) -> tuple[str, str]:
    """"/sam2.v1.EncoderService/EmbedImages" -> ("sam2.v1.EncoderService", "EmbedImages")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class RpcMetrics:
    """Request counts, latency and in-flight requests per RPC and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter(
            "sam2_grpc_server_started_total", "RPCs started on the server", labels,
            registry=registry,
        )
        self.handled = Counter(
            "sam2_grpc_server_handled_total", "RPCs completed on the server, by status code",
            (*labels, "grpc_code"), registry=registry,
        )
        self.handling_seconds = Histogram(
            "sam2_grpc_server_handling_seconds",
            "time from the RPC reaching the servicer to its last response, by status code",
            (*labels, "grpc_code"), buckets=RPC_SECONDS_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "sam2_grpc_server_in_flight_requests", "RPCs being handled now", labels,
            registry=registry,
        )

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """A ``grpc.aio`` server interceptor for all four RPC kinds.

    Put it outermost (``build_server(interceptors=[...])``): the error-mapping interceptor
    runs inside it, so a domain error has become its status code by the time it is counted.
    Unknown methods (no handler) are not counted: their names are unbounded.
    """

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_call(
                handler.unary_unary, (service, method, "unary")))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_call(
                handler.stream_unary, (service, method, "client_stream")))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(
                handler.unary_stream, (service, method, "server_stream")))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(
                handler.stream_stream, (service, method, "bidi_stream")))
        return handler

    def _begin(self, labels: tuple[str, str, str]) -> float:
        self.metrics.started.labels(*labels).inc()
        self.metrics.in_flight.labels(*labels).inc()
        return time.perf_counter()

    def _end(self, labels: tuple[str, str, str], started: float, code: str) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.in_flight.labels(*labels).dec()
        self.metrics.handled.labels(*labels, code).inc()
        self.metrics.handling_seconds.labels(*labels, code).observe(elapsed)

    @staticmethod
    def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
        if isinstance(exc, asyncio.CancelledError):
            return "CANCELLED"
        code = _code_name(context.code())
        if exc is not None and not isinstance(exc, grpc.aio.AbortError) and code == "OK":
            return "UNKNOWN"  # grpc turns an unmapped exception into UNKNOWN
        return code

    def _wrap_call(self, behavior: Callable[..., Any],
                   labels: tuple[str, str, str]) -> Callable[..., Any]:
        async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            started = self._begin(labels)
            failure: BaseException | None = None
            try:
                result = behavior(request_or_iterator, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(labels, started, self._final_code(context, failure))

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any],
                     labels: tuple[str, str, str]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A coroutine writing with context.write (health Watch): grpc.aio refuses
            # writes from inside an async generator, so keep it a coroutine.
            return self._wrap_call(behavior, labels)

        async def wrapped(
            request_or_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            started = self._begin(labels)
            failure: BaseException | None = None
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(labels, started, self._final_code(context, failure))

        return wrapped


# --------------------------------------------------------------------------- caches


class CacheCollector:
    """Hits, misses, evictions, entries and bytes of every cache tier, read at scrape time.

    One per registry (``Sam2Metrics.caches``); tiers are added with ``add`` / ``add_lru``.
    ``tier`` is where the cache lives ("decoder_memory", "store"); ``kind`` what it holds
    ("embedding", "logits").
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._sources: dict[tuple[str, str], Callable[[], CacheReading]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def add(self, tier: str, kind: str, read: Callable[[], CacheReading]) -> None:
        with self._lock:
            self._sources[(tier, kind)] = read

    def add_lru(self, tier: str, kind: str, cache: _CacheLike) -> None:
        """An ``LruCache`` (or anything with hits/misses/evictions/nbytes/len)."""
        self.add(tier, kind, lambda: CacheReading(
            cache.hits, cache.misses, cache.evictions, len(cache), cache.nbytes))

    def describe(self) -> Iterable[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            sources = list(self._sources.items())
        readings = [(labels, read()) for labels, read in sources]
        return list(self._families(readings))

    @staticmethod
    def _families(readings: list[tuple[tuple[str, str], CacheReading]]) -> Iterator[Metric]:
        specs = (
            ("sam2_cache_hits", "lookups that found a usable entry", CounterMetricFamily,
             "hits"),
            ("sam2_cache_misses", "lookups that found nothing usable (corrupt entries included)",
             CounterMetricFamily, "misses"),
            ("sam2_cache_evictions", "entries dropped to stay within the cache's bounds",
             CounterMetricFamily, "evictions"),
            ("sam2_cache_entries", "entries held now", GaugeMetricFamily, "entries"),
            ("sam2_cache_bytes", "bytes held now", GaugeMetricFamily, "nbytes"),
        )
        for name, doc, family_type, attribute in specs:
            family = family_type(name, doc, labels=("tier", "kind"))
            for labels, reading in readings:
                value = getattr(reading, attribute)
                if value is not None:
                    family.add_metric(list(labels), value)
            yield family


# --------------------------------------------------------------------------- store


class StoreMetrics:
    """Store operation latency by outcome, errors, corrupt entries, bytes moved, and the
    store's hits/misses as cache tier "store". Fed by ``StoreStats.observers``."""

    def __init__(self, registry: CollectorRegistry, caches: CacheCollector) -> None:
        self.operation_seconds = Histogram(
            "sam2_store_operation_seconds",
            "shared-store reads (op=get) and writes (op=put), by entry kind and outcome",
            ("op", "kind", "outcome"), buckets=STORE_SECONDS_BUCKETS, registry=registry,
        )
        self.errors = Counter(
            "sam2_store_errors_total", "store operations that failed (store unavailable)",
            ("op", "kind"), registry=registry,
        )
        self.corrupt = Counter(
            "sam2_store_corrupt_entries_total",
            "entries that failed verification (or were of another model) and read as misses",
            ("kind",), registry=registry,
        )
        self.bytes_read = Counter(
            "sam2_store_read_bytes_total", "bytes read from the store", ("kind",),
            registry=registry,
        )
        self.bytes_written = Counter(
            "sam2_store_written_bytes_total", "bytes written to the store", ("kind",),
            registry=registry,
        )
        self.backends = Gauge(
            "sam2_store_info", "the store this process uses (value 1)", ("backend",),
            registry=registry,
        )
        self._lookups: dict[str, list[int]] = {}  # kind -> [hits, misses]
        self._lock = threading.Lock()
        self._caches = caches

    def watch(self, store: Any) -> None:
        """Add an observer to ``store.stats`` (an ``EmbeddingStore``)."""
        backend = str(getattr(store, "url", "unknown")).split(":", 1)[0] or "unknown"
        self.backends.labels(backend).set(1)
        store.stats.observers.append(self.observe)

    def _lookup_counts(self, kind: str) -> list[int]:
        with self._lock:
            counts = self._lookups.get(kind)
            if counts is None:
                counts = self._lookups[kind] = [0, 0]

                def read() -> CacheReading:
                    with self._lock:
                        return CacheReading(counts[0], counts[1])

                self._caches.add("store", kind, read)
            return counts

    def observe(self, sample: Any) -> None:
        """One ``LatencySample(op, kind, outcome, seconds, nbytes)``."""
        outcome = sample.outcome if sample.outcome in STORE_OUTCOMES else "other"
        self.operation_seconds.labels(sample.op, sample.kind, outcome).observe(sample.seconds)
        if outcome == "error":
            self.errors.labels(sample.op, sample.kind).inc()
        if outcome == "corrupt":
            self.corrupt.labels(sample.kind).inc()
        if sample.nbytes:
            target = self.bytes_read if sample.op == "get" else self.bytes_written
            target.labels(sample.kind).inc(sample.nbytes)
        if sample.op == "get" and outcome in ("hit", "miss", "corrupt"):
            counts = self._lookup_counts(sample.kind)
            with self._lock:
                counts[0 if outcome == "hit" else 1] += 1


# --------------------------------------------------------------------------- batching


class _BatcherStatsCollector:
    """Counters a ``BatcherStats`` keeps (rejections, coalescing, cancellations)."""

    def __init__(self, prefix: str, model_id: str, batcher: _BatcherLike,
                 unit: str) -> None:
        self._prefix, self._model_id, self._batcher, self._unit = prefix, model_id, batcher, unit

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        stats = self._batcher.stats
        for name, value, doc in (
            ("submitted", stats.submitted,
             f"{self._unit} submitted to the batch queue (rejected ones included)"),
            ("coalesced", stats.coalesced,
             f"{self._unit} that joined an identical queued or running one"),
            ("rejected", stats.rejected, f"{self._unit} refused with RESOURCE_EXHAUSTED "
                                         "(queue full)"),
            ("cancelled", stats.cancelled, f"queued {self._unit} dropped: every caller left"),
        ):
            family = CounterMetricFamily(f"{self._prefix}_queue_{name}", doc, labels=("model",))
            family.add_metric([self._model_id], value)
            yield family


class _BatcherMetrics:
    """Batch size, queue wait, run time and queue depth of one tier's ``MicroBatcher``."""

    def __init__(self, registry: CollectorRegistry, prefix: str, model_id: str, *,
                 unit: str, run_name: str, run_doc: str,
                 run_buckets: tuple[float, ...]) -> None:
        self._registry, self._prefix, self._model_id, self._unit = (
            registry, prefix, model_id, unit)
        self.batch_size = Histogram(
            f"{prefix}_batch_size", f"{unit} per executed batch", ("model",),
            buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            f"{prefix}_queue_wait_seconds", f"time {unit} waited from submit to their batch "
            "starting", ("model",), buckets=QUEUE_WAIT_BUCKETS, registry=registry,
        )
        self.run_seconds = Histogram(run_name, run_doc, ("model",), buckets=run_buckets,
                                     registry=registry)
        self.failed_items = Counter(
            f"{prefix}_batch_failed_items_total", f"{unit} whose batch computation failed",
            ("model",), registry=registry,
        )
        self.queue_depth = Gauge(
            f"{prefix}_queue_depth", f"{unit} waiting for a batch now", ("model",),
            registry=registry,
        )

    def attach_batcher(self, batcher: _BatcherLike) -> None:
        """Observe every batch of ``batcher`` and read its queue depth at scrape time."""
        batcher.stats.observers.append(self.observe_batch)
        self.queue_depth.labels(self._model_id).set_function(lambda: batcher.queue_depth)
        self._registry.register(
            _BatcherStatsCollector(self._prefix, self._model_id, batcher, self._unit))

    def observe_batch(self, record: Any) -> None:
        """One ``BatchRecord(size, queue_wait_s, run_s, failed_items)``."""
        self.batch_size.labels(self._model_id).observe(record.size)
        wait = self.queue_wait_seconds.labels(self._model_id)
        for seconds in record.queue_wait_s:
            wait.observe(seconds)
        self.run_seconds.labels(self._model_id).observe(record.run_s)
        if record.failed_items:
            self.failed_items.labels(self._model_id).inc(record.failed_items)


class EncoderMetrics(_BatcherMetrics):
    """The encoder tier's own metrics. ``attach_batcher(encoder.batcher)`` once, and
    ``observe_images(outcomes)`` per ``EmbedImages`` call."""

    def __init__(self, registry: CollectorRegistry, model_id: str) -> None:
        super().__init__(
            registry, "sam2_encoder", model_id, unit="images",
            run_name="sam2_encoder_embed_seconds",
            run_doc="image-encoder forward time per batch (decoded pixels to embeddings)",
            run_buckets=EMBED_SECONDS_BUCKETS,
        )
        self.images = Counter(
            "sam2_encoder_images_total",
            "images in EmbedImages requests by outcome (embedded, already_stored, error)",
            ("model", "outcome"), registry=registry,
        )
        self.image_errors = Counter(
            "sam2_encoder_image_errors_total", "per-image errors by ErrorInfo reason",
            ("model", "reason"), registry=registry,
        )

    def observe_images(self, outcomes: Iterable[Any]) -> None:
        """Per image: ``(info, already_stored)`` or the exception that image got."""
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                reason = str(getattr(outcome, "reason", "") or "INTERNAL")
                self.images.labels(self._model_id, "error").inc()
                self.image_errors.labels(self._model_id, reason).inc()
            else:
                stored_before = bool(outcome[1])
                label = "already_stored" if stored_before else "embedded"
                self.images.labels(self._model_id, label).inc()


class DecoderMetrics(_BatcherMetrics):
    """The decoder tier's own metrics.

    Calls a decoder makes (all cheap, thread-safe):

    - ``attach_batcher(batcher)``: its decode ``MicroBatcher`` -> ``sam2_decoder_batch_size``
      (requests per batch), ``sam2_decoder_queue_wait_seconds``, ``sam2_decoder_queue_depth``,
      ``sam2_decoder_decode_seconds`` (batch run time: prompt encoder + mask decoder).
    - ``attach_hot_cache(cache)`` / ``attach_logits_cache(cache)``: its ``LruCache`` objects ->
      ``sam2_cache_*{tier="decoder_memory", kind="embedding"|"logits"}``.
    - ``attach_stats(stats)``: an object with ``requests``, ``model_calls``,
      ``prompts_decoded``, ``encoder_calls`` counters (``DecoderStats``), read at scrape time.
    - ``observe_mask_encoding(fmt, seconds, nbytes)``: once per response, around the mask
      encoding (``wire.prompt_results_to_proto``); ``fmt`` a ``MaskEncoding`` or its value.
    """

    def __init__(self, registry: CollectorRegistry, model_id: str) -> None:
        super().__init__(
            registry, "sam2_decoder", model_id, unit="requests",
            run_name="sam2_decoder_decode_seconds",
            run_doc="prompt-encoder + mask-decoder time per batch",
            run_buckets=DECODE_SECONDS_BUCKETS,
        )
        self.mask_encode_seconds = Histogram(
            "sam2_decoder_mask_encode_seconds", "time to encode one response's masks, by format",
            ("format",), buckets=DECODE_SECONDS_BUCKETS, registry=registry,
        )
        self.mask_bytes = Histogram(
            "sam2_decoder_mask_bytes", "encoded mask bytes per response, by format",
            ("format",), buckets=MASK_BYTES_BUCKETS, registry=registry,
        )
        self._caches: CacheCollector | None = None

    def attach_hot_cache(self, cache: _CacheLike) -> None:
        self._cache_collector().add_lru("decoder_memory", "embedding", cache)

    def attach_logits_cache(self, cache: _CacheLike) -> None:
        self._cache_collector().add_lru("decoder_memory", "logits", cache)

    def _cache_collector(self) -> CacheCollector:
        if self._caches is None:
            raise RuntimeError("make DecoderMetrics with Sam2Metrics.decoder()")
        return self._caches

    def attach_stats(self, stats: Any) -> None:
        model_id = self._model_id

        class _Collector:
            def describe(self) -> Iterable[Metric]:
                return list(self.collect())

            def collect(self) -> Iterable[Metric]:
                families = []
                for name, attribute, doc in (
                    ("sam2_decoder_requests", "requests", "Segment requests (stream messages "
                     "included)"),
                    ("sam2_decoder_forwards", "model_calls", "mask-decoder forwards (batched)"),
                    ("sam2_decoder_prompts_decoded", "prompts_decoded", "prompts decoded"),
                    ("sam2_decoder_encoder_calls", "encoder_calls",
                     "embeddings asked of the encoder tier on a miss"),
                ):
                    family = CounterMetricFamily(name, doc, labels=("model",))
                    family.add_metric([model_id], getattr(stats, attribute, 0))
                    families.append(family)
                return families

        self._registry.register(_Collector())

    def observe_mask_encoding(self, fmt: str, seconds: float, nbytes: int) -> None:
        value = str(getattr(fmt, "value", fmt)).lower()
        label = value if value in MASK_FORMATS else "other"
        self.mask_encode_seconds.labels(label).observe(seconds)
        self.mask_bytes.labels(label).observe(nbytes)


# --------------------------------------------------------------------------- process, GPU


class GpuMemoryCollector:
    """CUDA memory per device, only where torch is already imported and CUDA initialised
    (a scrape never imports torch or creates a CUDA context)."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        families = {
            "allocated": GaugeMetricFamily("sam2_gpu_memory_allocated_bytes",
                                           "bytes held by tensors", labels=("device",)),
            "reserved": GaugeMetricFamily("sam2_gpu_memory_reserved_bytes",
                                          "bytes reserved by torch's caching allocator",
                                          labels=("device",)),
            "peak": GaugeMetricFamily("sam2_gpu_memory_max_allocated_bytes",
                                      "peak bytes held by tensors since start",
                                      labels=("device",)),
            "total": GaugeMetricFamily("sam2_gpu_memory_total_bytes", "device memory",
                                       labels=("device",)),
        }
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            families["allocated"].add_metric([device], torch.cuda.memory_allocated(index))
            families["reserved"].add_metric([device], torch.cuda.memory_reserved(index))
            families["peak"].add_metric([device], torch.cuda.max_memory_allocated(index))
            families["total"].add_metric(
                [device], torch.cuda.get_device_properties(index).total_memory)
        return list(families.values())


# --------------------------------------------------------------------------- per process


class Sam2Metrics:
    """Everything one process exports, on its own registry.

    Arguments:
        registry: where to register; default a new ``CollectorRegistry``.
        process_collectors: add the standard ``process_*``, ``python_*`` and GC collectors
            and the GPU memory collector (off in unit tests that count families).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process_collectors: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
            self.registry.register(GpuMemoryCollector())
        self.rpc = RpcMetrics(self.registry)
        self.caches = CacheCollector(self.registry)
        self._store: StoreMetrics | None = None
        self._encoders: dict[str, EncoderMetrics] = {}
        self._decoders: dict[str, DecoderMetrics] = {}
        self.model_load_seconds = Gauge(
            "sam2_model_load_seconds", "time to load the model's weights at start-up",
            ("model", "part"), registry=self.registry,
        )
        self.model_warmup_seconds = Gauge(
            "sam2_model_warmup_seconds", "time of the warm-up forward before SERVING",
            ("model", "part"), registry=self.registry,
        )
        self.model_info = Gauge(
            "sam2_model_info", "the model this process serves (value 1)",
            ("model", "part", "device", "precision"), registry=self.registry,
        )
        self.http_port: int | None = None

    def interceptor(self) -> MetricsInterceptor:
        """The gRPC server interceptor; pass it first in ``build_server(interceptors=...)``."""
        return self.rpc.interceptor()

    def watch_store(self, store: Any) -> StoreMetrics:
        if self._store is None:
            self._store = StoreMetrics(self.registry, self.caches)
        self._store.watch(store)
        return self._store

    def encoder(self, model_id: str) -> EncoderMetrics:
        if model_id not in self._encoders:
            self._encoders[model_id] = EncoderMetrics(self.registry, model_id)
        return self._encoders[model_id]

    def decoder(self, model_id: str) -> DecoderMetrics:
        if model_id not in self._decoders:
            metrics = DecoderMetrics(self.registry, model_id)
            metrics._caches = self.caches
            self._decoders[model_id] = metrics
        return self._decoders[model_id]

    def observe_model_load(self, model_id: str, part: str, load_s: float,
                           warmup_s: float | None = None, device: str = "",
                           precision: str = "") -> None:
        """Record start-up: ``part`` is "encoder" or "decoder"."""
        self.model_load_seconds.labels(model_id, part).set(load_s)
        if warmup_s is not None:
            self.model_warmup_seconds.labels(model_id, part).set(warmup_s)
        self.model_info.labels(model_id, part, device, precision).set(1)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (0 picks one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.http_port = int(server.server_port)
        return self.http_port
