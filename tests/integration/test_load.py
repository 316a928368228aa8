"""Bounded load (count and time) at a sustained rate against two decoder replicas behind
client-side round robin (one channel, both addresses, ``round_robin``): no errors, no wrong
answers (each response's masks equal the in-process model's for that image and prompt), the
rate held. Figures go to the test log (``-s``)."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from sam2_shared.client import Sam2Client
from sam2_shared.inference.sam2_model import Sam2Model
from tests.helpers import REPO_ROOT
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import decoder_process, encoder_process

sys.path.insert(0, str(REPO_ROOT / "bench"))
import bench_load  # noqa: E402

MODEL_ID = "sam2.1/hiera_tiny"
RATE_HZ = 15.0
REQUESTS = 150
MAX_SECONDS = 20.0


def test_sustained_rate_on_two_replicas_round_robin(tiny_checkpoint: Path) -> None:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-load-")
    encoder = encoder_process(tiny_checkpoint, store, "--store-dtype", "float32").start()
    decoders = []
    try:
        decoders = [decoder_process(tiny_checkpoint, store).start() for _ in range(2)]
        images = [synthetic_rgb(240, 320, seed=200 + i) for i in range(3)]
        with Sam2Client(encoder=encoder.address) as client:
            ids = [r.embedding_id for r in client.embed_images(images, input_color_format="rgb")]
        cases = bench_load.make_cases(Sam2Model.from_pretrained(MODEL_ID, tiny_checkpoint),
                                      images, ids)
        target = bench_load.round_robin_target([d.address for d in decoders])
        report = asyncio.run(bench_load.run_load(target, cases, rate_hz=RATE_HZ,
                                                 count=REQUESTS, max_seconds=MAX_SECONDS))
        print(report.summary())
        assert report.errors == {} and report.wrong == 0, report.summary()
        assert report.sent == REQUESTS and report.ok == REQUESTS, report.summary()
        assert report.throughput_hz >= 0.8 * RATE_HZ, report.summary()
        assert json.loads(report.summary())["p99_ms"] < 5000
        for decoder in decoders:  # both replicas alive (and, with round robin, both used)
            assert decoder.process is not None and decoder.process.poll() is None
    finally:
        for process in (*decoders, encoder):
            process.stop()
