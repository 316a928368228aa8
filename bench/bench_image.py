"""Side-by-side benchmark of our SAM 2 image path against Meta's reference.

Both run in this process on the same random official-format checkpoint, on the CPU,
with ``torch.set_num_threads(--threads)``. Timings alternate between the two
implementations (ours, reference, ours, ...) so background load hits both alike, and
the table reports medians. Peak memory is measured in child processes (ru_maxrss after
loading the model and embedding one image).

    python bench/bench_image.py --models sam2.1/hiera_tiny --out BENCHMARKS.md

Needs the test dependencies (Meta's ``sam2==1.1.0``; see scripts/setup_env.sh).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam2_shared import Sam2Model  # noqa: E402
from sam2_shared.prompts import Prompt  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.reference import ReferenceImage, build_reference_model  # noqa: E402

HEIGHT, WIDTH = 1080, 1920


def bench_image() -> np.ndarray:
    """A deterministic 1080x1920 RGB image with structure."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) // 8 % 256], -1).astype(np.uint8)
    rgb[200:700, 400:1200] = (230, 40, 40)
    rgb[500:900, 1300:1700] = (30, 200, 60)
    return rgb


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved, after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_timings(model_id: str, repeats_encode: int, repeats_decode: int) -> dict[str, float]:
    checkpoint = make_random_checkpoint(model_id)
    rgb = bench_image()
    reference = ReferenceImage(model_id, checkpoint)
    predictor = reference.predictor
    ours = Sam2Model.from_pretrained(model_id, checkpoint=checkpoint)
    ours_bf16 = Sam2Model.from_pretrained(model_id, checkpoint=checkpoint, precision="bf16")

    results: dict[str, float] = {}
    enc = alternate(
        {
            "ours": lambda: ours.encode_rgb([rgb]),
            "ref": lambda: predictor.set_image(rgb),
            "ours_bf16": lambda: ours_bf16.encode_rgb([rgb]),
        },
        repeats_encode,
    )
    results.update({f"encode_{k}_s": v for k, v in enc.items()})

    embedding = ours.encode_rgb([rgb])[0]
    embedding_bf16 = ours_bf16.encode_rgb([rgb])[0]
    predictor.set_image(rgb)
    point = np.array([[800.0, 450.0]], np.float32)
    label = np.array([1], np.int32)
    one = [Prompt(point, label, multimask_output=True)]
    rng = np.random.default_rng(0)
    points16 = rng.uniform((0, 0), (WIDTH, HEIGHT), size=(16, 1, 2)).astype(np.float32)
    labels16 = np.ones((16, 1), np.int32)
    sixteen = [Prompt(points16[i], labels16[i]) for i in range(16)]

    dec1 = alternate(
        {
            "ours": lambda: ours.decode_prompts(embedding, one),
            "ref": lambda: predictor.predict(point, label, multimask_output=True),
            "ours_bf16": lambda: ours_bf16.decode_prompts(embedding_bf16, one),
        },
        repeats_decode,
    )
    results.update({f"decode1_{k}_s": v for k, v in dec1.items()})
    dec16 = alternate(
        {
            "ours": lambda: ours.decode_prompts(embedding, sixteen),
            "ref": lambda: predictor.predict(points16, labels16, multimask_output=True),
            "ours_bf16": lambda: ours_bf16.decode_prompts(embedding_bf16, sixteen),
        },
        max(3, repeats_decode // 3),
    )
    results.update({f"decode16_{k}_s": v for k, v in dec16.items()})

    # Agreement: fp32 ours vs reference, bf16 ours vs fp32 ours (16 prompts).
    ref_masks, _, _ = predictor.predict(points16, labels16, multimask_output=True)
    fp32 = ours.decode_prompts(embedding, sixteen)
    bf16 = ours_bf16.decode_prompts(embedding_bf16, sixteen)
    results["iou_fp32_vs_ref_min"] = min(
        mask_iou(fp32[i].masks[0, c], ref_masks[i, c] > 0) for i in range(16) for c in range(3)
    )
    best = [int(p.scores[0].argmax()) for p in fp32]
    results["iou_bf16_vs_fp32_best_mean"] = float(
        np.mean([mask_iou(bf16[i].masks[0, best[i]], fp32[i].masks[0, best[i]]) for i in range(16)])
    )
    results["iou_bf16_vs_fp32_best_min"] = float(
        min(mask_iou(bf16[i].masks[0, best[i]], fp32[i].masks[0, best[i]]) for i in range(16))
    )
    return results


def child_peak_memory(impl: str, model_id: str, threads: int) -> float:
    """Peak RSS (MiB) of a fresh process that loads ``impl`` and embeds one image."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, "--models", model_id,
         "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def child_main(impl: str, model_id: str) -> None:
    checkpoint = make_random_checkpoint(model_id)
    rgb = bench_image()
    if impl == "ref":
        reference = ReferenceImage(model_id, checkpoint)
        reference.predictor.set_image(rgb)
        reference.predictor.predict(np.array([[800.0, 450.0]]), np.array([1]))
    elif impl == "ref_load":
        build_reference_model(model_id, checkpoint)
    else:
        parts = {"ours": "all", "ours_encoder": "encoder", "ours_decoder": "decoder"}[impl]
        model = Sam2Model.from_pretrained(model_id, checkpoint=checkpoint, parts=parts)
        if parts != "decoder":
            model.encode_rgb([rgb])
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child started by a big parent reports the
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sam2.1/hiera_tiny", help="comma-separated ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats-encode", type=int, default=3)
    parser.add_argument("--repeats-decode", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory children")
    parser.add_argument("--out", help="append a markdown section to this file")
    parser.add_argument("--json", help="write raw results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child_main(args.child, args.models)
        return

    machine = f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}"
    rows, raw = [], {}
    for model_id in args.models.split(","):
        r = run_timings(model_id, args.repeats_encode, args.repeats_decode)
        if not args.no_memory:
            for impl in ("ref", "ours", "ours_decoder"):
                r[f"peak_rss_{impl}_mib"] = child_peak_memory(impl, model_id, args.threads)
        raw[model_id] = r
        rows.append((model_id, r))
        print(json.dumps({model_id: r}, indent=1), flush=True)

    lines = [
        f"### Image path, {HEIGHT}x{WIDTH} image, fp32 unless noted",
        "",
        f"Machine: {machine}. Medians; ratios are reference time / our time (higher is better).",
        "",
        "| model | encode ref (s) | encode ours (s) | ratio | encode bf16 (s) | ratio "
        "| 1 prompt ref (ms) | ours (ms) | ratio | bf16 (ms) | ratio "
        "| 16 prompts ref (ms) | ours (ms) | ratio | bf16 (ms) | ratio |",
        "|---" * 16 + "|",
    ]
    for model_id, r in rows:
        def ratio(prefix: str, impl: str, r: dict = r) -> str:
            return f"{r[f'{prefix}_ref_s'] / r[f'{prefix}_{impl}_s']:.2f}x"

        lines.append(
            f"| {model_id} | {r['encode_ref_s']:.2f} | {r['encode_ours_s']:.2f} | "
            f"{ratio('encode', 'ours')} | {r['encode_ours_bf16_s']:.2f} | "
            f"{ratio('encode', 'ours_bf16')} | {r['decode1_ref_s'] * 1e3:.1f} | "
            f"{r['decode1_ours_s'] * 1e3:.1f} | {ratio('decode1', 'ours')} | "
            f"{r['decode1_ours_bf16_s'] * 1e3:.1f} | {ratio('decode1', 'ours_bf16')} | "
            f"{r['decode16_ref_s'] * 1e3:.0f} | {r['decode16_ours_s'] * 1e3:.0f} | "
            f"{ratio('decode16', 'ours')} | {r['decode16_ours_bf16_s'] * 1e3:.0f} | "
            f"{ratio('decode16', 'ours_bf16')} |"
        )
    lines += ["", "| model | min mask IoU ours fp32 vs ref | bf16 vs fp32 IoU (mean / min) "
              "| peak RSS ref (MiB) | ours (MiB) | ours decoder-only (MiB) |", "|---" * 6 + "|"]
    for model_id, r in rows:
        mem = [r.get(f"peak_rss_{i}_mib") for i in ("ref", "ours", "ours_decoder")]
        mem_text = " | ".join("n/a" if m is None else f"{m:.0f}" for m in mem)
        lines.append(
            f"| {model_id} | {r['iou_fp32_vs_ref_min']:.4f} | "
            f"{r['iou_bf16_vs_fp32_best_mean']:.4f} / {r['iou_bf16_vs_fp32_best_min']:.4f} | "
            f"{mem_text} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
