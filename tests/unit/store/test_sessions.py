"""Tracking sessions as store entries: one codec entry per session (per-tensor dtypes kept),
a revision next to it, both verified on the way back; damage is a miss, never a crash."""

from __future__ import annotations

import torch

from sam2_shared.store import codec, open_store

STATE = {"model_id": "sam2.1/hiera_tiny", "num_frames": 3, "video_hw": [4, 5], "objects": []}
TRACKING = {"model_id": "sam2.1/hiera_tiny", "frame_ids": ["a", "b", "c"], "video_hw": [4, 5]}


def tensors() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("t0", torch.randn(2, 3, generator=generator)),
        ("t1", torch.randn(4, generator=generator).to(torch.bfloat16)),
        ("t2", torch.arange(6, dtype=torch.int32).reshape(2, 3)),
        ("t3", torch.tensor(1.5)),  # 0-d
    ]


def test_session_round_trip_keeps_values_and_dtypes() -> None:
    store = open_store("memory://")
    for revision in (1, 2, 3):
        store.put_session("ns:s1", STATE, tensors(), TRACKING, revision=revision, ttl_s=60)
    assert store.session_revision("ns:s1") == 3
    state, back, tracking = store.get_session("ns:s1")
    assert state == STATE and tracking == {**TRACKING, "session_id": "ns:s1", "revision": 3}
    assert len(store.blobs._entries) == 2  # the pointer and the current state only
    for name, tensor in tensors():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert store.stats.hits == 1
    store.delete_session("ns:s1")
    assert store.get_session("ns:s1") is None and store.session_revision("ns:s1") is None


def test_damaged_session_or_revision_is_a_miss() -> None:
    store = open_store("memory://")
    store.put_session("s2", STATE, tensors(), TRACKING, revision=1, ttl_s=60)
    key = store.session_key("s2", store.blobs.get("session-rev/s2").decode())
    data = bytearray(store.blobs.get(key))
    data[-3] ^= 0xFF
    store.blobs.put(key, bytes(data))
    assert store.get_session("s2") is None
    assert store.stats.corrupt == 1 and store.blobs.get(key) is None  # deleted
    store.blobs.put("session-rev/s2", b"12; DROP")
    assert store.session_revision("s2") is None


def test_an_embedding_entry_is_not_a_session() -> None:
    entry = codec.encode_logits(torch.zeros(1, 256, 256).numpy())
    store = open_store("memory://")
    store.blobs.put("session-rev/s3", b"1.abc")
    store.blobs.put(store.session_key("s3", "1.abc"), entry)
    assert store.get_session("s3") is None and store.stats.corrupt == 1


def test_sizes_read_back_are_checked_against_the_limit() -> None:
    store = open_store("memory://", max_image_pixels=10)  # the session claims 4x5 = 20
    store.put_session("s4", STATE, tensors(), TRACKING, revision=1, ttl_s=60)
    assert store.get_session("s4") is None and store.stats.corrupt == 1
    roomy = open_store("memory://", max_image_pixels=20)
    roomy.put_session("s5", STATE, tensors(), TRACKING, revision=1, ttl_s=60)
    assert roomy.get_session("s5") is not None
    lying = open_store("memory://")
    lying.put_session("s6", STATE, tensors(), {**TRACKING, "video_hw": [400, 500]}, revision=1,
                      ttl_s=60)
    assert lying.get_session("s6") is None  # the two sizes disagree


def test_a_session_entry_copied_under_another_id_is_refused() -> None:
    store = open_store("memory://")
    store.put_session("mine", STATE, tensors(), TRACKING, revision=1, ttl_s=60)
    store.put_session("theirs", STATE, tensors(), TRACKING, revision=1, ttl_s=60)
    pointer = store.blobs.get("session-rev/theirs").decode()
    mine = store.blobs.get(store.session_key("mine", store.blobs.get("session-rev/mine").decode()))
    store.blobs.put(store.session_key("theirs", pointer), mine)  # same revision, other id
    assert store.get_session("theirs") is None and store.stats.corrupt == 1
