"""``sam2-embed`` without a network: source expansion, the manifest's resume rules, and the
runner's failure isolation and back-pressure with a stand-in for the encoder call."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sam2_shared.client.embed_cli import (
    FAILED,
    OK,
    SKIPPED,
    ManifestEntry,
    ManifestWriter,
    Progress,
    Summary,
    build_parser,
    done_paths,
    embed_retrying,
    main,
    run_embedding,
)
from sam2_shared.client.embed_sources import S3Location, SourceError, SourceItem, iter_sources
from sam2_shared.embedding import EmbeddingRef
from sam2_shared.errors import InvalidInputError, ResourceExhaustedError

MODEL_ID = "sam2.1/hiera_tiny"


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.webp", "sub/deeper/d.tiff",
                 "sub/readme.md", "z/e.bmp"):
        _touch(tmp_path / name)
    return tmp_path


def _paths(items) -> list[str]:  # noqa: ANN001
    return [item.path for item in items]


def test_folder_is_walked_recursively_by_image_extension_in_sorted_order(tree: Path) -> None:
    paths = _paths(iter_sources([str(tree)]))
    relative = [str(Path(p).relative_to(tree)) for p in paths]
    assert relative == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.tiff", "z/e.bmp"]


def test_an_explicit_file_is_taken_whatever_its_extension(tree: Path) -> None:
    assert _paths(iter_sources([str(tree / "notes.txt")])) == [str(tree / "notes.txt")]


def test_glob_matches_are_taken_like_sources_and_each_path_once(tree: Path) -> None:
    paths = _paths(iter_sources([f"{tree}/**/*.webp", str(tree / "sub"), str(tree / "b.png"),
                                 str(tree / "b.png")]))
    assert paths == [str(tree / "sub/c.webp"), str(tree / "sub/deeper/d.tiff"),
                     str(tree / "b.png")]


def test_stdin_lists_sources_one_per_line(tree: Path) -> None:
    stdin = io.StringIO(f"{tree / 'b.png'}\n\n  {tree / 'z'}  \n-\n")
    assert _paths(iter_sources(["-"], stdin)) == [str(tree / "b.png"), str(tree / "z/e.bmp")]


def test_missing_sources_become_items_that_fail_when_read(tmp_path: Path) -> None:
    items = list(iter_sources([str(tmp_path / "nope.png"), f"{tmp_path}/*.jpg"]))
    assert _paths(items) == [str(tmp_path / "nope.png"), f"{tmp_path}/*.jpg"]
    with pytest.raises(SourceError, match="no such file") as raised:
        items[0].read(100)
    assert raised.value.reason == "NOT_FOUND"
    with pytest.raises(SourceError, match="matches no file"):
        items[1].read(100)


def test_a_file_over_the_byte_limit_fails_before_it_is_read(tmp_path: Path) -> None:
    [item] = iter_sources([str(_touch(tmp_path / "big.png", b"0" * 101))])
    with pytest.raises(SourceError, match="101 bytes; the limit is 100") as raised:
        item.read(100)
    assert raised.value.reason == "TOO_LARGE"
    assert item.read(101) == b"0" * 101


def test_expansion_is_lazy(tmp_path: Path) -> None:
    for index in range(5):
        _touch(tmp_path / f"{index}.png")
    items = iter_sources([str(tmp_path), str(tmp_path / "missing")])
    first = next(items)  # the second source is not looked at yet
    assert first.path == str(tmp_path / "0.png")


def test_s3_url_takes_the_store_url_options_and_rejects_others() -> None:
    location = S3Location.parse("s3://bkt/raw/2024?endpoint_url=http://h:9000&region=eu")
    assert (location.bucket, location.prefix) == ("bkt", "raw/2024")
    assert location.options == {"endpoint_url": "http://h:9000", "region": "eu"}
    with pytest.raises(ValueError, match="unknown option.*aws_secret"):
        S3Location.parse("s3://bkt/p?aws_secret_access_key=x")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Location.parse("s3:///p")


class FakeS3:
    """Just what the S3 source uses: a paginated listing and get_object."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_paginator(self, name: str) -> FakeS3:
        assert name == "list_objects_v2"
        return self

    def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # noqa: N803
        keys = sorted(k for k in self.objects if k.startswith(Prefix))
        return [{"Contents": [{"Key": k, "Size": len(self.objects[k])} for k in keys[:2]]},
                {"Contents": [{"Key": k, "Size": len(self.objects[k])} for k in keys[2:]]}]

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        return {"Body": io.BytesIO(self.objects[Key])}


def test_s3_prefix_selects_images_under_it_as_a_folder() -> None:
    s3 = FakeS3({"raw/a.png": b"A", "raw/sub/b.jpg": b"B", "raw/c.txt": b"C",
                 "rawer/d.png": b"D", "one.png": b"E"})
    items = list(iter_sources(["s3://bkt/raw", "s3://bkt/one.png"], s3_client=lambda loc: s3))
    assert _paths(items) == ["s3://bkt/raw/a.png", "s3://bkt/raw/sub/b.jpg", "s3://bkt/one.png"]
    assert items[1].read(10) == b"B"
    with pytest.raises(SourceError, match="limit is 0"):
        items[0].read(0)


def test_s3_listing_failure_is_one_failed_item() -> None:
    def broken(location: S3Location) -> Any:
        raise RuntimeError("connection refused")

    [item] = iter_sources(["s3://bkt/raw"], s3_client=broken)
    with pytest.raises(SourceError, match="cannot list s3://bkt/raw: connection refused"):
        item.read(10)


# ----------------------------------------------------------------------------- manifest


def _entry(path: str, status: str, model_id: str = MODEL_ID) -> ManifestEntry:
    return ManifestEntry(path, "id-" + path, model_id, 4, 3, status)


def test_resume_redoes_failed_other_models_and_a_torn_last_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    writer = ManifestWriter(manifest)
    for entry in (_entry("a", OK), _entry("b", SKIPPED), _entry("c", FAILED),
                  _entry("d", OK, "sam2.1/hiera_large")):
        writer.write(entry)
    writer.close()
    with manifest.open("a") as file:
        file.write('{"path": "e", "status": "o')  # killed mid-line
    assert done_paths(manifest, MODEL_ID) == {"a", "b"}
    writer = ManifestWriter(manifest)  # appends on a fresh line after the torn one
    writer.write(_entry("e", OK))
    writer.close()
    assert done_paths(manifest, MODEL_ID) == {"a", "b", "e"}
    assert json.loads(manifest.read_text().splitlines()[-1])["path"] == "e"


def test_missing_manifest_means_nothing_done(tmp_path: Path) -> None:
    assert done_paths(tmp_path / "none.jsonl", MODEL_ID) == set()


# ----------------------------------------------------------------------------- runner


def _item(path: str, data: bytes) -> SourceItem:
    return SourceItem(path, lambda max_bytes: data)


def _fake_embed(data: bytes) -> EmbeddingRef:
    if data == b"bad":
        raise InvalidInputError("could not decode 3 bytes as an image")
    if data == b"boom":
        raise RuntimeError("surprise")
    return EmbeddingRef("id-" + data.decode(), MODEL_ID, (3, 4), data.startswith(b"old"))


def test_bad_images_are_recorded_and_do_not_stop_the_run(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    missing = next(iter_sources([str(tmp_path / "gone.png")]))
    items = [_item("1", b"new1"), _item("2", b"bad"), _item("3", b"old3"), _item("4", b"boom"),
             _item("5", b"new5"), _item("done", b"new6"), missing]
    writer = ManifestWriter(manifest)
    summary = run_embedding(items, _fake_embed, model_id=MODEL_ID, concurrency=2,
                            manifest=writer, skip_paths={"done"})
    writer.close()
    assert (summary.ok, summary.skipped, summary.failed, summary.resumed) == (2, 1, 3, 1)
    lines = {e["path"]: e for e in map(json.loads, manifest.read_text().splitlines())}
    assert set(lines) == {"1", "2", "3", "4", "5", missing.path}
    assert lines[missing.path]["reason"] == "NOT_FOUND"
    assert lines["1"] == {"path": "1", "embedding_id": "id-new1", "model_id": MODEL_ID,
                          "width": 4, "height": 3, "status": "ok", "reason": None,
                          "error": None}
    assert lines["3"]["status"] == "skipped"
    assert lines["2"]["reason"] == "INVALID_ARGUMENT" and "decode" in lines["2"]["error"]
    assert lines["4"]["reason"] == "INTERNAL" and "surprise" in lines["4"]["error"]


def test_sources_are_read_no_further_ahead_than_the_bounded_queue() -> None:
    pulled = 0
    release = threading.Event()

    def items():
        nonlocal pulled
        for index in range(100):
            pulled += 1
            yield _item(str(index), b"new")

    def slow_embed(data: bytes) -> EmbeddingRef:
        release.wait(10)
        return _fake_embed(data)

    runner = threading.Thread(target=run_embedding, args=(items(), slow_embed), kwargs={
        "model_id": MODEL_ID, "concurrency": 2, "manifest": ManifestWriter(None)})
    runner.start()
    time.sleep(0.5)
    in_hand = pulled
    release.set()
    runner.join(10)
    # 2 workers hold one each, the queue holds 2 * 2, the producer one waiting to be put.
    assert in_hand <= 2 + 4 + 1
    assert pulled == 100


def test_stop_ends_the_run_after_the_images_in_flight() -> None:
    stop = threading.Event()

    def embed(data: bytes) -> EmbeddingRef:
        stop.set()
        return _fake_embed(data)

    summary = run_embedding((_item(str(i), b"new") for i in range(50)), embed,
                            model_id=MODEL_ID, concurrency=1, manifest=ManifestWriter(None),
                            stop=stop)
    assert summary.interrupted
    assert summary.ok == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["x.png"])  # no --encoder
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["x.png", "--encoder", "h:1", "--concurrency", "0"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["x.png", "--encoder", "h:1", "--model", "no-such-model"])
    assert exited.value.code == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["a", "--encoder", "h:1"])
    assert (args.concurrency, args.model, args.json) == (4, MODEL_ID, False)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    summary = Summary(ok=3, skipped=1, failed=1, found=10, seconds=2.0)
    entry = _entry("a", OK)
    terminal = io.StringIO()
    bar = Progress(terminal, every_s=60, tty=True)
    bar(summary, entry)
    bar.close()
    assert "ok=3" in terminal.getvalue() and "skipped=1" in terminal.getvalue()
    plain = io.StringIO()
    lines = Progress(plain, every_s=0, tty=False)
    lines(summary, entry)
    assert plain.getvalue() == ("sam2-embed: 5 done of 10 listed so far, 3 ok, 1 skipped, "
                                "1 failed, 2.50 images/s, ETA 2 s\n")


def test_a_busy_encoder_is_waited_out_no_sooner_than_its_hint() -> None:
    answers: list[Exception | EmbeddingRef] = [
        ResourceExhaustedError("encoder queue is full", reason="QUEUE_FULL",
                               retry_delay_s="0.5"),
        ResourceExhaustedError("encoder queue is full", reason="QUEUE_FULL",
                               retry_delay_s="0.5"),
        EmbeddingRef("id", MODEL_ID, (3, 4)),
    ]
    waits: list[float] = []

    def embed(data: bytes) -> EmbeddingRef:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    ref = embed_retrying(embed, b"x", timeout_s=60, sleep=waits.append)
    assert ref.embedding_id == "id"
    assert len(waits) == 2 and min(waits) >= 0.5


def test_a_bad_image_is_not_retried_and_the_deadline_bounds_retries() -> None:
    calls = 0

    def bad(data: bytes) -> EmbeddingRef:
        nonlocal calls
        calls += 1
        raise InvalidInputError("not an image")

    with pytest.raises(InvalidInputError):
        embed_retrying(bad, b"x", timeout_s=60, sleep=lambda s: None)
    assert calls == 1

    def busy(data: bytes) -> EmbeddingRef:
        raise ResourceExhaustedError("full", retry_delay_s="5")

    with pytest.raises(ResourceExhaustedError):
        embed_retrying(busy, b"x", timeout_s=1, sleep=lambda s: None)  # 5 s hint > 1 s left


def test_video_frames_are_items_of_lossless_pngs_in_order(tmp_path: Path) -> None:
    """``--video``: one item per frame, ``PATH#frame=N``, whose PNG decodes to the frame the
    video gives (so the encoder's id is ``video_frame_id`` of it); a frame over the pixel
    bound and a file that is no video fail as items, not as the run."""
    import cv2
    import numpy as np

    from sam2_shared.client.embed_sources import video_frame_items
    from sam2_shared.inference.imaging import decode_image

    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for t in range(3):
        writer.write(np.full((48, 64, 3), 40 * t, np.uint8))
    writer.release()
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    decoded = []
    while (frame := capture.read())[0]:
        decoded.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
    capture.release()

    items = list(video_frame_items([str(path)], max_pixels=64 * 48))
    assert _paths(items) == [f"{path}#frame={i}" for i in range(3)]
    for item, rgb in zip(items, decoded, strict=True):
        np.testing.assert_array_equal(decode_image(item.read(10**6)), rgb)
    with pytest.raises(SourceError) as large:
        next(video_frame_items([str(path)], max_pixels=64 * 48 - 1)).read(10**6)
    assert large.value.reason == "TOO_LARGE"
    with pytest.raises(SourceError) as small_limit:
        items[0].read(10)
    assert small_limit.value.reason == "TOO_LARGE"
    not_video = _touch(tmp_path / "notes.mp4", b"not a video" * 50)
    for source, reason in ((not_video, "UNREADABLE"), (tmp_path / "missing.mp4", "NOT_FOUND")):
        (failed,) = video_frame_items([str(source)], max_pixels=10**6)
        with pytest.raises(SourceError) as refused:
            failed.read(10**6)
        assert refused.value.reason == reason
