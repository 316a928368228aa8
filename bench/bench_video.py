"""Video tracking on CPU: ours (``VideoSession.propagate``) vs Meta's
``SAM2VideoPredictor.propagate_in_video``, per-frame time per object and process memory.

    python bench/bench_video.py --model sam2.1/hiera_tiny --frames 10,50 --out BENCHMARKS.md
    python bench/bench_video.py --frames 6 --objects 4   # objects tracked together

Each implementation runs in its own child process (so their RSS do not mix), one object
(a click on frame 0), tracked forward over max(--frames) frames; RSS is read after 10, 50,
... frames. To keep the run affordable, 10 distinct frames are encoded once and the clip
cycles them (the reference memoises its image encoder per distinct frame; ours reads the
same 10 embeddings): only tracking is timed. The reference is built as users get it
(``build_sam2_video_predictor``) with the CPU dtype workaround of
``tests/parity/test_video_parity.py``; it loads every frame at init (``init_state``) and keeps
every frame's output, so its memory grows with the video; ours keeps a bounded window.
Random official-format weights (``tests/helpers/checkpoints.py``) with the object-score bias
shifted so the object stays present (speed does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DISTINCT_FRAMES = 10
HEIGHT, WIDTH = 96, 128  # frames are resized to 1024 anyway; small keeps decode/upsample cheap
CLICK = np.array([[40.0, 48.0]], dtype=np.float32)


def click(obj_id: int) -> np.ndarray:
    """Object 1 on the moving square, others spread over the frame."""
    if obj_id == 1:
        return CLICK
    return np.array([[8.0 + (obj_id * 37) % (WIDTH - 16), 8.0 + (obj_id * 23) % (HEIGHT - 16)]],
                    dtype=np.float32)


TRIM = False  # --trim: hand freed heap back to the OS before reading RSS (glibc malloc_trim)


def rss_bytes() -> int:
    gc.collect()
    if TRIM:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def frame(t: int) -> np.ndarray:
    rng = np.random.default_rng(t)
    rgb = rng.integers(0, 80, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    x0 = 20 + 6 * t
    rgb[30:70, x0 : x0 + 40] = (230, 200, 40)
    return rgb


def present_checkpoint(model_id: str, folder: Path) -> Path:
    from tests.helpers.checkpoints import make_random_checkpoint

    blob = torch.load(make_random_checkpoint(model_id), map_location="cpu", weights_only=True)
    blob["model"]["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] += 1.0
    path = folder / f"{model_id.replace('/', '_')}_present.pt"
    torch.save(blob, path)
    return path


def track(frames: Any, checkpoints: list[int]) -> dict[str, Any]:
    """Iterate a propagation; per-frame seconds (frame 0, the prompted one, excluded) and
    RSS after each checkpoint count of frames."""
    times: list[float] = []
    rss: dict[str, int] = {}
    started = time.perf_counter()
    for count, _ in enumerate(frames, start=1):
        now = time.perf_counter()
        if count > 1:
            times.append(now - started)
        if count in checkpoints:
            rss[str(count)] = rss_bytes()
        started = time.perf_counter()
    return {"per_frame_s": statistics.median(times), "rss": rss, "frames": len(times) + 1}


def run_ours(model_id: str, checkpoint: Path, checkpoints: list[int], objects: int
             ) -> dict[str, Any]:
    from sam2_shared.inference.video import FrameSource, Sam2VideoModel

    model = Sam2VideoModel.from_pretrained(model_id, checkpoint, device="cpu")
    embeddings = model.embed_frames([frame(t) for t in range(DISTINCT_FRAMES)])
    model.encoder = None  # the tracking side does not need Hiera any more
    num_frames = max(checkpoints)
    source = FrameSource(num_frames, (HEIGHT, WIDTH),
                         lambda i: embeddings[i % DISTINCT_FRAMES])
    session = model.start_session(source)
    for obj_id in range(1, objects + 1):
        session.add_points(0, obj_id, points=click(obj_id), labels=np.array([1]))
    out = track(session.propagate(), checkpoints)
    out["state_bytes"] = session.state_nbytes()
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_precision_iou(model_id: str, checkpoint: Path, num_frames: int, objects: int,
                      margin: float) -> dict[str, Any]:
    """Two sessions of ours, float32 and bfloat16 tracking, stepped alternately over the same
    clip: per-frame time of each and the bfloat16 masks' IoU against float32 on every tracked
    frame and object (plainly, and only over pixels where |float32 logit| > margin)."""
    from sam2_shared.inference.video import FrameSource, Sam2VideoModel

    exact = Sam2VideoModel.from_pretrained(model_id, checkpoint, device="cpu")
    low = Sam2VideoModel(exact.config, exact.decoder, copy.deepcopy(exact.tracker),
                         device="cpu", tracking_dtype="bfloat16")
    embeddings = exact.embed_frames([frame(t) for t in range(DISTINCT_FRAMES)])
    runs = []
    for model in (exact, low):
        source = FrameSource(num_frames, (HEIGHT, WIDTH),
                             lambda i: embeddings[i % DISTINCT_FRAMES])
        session = model.start_session(source)
        for obj_id in range(1, objects + 1):
            session.add_points(0, obj_id, points=click(obj_id), labels=np.array([1]))
        runs.append(session.propagate())
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    ious, margin_ious, score_flips = [], [], 0
    for count in range(num_frames):
        results = []
        for name, run in zip(times, runs, strict=True):
            started = time.perf_counter()
            results.append(next(run))
            if count:
                times[name].append(time.perf_counter() - started)
        ref, got = results
        for o in range(len(ref.obj_ids)):
            ious.append(mask_iou(ref.logits[o] > 0, got.logits[o] > 0))
            sure = np.abs(ref.logits[o]) > margin
            margin_ious.append(mask_iou((ref.logits[o] > 0) & sure, (got.logits[o] > 0) & sure))
            score_flips += int((ref.object_score_logits[o] > 0)
                               != (got.object_score_logits[o] > 0))
    return {"ms_float32": 1000 * statistics.median(times["float32"]),
            "ms_bfloat16": 1000 * statistics.median(times["bfloat16"]),
            "iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
            "margin": margin, "margin_iou_mean": float(np.mean(margin_ious)),
            "margin_iou_min": float(np.min(margin_ious)), "score_flips": score_flips,
            "frames": num_frames, "objects": objects}


def run_reference(model_id: str, checkpoint: Path, checkpoints: list[int], objects: int
                  ) -> dict[str, Any]:
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from tests.helpers.reference import config_for

    num_frames = max(checkpoints)
    folder = Path(tempfile.mkdtemp(prefix="bench-video-"))
    for t in range(num_frames):
        Image.fromarray(frame(t % DISTINCT_FRAMES)).save(folder / f"{t}.jpg", quality=95)
    predictor = build_sam2_video_predictor(config_for(model_id), str(checkpoint), device="cpu")
    encode = predictor.forward_image
    memo: dict[int, dict[str, Any]] = {}
    frame_of: dict[int, int] = {}

    def forward_image_memoised(image: torch.Tensor) -> dict[str, Any]:
        if image.data_ptr() not in frame_of:  # init_state's warm-up, before frame_of is set
            return encode(image)
        key = frame_of[image.data_ptr()] % DISTINCT_FRAMES
        if key not in memo:
            memo[key] = encode(image)
        return {k: list(v) if isinstance(v, list) else v for k, v in memo[key].items()}

    predictor.forward_image = forward_image_memoised
    attend = predictor.memory_attention.forward

    def memory_attention_promoted(*args: Any, **kwargs: Any) -> torch.Tensor:
        for name in ("memory", "memory_pos"):  # reference CPU dtype bug, see the parity test
            if kwargs[name].dtype == torch.bfloat16:
                kwargs[name] = kwargs[name].float()
        return attend(*args, **kwargs)

    predictor.memory_attention.forward = memory_attention_promoted
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = predictor.init_state(str(folder))
        frame_of.update({state["images"][t].data_ptr(): t for t in range(num_frames)})
        for t in range(DISTINCT_FRAMES):  # encode the distinct frames up front, untimed
            forward_image_memoised(state["images"][t].float().unsqueeze(0))
        for obj_id in range(1, objects + 1):
            predictor.add_new_points_or_box(state, 0, obj_id, points=click(obj_id),
                                            labels=np.array([1], np.int32))
        return track((o for o in predictor.propagate_in_video(state)), checkpoints)


def child(args: argparse.Namespace) -> None:
    global TRIM
    TRIM = args.trim
    torch.set_num_threads(args.threads)
    checkpoints = [int(n) for n in args.frames.split(",")]
    run = run_ours if args.impl == "ours" else run_reference
    print("RESULT " + json.dumps(run(args.model, Path(args.checkpoint), checkpoints,
                                     args.objects)), flush=True)


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
    parser.add_argument("--model", default="sam2.1/hiera_tiny")
    parser.add_argument("--frames", default="10,50", help="RSS checkpoints; the run tracks "
                        "max of them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--objects", type=int, default=1,
                        help="objects clicked on frame 0 and tracked together")
    parser.add_argument("--out", help="append the table to this Markdown file")
    parser.add_argument("--trim", action="store_true", help="malloc_trim before each RSS read "
                        "(separates memory in use from heap the allocator keeps)")
    parser.add_argument("--impl-only", choices=("ours", "reference"),
                        help="run one implementation (no table)")
    parser.add_argument("--iou-frames", type=int, help="instead of the table: track this many "
                        "frames with ours in float32 and bfloat16 side by side, report times "
                        "and the bfloat16 masks' IoU against float32")
    parser.add_argument("--margin", type=float, default=1.0, help="IoU also over the pixels "
                        "where |float32 logit| > margin")
    parser.add_argument("--impl", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        child(args)
        return
    if args.iou_frames:
        torch.set_num_threads(args.threads)
        checkpoint = present_checkpoint(args.model, Path(tempfile.mkdtemp(prefix="bench-ckpt-")))
        print(json.dumps(run_precision_iou(args.model, checkpoint, args.iou_frames,
                                           args.objects, args.margin)))
        return
    if (Path.cwd() / "sam2").is_dir():
        raise SystemExit("run from a directory without a sam2/ folder")
    checkpoint = present_checkpoint(args.model, Path(tempfile.mkdtemp(prefix="bench-ckpt-")))
    results = {}
    for impl in (args.impl_only,) if args.impl_only else ("reference", "ours"):
        started = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        done = subprocess.run(
            [sys.executable, __file__, "--impl", impl, "--model", args.model, "--frames",
             args.frames, "--threads", str(args.threads), "--checkpoint", str(checkpoint),
             "--objects", str(args.objects),
             *(["--trim"] if args.trim else [])],
            capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{impl} failed:\n{done.stderr[-4000:]}")
        results[impl] = json.loads(line[len("RESULT "):])
        print(f"{impl}: {results[impl]} ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.impl_only:
        return
    counts = [int(n) for n in args.frames.split(",")]
    mib = 1024 * 1024
    lines = [
        f"### Tracking, {args.objects} object(s) ({cpu_name()}, {args.threads} threads, torch "
        f"{torch.__version__}, {args.model}, {HEIGHT}x{WIDTH} frames)",
        "",
        f"| implementation | ms per frame, all {args.objects} object(s) (median) | "
        + " | ".join(f"RSS after {n} frames (MiB)" for n in counts) + " |",
        "|---|---|" + "---|" * len(counts),
    ]
    names = {"reference": "reference `propagate_in_video`", "ours": "ours `VideoSession`"}
    for impl in ("reference", "ours"):
        r = results[impl]
        lines.append(f"| {names[impl]} | {1000 * r['per_frame_s']:.0f} | "
                     + " | ".join(f"{r['rss'][str(n)] / mib:.0f}" for n in counts) + " |")
    lines.append("")
    lines.append(f"Our tracking state after {max(counts)} frames: "
                 f"{results['ours']['state_bytes'] / mib:.2f} MiB for {args.objects} "
                 "object(s).")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + table)


if __name__ == "__main__":
    main()
