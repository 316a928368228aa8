"""``sam2-embed`` (as a process) against a real encoder tier and a real S3 server: a folder
with corrupt files, an S3 prefix, a second run that finds everything stored, and a run killed
mid-way then resumed from its manifest without redoing anything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.servers import RcloneS3Server, free_port
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH = 48, 64
MAX_PIXELS = 10_000  # above 64 x 48; the "too large" image is bigger


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> Iterator[tuple[TierProcess, int]]:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-embed-test-")
    metrics_port = free_port()
    # A tiny queue: concurrent uploads get QUEUE_FULL (RESOURCE_EXHAUSTED) and must retry.
    with encoder_process(tiny_checkpoint, store, "--metrics-port", str(metrics_port),
                         "--max-batch-size", "2", "--max-queue", "1") as process:
        yield process, metrics_port


def metric(metrics_port: int, pattern: bytes) -> float:
    """The value of the first sample of the encoder's /metrics matching ``pattern``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    found = re.search(rb"^" + pattern + rb" (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def embedded_total(metrics_port: int) -> float:
    """Images the encoder computed (not found stored)."""
    return metric(metrics_port, rb'sam2_encoder_images_total\{[^}]*outcome="embedded"[^}]*\}')


def png(seed: int, height: int = HEIGHT, width: int = WIDTH) -> bytes:
    ok, data = cv2.imencode(".png", synthetic_rgb(height, width, seed=seed))
    assert ok
    return data.tobytes()


def command(encoder: TierProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "sam2_shared.client.embed_cli", *args,
            "--encoder", encoder.address, "--model", MODEL_ID,
            "--max-image-pixels", str(MAX_PIXELS), "--log-every-s", "0.5"]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_embed(encoder: TierProcess, *args: str, stdin: str | None = None,
              env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """Exit code, the ``--json`` summary and stderr of one run."""
    done = subprocess.run(command(encoder, *args, "--json"), input=stdin, capture_output=True,
                          text=True, env=environment(env), timeout=600)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def manifest_lines(path: Path) -> list[dict[str, Any]]:
    """Parsed lines; a line torn by a kill is left out (as the resume logic does)."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def test_folder_with_corrupt_files_then_a_second_run_skips_everything(
        encoder: tuple[TierProcess, int], tmp_path: Path) -> None:
    process, metrics_port = encoder
    folder = tmp_path / "dataset"
    good = []
    for index in range(20):
        path = folder / ("nested" if index % 3 else "") / f"img{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(seed=index))
        good.append(str(path))
    bad = {
        "garbage.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "truncated.png": png(seed=99)[:40],
        "text.png": b"hello, I am a text file",
        "empty.jpg": b"",
        "huge.png": png(seed=98, height=200, width=300),  # 60,000 pixels > MAX_PIXELS
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image extension: not picked up")
    manifest = tmp_path / "embeddings.jsonl"
    before = embedded_total(metrics_port)

    code, summary, stderr = run_embed(process, str(folder), "--manifest", str(manifest),
                                      "--concurrency", "6")

    assert code == 1, stderr  # some failed
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (20, 0, 5)
    # The encoder's queue was full along the way; those images were retried, not failed.
    assert metric(metrics_port, rb"sam2_encoder\w*_queue_rejected_total\{[^}]*\}") > 0
    assert summary["images_per_s"] > 0 and summary["seconds"] > 0
    assert embedded_total(metrics_port) - before == 20
    entries = {Path(e["path"]).name: e for e in manifest_lines(manifest)}
    assert len(entries) == 25
    for path in good:
        entry = entries[Path(path).name]
        assert entry["path"] == path
        assert (entry["status"], entry["width"], entry["height"]) == ("ok", WIDTH, HEIGHT)
        assert re.fullmatch(r"[0-9a-f]{64}", entry["embedding_id"]) and entry["error"] is None
    for name in bad:
        assert entries[name]["status"] == "failed" and entries[name]["embedding_id"] is None
        assert entries[name]["reason"] == "INVALID_ARGUMENT" and entries[name]["error"]
    assert "60000" in entries["huge.png"]["error"].replace(",", "")
    assert "failed: " in stderr and "sam2-embed:" in stderr  # plain lines, not a TTY

    # Second run, paths on stdin and no manifest: everything is already stored.
    listing = "\n".join(str(folder / name) for name in [*map(Path, good), *bad]) + "\n"
    code, summary, _ = run_embed(process, "-", stdin=listing)
    assert code == 1
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (0, 20, 5)
    assert embedded_total(metrics_port) - before == 20  # the encoder computed nothing new

    # Third run with the first manifest: done paths are not even sent; failed ones retried.
    code, summary, _ = run_embed(process, str(folder), "--manifest", str(manifest))
    assert (summary["resumed"], summary["ok"], summary["skipped"], summary["failed"]) == \
        (20, 0, 0, 5)
    assert len(manifest_lines(manifest)) == 30


def test_s3_prefix(encoder: tuple[TierProcess, int], tmp_path: Path) -> None:
    import boto3

    process, metrics_port = encoder
    with RcloneS3Server() as s3:
        client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=s3.access_key,
                              aws_secret_access_key=s3.secret_key)
        client.create_bucket(Bucket="photos")
        objects = {"ds/a.png": png(seed=200), "ds/sub/b.png": png(seed=201),
                   "ds/c.PNG": png(seed=202), "ds/broken.jpg": b"\xff\xd8 broken",
                   "ds/readme.txt": b"skipped by extension", "dsx/other.png": png(seed=203)}
        for key, data in objects.items():
            client.put_object(Bucket="photos", Key=key, Body=data)
        manifest = tmp_path / "s3.jsonl"
        before = embedded_total(metrics_port)
        url = f"s3://photos/ds?endpoint_url={s3.endpoint_url}&region=us-east-1"

        code, summary, stderr = run_embed(process, url, "--manifest", str(manifest),
                                          env=s3.aws_env)

        assert code == 1, stderr
        assert (summary["ok"], summary["failed"]) == (3, 1)
        assert embedded_total(metrics_port) - before == 3
        entries = {e["path"]: e for e in manifest_lines(manifest)}
        assert set(entries) == {"s3://photos/ds/a.png", "s3://photos/ds/sub/b.png",
                                "s3://photos/ds/c.PNG", "s3://photos/ds/broken.jpg"}
        assert entries["s3://photos/ds/broken.jpg"]["status"] == "failed"
        assert entries["s3://photos/ds/a.png"]["width"] == WIDTH

        # Wrong credentials: the listing fails, reported as one failed source, exit 1.
        code, summary, _ = run_embed(process, url, env={**s3.aws_env,
                                                        "AWS_SECRET_ACCESS_KEY": "wrong"})
        assert code == 1 and summary["failed"] == 1 and summary["ok"] == 0


def test_interrupted_run_resumes_without_redoing_anything(
        encoder: tuple[TierProcess, int], tmp_path: Path) -> None:
    process, metrics_port = encoder
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(8):
        (folder / f"f{index}.png").write_bytes(png(seed=300 + index))
    manifest = tmp_path / "resume.jsonl"
    before = embedded_total(metrics_port)

    first = subprocess.Popen(command(process, str(folder), "--manifest", str(manifest),
                                     "--concurrency", "1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=environment())
    deadline = time.monotonic() + 300
    while not (manifest.exists() and len(manifest.read_text().splitlines()) >= 2):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # no clean shutdown: the manifest is all there is
    first.wait(30)
    done_first = {e["path"] for e in manifest_lines(manifest) if e["status"] == "ok"}
    assert 2 <= len(done_first) < 8

    code, summary, stderr = run_embed(process, str(folder), "--manifest", str(manifest))

    assert code == 0, stderr
    assert summary["resumed"] == len(done_first)
    assert summary["ok"] + summary["skipped"] == 8 - len(done_first)
    later = manifest_lines(manifest)[len(done_first):]
    assert not {e["path"] for e in later} & done_first  # nothing redone
    assert {e["path"] for e in manifest_lines(manifest)} == \
        {str(folder / f"f{index}.png") for index in range(8)}
    # Each image computed once: the one in flight at the kill was either finished by the
    # encoder (then skipped now) or never stored (then computed now).
    assert embedded_total(metrics_port) - before == 8


def test_a_video_is_pre_embedded_frame_by_frame_under_the_ids_tracking_uses(
        encoder: tuple[TierProcess, int], tmp_path: Path) -> None:
    """``sam2-embed clip.mp4 --video``: one manifest line per frame, whose id is
    ``video_frame_id`` of the decoded frame (what StartSession takes); a rerun resumes."""
    from sam2_shared.embedding import video_frame_id

    process, _ = encoder
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (WIDTH, HEIGHT))
    for seed in range(4):
        writer.write(synthetic_rgb(HEIGHT, WIDTH, seed=seed))
    writer.release()
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    manifest = tmp_path / "frames.jsonl"

    code, summary, stderr = run_embed(process, str(path), "--video", "--manifest", str(manifest))

    assert code == 0, stderr
    assert summary["ok"] + summary["skipped"] == 4 and summary["failed"] == 0
    entries = sorted(manifest_lines(manifest), key=lambda e: int(e["path"].split("=")[-1]))
    assert [e["path"] for e in entries] == [f"{path}#frame={i}" for i in range(4)]
    assert [e["embedding_id"] for e in entries] == [video_frame_id(f, MODEL_ID) for f in frames]
    assert {(e["width"], e["height"]) for e in entries} == {(WIDTH, HEIGHT)}
    code, summary, _ = run_embed(process, str(path), "--video", "--manifest", str(manifest))
    assert code == 0 and summary["resumed"] == 4 and summary["ok"] == 0
