"""TLS for the tiers' listeners: ``server_credentials`` (TLS, or mutual TLS with a client
CA) for ``build_server``. PEM files are read once at start-up."""

from __future__ import annotations

import os

import grpc

from sam2_shared.client.channels import read_pem


def server_credentials(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                       client_ca: str | os.PathLike[str] | None = None
                       ) -> grpc.ServerCredentials:
    """TLS for a listener; with ``client_ca``, mutual TLS (clients must present a
    certificate signed by that CA, checked before any RPC)."""
    cert_pem, key_pem = read_pem(cert, "TLS certificate"), read_pem(key, "TLS key")
    assert cert_pem is not None and key_pem is not None
    ca_pem = read_pem(client_ca, "client CA")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None)


def tls_server_settings(cert: str | None, key: str | None, client_ca: str | None
                        ) -> grpc.ServerCredentials | None:
    """From a tier's settings: None (plaintext) when no certificate is configured."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("give both --tls-cert and --tls-key")
    return server_credentials(cert, key, client_ca)
