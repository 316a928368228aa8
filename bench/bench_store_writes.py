"""What one write to the diskcache store costs: our writer next to diskcache's own.

The decoder writes every click's logits (3 candidates x 256 x 256 float32, 786 KB encoded)
to the store behind the response, and the encoder writes every embedding; both are files in
the cache directory. diskcache's stock writer iterates the value as a ``BytesIO``, which
yields lines, so a float payload went to the file in ~3,000 small writes. This times
``put`` of the real encoded entries through ``DiskBlobStore`` (our ``BytesOnlyDisk``) and
through a cache with diskcache's default ``Disk``, alternating, in one run: CPU and wall
milliseconds per put, medians.

    python bench/bench_store_writes.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diskcache
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_image import cpu_name  # noqa: E402

from sam2_shared.embedding import ImageEmbedding  # noqa: E402
from sam2_shared.store import codec  # noqa: E402
from sam2_shared.store.disk_store import DiskBlobStore  # noqa: E402


def payloads() -> dict[str, bytes]:
    """The encoded entries a click and an embedding put in the store (random values)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 256, 256, generator=generator).numpy()
    embedding = ImageEmbedding(
        image_embed=torch.randn(1, 256, 64, 64, generator=generator),
        high_res_feats=(torch.randn(1, 32, 256, 256, generator=generator),
                        torch.randn(1, 64, 128, 128, generator=generator)),
        original_hw=(1080, 1920), model_id="sam2.1/hiera_tiny", embedding_id="bench",
    )
    return {
        "click logits (fp32)": codec.encode_logits(np.ascontiguousarray(logits)),
        "embedding (fp16)": codec.encode_embedding(embedding, storage_dtype="float16"),
    }


def time_puts(cache: diskcache.Cache, data: bytes, repeats: int, tag: str
              ) -> tuple[float, float]:
    """Median (CPU ms, wall ms) of ``repeats`` puts of ``data`` under fresh keys, each
    deleted after it is timed."""
    cpu, wall = [], []
    for index in range(repeats):
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        cache.set(f"{tag}-{index}", data, expire=600)
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started_wall)
        # Deleted before the kernel writes it back: a run of back-to-back 8 MB writes
        # otherwise measures the disk's dirty-page throttling, whichever writer hits it.
        cache.delete(f"{tag}-{index}")
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="puts per payload and writer")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, python {sys.version.split()[0]}, diskcache "
          f"{diskcache.__version__}; {args.repeats} puts per entry and writer, in rounds of "
          "20 alternating the writers; the median of the rounds' medians\n")
    print("| entry | bytes | writer | CPU ms / put | wall ms / put |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="sam2-bench-store-") as scratch:
        ours = DiskBlobStore(str(Path(scratch) / "ours"), size_limit_bytes=8 << 30).cache
        stock = diskcache.Cache(str(Path(scratch) / "stock"), size_limit=8 << 30,
                                eviction_policy="least-recently-used")
        for name, data in payloads().items():
            results: dict[str, list[tuple[float, float]]] = {"ours": [], "stock": []}
            rounds = max(1, args.repeats // 20)
            for round_index in range(rounds):
                for label, cache in (("ours", ours), ("stock", stock)):
                    results[label].append(
                        time_puts(cache, data, 20, f"{name}-{round_index}"))
            for label, writer in (("ours", "ours (one write call)"),
                                  ("stock", "diskcache's Disk")):
                cpu = statistics.median(r[0] for r in results[label])
                wall = statistics.median(r[1] for r in results[label])
                print(f"| {name} | {len(data):,} | {writer} | {cpu:.2f} | {wall:.2f} |")
        ours.close()
        stock.close()


if __name__ == "__main__":
    main()
