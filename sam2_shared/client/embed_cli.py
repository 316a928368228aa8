"""``sam2-embed``: pre-embed a folder, a glob, a list or an S3 prefix through the encoder tier.

    sam2-embed photos/ 's3://bucket/raw?endpoint_url=http://minio:9000' --encoder enc:50051 \\
        --manifest embeddings.jsonl --concurrency 8

Each image goes to ``EncoderService.EmbedImages`` through ``Sam2Client`` (which decodes it
and computes its content id locally first, so a corrupt, unsupported or too large image fails
here without a call). The encoder checks its store before computing: an image already stored
costs its upload and one store lookup, no forward, and is ``skipped``. ``RESOURCE_EXHAUSTED``
and ``UNAVAILABLE`` (of the call, or of the image inside its response: a full encoder queue)
are retried with backoff, never sooner than the server's retry hint, until ``--timeout-s``.

Memory is bounded: one thread lists the sources into a queue of ``2 * concurrency`` items
(it blocks when the queue is full: back-pressure) and ``concurrency`` workers each read and
send one image at a time.

Manifest (``--manifest``, JSON lines, appended and flushed per image, in completion order)::

    {"path": "photos/a.jpg", "embedding_id": "…", "model_id": "sam2.1/hiera_tiny",
     "width": 640, "height": 480, "status": "ok", "reason": null, "error": null}

``status``: ``ok`` (embedded now), ``skipped`` (already stored), ``failed`` (``reason`` and
``error`` say why: the server's ErrorInfo reason, e.g. ``INVALID_ARGUMENT`` for a corrupt or
unsupported image, or ``TOO_LARGE`` / ``NOT_FOUND`` / ``UNREADABLE`` from reading it). A
rerun with the same manifest does not redo paths already ``ok`` or
``skipped`` for the same model (failed ones are retried), so an interrupted run resumes.

``--video``: each SOURCE is a local video file whose frames are embedded for tracking (video
preprocessing), one manifest line per frame, ``path`` ``clip.mp4#frame=N`` and the id
``embedding.video_frame_id`` gives that frame (what ``TrackingService.StartSession`` takes).

Exit code: 0 when no image failed, 1 when some did, 2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from sam2_shared.client.channels import DEFAULT_MAX_MESSAGE_BYTES
from sam2_shared.client.embed_sources import (
    STDIN_SOURCE,
    SourceError,
    SourceItem,
    iter_sources,
    video_frame_items,
)
from sam2_shared.client.retry import RetryPolicy
from sam2_shared.counters import Counters
from sam2_shared.embedding import EmbeddingRef
from sam2_shared.errors import Sam2Error
from sam2_shared.wire.status import is_retryable_error

logger = logging.getLogger("sam2_embed")

OK, SKIPPED, FAILED = "ok", "skipped", "failed"
DONE_STATUSES = (OK, SKIPPED)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MIB = 1 << 20
# Room for the request's other fields next to the image bytes in one gRPC message.
REQUEST_OVERHEAD_BYTES = 64 << 10
# A bulk job waits out a busy encoder for as long as --timeout-s allows, not a few attempts.
BULK_RETRY = RetryPolicy(max_attempts=1000, initial_backoff_s=0.2, max_backoff_s=10.0)

# How long Ctrl-C waits for the images in flight, so that their lines reach the manifest.
INTERRUPT_GRACE_S = 30.0

EmbedOne = Callable[[bytes], EmbeddingRef]


@dataclass(frozen=True)
class ManifestEntry:
    """One line of the manifest."""

    path: str
    embedding_id: str | None
    model_id: str
    width: int | None
    height: int | None
    status: str
    reason: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def done_paths(manifest: Path, model_id: str) -> set[str]:
    """Paths the manifest already has ``ok`` or ``skipped`` for ``model_id``.

    A line that does not parse (the last one, when a run was killed mid-write) is ignored: its
    image is simply done again.
    """
    done: set[str] = set()
    if not manifest.exists():
        return done
    with manifest.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("status") in DONE_STATUSES \
                    and entry.get("model_id") == model_id and isinstance(entry.get("path"), str):
                done.add(entry["path"])
    return done


class ManifestWriter:
    """Appends entries to ``path``, one flushed line each (None: writes nothing)."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = None
        if path is None:
            return
        # A run killed mid-line leaves no final newline: start ours on a fresh line.
        needs_newline = path.exists() and path.stat().st_size > 0 and \
            not path.read_bytes()[-1:] == b"\n"
        self._file = path.open("a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def write(self, entry: ManifestEntry) -> None:
        if self._file is not None:
            self._file.write(entry.to_json() + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class Summary(Counters):
    """Counts of a run (the listing thread counts ``found`` and ``resumed``: paths the
    manifest already had done, not redone)."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    resumed: int = 0
    found: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.ok + self.skipped + self.failed

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "skipped": self.skipped, "failed": self.failed,
                "resumed": self.resumed, "found": self.found, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 3), "interrupted": self.interrupted}

    def line(self) -> str:
        return (f"{self.processed} images in {self.seconds:.1f} s ({self.images_per_s:.2f}/s): "
                f"{self.ok} ok, {self.skipped} skipped (already stored), {self.failed} failed, "
                f"{self.resumed} done by an earlier run")


def _hint_s(error: Sam2Error) -> float | None:
    try:
        return float(error.metadata["retry_delay_s"])
    except (KeyError, ValueError):
        return None


def embed_retrying(embed: EmbedOne, data: bytes, *, timeout_s: float,
                   policy: RetryPolicy = BULK_RETRY, rng: random.Random | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> EmbeddingRef:
    """``embed(data)``, retried while the encoder answers this image with a retryable error
    (queue full, not ready: inside an OK ``EmbedImages`` response, so not retried by the
    call's own retries), waiting at least the server's ``retry_delay_s`` hint, for at most
    ``timeout_s`` in all."""
    rng = rng or random.Random()
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            return embed(data)
        except Sam2Error as error:
            if not is_retryable_error(error) or attempt + 1 >= policy.max_attempts:
                raise
            wait = policy.backoff_s(attempt, _hint_s(error), rng)
            if time.monotonic() + wait >= deadline:
                raise
        sleep(wait)
        attempt += 1


def embed_item(item: SourceItem, embed: EmbedOne, model_id: str, max_bytes: int
               ) -> ManifestEntry:
    """Read and embed one item; any failure of this image becomes a ``failed`` entry."""
    try:
        ref = embed(item.read(max_bytes))
    except Sam2Error as exc:
        return ManifestEntry(item.path, None, model_id, None, None, FAILED, exc.reason, str(exc))
    except SourceError as exc:
        return ManifestEntry(item.path, None, model_id, None, None, FAILED, exc.reason,
                             str(exc))
    except Exception as exc:  # one image's surprise must not end a dataset's run
        return ManifestEntry(item.path, None, model_id, None, None, FAILED, "INTERNAL",
                             f"{type(exc).__name__}: {exc}")
    height, width = ref.original_hw
    return ManifestEntry(item.path, ref.embedding_id, ref.model_id, width, height,
                         SKIPPED if ref.already_stored else OK)


_END = object()


def run_embedding(
    items: Iterable[SourceItem],
    embed: EmbedOne,
    *,
    model_id: str,
    concurrency: int,
    manifest: ManifestWriter,
    skip_paths: set[str] | frozenset[str] = frozenset(),
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES,
    on_progress: Callable[[Summary, ManifestEntry | None], None] | None = None,
    stop: threading.Event | None = None,
) -> Summary:
    """Embed every item not in ``skip_paths`` with ``concurrency`` workers; write one manifest
    entry per image as it completes. ``stop`` (or Ctrl-C) ends the run after the images in
    flight; the summary then says ``interrupted``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    stop = stop or threading.Event()
    summary = Summary()
    started = time.monotonic()
    pending: queue.Queue[Any] = queue.Queue(maxsize=2 * concurrency)
    results: queue.Queue[Any] = queue.Queue()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                pending.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if item.path in skip_paths:
                    summary.add(resumed=1)
                    continue
                summary.add(found=1)
                if not put(item):
                    return
        except Exception as exc:  # an expansion bug ends the listing, not the finished work
            results.put(ManifestEntry("(sources)", None, model_id, None, None, FAILED,
                                      "INTERNAL", f"listing the sources failed: {exc}"))
        finally:
            for _ in range(concurrency):
                put(_END)

    def work() -> None:
        while not stop.is_set():
            try:
                item = pending.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            results.put(embed_item(item, embed, model_id, max_bytes))
        results.put(_END)

    threads = [threading.Thread(target=produce, name="sam2-embed-sources", daemon=True)]
    threads += [threading.Thread(target=work, name=f"sam2-embed-{i}", daemon=True)
                for i in range(concurrency)]
    for thread in threads:
        thread.start()
    finished_workers = 0

    def record(entry: ManifestEntry) -> None:
        manifest.write(entry)
        summary.add(**{entry.status: 1})
        if entry.status == FAILED:
            summary.failures.append(f"{entry.path}: {entry.error}")
        summary.seconds = time.monotonic() - started

    try:
        while finished_workers < concurrency:
            try:
                entry = results.get(timeout=0.5)
            except queue.Empty:
                if on_progress is not None:
                    summary.seconds = time.monotonic() - started
                    on_progress(summary, None)
                continue
            if entry is _END:
                finished_workers += 1
                continue
            record(entry)
            if on_progress is not None:
                on_progress(summary, entry)
    except KeyboardInterrupt:
        stop.set()
    if stop.is_set():
        summary.interrupted = True
        # Workers finish the image in hand (for a while); what they finish is recorded.
        give_up_at = time.monotonic() + INTERRUPT_GRACE_S
        for thread in threads[1:]:
            thread.join(timeout=max(0.0, give_up_at - time.monotonic()))
        while True:
            try:
                entry = results.get_nowait()
            except queue.Empty:
                break
            if entry is not _END:
                record(entry)
    summary.seconds = time.monotonic() - started
    return summary


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar (rate, counts, ETA) on a terminal; else a log line every ``every_s``."""

    def __init__(self, stream: IO[str], every_s: float, tty: bool | None = None) -> None:
        self.stream = stream
        self.every_s = every_s
        self.tty = stream.isatty() if tty is None else tty
        self._last_log = time.monotonic()
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="img", file=stream, dynamic_ncols=True,
                             desc="sam2-embed")

    def __call__(self, summary: Summary, entry: ManifestEntry | None) -> None:
        if self._bar is not None:
            self._bar.total = summary.found
            if entry is not None:
                self._bar.set_postfix(ok=summary.ok, skipped=summary.skipped,
                                      failed=summary.failed, refresh=False)
                self._bar.update(1)
            else:
                self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_log >= self.every_s:
            self._last_log = now
            remaining = summary.found - summary.processed
            rate = summary.images_per_s
            eta = f"{remaining / rate:.0f} s" if rate > 0 else "?"
            print(f"sam2-embed: {summary.processed} done of {summary.found} listed so far, "
                  f"{summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed, "
                  f"{rate:.2f} images/s, ETA {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam2-embed",
        description="Pre-embed images (files, folders, globs, s3://bucket/prefix, '-' for "
                    "paths on stdin) through the encoder tier, so that the first click on "
                    "each is fast. Exit code: 0 all ok, 1 some failed, 2 usage, 130 "
                    "interrupted.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE")
    parser.add_argument("--encoder", required=True, metavar="HOST:PORT",
                        help="encoder tier address")
    parser.add_argument("--model", default="sam2.1/hiera_tiny",
                        help="model the encoder serves (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="images in flight (default: %(default)s)")
    parser.add_argument("--manifest", type=Path,
                        help="JSON-lines manifest to append to and resume from")
    parser.add_argument("--api-key", default=os.environ.get("SAM2_API_KEY"),
                        help="API key (default: $SAM2_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    parser.add_argument("--tls-root-certs", metavar="PEM", help="CA of the server certificate")
    parser.add_argument("--tls-client-cert", metavar="PEM", help="client certificate (mTLS)")
    parser.add_argument("--tls-client-key", metavar="PEM", help="client key (mTLS)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="deadline per image, retries included (default: %(default)s)")
    parser.add_argument("--max-image-mb", type=float,
                        default=(DEFAULT_MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES) / MIB,
                        help="larger files fail without being read (default: %(default).2f)")
    parser.add_argument("--max-image-pixels", type=int, default=100_000_000,
                        help="larger images fail (default: %(default)s)")
    parser.add_argument("--log-every-s", type=float, default=10.0,
                        help="progress line interval when not on a terminal")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON summary on stdout at the end")
    parser.add_argument("--video", action="store_true",
                        help="the SOURCEs are local video files: embed every frame for "
                             "tracking (manifest paths PATH#frame=N, ids as StartSession "
                             "takes them)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.max_image_mb <= 0 or args.max_image_pixels < 1 or args.timeout_s <= 0:
        parser.error("--max-image-mb, --max-image-pixels and --timeout-s must be positive")
    if args.video and STDIN_SOURCE in args.sources:
        parser.error("--video takes video file paths, not '-'")
    if args.sources.count(STDIN_SOURCE) > 1:
        parser.error("'-' (paths on stdin) may be given once")
    if args.manifest is not None and args.manifest.is_dir():
        parser.error(f"--manifest {args.manifest} is a folder; give a file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from sam2_shared.client import Sam2Client
    from sam2_shared.model.config import canonical_model_id

    try:
        model_id = canonical_model_id(args.model)
    except ValueError as exc:
        parser.error(str(exc))
    max_bytes = int(args.max_image_mb * MIB)
    try:
        client = Sam2Client(
            encoder=args.encoder, model_id=model_id, timeout_s=args.timeout_s,
            max_message_bytes=max_bytes + REQUEST_OVERHEAD_BYTES,
            max_pixels=args.max_image_pixels, api_key=args.api_key, tls=args.tls,
            tls_root_certs=args.tls_root_certs, tls_client_cert=args.tls_client_cert,
            tls_client_key=args.tls_client_key, retry=BULK_RETRY, array_type="numpy")
    except (OSError, ValueError) as exc:  # unreadable PEM files, bad arguments
        parser.error(str(exc))
    skip = done_paths(args.manifest, model_id) if args.manifest else set()
    manifest = ManifestWriter(args.manifest)
    progress = Progress(sys.stderr, args.log_every_s)
    stdin = sys.stdin if STDIN_SOURCE in args.sources else None
    if args.video:
        items = video_frame_items(args.sources, args.max_image_pixels)
        embed_one: EmbedOne = lambda d: client.embed_video_frames([d])[0]  # noqa: E731
    else:
        items = iter_sources(args.sources, stdin)
        embed_one = lambda d: client.embed_images(d)[0]  # noqa: E731
    try:
        summary = run_embedding(
            items,
            lambda data: embed_retrying(embed_one, data, timeout_s=args.timeout_s),
            model_id=model_id, concurrency=args.concurrency, manifest=manifest,
            skip_paths=skip, max_bytes=max_bytes, on_progress=progress)
    finally:
        progress.close()
        manifest.close()
        client.close()
    for failure in summary.failures[:20]:
        print(f"failed: {failure}", file=sys.stderr)
    if len(summary.failures) > 20:
        print(f"... and {len(summary.failures) - 20} more failures (see the manifest)",
              file=sys.stderr)
    print(f"sam2-embed: {summary.line()}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.to_dict()))
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
