"""How long a client streaming frames (``StartSessionFromFrames``) waits for them to be embedded.

Starts the encoder and one decoder (real CLIs, loopback, diskcache store in a temp dir) per
``--code`` tree (default: this one; give two, e.g. an export of main and this tree, to compare
them interleaved round by round), then per round streams ``--frames`` fresh frames with
``--gap-s`` between them, as a camera or a slow upload would, and times from the first frame
sent to the session's answer and to every frame being in the store (polled). Prints each
round and the medians.

    python bench/bench_frame_stream.py [--frames 8] [--gap-s 0.3] [--rounds 5] \\
        [--code /tmp/main-export --code .]

Random sam2.1/hiera_tiny weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_shared.client.tracking import Sam2TrackingClient  # noqa: E402
from sam2_shared.store import open_store  # noqa: E402
from tests.helpers import tier_processes  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.scratch import use_scratch_tempdir  # noqa: E402
from tests.helpers.synthetic_images import synthetic_rgb  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"


def start_fleet(code: Path, checkpoint: Path) -> tuple[str, list[tier_processes.TierProcess]]:
    """Encoder and decoder running the code in ``code`` (first on their PYTHONPATH)."""
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-bench-stream-")
    tier_processes.REPO_ROOT = code
    encoder = tier_processes.encoder_process(checkpoint, store).start()
    decoder = tier_processes.decoder_process(checkpoint, store, "--encoder-address",
                                             encoder.address).start()
    return store, [encoder, decoder]


def one_round(store_url: str, encoder: str, decoder: str, frames: list[np.ndarray],
              gap_s: float) -> tuple[float, float, float]:
    """(answer, all embedded, all embedded after the last frame sent), in seconds."""
    sent: list[float] = []

    def paced() -> Iterator[np.ndarray]:
        for index, frame in enumerate(frames):
            if index:
                time.sleep(gap_s)
            sent.append(time.perf_counter())
            yield frame

    store = open_store(store_url)
    with Sam2TrackingClient(encoder, decoder, model_id=MODEL_ID, timeout_s=300.0) as client:
        session = client.start_session(frames=paced())
        answered = time.perf_counter()
        while not all(store.has_embedding(i) for i in session.frame_embedding_ids):
            time.sleep(0.005)
        embedded = time.perf_counter()
        client.close_session(session.session_id)
    return answered - sent[0], embedded - sent[0], embedded - sent[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--gap-s", type=float, default=0.3)
    parser.add_argument("--size", default="360x640", help="HxW of the frames")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--code", type=Path, action="append",
                        help="a tree whose tiers to run (repeat to compare; default: this)")
    args = parser.parse_args()
    use_scratch_tempdir("sam2-bench-", remove_at_exit=True)
    height, width = map(int, args.size.split("x"))
    codes = [path.resolve() for path in args.code or [REPO]]
    checkpoint = make_random_checkpoint(MODEL_ID)
    fleets = [start_fleet(code, checkpoint) for code in codes]
    results: dict[Path, list[tuple[float, float, float]]] = {code: [] for code in codes}
    try:
        for round_index in range(args.rounds):
            # Fresh frames each round (the encoder skips frames it stored before); the
            # same ones for every tree.
            frames = [synthetic_rgb(height, width, seed=1000 * round_index + i)
                      for i in range(args.frames)]
            for code, (store, (encoder, decoder)) in zip(codes, fleets, strict=True):
                times = one_round(store, encoder.address, decoder.address, frames, args.gap_s)
                results[code].append(times)
                print(f"round {round_index} {code}: answer {times[0]:.2f} s, all embedded "
                      f"{times[1]:.2f} s, {times[2]:.2f} s after the last frame", flush=True)
    finally:
        for _, processes in fleets:
            for process in processes:
                process.stop()
    print(f"{args.frames} frames of {width}x{height}, {args.gap_s} s apart, medians of "
          f"{args.rounds} rounds (from the first frame sent):")
    for code, rows in results.items():
        answer, embedded, after = (statistics.median(column) for column in zip(*rows))
        print(f"  {code}: answer {answer:.2f} s, all embedded {embedded:.2f} s, "
              f"{after:.2f} s after the last frame")


if __name__ == "__main__":
    main()
