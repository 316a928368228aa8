"""Measure the peak RSS of both tiers under a little load: the numbers behind the resource
requests and limits in ``k8s/base`` (see ``k8s/README.md``).

Usage (from the repository root, venv active)::

    python k8s/measure_rss.py --checkpoint PATH [--model sam2.1/hiera_tiny] [--images 4]

Starts ``python -m encoder_service`` and ``python -m decoder_service`` on 127.0.0.1 sharing
a temporary diskcache store, embeds ``--images`` images in one request (one full batch),
segments each image ``--rounds`` times with 8 prompts, then reads ``VmHWM`` (peak RSS) of both
processes from /proc before stopping them. Linux only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sam2_shared.client import Sam2Client  # noqa: E402

LISTENING = re.compile(rb"SAM2_LISTENING port=(\d+)")


def start(module: str, args: list[str], workdir: Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = (workdir / f"{module}.out").open("wb")
    err = (workdir / f"{module}.err").open("wb")
    process = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", "0", *args],
                               stdout=out, stderr=err, cwd=workdir, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = LISTENING.search((workdir / f"{module}.out").read_bytes())
        if found:
            return process, int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError((workdir / f"{module}.err").read_text())
        time.sleep(0.1)
    raise RuntimeError(f"{module} did not start")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--model", default="sam2.1/hiera_tiny")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sam2-rss-"))
    store = f"diskcache://{workdir}/store"
    common = ["--model", args.model, "--checkpoint", args.checkpoint, "--store", store]
    encoder, encoder_port = start("encoder_service", [*common, "--max-batch-size",
                                                      str(args.images)], workdir)
    decoder, decoder_port = start("decoder_service", common, workdir)
    try:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (768, 1024, 3), np.uint8) for _ in range(args.images)]
        with Sam2Client(f"127.0.0.1:{encoder_port}", f"127.0.0.1:{decoder_port}",
                        model_id=args.model, timeout_s=600) as client:
            deadline = time.monotonic() + 300
            while True:  # wait for both tiers to be SERVING
                try:
                    refs = client.embed_images(images, input_color_format="rgb")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            points = rng.uniform(0, 700, (8, 1, 2)).astype(np.float32)
            labels = np.ones((8, 1), np.int32)
            for _ in range(args.rounds):
                for ref in refs:
                    while True:
                        try:
                            client.segment_images(embeddings=ref, point_coordinates=points,
                                                  point_labels=labels)
                            break
                        except Exception:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(1)
        print(f"model {args.model}: encoder peak RSS {peak_rss_mib(encoder.pid):.0f} MiB "
              f"(batch of {args.images}), decoder peak RSS {peak_rss_mib(decoder.pid):.0f} MiB")
    finally:
        for process in (encoder, decoder):
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
