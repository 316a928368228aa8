"""The tiers' own metric families: store, caches, batch queues, encoder and decoder work,
and counters kept by other modules (read at scrape time, so those modules know nothing of
Prometheus). ``serving.metrics.Sam2Metrics`` makes and wires them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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



@dataclass(frozen=True)
class Reading:
    """One value read at scrape time: a metric family, one sample of it."""

    name: str  # without ``_total``
    doc: str
    kind: str  # "counter" or "gauge"
    read: Callable[[], float | dict[str, float]]  # a value, or {label value: value}
    labels: tuple[str, ...] = ()  # label names of the sample(s) (bounded values only)
    label_values: tuple[str, ...] = ()  # fixed label values (e.g. the model id)
    by: str | None = None  # label name for the keys of a dict reading


class ReadingsCollector:
    """Exports counters and gauges that another object keeps, read at scrape time."""

    def __init__(self, readings: Sequence[Reading]) -> None:
        self.readings = list(readings)

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        families = []
        for reading in self.readings:
            cls = CounterMetricFamily if reading.kind == "counter" else GaugeMetricFamily
            labels = reading.labels + ((reading.by,) if reading.by else ())
            family = cls(reading.name, reading.doc, labels=labels)
            value = reading.read()
            if isinstance(value, dict):
                for key, count in sorted(value.items()):
                    family.add_metric([*reading.label_values, str(key)], count)
            else:
                family.add_metric(list(reading.label_values), value)
            families.append(family)
        return families


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
        """Export the ``DecoderStats`` counters."""
        model = (self._model_id,)
        self._registry.register(ReadingsCollector([
            Reading(name, doc, "counter", lambda a=attribute: getattr(stats, a, 0), ("model",),
                    model)
            for name, attribute, doc in (
                ("sam2_decoder_requests", "requests",
                 "Segment requests (stream messages included)"),
                ("sam2_decoder_forwards", "model_calls", "mask-decoder forwards (batched)"),
                ("sam2_decoder_prompts_decoded", "prompts_decoded", "prompts decoded"),
                ("sam2_decoder_encoder_calls", "encoder_calls",
                 "embeddings asked of the encoder tier on a miss"),
            )
        ]))

    def observe_mask_encoding(self, fmt: str, seconds: float, nbytes: int) -> None:
        value = str(getattr(fmt, "value", fmt)).lower()
        label = value if value in MASK_FORMATS else "other"
        self.mask_encode_seconds.labels(label).observe(seconds)
        self.mask_bytes.labels(label).observe(nbytes)
