"""Client channels: options, TLS credentials and the API-key metadata of every call.

Channel options: message size limits for real images; keepalive pings every 30 s
(``grpc.keepalive_time_ms``, also without calls in flight) so that a silently dropped
connection (a load balancer's idle timeout, a dead pod) is noticed before the next call, not
by it; and the ``round_robin`` load-balancing policy, so that a target resolving to several
addresses spreads calls over all of them instead of pinning one (gRPC's default is
``pick_first``).
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"


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



def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``api_key`` (empty without one)."""
    return ((AUTHORIZATION_HEADER, f"Bearer {api_key}"),) if api_key else ()



def read_pem(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None or path == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {what} {path}: {exc.strerror}") from None



def channel_credentials(root_certs: str | os.PathLike[str] | None = None,
                        client_cert: str | os.PathLike[str] | None = None,
                        client_key: str | os.PathLike[str] | None = None
                        ) -> grpc.ChannelCredentials:
    """TLS for a client channel: ``root_certs`` (None: the system roots) and, for mutual
    TLS, the client's certificate and key."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_certs, "TLS root certificates"),
        private_key=read_pem(client_key, "TLS client key"),
        certificate_chain=read_pem(client_cert, "TLS client certificate"),
    )



def credentials(tls: bool, root_certs: str | None, client_cert: str | None,
                 client_key: str | None) -> grpc.ChannelCredentials | None:
    if not (tls or root_certs or client_cert or client_key):
        return None
    return channel_credentials(root_certs, client_cert, client_key)
