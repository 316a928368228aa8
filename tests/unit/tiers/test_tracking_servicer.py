"""The tracking servicer frees a session even when its stream outlives the worker pool."""

from __future__ import annotations

import asyncio

from decoder_service.tracking_servicer import TrackingServicer


class _Propagation:
    """Two frames, then the end; records whether it was closed."""

    def __init__(self) -> None:
        self.frames_done = 0
        self.closed = False

    def step(self) -> object | None:
        self.frames_done += 1
        return None if self.frames_done > 2 else object()

    def close(self) -> None:
        self.closed = True


class _Tracker:
    def __init__(self) -> None:
        self.propagation = _Propagation()

    def propagate(self, *args: object) -> _Propagation:
        return self.propagation


class _Request:
    session_id = "s"
    reverse = False
    mask_format = 0

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        return False


def test_a_stream_cut_off_after_the_pool_stopped_still_closes_its_propagation(
    monkeypatch,
) -> None:
    tracker = _Tracker()
    servicer = TrackingServicer(tracker, workers=1)  # type: ignore[arg-type]
    monkeypatch.setattr("decoder_service.tracking_servicer.frame_to_proto",
                        lambda result, encoding: None)

    async def scenario() -> None:
        stream = servicer.Propagate(_Request(), None)
        await stream.__anext__()          # one frame out, the stream is suspended
        await servicer.close()            # shutdown stops the pool first ...
        await stream.aclose()             # ... then the grace period cancels the stream

    asyncio.run(scenario())
    assert tracker.propagation.closed
    assert servicer.propagations_cancelled == 1
    assert servicer.frames_tracked == 1 and servicer.frame_seconds > 0
