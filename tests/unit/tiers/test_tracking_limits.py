"""The tracker never makes a caller wait for a busy session (a propagation holds it for its
whole run): a second call is refused at once with SESSION_BUSY, so worker threads cannot pile
up behind one session; and a session tracks a bounded number of objects."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from decoder_service.tracking import Tracker
from sam2_shared.embedding import scope_id
from sam2_shared.errors import (
    InvalidInputError,
    ResourceExhaustedError,
    SessionBusyError,
    SessionNotFoundError,
)
from sam2_shared.inference.video import Sam2VideoModel
from sam2_shared.store import open_store
from tests.helpers.synthetic_images import synthetic_rgb
from tests.unit.tiers.test_video_upload import video_bytes


@pytest.fixture(scope="module")
def video(tiny_checkpoint: Path) -> tuple[Tracker, list[str]]:
    """A tracker (at most 2 objects per session) and three stored frames."""
    model = Sam2VideoModel.from_pretrained("sam2.1/hiera_tiny", tiny_checkpoint)
    store = open_store("memory://")
    frames = model.embed_frames([synthetic_rgb(64, 80, seed=s) for s in range(3)])
    for embedding in frames:
        store.put_embedding(embedding)
    return (Tracker(model, store, max_objects=2, max_prompted_frames=2),
            [e.embedding_id for e in frames])


def click(tracker: Tracker, session_id: str, obj_id: int, frame_idx: int = 0) -> None:
    tracker.add_prompt(session_id, frame_idx, obj_id, points=np.array([[20.0, 20.0]]),
                       labels=np.array([1]))


def test_a_busy_session_answers_at_once(video: tuple[Tracker, list[str]]) -> None:
    tracker, frame_ids = video
    session_id, _, _ = tracker.start("sam2.1/hiera_tiny", frame_ids)
    click(tracker, session_id, 1)
    propagation = tracker.propagate(session_id)  # holds the session
    outcome: list[BaseException | None] = []

    def second_caller() -> None:
        try:
            click(tracker, session_id, 1)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=second_caller)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the second call waited for the busy session"
    assert time.monotonic() - started < 2
    assert isinstance(outcome[0], SessionBusyError) and outcome[0].reason == "SESSION_BUSY"
    propagation.close()
    click(tracker, session_id, 1)  # free again once the propagation is closed


def test_objects_per_session_are_bounded(video: tuple[Tracker, list[str]]) -> None:
    tracker, frame_ids = video
    session_id, _, _ = tracker.start("sam2.1/hiera_tiny", frame_ids)
    click(tracker, session_id, 1)
    click(tracker, session_id, 2)
    with pytest.raises(InvalidInputError, match="already tracks 2 objects"):
        click(tracker, session_id, 3)
    click(tracker, session_id, 2)  # a known object may always be prompted again


def test_prompted_frames_per_object_are_bounded(video: tuple[Tracker, list[str]]) -> None:
    tracker, frame_ids = video
    session_id, _, _ = tracker.start("sam2.1/hiera_tiny", frame_ids)
    click(tracker, session_id, 1, frame_idx=0)
    tracker.add_prompt(session_id, 1, 1, mask=np.ones((64, 80), dtype=bool))  # a mask counts
    with pytest.raises(InvalidInputError, match="prompts on 2 frames") as caught:
        click(tracker, session_id, 1, frame_idx=2)
    assert caught.value.metadata["limit"] == "2"
    click(tracker, session_id, 1, frame_idx=0)  # refining a prompted frame is always allowed
    click(tracker, session_id, 2, frame_idx=2)  # the bound is per object


def test_video_size_looks_the_session_up(video: tuple[Tracker, list[str]]) -> None:
    tracker, frame_ids = video
    session_id, _, _ = tracker.start("sam2.1/hiera_tiny", frame_ids)
    assert tracker.video_size(session_id) == (64, 80)
    with pytest.raises(SessionNotFoundError):
        tracker.video_size(session_id + "x")


def test_a_stored_session_naming_another_tenants_frames_is_refused(
    video: tuple[Tracker, list[str]],
) -> None:
    # Someone with write access to the store saves a session in tenant a's namespace that
    # points at tenant b's frames; tenant a's calls must not read them through it.
    tracker, frame_ids = video
    session_id, _, _ = tracker.start("sam2.1/hiera_tiny", frame_ids)
    state, tensors, tracking = tracker.store.get_session(session_id)
    forged_id = scope_id("a", "forged")
    foreign = [scope_id("b", frame_id) for frame_id in frame_ids]
    tracker.store.put_session(forged_id, state, sorted(tensors.items()),
                              {**tracking, "frame_ids": foreign}, 1, 60)
    refused = tracker.sessions_refused
    with pytest.raises(SessionNotFoundError):
        tracker.add_prompt(forged_id, 0, 1, points=np.array([[20.0, 20.0]]),
                           labels=np.array([1]), namespace="a")
    assert tracker.sessions_refused == refused + 1


def test_live_sessions_fit_the_memory_budget(video: tuple[Tracker, list[str]]) -> None:
    """Each session holds one 16 MiB frame (float32 features) after a prompt: with a 40 MiB
    budget the third session pushes the least recently used idle one out of memory; it
    reloads from the store on its next call. A session that alone exceeds the budget is
    refused for prompts (RESOURCE_EXHAUSTED, naming the numbers) but can still be reset."""
    shared, frame_ids = video
    tracker = Tracker(shared.model, shared.store, memory_budget_bytes=40 * 1024 * 1024)
    first, second, third = (tracker.start("sam2.1/hiera_tiny", frame_ids)[0] for _ in range(3))
    for session_id in (first, second, third):
        click(tracker, session_id, 1)
    assert tracker.live_session_count() == 2 and tracker.sessions_evicted == 1
    assert 32 * 1024 * 1024 <= tracker.held_bytes() <= tracker.memory_budget_bytes
    click(tracker, first, 1)  # back from the store, pushing out the next least recent
    assert tracker.sessions_loaded == 1 and tracker.sessions_evicted == 2
    assert tracker.held_bytes() <= tracker.memory_budget_bytes

    small = Tracker(shared.model, shared.store, memory_budget_bytes=10 * 1024 * 1024)
    session_id, _, _ = small.start("sam2.1/hiera_tiny", frame_ids)
    click(small, session_id, 1)  # checked before the call: it held nothing yet
    with pytest.raises(ResourceExhaustedError, match=r"holds 16\.\d MiB.*budget of 10 MiB"):
        click(small, session_id, 1)
    small.reset(session_id)
    assert shared.store.session_revision(second) == shared.store.session_revision(third) == 2


def test_uploads_of_expired_sessions_are_forgotten(video: tuple[Tracker, list[str]],
                                                    tmp_path: Path) -> None:
    """A long-running decoder must not keep an upload per video session forever: when a new
    upload registers, those whose session expired (not closed) are dropped, and one still
    embedding is failed, which stops it; a live session's running upload stays."""
    shared, _ = video
    # A TTL that a loaded 2-core CI machine's pauses stay well inside (0.3 s did not).
    tracker = Tracker(shared.model, open_store("memory://"), session_ttl_s=3.0)
    data = video_bytes(tmp_path, 2)
    uploads = []
    for _ in range(3):
        _, _, _, file, upload = tracker.start_video("sam2.1/hiera_tiny", data)
        file.close()
        uploads.append(upload)
    uploads[1].fail(ResourceExhaustedError("encoder full"))  # a failed one is kept too
    for index in range(2):
        uploads[2].stored(index)
    uploads[2].finish()
    assert tracker.upload_count() == 3
    time.sleep(3.5)  # every session expires
    _, _, _, file, running = tracker.start_video("sam2.1/hiera_tiny", data)
    file.close()
    assert tracker.upload_count() == 1
    assert uploads[0].failed and uploads[0].finished  # its embedding stops
    with pytest.raises(SessionNotFoundError, match="expired"):
        uploads[0].wait(0, timeout_s=1)
    _, _, _, file, _ = tracker.start_video("sam2.1/hiera_tiny", data)
    file.close()
    assert tracker.upload_count() == 2 and not running.finished  # still live: kept
