"""TrackingService end to end: real encoder and two decoder replicas on 127.0.0.1 sharing one
diskcache store, sam2.1/hiera_tiny with random weights, a 6-frame synthetic clip.

The in-process reference is ``VideoSession`` over the very frame embeddings the encoder
tier stored, so the service must give the same masks (same code, same inputs; only thread
counts differ, so a handful of boundary pixels may flip).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from sam2_shared.api.v1 import common_pb2, tracking_pb2
from sam2_shared.client.tracking import Sam2TrackingClient
from sam2_shared.embedding import content_id
from sam2_shared.errors import (
    EmbeddingNotFoundError,
    FailedPreconditionError,
    InvalidInputError,
)
from sam2_shared.inference.video import FrameResult, Sam2VideoModel
from sam2_shared.store import open_store
from sam2_shared.wire.tracking import TrackedFrame
from tests.helpers import hostile_payloads as payloads
from tests.helpers.checkpoints import present_checkpoint as present_checkpoint_file
from tests.helpers.http_rpc import HttpRpcClient
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH, NUM_FRAMES = 160, 200, 6
MAX_FLIPPED = 0.002  # fraction of pixels allowed to differ from the in-process masks
MAX_VIDEO_FRAMES = 8  # replica A's --max-video-frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """RGB frames as an MP4 (MPEG-4 part 2 through OpenCV's FFmpeg): lossy, as users' are."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write MP4 here"
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def clip() -> list[np.ndarray]:
    """A bright square moving right over a fixed textured background."""
    rng = np.random.default_rng(7)
    background = rng.integers(0, 90, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames = []
    for t in range(NUM_FRAMES):
        frame = background.copy()
        x0 = 30 + 12 * t
        frame[50:110, x0 : x0 + 50] = (230, 200, 40)
        frame[20:50, 140:180] = (40, 120, 230)  # a second, still object
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def present_checkpoint(random_checkpoint: Callable[..., Path],
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights judge every object absent; shifted, masks are not empty and depend on
    the memories."""
    return present_checkpoint_file(random_checkpoint(MODEL_ID),
                                   tmp_path_factory.mktemp("tracking") / "present.pt")


class Fleet:
    def __init__(self, store_url: str, encoder: TierProcess, replica_a: TierProcess,
                 replica_b: TierProcess) -> None:
        self.store_url = store_url
        self.encoder, self.replica_a, self.replica_b = encoder, replica_a, replica_b

    def client(self, replica: TierProcess) -> Sam2TrackingClient:
        return Sam2TrackingClient(self.encoder.address, replica.address, model_id=MODEL_ID,
                                  timeout_s=120.0)


@pytest.fixture(scope="module")
def fleet(present_checkpoint: Path) -> Iterator[Fleet]:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-tracking-test-")
    processes: list[TierProcess] = []
    try:
        encoder = encoder_process(present_checkpoint, store, "--store-dtype", "float32")
        processes.append(encoder)
        encoder.start()
        # Replica A can embed uploaded videos' frames (it has the encoder); B cannot.
        replicas = [
            decoder_process(present_checkpoint, store, "--session-ttl-s", "600",
                            "--encoder-address", encoder.address,
                            "--max-video-frames", str(MAX_VIDEO_FRAMES), "--http-port", "0"),
            decoder_process(present_checkpoint, store, "--session-ttl-s", "600"),
        ]
        processes += replicas
        for process in replicas:
            process.start()
        yield Fleet(store, encoder, *replicas)
    finally:
        for process in processes:
            process.stop()


@pytest.fixture(scope="module")
def frame_ids(fleet: Fleet) -> list[str]:
    with fleet.client(fleet.replica_a) as client:
        return client.embed_frames(clip())


@pytest.fixture(scope="module")
def video_model(present_checkpoint: Path) -> Sam2VideoModel:
    return Sam2VideoModel.from_pretrained(MODEL_ID, present_checkpoint, with_encoder=True)


def reference_session(fleet: Fleet, video_model: Sam2VideoModel, frame_ids: list[str]):
    store = open_store(fleet.store_url)
    embeddings = [store.get_embedding(i, MODEL_ID) for i in frame_ids]
    store.close()
    assert all(e is not None for e in embeddings)
    return video_model.start_session(embeddings)


def prompt_both(session_or_client, session_id: str | None = None) -> list:
    """Object 1: a click on the moving square on frame 0; object 2: a box around the still
    one on frame 2."""
    calls = [
        dict(frame_index=0, object_id=1, points=[[55.0, 80.0]], labels=[1]),
        dict(frame_index=2, object_id=2, box=[140.0, 20.0, 180.0, 50.0]),
    ]
    out = []
    for call in calls:
        if session_id is None:
            out.append(session_or_client.add_points(call["frame_index"], call["object_id"],
                                                    points=call.get("points"),
                                                    labels=call.get("labels"),
                                                    box=call.get("box")))
        else:
            out.append(session_or_client.add_prompt(session_id, **call))
    return out


def assert_same(remote: TrackedFrame, local: FrameResult) -> None:
    assert remote.frame_index == local.frame_idx
    assert remote.object_ids == local.obj_ids
    assert remote.masks.shape == local.masks.shape == (len(local.obj_ids), HEIGHT, WIDTH)
    flipped = float(np.mean(remote.masks != local.masks))
    assert flipped <= MAX_FLIPPED, f"frame {local.frame_idx}: {flipped:.4%} pixels differ"
    np.testing.assert_allclose(remote.object_score_logits, local.object_score_logits,
                               atol=1e-3)


def test_frames_use_the_video_preprocessing(fleet: Fleet, frame_ids: list[str],
                                            video_model: Sam2VideoModel) -> None:
    """Frame ids are not image ids, and the stored features are the video path's."""
    frames = clip()
    assert len(frame_ids) == NUM_FRAMES and len(set(frame_ids)) == NUM_FRAMES
    assert frame_ids[0] != content_id(frames[0], MODEL_ID)
    store = open_store(fleet.store_url)
    stored = store.get_embedding(frame_ids[0], MODEL_ID)
    store.close()
    assert stored is not None and stored.original_hw == (HEIGHT, WIDTH)
    local = video_model.embed_frames([frames[0]])[0]
    torch.testing.assert_close(stored.image_embed, local.image_embed, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(stored.high_res_feats[1], local.high_res_feats[1], atol=2e-4,
                               rtol=1e-3)


def test_session_moves_between_replicas(fleet: Fleet, frame_ids: list[str],
                                        video_model: Sam2VideoModel) -> None:
    """Start and prompt on replica A, propagate on B, continue on A (which must notice its
    copy is stale): the masks equal the in-process session's throughout."""
    local = reference_session(fleet, video_model, frame_ids)
    local_prompts = prompt_both(local)
    local_forward = list(local.propagate())
    local_back = list(local.propagate(start_frame_idx=2, reverse=True))

    with fleet.client(fleet.replica_a) as a, fleet.client(fleet.replica_b) as b:
        session = a.start_session(frame_ids)
        assert (session.frame_count, session.video_hw) == (NUM_FRAMES, (HEIGHT, WIDTH))
        for remote, expected in zip(prompt_both(a, session.session_id), local_prompts,
                                    strict=True):
            assert_same(remote, expected)
        assert local_prompts[1].masks[1].any()  # the box prompt gave a real mask
        forward = list(b.propagate(session.session_id))
        assert [f.frame_index for f in forward] == list(range(NUM_FRAMES))
        for remote, expected in zip(forward, local_forward, strict=True):
            assert_same(remote, expected)
        assert any(f.masks[0].any() for f in forward[1:])  # something was tracked
        back = list(a.propagate(session.session_id, start_frame_index=2, reverse=True))
        assert [f.frame_index for f in back] == [2, 1, 0]
        for remote, expected in zip(back, local_back, strict=True):
            assert_same(remote, expected)
        a.close_session(session.session_id)
        with pytest.raises(EmbeddingNotFoundError) as closed:
            b.propagate(session.session_id).__next__()
        assert closed.value.reason == "SESSION_NOT_FOUND"


def test_propagate_cancel_stops_the_server(fleet: Fleet, frame_ids: list[str]) -> None:
    with fleet.client(fleet.replica_b) as client:
        session = client.start_session(frame_ids)
        client.add_prompt(session.session_id, 0, 1, points=[[55.0, 80.0]], labels=[1])
        stream = client.propagate(session.session_id)
        received = [next(stream), next(stream)]
        stream.cancel()
        assert [f.frame_index for f in received] == [0, 1]
        # The session is free again at once (the server closed the propagation) and
        # continues from where the cancelled run stopped.
        started = time.monotonic()
        more = list(client.propagate(session.session_id, start_frame_index=NUM_FRAMES - 1))
        assert [f.frame_index for f in more] == [NUM_FRAMES - 1]
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 10
        while "stopped after" not in fleet.replica_b.log_tail(20000):
            assert time.monotonic() < deadline, fleet.replica_b.log_tail()
            time.sleep(0.1)
        line = next(line for line in fleet.replica_b.log_tail(20000).splitlines()
                    if "stopped after" in line and session.session_id in line)
        frames_done = int(line.split("stopped after ")[1].split()[0])
        assert 2 <= frames_done < NUM_FRAMES  # the server did not run to the end
        client.close_session(session.session_id)


def test_bad_input(fleet: Fleet, frame_ids: list[str]) -> None:
    with fleet.client(fleet.replica_a) as client:
        with pytest.raises(EmbeddingNotFoundError) as unknown:
            client.add_prompt("0123456789abcdef", 0, 1, points=[[5.0, 5.0]], labels=[1])
        assert unknown.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(EmbeddingNotFoundError) as missing_frame:
            client.start_session([frame_ids[0], "f" * 64])
        assert missing_frame.value.reason == "EMBEDDING_NOT_FOUND"
        session = client.start_session(frame_ids)
        sid = session.session_id
        with pytest.raises(InvalidInputError) as out_of_range:
            client.add_prompt(sid, NUM_FRAMES, 1, points=[[5.0, 5.0]], labels=[1])
        assert out_of_range.value.reason == "FRAME_OUT_OF_RANGE"
        with pytest.raises(InvalidInputError) as empty:
            client.add_prompt(sid, 0, 1)
        assert empty.value.reason == "EMPTY_PROMPT"
        with pytest.raises(InvalidInputError) as no_objects:
            next(client.propagate(sid))
        assert "no objects" in str(no_objects.value)
        client.add_prompt(sid, 0, 1, points=[[55.0, 80.0]], labels=[1])
        with pytest.raises(InvalidInputError) as unknown_object:
            client.remove_object(sid, 99)
        assert unknown_object.value.reason == "UNKNOWN_OBJECT"
        with pytest.raises(InvalidInputError) as late_start:
            next(client.propagate(sid, start_frame_index=-1))
        assert late_start.value.reason == "FRAME_OUT_OF_RANGE"
        # Mask prompts, removal and reset work and leave a usable session.
        mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
        mask[20:50, 140:180] = True
        frame = client.add_prompt(sid, 1, 2, mask=mask)
        assert frame.object_ids == [1, 2] and frame.masks[1].any()
        assert client.remove_object(sid, 1) == [2]
        client.reset_session(sid)
        with pytest.raises(InvalidInputError):
            client.remove_object(sid, 2)
        client.close_session(sid)
        with pytest.raises(EmbeddingNotFoundError) as closed:
            client.reset_session(sid)
        assert closed.value.reason == "SESSION_NOT_FOUND"


def click_and_track(client: Sam2TrackingClient, session_id: str
                    ) -> tuple[TrackedFrame, list[TrackedFrame]]:
    """One click on the moving square of frame 0, then every frame tracked."""
    first = client.add_prompt(session_id, 0, 1, points=[[55.0, 80.0]], labels=[1])
    return first, list(client.propagate(session_id))


def assert_tracked_alike(got: tuple[TrackedFrame, list[TrackedFrame]],
                         want: tuple[TrackedFrame, list[TrackedFrame]]) -> None:
    assert got[0].masks.any()  # the click found the object: a comparison that can fail
    np.testing.assert_array_equal(got[0].masks, want[0].masks)
    assert [f.frame_index for f in got[1]] == list(range(NUM_FRAMES))
    for tracked, expected in zip(got[1], want[1], strict=True):
        np.testing.assert_array_equal(tracked.masks, expected.masks)
        np.testing.assert_allclose(tracked.object_score_logits,
                                   expected.object_score_logits, atol=1e-5)


def test_a_video_file_is_tracked_like_its_embedded_frames(
        fleet: Fleet, tmp_path: Path) -> None:
    """StartSession with the MP4 itself: the decoder has the encoder embed its frames in the
    background while the client already prompts and propagates; the ids and every mask
    equal a session over the same decoded frames embedded by the client."""
    path = write_video(tmp_path / "clip.mp4", clip())
    decoded = read_video(path)
    assert len(decoded) == NUM_FRAMES
    with fleet.client(fleet.replica_a) as client:
        uploaded = client.start_session(video=path)
        assert (uploaded.frame_count, uploaded.video_hw) == (NUM_FRAMES, (HEIGHT, WIDTH))
        # Prompt and propagate at once: frames still on their way are waited for.
        got = click_and_track(client, uploaded.session_id)

        ids = client.embed_frames(decoded)  # what a client that embeds first would send
        assert list(uploaded.frame_embedding_ids) == ids
        session = client.start_session(ids)
        assert list(session.frame_embedding_ids) == ids
        want = click_and_track(client, session.session_id)
    assert_tracked_alike(got, want)


def test_bad_videos_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    too_long = write_video(tmp_path / "long.mp4", clip() + clip())  # 12 > 8 frames
    with fleet.client(fleet.replica_a) as client:
        with pytest.raises(InvalidInputError) as garbage:
            client.start_session(video=b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 5000)
        assert garbage.value.reason == "VIDEO_UNREADABLE"
        with pytest.raises(InvalidInputError) as long_video:
            client.start_session(video=too_long)
        assert long_video.value.reason == "VIDEO_TOO_LONG"
        assert long_video.value.metadata.get("limit") == str(MAX_VIDEO_FRAMES)
        with pytest.raises(InvalidInputError):
            client.start_session(video=b"")  # empty bytes: neither ids nor a video
    with fleet.client(fleet.replica_b) as client:
        with pytest.raises(FailedPreconditionError, match="--encoder-address"):
            client.start_session(video=write_video(tmp_path / "ok.mp4", clip()))
    assert fleet.replica_a.process.poll() is None and fleet.replica_b.process.poll() is None


def test_streamed_frames_are_tracked_like_their_embedded_frames(
        fleet: Fleet, frame_ids: list[str]) -> None:
    """StartSessionFromFrames (``start_session(frames=...)``, here from a generator): the
    decoder hashes the streamed frames to the ids the client's own embedding gave and has
    the encoder embed them while the client already prompts; the masks equal a session over
    those ids. Lossless PNG frames give the same ids; over Connect (HTTP/1.1) the stream is
    one request body and works too."""
    frames = clip()
    with fleet.client(fleet.replica_a) as client:
        streamed = client.start_session(frames=(frame for frame in frames))
        assert (streamed.frame_count, streamed.video_hw) == (NUM_FRAMES, (HEIGHT, WIDTH))
        assert list(streamed.frame_embedding_ids) == frame_ids
        got = click_and_track(client, streamed.session_id)
        encoded = [cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes()
                   for f in frames]
        assert list(client.start_session(frames=encoded).frame_embedding_ids) == frame_ids
        want = click_and_track(client, client.start_session(frame_ids).session_id)
    assert_tracked_alike(got, want)

    messages = [tracking_pb2.StartSessionFromFramesRequest(model_id=MODEL_ID)] + [
        tracking_pb2.StartSessionFromFramesRequest(frame=common_pb2.Image(encoded_bytes=data))
        for data in encoded[:2]]
    with HttpRpcClient(fleet.replica_a.http_url) as http:
        reply, answers, end = http.connect_stream(
            "/sam2.v1.TrackingService/StartSessionFromFrames", messages)
    assert reply.status == 200 and "error" not in end, end
    answer = tracking_pb2.StartSessionFromFramesResponse.FromString(answers[0])
    assert list(answer.frame_embedding_ids) == frame_ids[:2]


def test_hostile_frame_streams_are_refused_and_the_decoder_serves_on(fleet: Fleet) -> None:
    frames = clip()
    with fleet.client(fleet.replica_a) as client:
        with pytest.raises(InvalidInputError) as long_stream:
            client.start_session(frames=frames + frames[:3])  # 9 > 8 frames
        assert long_stream.value.reason == "VIDEO_TOO_LONG"
        assert long_stream.value.metadata.get("limit") == str(MAX_VIDEO_FRAMES)
        with pytest.raises(InvalidInputError, match="frame 1: .*exceeds the limit"):
            client.start_session(frames=[frames[0], payloads.png_header_only(20_000, 20_000)])
        with pytest.raises(InvalidInputError, match="frame 1 is 100x80 pixels"):
            client.start_session(frames=[frames[0], np.zeros((80, 100, 3), np.uint8)])
        with pytest.raises(InvalidInputError, match="at least one"):
            client.start_session(frames=[])
        assert client.start_session(frames=frames[:2]).frame_count == 2  # serving on
    with fleet.client(fleet.replica_b) as client:
        with pytest.raises(FailedPreconditionError, match="--encoder-address"):
            client.start_session(frames=frames[:1])
    assert fleet.replica_a.process.poll() is None and fleet.replica_b.process.poll() is None
