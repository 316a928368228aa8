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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from sam2_shared.serving.tier_metrics import (
    CacheCollector,
    DecoderMetrics,
    EncoderMetrics,
    Reading,
    ReadingsCollector,
    StoreMetrics,
)

# Buckets in base units (seconds, bytes, items), chosen for where each quantity lives.
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0, 60.0)



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
        # protocol: "grpc" on the gRPC port; "connect" or "grpc_web" on the HTTP port.
        labels = ("grpc_service", "grpc_method", "grpc_type", "protocol")
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
        # The HTTP gateway's call details name their protocol; gRPC's have none.
        protocol = getattr(handler_call_details, "protocol", "grpc")
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_call(
                handler.unary_unary, (service, method, "unary", protocol)))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_call(
                handler.stream_unary, (service, method, "client_stream", protocol)))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(
                handler.unary_stream, (service, method, "server_stream", protocol)))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(
                handler.stream_stream, (service, method, "bidi_stream", protocol)))
        return handler

    def _begin(self, labels: tuple[str, ...]) -> float:
        self.metrics.started.labels(*labels).inc()
        self.metrics.in_flight.labels(*labels).inc()
        return time.perf_counter()

    def _end(self, labels: tuple[str, ...], started: float, code: str) -> None:
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
                   labels: tuple[str, ...]) -> Callable[..., Any]:
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
                     labels: tuple[str, ...]) -> Callable[..., Any]:
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

    def watch_auth(self, auth: Any) -> None:
        """Export an ``AuthInterceptor``'s counters (calls accepted, rejected by reason, streams
        refused), its key ring's reloads, and whether keys are required at all."""
        stats = auth.stats
        self.registry.register(ReadingsCollector([
            Reading("sam2_auth_enabled", "1: calls need an API key; 0: every caller is "
                    "accepted (no --api-keys-file)", "gauge", lambda: int(auth.keys is not None)),
            Reading("sam2_auth_accepted", "calls with a valid API key (or auth off)", "counter",
                    lambda: stats.accepted),
            Reading("sam2_auth_rejected", "calls refused UNAUTHENTICATED, by reason", "counter",
                    lambda: dict(stats.rejected) or {"API_KEY_MISSING": 0}, by="reason"),
            Reading("sam2_auth_streams_refused", "streams refused: the key had too many open",
                    "counter", lambda: stats.sessions_refused),
            Reading("sam2_auth_key_reloads", "API key set reloaded after the file changed",
                    "counter", lambda: 0 if auth.keys is None else auth.keys.reloads),
        ]))

    def watch_tracking(self, model_id: str, tracker: Any, servicer: Any) -> None:
        """Export the decoder tier's tracking counters (``Tracker``, ``TrackingServicer``)."""
        model = ("model",), (model_id,)
        self.registry.register(ReadingsCollector([
            Reading("sam2_tracking_live_sessions", "tracking sessions held in memory now",
                    "gauge", tracker.live_session_count, *model),
            Reading("sam2_tracking_held_bytes", "bytes of cached frame features and state "
                    "the live tracking sessions hold", "gauge", tracker.held_bytes, *model),
            Reading("sam2_tracking_sessions_evicted", "tracking sessions that left memory "
                    "for the memory budget (they reload from the store)", "counter",
                    lambda: tracker.sessions_evicted, *model),
            Reading("sam2_tracking_sessions_loaded", "sessions continued from the store "
                    "(another replica's, or evicted here)", "counter",
                    lambda: tracker.sessions_loaded, *model),
            Reading("sam2_tracking_propagations_cancelled", "propagations stopped early by "
                    "the client", "counter", lambda: servicer.propagations_cancelled, *model),
            Reading("sam2_tracking_frames", "frames answered by Propagate (rate: frames "
                    "tracked per second)", "counter", lambda: servicer.frames_tracked, *model),
            Reading("sam2_tracking_frame_seconds", "time spent tracking those frames (divided "
                    "by sam2_tracking_frames_total: latency per frame)", "counter",
                    lambda: servicer.frame_seconds, *model),
            Reading("sam2_tracking_stored_bytes", "bytes of the live sessions' tracking state "
                    "as last saved to the store", "gauge", tracker.stored_bytes, *model),
            Reading("sam2_tracking_video_uploads", "uploaded videos whose frames are being "
                    "embedded now", "gauge", servicer.uploads_in_progress, *model),
            Reading("sam2_tracking_video_frames_embedded", "frames of uploaded videos the "
                    "encoder stored", "counter", lambda: servicer.video_frames_embedded, *model),
        ]))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (0 picks one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.http_port = int(server.server_port)
        return self.http_port
