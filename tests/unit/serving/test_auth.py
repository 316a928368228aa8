"""Authentication hardening, without a model: closed by default (no keys, no public listener),
weak and placeholder keys refused, keys revoked when their file is emptied or deleted, the
``sam2_auth_enabled`` gauge, and per-client-address session limits without keys. The
interceptor runs on a real ``grpc.aio`` server on 127.0.0.1 with a fake servicer."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml

from decoder_service.cli import DecoderSettings
from encoder_service import cli as encoder_cli
from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc, tracking_pb2, tracking_pb2_grpc
from sam2_shared.serving import auth
from sam2_shared.serving.auth import ApiKeyRing, AuthInterceptor
from sam2_shared.serving.metrics import Sam2Metrics
from sam2_shared.serving.server import build_server
from sam2_shared.serving.settings import load_settings
from sam2_shared.wire.status import error_from_rpc_error
from tests.helpers import REPO_ROOT
from tests.helpers.fake_servicers import FrameCountingTracking

KEY = secrets.token_urlsafe(32)
OTHER_KEY = secrets.token_urlsafe(32)


# ----------------------------------------------------------------------- closed by default


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    auth.check_listener_auth(host, None, allow_unauthenticated=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.7", "fe80::1",
                                  "sam2.example.org"])
def test_a_reachable_host_without_keys_is_refused(host: str) -> None:
    with pytest.raises(ValueError) as caught:
        auth.check_listener_auth(host, None, allow_unauthenticated=False)
    message = str(caught.value)
    assert "--allow-unauthenticated" in message and "SAM2_ALLOW_UNAUTHENTICATED" in message
    assert "--api-keys-file" in message and host in message
    auth.check_listener_auth(host, "/etc/sam2/api-keys", allow_unauthenticated=False)
    auth.check_listener_auth(host, None, allow_unauthenticated=True)


def test_the_tier_exits_before_opening_a_port(caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAM2_API_KEYS_FILE", "SAM2_ALLOW_UNAUTHENTICATED", "SAM2_HOST"):
        monkeypatch.delenv(name, raising=False)
    # serve() would open the store and the port; it must not even be reached
    monkeypatch.setattr(encoder_cli, "serve", lambda *_: pytest.fail("serve() was called"))
    with caplog.at_level(logging.ERROR):
        code = encoder_cli.main(["--host", "0.0.0.0", "--port", "0", "--metrics-port", "0"])
    assert code == 1
    assert "--allow-unauthenticated" in caplog.text


def test_a_placeholder_key_stops_the_tier_with_how_to_make_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("change-me-long-random-api-key\n")
    monkeypatch.setattr(encoder_cli, "serve", lambda *_: pytest.fail("serve() was called"))
    with caplog.at_level(logging.ERROR):
        code = encoder_cli.main(["--api-keys-file", str(keys), "--port", "0",
                                 "--metrics-port", "0"])
    assert code == 1
    assert "placeholder" in caplog.text and "secrets.token_urlsafe(32)" in caplog.text


def test_allow_unauthenticated_has_an_env_twin() -> None:
    env = {"SAM2_ALLOW_UNAUTHENTICATED": "true"}
    assert load_settings(DecoderSettings, [], env=env).allow_unauthenticated is True
    assert load_settings(DecoderSettings, ["--allow-unauthenticated"],
                         env={}).allow_unauthenticated is True
    assert load_settings(DecoderSettings, [], env={}).allow_unauthenticated is False


# ----------------------------------------------------------------------- weak keys


@pytest.mark.parametrize("key", [
    "change-me-long-random-api-key",  # the shipped placeholder
    "my-changeme-key-0123456789",
    "PLACEHOLDER-9f8e7d6c5b4a3210",
    "a" * 40,
    "tenant-a-" + "a" * 24,
    "abababababababababababab",
    "short-Key-1",
])
def test_weak_and_placeholder_keys_are_refused(key: str, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{key} tenant\n")
    with pytest.raises(ValueError, match="secrets.token_urlsafe"):
        auth.load_api_keys(path)


def test_random_keys_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    keys = [secrets.token_urlsafe(32), secrets.token_hex(16), secrets.token_urlsafe(16)]
    path.write_text("".join(f"{key}\n" for key in keys))
    assert [k.key for k in auth.load_api_keys(path)] == keys


def test_the_committed_secret_placeholder_is_refused(tmp_path: Path) -> None:
    """k8s/base/secret.yaml's sam2-api-keys, mounted as Kubernetes would (one file per entry),
    does not start a tier: whoever deploys must put a real key there first."""
    docs = yaml.safe_load_all((REPO_ROOT / "k8s" / "base" / "secret.yaml").read_text())
    [secret] = [d for d in docs if d["metadata"]["name"] == "sam2-api-keys"]
    mounted = tmp_path / "api-keys"
    mounted.mkdir()
    for name, value in secret["stringData"].items():
        (mounted / name).write_text(value)
    with pytest.raises(ValueError) as caught:
        auth.load_api_keys(mounted)
    assert "placeholder" in str(caught.value) and "secrets.token_urlsafe" in str(caught.value)


# ----------------------------------------------------------------------- revocation


def test_emptying_or_deleting_the_key_file_revokes_every_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n{OTHER_KEY} tenant-b\n")
    ring = ApiKeyRing(path=path, reload_interval_s=0)
    assert ring.match(KEY) is not None

    def touch(seconds: float) -> None:  # a new mtime even within the filesystem's resolution
        os.utime(path, (time.time() + seconds, time.time() + seconds))

    path.write_text("")
    touch(1)
    assert ring.match(KEY) is None and ring.match(OTHER_KEY) is None and len(ring) == 0
    path.write_text(f"{OTHER_KEY} tenant-b\n")  # fixed: the keys in the file work again
    touch(2)
    assert ring.match(OTHER_KEY).namespace == "tenant-b" and ring.match(KEY) is None
    path.unlink()
    assert ring.match(OTHER_KEY) is None
    path.write_text(f"{KEY}\n")
    assert ring.match(KEY) is not None
    path.write_text(f"{KEY}\n{'b' * 30}\n")  # a broken file is not half-used
    touch(3)
    assert ring.match(KEY) is None
    assert ring.reloads >= 5


class FakeDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    """Segment answers at once; SegmentStream stays open until the client closes it."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.open_streams = 0

    async def Segment(self, request, context):  # type: ignore[no-untyped-def]
        return decoder_pb2.SegmentResponse()

    async def SegmentStream(self, request_iterator, context  # type: ignore[no-untyped-def]
                            ) -> AsyncIterator[decoder_pb2.SegmentStreamResponse]:
        self.peers.append(context.peer())
        self.open_streams += 1
        try:
            async for message in request_iterator:
                yield decoder_pb2.SegmentStreamResponse(request_id=message.request_id)
        finally:
            self.open_streams -= 1


async def _serve(interceptor: AuthInterceptor, fake: FakeDecoder,  # noqa: ANN202
                 tracking: FrameCountingTracking | None = None, **kwargs):
    server, port = build_server(
        [lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(fake, s),
         lambda s: tracking_pb2_grpc.add_TrackingServiceServicer_to_server(
             tracking or FrameCountingTracking(), s)],
        ["sam2.v1.DecoderService", "sam2.v1.TrackingService"], port=0, host="127.0.0.1",
        grace_s=0, interceptors=[interceptor], **kwargs)
    await server.start()
    await server.mark_serving()
    return server, f"127.0.0.1:{port}"


def test_a_running_server_refuses_every_key_once_the_file_is_gone(tmp_path: Path) -> None:
    secret = tmp_path / "api-keys"  # a mounted Secret: one file per key
    secret.mkdir()
    (secret / "default").write_text(KEY + "\n")
    interceptor = AuthInterceptor(ApiKeyRing(path=secret, reload_interval_s=0))

    async def main() -> list[str]:
        server, address = await _serve(interceptor, FakeDecoder())
        outcomes = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = decoder_pb2_grpc.DecoderServiceStub(channel)

                async def call() -> str:
                    try:
                        await stub.Segment(decoder_pb2.SegmentRequest(), timeout=5,
                                           metadata=(("x-api-key", KEY),))
                        return "OK"
                    except grpc.aio.AioRpcError as exc:
                        return f"{exc.code().name} {error_from_rpc_error(exc).reason}"

                outcomes.append(await call())
                (secret / "default").unlink()  # the Secret's last entry deleted
                # File times tick coarsely (a few ms here): a deletion in the same tick as the
                # write leaves the directory's mtime as it was, so move it visibly (as a
                # Secret update, minutes apart, does).
                moved = time.time() + 2
                os.utime(secret, (moved, moved))
                outcomes.append(await call())
                (secret / "default").write_text(KEY + "\n")
                outcomes.append(await call())
                (secret / "default").write_text("")  # emptied
                later = time.time() + 5
                os.utime(secret / "default", (later, later))
                outcomes.append(await call())
        finally:
            await server.stop(0)
        return outcomes

    assert asyncio.run(main()) == ["OK", "UNAUTHENTICATED API_KEY_INVALID", "OK",
                                   "UNAUTHENTICATED API_KEY_INVALID"]


# ----------------------------------------------------------------------- metrics


def test_auth_enabled_gauge() -> None:
    def gauge(interceptor: AuthInterceptor) -> float | None:
        metrics = Sam2Metrics(process_collectors=False)
        metrics.watch_auth(interceptor)
        return metrics.registry.get_sample_value("sam2_auth_enabled")

    assert gauge(AuthInterceptor(None)) == 0
    assert gauge(AuthInterceptor(ApiKeyRing([auth.ApiKey(KEY)]))) == 1


# ----------------------------------------------------------------------- sessions per address


@pytest.mark.parametrize(("peer", "address"), [
    ("ipv4:127.0.0.1:54321", "ipv4:127.0.0.1"),
    ("ipv6:[::1]:54321", "ipv6:[::1]"),
    ("ipv6:%5B2001:db8::7%5D:443", "ipv6:[2001:db8::7]"),
    ("unix:/run/sam2.sock", "unix:/run/sam2.sock"),
])
def test_peer_address_drops_the_port(peer: str, address: str) -> None:
    assert auth.peer_address(peer) == address


def test_connections_from_one_address_share_the_session_limit() -> None:
    """Without keys the limit is per client address: a second connection (another source
    port) from the same host does not get a budget of its own."""
    fake = FakeDecoder()
    interceptor = AuthInterceptor(None, max_streams_per_key=1)

    async def main() -> str:
        server, address = await _serve(interceptor, fake)
        # separate subchannel pools: two TCP connections, two source ports
        own = [("grpc.use_local_subchannel_pool", 1)]
        first_channel = grpc.aio.insecure_channel(address, options=own)
        second_channel = grpc.aio.insecure_channel(address, options=own)
        try:
            first = decoder_pb2_grpc.DecoderServiceStub(first_channel).SegmentStream(timeout=10)
            await first.write(decoder_pb2.SegmentStreamRequest(request_id="1"))
            assert (await first.read()).request_id == "1"
            second = decoder_pb2_grpc.DecoderServiceStub(second_channel).SegmentStream(
                timeout=10)
            try:  # nothing written: a write racing the refusal fails on the client (INTERNAL)
                await second.read()
                outcome = "second stream served"
            except grpc.aio.AioRpcError as exc:
                outcome = f"{exc.code().name} {error_from_rpc_error(exc).reason}"
            await first.done_writing()
            await first.read()  # the end of the first stream frees the slot...
            third = decoder_pb2_grpc.DecoderServiceStub(second_channel).SegmentStream(
                timeout=10)
            await third.write(decoder_pb2.SegmentStreamRequest(request_id="3"))
            assert (await third.read()).request_id == "3"  # ...for any connection
            await third.done_writing()
        finally:
            await first_channel.close()
            await second_channel.close()
            await server.stop(0)
        return outcome

    assert asyncio.run(main()) == "RESOURCE_EXHAUSTED TOO_MANY_SESSIONS"
    assert len(fake.peers) == 2 and fake.peers[0] != fake.peers[1]  # two source ports
    assert {auth.peer_address(p) for p in fake.peers} == {"ipv4:127.0.0.1"}


def test_client_streaming_uploads_count_against_the_session_limit() -> None:
    """An open StartSessionFromFrames upload holds one of its key's stream slots (the same
    budget as SegmentStream): one more stream of that key is refused until it ends; another
    key has its own budget."""
    tracking = FrameCountingTracking()
    interceptor = AuthInterceptor(ApiKeyRing([auth.ApiKey(KEY), auth.ApiKey(OTHER_KEY)]),
                                  max_streams_per_key=1)
    frame = tracking_pb2.StartSessionFromFramesRequest(model_id="m")

    async def main() -> list[str]:
        server, address = await _serve(interceptor, FakeDecoder(), tracking)
        outcomes = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                tracker = tracking_pb2_grpc.TrackingServiceStub(channel)
                decoder = decoder_pb2_grpc.DecoderServiceStub(channel)

                def outcome(exc: grpc.aio.AioRpcError) -> str:
                    return f"{exc.code().name} {error_from_rpc_error(exc).reason}"

                async def refused(key: str) -> str:
                    """Open an upload and wait for its answer, writing nothing: a write racing
                    the refusal would fail on the client (INTERNAL), not with its status."""
                    try:
                        await tracker.StartSessionFromFrames(timeout=10,
                                                             metadata=(("x-api-key", key),))
                        return "served"
                    except grpc.aio.AioRpcError as exc:
                        return outcome(exc)

                async def upload(key: str) -> str:
                    call = tracker.StartSessionFromFrames(timeout=10,
                                                          metadata=(("x-api-key", key),))
                    await call.write(frame)
                    await call.done_writing()
                    return f"OK {(await call).frame_count}"

                held = tracker.StartSessionFromFrames(timeout=10, metadata=(("x-api-key", KEY),))
                await held.write(frame)
                await tracking.receiving.wait()  # the upload holds KEY's one slot
                outcomes.append(await refused(KEY))
                segment = decoder.SegmentStream(timeout=10, metadata=(("x-api-key", KEY),))
                try:
                    await segment.read()
                    outcomes.append("SegmentStream served")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(outcome(exc))
                outcomes.append(await upload(OTHER_KEY))
                await held.write(frame)
                await held.done_writing()
                outcomes.append(f"OK {(await held).frame_count}")  # the end frees the slot
                outcomes.append(await upload(KEY))
        finally:
            await server.stop(0)
        return outcomes

    assert asyncio.run(main()) == [
        "RESOURCE_EXHAUSTED TOO_MANY_SESSIONS", "RESOURCE_EXHAUSTED TOO_MANY_SESSIONS",
        "OK 1", "OK 2", "OK 1"]
    assert interceptor.stats.sessions_refused == 2
