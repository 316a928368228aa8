"""What both tiers' gRPC servers share: construction, health, reflection, error
mapping, message sizes and graceful shutdown. Knows no tier.

A tier's ``cli.py`` does, inside its event loop::

    server, port = build_server([register_encoder], [ENCODER_SERVICE_NAME], port=50051)
    server.add_close_callback(batcher.close)
    await server.start()          # health answers NOT_SERVING while the model loads
    ...load and warm up the model...
    await server.mark_serving()
    await server.serve()          # until SIGTERM/SIGINT, then drains and closes

Shutdown sequence (Kubernetes sends SIGTERM, then SIGKILL after
``terminationGracePeriodSeconds``): health goes NOT_SERVING for good, new RPCs are
refused, in-flight RPCs get ``grace_s`` to finish, then the close callbacks run in
reverse order of registration (batcher before store, for example).

Health port: with ``health_port`` a second, plaintext listener on the same host serves the
same health service and nothing else (every other method is UNIMPLEMENTED there), for probes
that cannot speak TLS (the kubelet's gRPC probe). It stays up while the main one drains, so
probes see NOT_SERVING rather than a refused connection.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sam2_shared.serving.connect import HandlerTable, RpcGateway
from sam2_shared.serving.http_server import HttpServer
from sam2_shared.serving.interceptors import ErrorMappingInterceptor

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 12 MP JPEG is several MB; raw pixels more
DEFAULT_GRACE_S = 25.0  # below Kubernetes' default terminationGracePeriodSeconds (30 s)
# RPCs in progress at once (streams count for their whole life); gRPC answers the next one
# RESOURCE_EXHAUSTED before it reaches an interceptor or a servicer.
DEFAULT_MAX_CONCURRENT_RPCS = 256
# The health-only listener: a HealthCheckRequest is a service name, and probes are few.
HEALTH_MAX_MESSAGE_BYTES = 4096
HEALTH_MAX_CONCURRENT_RPCS = 32

# Adds a servicer to a grpc.aio.Server (or to the HTTP gateway's HandlerTable).
Registrar = Callable[[Any], None]
CloseCallback = Callable[[], "Awaitable[None] | None"]

logger = logging.getLogger(__name__)


class Sam2Server:
    """A started-or-not ``grpc.aio.Server`` with its health servicer and shutdown.

    Built by ``build_server``; the underlying server is ``grpc_server``.
    """

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        port: int,
        grace_s: float,
        health_server: grpc.aio.Server | None = None,
        health_port: int = 0,
        http_server: HttpServer | None = None,
        http_address: tuple[str, int] = ("", 0),
    ) -> None:
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.port = port
        self.grace_s = grace_s
        self.health_server = health_server  # the plaintext health-only listener, if any
        self.health_port = health_port
        self.http_server = http_server  # Connect / gRPC-Web / static files, if any
        self._http_address = http_address
        self.http_port = 0  # bound by start()
        self._close_callbacks: list[CloseCallback] = []
        self._stopped: asyncio.Event | None = None
        self._stopping = False

    def add_close_callback(self, callback: CloseCallback) -> None:
        """Run ``callback`` (sync or async) after the server has stopped."""
        self._close_callbacks.append(callback)

    async def _set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start serving RPCs; health reports NOT_SERVING until ``mark_serving``."""
        self._stopped = asyncio.Event()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        logger.info(
            "gRPC server listening on port %d: %s", self.port, ", ".join(self.service_names)
        )
        if self.health_server is not None:
            await self.health_server.start()
            logger.info("gRPC health only, plaintext, on port %d", self.health_port)
        if self.http_server is not None:
            self.http_port = await self.http_server.start(*self._http_address)
            logger.info("HTTP (Connect, gRPC-Web) on port %d", self.http_port)

    async def mark_serving(self) -> None:
        """Report SERVING (overall and per service): the model is loaded and warm."""
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, drain for ``grace_s``, then close callbacks.

        Safe to call more than once; later calls wait for the first to finish.
        """
        if self._stopped is None:
            raise RuntimeError("stop() before start()")
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.grace_s if grace_s is None else grace_s
        try:
            await self.health.enter_graceful_shutdown()
            logger.info("stopping gRPC server (grace %.1f s)", grace)
            if self.http_server is not None:
                await asyncio.gather(self.grpc_server.stop(grace), self.http_server.stop(grace))
            else:
                await self.grpc_server.stop(grace)
            if self.health_server is not None:
                await self.health_server.stop(0)
        finally:
            for callback in reversed(self._close_callbacks):
                try:
                    result = callback()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    logger.exception("close callback %r failed", callback)
            self._stopped.set()

    async def serve(
        self,
        grace_s: float | None = None,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        """Serve until one of ``signals`` arrives, then ``stop`` gracefully."""
        if self._stopped is None:
            await self.start()
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, requested.set)
        try:
            # Not raced against wait_for_termination(): cancelling that waiter cancels
            # grpc's own shutdown future and breaks the later stop().
            await requested.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.stop(grace_s)


# Clients (Sam2Client) ping every 30 s, also on idle streams, so that a dropped connection is
# noticed before the next click. gRPC's default server policy accepts a ping without data at
# most every 5 minutes and answers the third early one with GOAWAY "too_many_pings", which
# killed a SegmentStream left idle for about two minutes. Accept pings every 10 s instead.
MIN_CLIENT_PING_INTERVAL_MS = 10_000
# Connections are recycled after about 30 minutes (with a grace for calls in flight), so
# clients re-resolve DNS and pods added by an autoscaler get traffic.
MAX_CONNECTION_AGE_MS = 30 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 5 * 60 * 1000


def connection_options(
    min_client_ping_interval_ms: int = MIN_CLIENT_PING_INTERVAL_MS,
) -> list[tuple[str, int]]:
    """Server channel arguments for long-lived client connections (keepalive, recycling)."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
    ]


def build_server(
    registrars: Sequence[Registrar],
    service_names: Sequence[str],
    *,
    port: int,
    host: str = "0.0.0.0",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    reflection_enabled: bool = True,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, int | str]] = (),
    grace_s: float = DEFAULT_GRACE_S,
    server_credentials: grpc.ServerCredentials | None = None,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    health_port: int = 0,
    http_port: int | None = None,
    http_cors_origins: Sequence[str] = (),
    static_dir: Path | None = None,
) -> tuple[Sam2Server, int]:
    """Build (not start) a ``grpc.aio`` server for one tier; call inside the event loop.

    Arguments:
        registrars: callables that add a servicer, e.g.
            ``lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(svc, s)``.
        service_names: full names of those services (``"sam2.v1.EncoderService"``),
            for health and reflection.
        port: TCP port; 0 picks a free one (returned).
        host: address to bind, "0.0.0.0" for all interfaces, "127.0.0.1" for tests.
        max_message_bytes: receive and send limit per message.
        reflection_enabled: register server reflection (grpcurl, Postman).
        interceptors: extra interceptors (auth, metrics), outermost first; the error
            mapping interceptor always runs innermost, next to the servicer.
        options: extra channel arguments; they replace ours of the same name.
        grace_s: default drain time of ``stop``.
        server_credentials: TLS / mutual TLS for the listener
            (``sam2_shared.serving.tls.server_credentials``); None listens in plaintext.
        max_concurrent_rpcs: most RPCs in progress at once (0: no limit); beyond, gRPC
            answers RESOURCE_EXHAUSTED.
        health_port: a plaintext port on ``host`` serving only gRPC health (0: none).
        http_port: an HTTP/1.1 port on ``host`` serving the same services (and health) over
            Connect and gRPC-Web, through the same interceptors (None: none; 0 picks one,
            ``Sam2Server.http_port`` after ``start``). Plaintext: put TLS in front.
        http_cors_origins: origins browsers may call the HTTP port from (``*``: any).
        static_dir: folder the HTTP port serves at ``/`` (the decoder's page).

    Returns:
        ``(server, bound_port)``.
    """
    # One value per argument, ``options`` winning (gRPC would take the first of duplicates).
    grpc_options = list(dict([
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Fail loudly when the port is taken instead of sharing it with another process.
        ("grpc.so_reuseport", 0),
        *connection_options(),
        *options,
    ]).items())
    server = grpc.aio.server(
        interceptors=(*interceptors, ErrorMappingInterceptor()), options=grpc_options,
        maximum_concurrent_rpcs=max_concurrent_rpcs or None,
    )
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    bound_port = _bind(server, host, port, server_credentials)
    health_server = None
    if health_port:
        health_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", HEALTH_MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=HEALTH_MAX_CONCURRENT_RPCS)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        _bind(health_server, host, health_port, None)
    http_server = None
    if http_port is not None:
        table = HandlerTable()  # the same servicer objects, registered a second time
        for register in registrars:
            register(table)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, table)
        gateway = RpcGateway(table, (*interceptors, ErrorMappingInterceptor()),
                             max_concurrent_calls=max_concurrent_rpcs)
        http_server = HttpServer(gateway, max_body_bytes=max_message_bytes,
                                 cors_origins=tuple(http_cors_origins), static_dir=static_dir)
    sam2_server = Sam2Server(server, health_servicer, service_names, bound_port, grace_s,
                             health_server, health_port, http_server, (host, http_port or 0))
    return sam2_server, bound_port


def _bind(server: grpc.aio.Server, host: str, port: int,
          credentials: grpc.ServerCredentials | None) -> int:
    """Add the listener ``host:port`` (TLS with ``credentials``); the bound port."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound_port = server.add_insecure_port(address)
        else:
            bound_port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpcio raises when binding fails
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if bound_port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return bound_port


def run_tier(
    settings_cls: type[Any],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    serve: Callable[[Any, Any], Awaitable[None]],
) -> int:
    """A tier's ``main``: settings from flags/env, logging, the metrics port, then ``serve``.

    Exit status: 0 after a clean stop, 2 when the model cannot be loaded (the message says
    where to put the checkpoint), 1 when the server cannot start (port in use, store
    unreachable or its directory unsafe, no API keys on a non-loopback ``--host``, an API
    key file that is missing or holds a weak or placeholder key).
    """
    from sam2_shared.errors import CheckpointError, StoreUnavailableError
    from sam2_shared.serving.auth import check_listener_auth, load_api_keys
    from sam2_shared.serving.metrics import Sam2Metrics
    from sam2_shared.serving.settings import describe_settings, load_settings

    settings = load_settings(settings_cls, argv, prog=prog, description=description)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.info("settings: %s", describe_settings(settings))
    try:  # before any port opens or the model loads
        check_listener_auth(settings.host, settings.api_keys_file,
                            settings.allow_unauthenticated)
        if settings.api_keys_file:
            load_api_keys(settings.api_keys_file)  # a weak or placeholder key stops here
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    # OpenCV's own pixel limit as a second fence behind the header check (read by OpenCV at
    # its first decode, so setting it here, before any, is enough).
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(settings.max_image_pixels))
    metrics = Sam2Metrics()
    if settings.metrics_port > 0:
        try:
            metrics.serve(settings.metrics_port, settings.host)
        except OSError as exc:  # e.g. the port in use: the same exit as the gRPC port's
            logger.error("cannot start: cannot serve metrics on %s:%d: %s", settings.host,
                         settings.metrics_port, exc)
            return 1
        logger.info("metrics on port %d", settings.metrics_port)
    try:
        asyncio.run(serve(settings, metrics))
    except CheckpointError as exc:
        logger.error("cannot load the model: %s", exc)
        return 2
    except (OSError, StoreUnavailableError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0
