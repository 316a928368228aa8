"""VideoSession semantics: bounded state, serialisation, bad input.

Runs the real decoder, memory encoder and memory-bank logic of sam2.1/hiera_tiny (random
official-format weights) on synthetic frame embeddings (no Hiera). Memory attention, the
expensive part (seconds per frame on CPU) whose numerics the parity test covers, is
replaced by a cheap stand-in that still depends on every memory and pointer token, so
bank bookkeeping mistakes change the masks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import CorruptEntryError, InvalidInputError
from sam2_shared.inference.video import FrameSource, Sam2VideoModel, VideoSession
from sam2_shared.store import codec

TRACKING = {"frame_ids": [], "revision": 1}


def to_bytes(session: VideoSession) -> bytes:
    """A session as the store writes it (one codec entry)."""
    return codec.encode_session(*session.to_state(), TRACKING)


def from_bytes(model: Sam2VideoModel, video: list, data: bytes) -> VideoSession:
    state, tensors, tracking = codec.decode_session(data)
    assert tracking == TRACKING
    return VideoSession.from_state(model, video, state, tensors)

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH = 60, 80


def frame_embedding(index: int) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(1000 + index)
    return ImageEmbedding(
        image_embed=torch.randn(1, 256, 64, 64, generator=generator),
        high_res_feats=(
            torch.randn(1, 32, 256, 256, generator=generator),
            torch.randn(1, 64, 128, 128, generator=generator),
        ),
        original_hw=(HEIGHT, WIDTH),
        model_id=MODEL_ID,
        embedding_id=f"frame-{index}",
    )


def frames(num_frames: int) -> FrameSource:
    return FrameSource(num_frames, (HEIGHT, WIDTH), frame_embedding)


def cheap_memory_attention(
    curr: torch.Tensor,
    curr_pos: torch.Tensor,
    memory: torch.Tensor,
    memory_pos: torch.Tensor,
    num_obj_ptr_tokens: int = 0,
) -> torch.Tensor:
    summary = (memory + memory_pos).mean(dim=1, keepdim=True)  # [B, 1, 64]
    return curr + 0.1 * curr_pos + summary.repeat(1, 1, curr.shape[-1] // summary.shape[-1])


@pytest.fixture(scope="module")
def model(
    random_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Sam2VideoModel:
    # Random weights judge every object absent (score ~ -0.35, masks all -1024); shift the
    # object-score bias so that objects are present and masks depend on the memories.
    blob = torch.load(random_checkpoint(MODEL_ID), map_location="cpu", weights_only=True)
    blob["model"]["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] += 1.0
    path = tmp_path_factory.mktemp("video") / "present.pt"
    torch.save(blob, path)
    loaded = Sam2VideoModel.from_pretrained(MODEL_ID, checkpoint=str(path), with_encoder=False)
    loaded.tracker.memory_attention.forward = cheap_memory_attention
    return loaded


def click(session: VideoSession, frame_idx: int = 0, obj_id: int = 1) -> None:
    session.add_points(frame_idx, obj_id, points=[[40.0, 30.0]], labels=[1])


def test_state_is_bounded(model: Sam2VideoModel) -> None:
    """One object over 20 frames: the state after 20 tracked frames is no larger than after
    10 (conditioning frames + 6 memories + a fixed 15-slot pointer ring per object)."""
    session = model.start_session(frames(20))
    click(session, 0, obj_id=1)
    start = time.perf_counter()
    seen = [result.frame_idx for result in session.propagate(max_frames=9)]
    assert seen == list(range(10))
    after_10 = {obj_id: session.state_nbytes(obj_id) for obj_id in session.obj_ids}
    seen = [result.frame_idx for result in session.propagate(start_frame_idx=10)]
    assert seen == list(range(10, 20))
    after_20 = {obj_id: session.state_nbytes(obj_id) for obj_id in session.obj_ids}
    elapsed = time.perf_counter() - start
    print(f"\n[video state] bytes per object after 10 frames {after_10}, after 20 {after_20}; "
          f"20 frames in {elapsed:.1f} s (stand-in memory attention)")
    assert after_20 == after_10
    assert session.state_nbytes() == sum(after_20.values())
    for obj_id in session.obj_ids:
        obj = session._objects[obj_id]
        assert len(obj.non_cond) <= 6 and len(obj.cond) == 1
        assert all(out.maskmem_features is not None for out in obj.non_cond.values())
        assert sorted(obj.non_cond) == list(range(14, 20))
        ring = sorted(int(f) for f in obj.ring_frames if f >= 0)
        assert ring == list(range(5, 14))
        # One full memory entry: bf16 memory + fp32 low-res logits + pointer + score.
        full = 64 * 64 * 64 * 2 + 256 * 256 * 4 + 256 * 4 + 4
        assert after_20[obj_id] < 8 * full


def test_serialisation_round_trip_gives_identical_masks(model: Sam2VideoModel) -> None:
    session = model.start_session(frames(9))
    click(session, 1, obj_id=5)
    session.add_points(3, 7, points=[[20.0, 20.0], [60.0, 50.0]], labels=[1, 0])
    for _ in session.propagate(max_frames=4):
        pass
    blob = to_bytes(session)
    assert len(blob) >= session.state_nbytes()
    restored = from_bytes(model, frames(9), blob)
    assert restored.obj_ids == session.obj_ids == [5, 7]
    assert restored.state_nbytes() == session.state_nbytes()
    assert to_bytes(restored) == blob

    # Continue both: forward to the end, then a correction click, then backward.
    originals = list(session.propagate(start_frame_idx=6))
    continued = list(restored.propagate(start_frame_idx=6))
    originals.append(session.add_points(7, 5, points=[[10.0, 10.0]], labels=[0],
                                        clear_old_points=False))
    continued.append(restored.add_points(7, 5, points=[[10.0, 10.0]], labels=[0],
                                         clear_old_points=False))
    originals += list(session.propagate(start_frame_idx=8, reverse=True, max_frames=2))
    continued += list(restored.propagate(start_frame_idx=8, reverse=True, max_frames=2))
    assert [r.frame_idx for r in originals] == [r.frame_idx for r in continued]
    assert len(originals) == 3 + 1 + 3
    for a, b in zip(originals, continued):
        assert a.obj_ids == b.obj_ids
        assert np.array_equal(a.logits, b.logits)
        assert np.array_equal(a.object_score_logits, b.object_score_logits)
    # The masks are not trivially constant: tracking depends on the restored memories.
    assert len({float(np.abs(r.low_res_logits).sum()) for r in originals}) > 3


def test_serialised_session_is_checked(model: Sam2VideoModel) -> None:
    session = model.start_session(frames(4))
    click(session)
    blob = bytearray(to_bytes(session))
    corrupted = bytearray(blob)
    corrupted[-10] ^= 0xFF
    with pytest.raises(CorruptEntryError, match="payload checksum"):
        from_bytes(model, frames(4), bytes(corrupted))
    with pytest.raises(CorruptEntryError, match="magic"):
        from_bytes(model, frames(4), b"NOTVIDEO" + bytes(blob[8:]))
    with pytest.raises(CorruptEntryError, match="payload is"):
        from_bytes(model, frames(4), bytes(blob[:-1]))
    future = bytearray(blob)
    future[8] = 99  # format version
    with pytest.raises(CorruptEntryError, match="format version 99"):
        from_bytes(model, frames(4), bytes(future))
    with pytest.raises(InvalidInputError, match="4 frames"):
        from_bytes(model, frames(5), bytes(blob))
    # state that names a tensor the entry does not hold is corrupt, not a crash
    state, tensors = session.to_state()
    tensors = dict(tensors)
    tensors.pop("t0")
    with pytest.raises(CorruptEntryError, match="does not fit"):
        VideoSession.from_state(model, frames(4), state, tensors)


def test_prompts_objects_and_outputs(model: Sam2VideoModel) -> None:
    session = model.start_session(frames(6))
    first = session.add_points(2, 3, points=[[40.0, 30.0]], labels=[1])
    assert first.frame_idx == 2 and first.obj_ids == [3]
    assert first.logits.shape == (1, HEIGHT, WIDTH) and first.logits.dtype == np.float32
    assert first.low_res_logits.shape == (1, 256, 256)
    frame_idx, obj_ids, logits, scores = first  # unpacks like Meta's tuples
    assert np.array_equal(first.masks, logits > 0) and scores.shape == (1,)

    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[10:40, 20:60] = True
    with_mask = session.add_mask(4, 8, mask)
    assert with_mask.obj_ids == [3, 8]
    # Mask prompts are taken as output: logits +-10 inside / outside (up to resampling).
    assert with_mask.logits[1][mask].min() > 0 and with_mask.logits[1][~mask].max() < 0
    assert with_mask.object_score_logits[1] == pytest.approx(10.0)
    # Object 3 has no output on frame 4 yet: filled with -1024.
    assert (with_mask.logits[0] == -1024.0).all()

    results = list(session.propagate(start_frame_idx=2))
    assert [r.frame_idx for r in results] == [2, 3, 4, 5]
    reverse = list(session.propagate(start_frame_idx=2, reverse=True))
    assert [r.frame_idx for r in reverse] == [2, 1, 0]
    assert list(session.propagate(start_frame_idx=0, reverse=True)) == []

    remaining, updated = session.remove_object(3)
    assert remaining == [8] and [r.frame_idx for r in updated] == [2]
    assert updated[0].obj_ids == [8]
    assert session.obj_ids == [8]
    session.reset()
    assert session.obj_ids == [] and session.state_nbytes() == 0


def test_bad_input(model: Sam2VideoModel) -> None:
    session = model.start_session(frames(5))
    with pytest.raises(InvalidInputError, match="no objects"):
        session.propagate()
    with pytest.raises(InvalidInputError, match="empty prompt"):
        session.add_points(0, 1)
    with pytest.raises(InvalidInputError, match="empty prompt"):
        session.add_points(0, 1, points=np.zeros((0, 2)), labels=np.zeros(0))
    with pytest.raises(InvalidInputError, match="together"):
        session.add_points(0, 1, points=[[1.0, 2.0]])
    with pytest.raises(InvalidInputError, match="labels"):
        session.add_points(0, 1, points=[[1.0, 2.0]], labels=[5])
    with pytest.raises(InvalidInputError, match="box"):
        session.add_points(0, 1, box=[10.0, 10.0, 5.0, 20.0])
    with pytest.raises(InvalidInputError, match="finite"):
        session.add_points(0, 1, points=[[np.nan, 2.0]], labels=[1])
    for frame_idx in (5, -1):
        with pytest.raises(InvalidInputError, match="out of range") as info:
            session.add_points(frame_idx, 1, points=[[1.0, 2.0]], labels=[1])
        assert info.value.reason == "FRAME_OUT_OF_RANGE"
    with pytest.raises(InvalidInputError, match="integer"):
        session.add_points(1.5, 1, points=[[1.0, 2.0]], labels=[1])
    with pytest.raises(InvalidInputError, match="HxW"):
        session.add_mask(0, 1, np.zeros((4, 4, 3), bool))
    assert session.obj_ids == []  # failed prompts create no object

    click(session, 0, obj_id=1)
    for call in (
        lambda: session.remove_object(2),
        lambda: session.clear_prompts(0, 2),
        lambda: session.state_nbytes(2),
    ):
        with pytest.raises(InvalidInputError, match="not in this session") as info:
            call()
        assert info.value.reason == "UNKNOWN_OBJECT"
    with pytest.raises(InvalidInputError, match="out of range"):
        session.propagate(start_frame_idx=9)
    with pytest.raises(InvalidInputError, match="max_frames"):
        session.propagate(max_frames=-1)
    # An object whose only prompt was cleared cannot be tracked.
    session.clear_prompts(0, 1)
    with pytest.raises(InvalidInputError, match="no prompts"):
        session.propagate()
    with pytest.raises(InvalidInputError, match="same size"):
        FrameSource.from_embeddings([frame_embedding(0), _resized(frame_embedding(1))])


def _resized(embedding: ImageEmbedding) -> ImageEmbedding:
    embedding.original_hw = (HEIGHT + 1, WIDTH)
    return embedding


def test_objects_are_tracked_in_batches_like_one_by_one(
    model: Sam2VideoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects whose memories have the same layout share one pass per frame (objects 1-3,
    prompted on frame 0); object 4, prompted on frame 2, has its own. The masks equal
    tracking every object alone."""
    from sam2_shared.inference.video import session as session_module

    batch_sizes: list[int] = []
    track_objects = model.tracker.track_objects

    def counted(*args, **kwargs):
        batch_sizes.append(len(args[4]))
        return track_objects(*args, **kwargs)

    monkeypatch.setattr(model.tracker, "track_objects", counted)

    def run(per_pass: int) -> list:
        monkeypatch.setattr(session_module, "MAX_OBJECTS_PER_PASS", per_pass)
        session = model.start_session(frames(5))
        for obj_id, (x, y) in enumerate([(40.0, 30.0), (10.0, 10.0), (70.0, 50.0)], start=1):
            session.add_points(0, obj_id, points=[[x, y]], labels=[1])
        session.add_points(2, 4, box=[5.0, 5.0, 30.0, 40.0])
        return list(session.propagate())

    alone = run(1)
    assert set(batch_sizes) == {1}
    batch_sizes.clear()
    batched = run(8)
    # Frame 0: object 4 only (1-3 are prompted there); frame 2: objects 1-3; elsewhere two
    # passes: objects 1-3 together and object 4.
    assert sorted(batch_sizes) == sorted([1, 3, 3, 1, 3, 1, 3, 1])
    for one, many in zip(alone, batched, strict=True):
        assert one.obj_ids == many.obj_ids == [1, 2, 3, 4]
        np.testing.assert_allclose(many.logits, one.logits, atol=1e-4)
        np.testing.assert_allclose(many.object_score_logits, one.object_score_logits,
                                   atol=1e-5)
        assert np.mean(many.masks != one.masks) < 1e-4
    assert any(f.masks[3].any() for f in batched)  # object 4's masks are not empty
