"""Security on the real tiers: API keys (missing, wrong, rotated), TLS and mutual TLS on both
listeners and on the decoder's calls to the encoder, the plaintext health-only port of a TLS
tier, tenant namespaces (same image, different ids; no reading across tenants), sessions per
key, a Redis store over TLS (rediss://); plus units of the key ring, the retry policy and
deadline forwarding."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sam2_shared import embedding, wire
from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from sam2_shared.client import Sam2Client, channels, retry
from sam2_shared.client.channels import channel_options
from sam2_shared.errors import EmbeddingNotFoundError, LogitsNotFoundError
from sam2_shared.prompts import Prompt
from sam2_shared.serving import auth
from sam2_shared.serving.encoder_client import AsyncEncoderClient
from sam2_shared.wire.status import error_from_rpc_error
from tests.helpers.servers import find_binary, free_port
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process
from tests.helpers.tls_certs import Pki, make_pki

# Fixed, random-looking keys (the loader refuses repeated characters and placeholders).
KEY_A = "tenant-a-Qm7vX2pL9sKf4tRw8zNc"
KEY_B = "tenant-b-Hd3yJ6gT1uVb5oEq0iWa"
KEY_PLAIN = "service-Zr8kP4nF7xCm2sLh9dGy"  # no namespace
FOREGROUND = common_pb2.POINT_LABEL_FOREGROUND


# ----------------------------------------------------------------------- units


def test_keys_from_file_and_secret_directory(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# comment\n{KEY_A} tenant-a\n\n{KEY_PLAIN}  # trailing\n")
    keys = auth.load_api_keys(keyfile)
    assert [(k.key, k.namespace) for k in keys] == [(KEY_A, "tenant-a"), (KEY_PLAIN, "")]
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "old").write_text(KEY_A + " tenant-a\n")
    (secret / "new").write_text(KEY_B + " tenant-b\n")
    (secret / "..data").mkdir()  # Kubernetes bookkeeping, skipped
    assert {k.namespace for k in auth.load_api_keys(secret)} == {"tenant-a", "tenant-b"}
    for bad in ("short tenant\n", f"{KEY_A} bad:namespace\n", f"{KEY_A} a b\n", "# none\n"):
        keyfile.write_text(bad)
        with pytest.raises(ValueError):
            auth.load_api_keys(keyfile)


def test_key_ring_rotates_on_change_and_revokes_all_on_an_emptied_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key1").write_text(KEY_A + " tenant-a\n")
    ring = auth.ApiKeyRing(path=secret, reload_interval_s=0)
    assert ring.match(KEY_A).namespace == "tenant-a"
    assert ring.match(KEY_B) is None and ring.match(KEY_A[:-1]) is None
    (secret / "key2").write_text(KEY_B + " tenant-b\n")  # rotation: new key added...
    assert ring.match(KEY_B).namespace == "tenant-b" and ring.match(KEY_A) is not None
    (secret / "key1").unlink()  # ...old one removed
    os.utime(secret, (time.time() + 1, time.time() + 1))
    assert ring.match(KEY_A) is None and ring.match(KEY_B) is not None
    (secret / "key2").write_text("")  # emptied: no key is accepted, neither old nor none
    os.utime(secret, (time.time() + 2, time.time() + 2))
    assert ring.match(KEY_B) is None and ring.match(KEY_A) is None


def test_presented_key_and_tenant_ids() -> None:
    assert auth.presented_key([("authorization", "Bearer  k1 ")]) == "k1"
    assert auth.presented_key([("x-api-key", "k2")]) == "k2"
    assert auth.presented_key([("authorization", "Basic xyz")]) is None
    rgb = synthetic_rgb(32, 48, seed=1)
    plain = embedding.namespaced_content_id(rgb, "sam2.1/hiera_tiny")
    scoped = embedding.namespaced_content_id(rgb, "sam2.1/hiera_tiny", "tenant-a")
    assert ":" not in plain and scoped.startswith("tenant-a:") and plain not in scoped
    embedding.check_id_namespace(scoped, "tenant-a")
    with pytest.raises(EmbeddingNotFoundError):
        embedding.check_id_namespace(scoped, "tenant-b")
    with pytest.raises(EmbeddingNotFoundError):
        embedding.check_id_namespace(scoped, "")
    with pytest.raises(LogitsNotFoundError):
        embedding.check_id_namespace("tenant-a:abc.0", "tenant-b", what="logits")


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, delay_s: float | None = None) -> None:
        from google.protobuf import any_pb2, duration_pb2
        from google.rpc import error_details_pb2

        self._code = code
        details = []
        if delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(delay_s * 1e9))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        from google.rpc import status_pb2

        self._status = status_pb2.Status(code=code.value[0], message="x", details=details)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "x"

    def trailing_metadata(self):  # noqa: ANN201
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def test_retry_backs_off_honours_hints_and_gives_up_on_other_codes() -> None:
    sleeps: list[float] = []
    failures = [_FakeRpcError(grpc.StatusCode.UNAVAILABLE, 0.7),
                _FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)]

    def flaky(remaining: float | None) -> str:
        assert remaining is not None and remaining > 0
        if failures:
            raise failures.pop(0)
        return "ok"

    policy = retry.RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=2)
    assert retry.call_with_retry(flaky, policy, timeout_s=10, rng=random.Random(0),
                                 sleep=sleeps.append) == "ok"
    assert sleeps[0] == pytest.approx(0.7)  # the server's hint wins over a short backoff
    assert 0 <= sleeps[1] <= 0.1
    calls = []

    def invalid(remaining: float | None) -> None:
        calls.append(1)
        raise _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.RpcError):
        retry.call_with_retry(invalid, policy, sleep=sleeps.append)
    assert len(calls) == 1
    # a hint that overruns the deadline: give up at once instead of sleeping past it
    with pytest.raises(grpc.RpcError):
        retry.call_with_retry(lambda _: (_ for _ in ()).throw(
            _FakeRpcError(grpc.StatusCode.UNAVAILABLE, 3.0)), policy, timeout_s=1.0,
            sleep=sleeps.append)
    assert len(sleeps) == 2


def test_encoder_calls_forward_the_callers_key_and_remaining_deadline() -> None:
    async def main() -> tuple[float, tuple, float, tuple]:
        client = AsyncEncoderClient("127.0.0.1:1", timeout_s=30.0, api_key="decoder-own-key")
        try:
            outside = client._call_settings()
            token = auth._current_caller.set(
                auth.Caller(api_key=KEY_A, namespace="tenant-a",
                                deadline=time.monotonic() + 20.0))
            try:
                inside = client._call_settings()
            finally:
                auth._current_caller.reset(token)
        finally:
            await client.close()
        return (*outside, *inside)

    outside_timeout, outside_meta, inside_timeout, inside_meta = asyncio.run(main())
    assert outside_timeout == 30.0
    assert outside_meta == (("authorization", "Bearer decoder-own-key"),)
    assert 10.0 < inside_timeout <= 20.0  # what is left of the caller's deadline
    assert inside_meta == (("authorization", f"Bearer {KEY_A}"),)


# ----------------------------------------------------------------------- real tiers


class SecureStack:
    """Encoder with mutual TLS and keys; a decoder with TLS and keys calling it over mTLS; a
    second plaintext decoder with keys and a session limit of 2."""

    def __init__(self, checkpoint: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sam2-security-"))
        self.pki: Pki = make_pki(self.dir)
        self.keys = self.dir / "keys"
        self.keys.write_text(f"{KEY_A} tenant-a\n{KEY_B} tenant-b\n{KEY_PLAIN}\n")
        store = "diskcache://" + str(self.dir / "store")
        p = self.pki
        tls = ["--tls-cert", str(p.server_cert), "--tls-key", str(p.server_key)]
        self.encoder = encoder_process(checkpoint, store, "--api-keys-file", str(self.keys),
                                       *tls, "--tls-client-ca", str(p.ca_cert))
        self.processes: list[TierProcess] = [self.encoder]
        # tier_processes polls health over plaintext: give it a TLS-aware health check
        _start_tls(self.encoder, p)
        self.health_port = free_port()  # plaintext, health only: for kubelet probes
        self.decoder = decoder_process(
            checkpoint, store, "--api-keys-file", str(self.keys), *tls,
            "--health-port", str(self.health_port),
            "--encoder-address", f"localhost:{self.encoder.port}", "--encoder-tls-ca",
            str(p.ca_cert), "--encoder-tls-cert", str(p.client_cert), "--encoder-tls-key",
            str(p.client_key))
        self.processes.append(self.decoder)
        _start_tls(self.decoder, p)
        self.plain_decoder = decoder_process(checkpoint, store, "--api-keys-file",
                                             str(self.keys), "--max-sessions-per-key", "2")
        self.processes.append(self.plain_decoder.start())

    def client(self, key: str | None, namespace: str = "", **kwargs) -> Sam2Client:
        p = self.pki
        return Sam2Client(encoder=f"localhost:{self.encoder.port}",
                          decoder=f"localhost:{self.decoder.port}", api_key=key,
                          namespace=namespace, tls_root_certs=str(p.ca_cert),
                          tls_client_cert=str(p.client_cert), tls_client_key=str(p.client_key),
                          retry=retry.NO_RETRY, **kwargs)

    def decoder_stub(self) -> tuple[grpc.Channel, decoder_pb2_grpc.DecoderServiceStub]:
        creds = channels.channel_credentials(self.pki.ca_cert)
        channel = grpc.secure_channel(f"localhost:{self.decoder.port}", creds,
                                      options=channel_options())
        return channel, decoder_pb2_grpc.DecoderServiceStub(channel)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _start_tls(process: TierProcess, pki: Pki) -> None:
    """``TierProcess.start`` with the health poll over TLS (client cert for mTLS servers)."""
    original = grpc.insecure_channel
    creds = channels.channel_credentials(pki.ca_cert, pki.client_cert, pki.client_key)

    def secure(address: str, *args, **kwargs):  # noqa: ANN202
        return grpc.secure_channel(address.replace("127.0.0.1", "localhost"), creds)

    grpc.insecure_channel = secure  # type: ignore[assignment]
    try:
        process.start()
    finally:
        grpc.insecure_channel = original  # type: ignore[assignment]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[SecureStack]:
    stack = SecureStack(tiny_checkpoint)
    try:
        yield stack
    finally:
        stack.close()


def _point(embedding_id: str, **fields) -> decoder_pb2.SegmentRequest:
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=40, y_px=30, label=FOREGROUND)])
    return decoder_pb2.SegmentRequest(embedding_id=embedding_id, prompts=[prompt], **fields)


def _error_of(call) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_health_is_open_and_rpcs_need_a_valid_key(stack: SecureStack) -> None:
    channel, stub = stack.decoder_stub()
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        for metadata, reason in (((), "API_KEY_MISSING"),
                                 ((("x-api-key", KEY_A + "x"),), "API_KEY_INVALID"),
                                 ((("authorization", "Bearer nope"),), "API_KEY_INVALID")):
            error = _error_of(lambda m=metadata: stub.Segment(_point("x"), metadata=m,
                                                              timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_from_rpc_error(error).reason == reason
        # a valid key gets through to the servicer (which answers NOT_FOUND for a fake id)
        error = _error_of(lambda: stub.Segment(_point("f" * 64), timeout=10,
                                               metadata=(("x-api-key", KEY_PLAIN),)))
        assert error.code() == grpc.StatusCode.NOT_FOUND


def test_tls_is_required_and_mutual_tls_checks_the_client(stack: SecureStack) -> None:
    request = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(stack.decoder.address) as plaintext:  # TLS listener
        error = _error_of(lambda: health_pb2_grpc.HealthStub(plaintext).Check(request,
                                                                                timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    wrong_ca = channels.channel_credentials(stack.pki.other_ca_cert)
    with grpc.secure_channel(f"localhost:{stack.decoder.port}", wrong_ca) as channel:
        error = _error_of(lambda: health_pb2_grpc.HealthStub(channel).Check(request, timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # server cert not trusted
    no_client_cert = channels.channel_credentials(stack.pki.ca_cert)
    with grpc.secure_channel(f"localhost:{stack.encoder.port}", no_client_cert) as channel:
        error = _error_of(lambda: health_pb2_grpc.HealthStub(channel).Check(request, timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # mTLS: no client certificate
    full = channels.channel_credentials(stack.pki.ca_cert, stack.pki.client_cert,
                                        stack.pki.client_key)
    with grpc.secure_channel(f"localhost:{stack.encoder.port}", full) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_tier_answers_health_in_plaintext_on_its_health_port_only(
        stack: SecureStack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.health_port}") as plain:
        reply = health_pb2_grpc.HealthStub(plain).Check(
            health_pb2.HealthCheckRequest(service="sam2.v1.DecoderService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = decoder_pb2_grpc.DecoderServiceStub(plain)
        for metadata in ((), (("x-api-key", KEY_PLAIN),)):  # a key does not open it either
            error = _error_of(lambda m=metadata: stub.Segment(_point("f" * 64), metadata=m,
                                                              timeout=10))
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tenants_get_different_ids_and_cannot_read_each_other(stack: SecureStack) -> None:
    rgb = synthetic_rgb(96, 128, seed=5)
    with stack.client(KEY_A, "tenant-a") as a, stack.client(KEY_B, "tenant-b") as b:
        [ref_a] = a.embed_images(rgb, input_color_format="rgb")
        [ref_b] = b.embed_images(rgb, input_color_format="rgb")
        assert ref_a.embedding_id.startswith("tenant-a:")
        assert ref_b.embedding_id.startswith("tenant-b:")
        assert ref_a.embedding_id.split(":")[1] != ref_b.embedding_id.split(":")[1]
        # each client computes its server-side id locally (no upload on the next segment)
        uploads = a.stats.images_uploaded
        rows, handles = a.segment_prompts(rgb, [Prompt(np.array([[40.0, 30.0]], np.float32),
                                                        np.array([1], np.int32))],
                                          input_color_format="rgb")
        assert a.stats.images_uploaded == uploads and handles[0][0].startswith("tenant-a:")
        # B with A's id: NOT_FOUND, exactly like an id that does not exist
        with pytest.raises(EmbeddingNotFoundError) as caught:
            b.segment_prompts(ref_a.embedding_id, [Prompt(np.array([[40.0, 30.0]], np.float32),
                                                          np.array([1], np.int32))])
        assert caught.value.reason == "EMBEDDING_NOT_FOUND"
        # B cannot refine with A's logits handle either
        prompt = Prompt(np.array([[41.0, 31.0]], np.float32), np.array([1], np.int32))
        request = _point(ref_b.embedding_id)
        request.prompts[0].logits_handle = handles[0][0]
        channel, stub = stack.decoder_stub()
        with channel:
            error = _error_of(lambda: stub.Segment(request, timeout=30,
                                                   metadata=(("x-api-key", KEY_B),)))
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error_from_rpc_error(error).reason == "LOGITS_NOT_FOUND"
            request.prompts[0].ClearField("logits_handle")  # the same request without it works
            assert stub.Segment(request, timeout=30, metadata=(("x-api-key", KEY_B),)).results
        # a caller without a namespace cannot use tenant ids either
        with stack.client(KEY_PLAIN) as plain, pytest.raises(EmbeddingNotFoundError):
            plain.segment_prompts(ref_b.embedding_id, [prompt])


def test_decoder_miss_asks_encoder_over_mtls_in_the_callers_namespace(
        stack: SecureStack) -> None:
    rgb = synthetic_rgb(80, 112, seed=9)
    want_id = embedding.namespaced_content_id(rgb, "sam2.1/hiera_tiny", "tenant-b")
    request = _point(want_id)
    request.image.CopyFrom(wire.image_to_proto(rgb, "rgb"))
    channel, stub = stack.decoder_stub()
    with channel:
        response = stub.Segment(request, timeout=120, metadata=(("x-api-key", KEY_B),))
    assert response.embedding.embedding_id == want_id
    with stack.client(KEY_B, "tenant-b") as b:  # the encoder stored it under B's id
        [ref] = b.embed_images(rgb, input_color_format="rgb")
        assert ref.embedding_id == want_id and ref.already_stored


def test_sessions_per_key_are_limited(stack: SecureStack) -> None:
    channel = grpc.insecure_channel(stack.plain_decoder.address, options=channel_options())
    stub = decoder_pb2_grpc.DecoderServiceStub(channel)
    metadata = (("x-api-key", KEY_A),)
    open_streams = []
    release = threading.Event()
    try:
        for _ in range(2):
            stream = stub.SegmentStream(_idle_requests(release), timeout=60, metadata=metadata)
            open_streams.append(stream)
        time.sleep(0.5)  # let both sessions register
        third = stub.SegmentStream(_idle_requests(release), timeout=30, metadata=metadata)
        error = _error_of(lambda: next(third))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_from_rpc_error(error).reason == "TOO_MANY_SESSIONS"
        assert retry.retry_hint_s(error) == pytest.approx(auth.SESSION_RETRY_DELAY_S)
        # another key has its own budget
        other = stub.SegmentStream(iter([decoder_pb2.SegmentStreamRequest(
            request_id="1", segment=_point("f" * 64))]), timeout=30,
            metadata=(("x-api-key", KEY_B),))
        [reply] = list(other)
        assert reply.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        release.set()
        for stream in open_streams:
            stream.cancel()
        channel.close()
    # closed sessions free the budget again
    with grpc.insecure_channel(stack.plain_decoder.address) as channel2:
        stub2 = decoder_pb2_grpc.DecoderServiceStub(channel2)
        deadline = time.monotonic() + 10
        while True:
            stream = stub2.SegmentStream(iter([decoder_pb2.SegmentStreamRequest(
                request_id="1", segment=_point("f" * 64))]), timeout=30, metadata=metadata)
            try:
                assert len(list(stream)) == 1
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "sessions never released"
                time.sleep(0.2)


def _idle_requests(release: threading.Event):  # noqa: ANN202
    """A request stream that stays open, sending nothing, until ``release`` is set."""
    release.wait(30)
    return
    yield


# ----------------------------------------------------------------------- store over TLS


def test_redis_store_over_tls(tmp_path: Path) -> None:
    """``rediss://`` against redis-server 7 with ``--tls-port`` (Debian builds it with TLS)."""
    import torch

    from sam2_shared.embedding import ImageEmbedding
    from sam2_shared.store import open_store

    pki = make_pki(tmp_path)
    port = free_port()
    binary = find_binary("redis-server", "apt-get install -y --no-install-recommends "
                         "redis-server")
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
         "--tls-ca-cert-file", str(pki.ca_cert), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki.ca_cert}"
        embedding = ImageEmbedding(torch.randn(1, 256, 64, 64),
                                   (torch.randn(1, 32, 256, 256), torch.randn(1, 64, 128, 128)),
                                   (10, 20), "sam2.1/hiera_tiny", "tls-test")
        with open_store(url, storage_dtype="float32") as store:
            store.put_embedding(embedding)
            back = store.get_embedding("tls-test", "sam2.1/hiera_tiny")
            assert back is not None and torch.equal(back.image_embed, embedding.image_embed)
        # plaintext against the TLS port fails as unavailable, not with garbage
        from sam2_shared.store import StoreUnavailableError

        with open_store(f"redis://127.0.0.1:{port}/0") as store, \
                pytest.raises(StoreUnavailableError):
            store.get_embedding("tls-test", "sam2.1/hiera_tiny")
    finally:
        process.terminate()
        process.wait(timeout=10)
