"""Video tracking on CPU: ours (``VideoSession.propagate``) vs Meta's
``SAM2VideoPredictor.propagate_in_video``, per-frame time per object and process memory.

    python bench/bench_video.py --model sam2.1/hiera_tiny --frames 10,50 --out BENCHMARKS.md
    python bench/bench_video.py --frames 6 --objects 4   # objects tracked together
    python bench/bench_video.py --frames 10,50,100 --objects 1,4,16 --embed both \
        --impls reference,ours,ours-bf16 --rounds 2 --out BENCHMARKS.md   # the full table
    python bench/bench_video.py --iou-frames 50   # bf16 vs fp32 masks, side by side

Implementations: ``reference``, ``ours`` (float32) and ``ours-bf16`` (``tracking_dtype=
"bfloat16"``). ``--rounds R`` runs the implementations in turn R times (interleaved, so a
shared machine's load falls on all alike) and reports medians. Source frames are
``--size`` (default 1920x1080). ``--embed included`` encodes every frame as it is tracked
(ours: its in-process encoder part; the reference: its ``forward_image``, not memoised).

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
PATTERN_H, PATTERN_W = 96, 128  # the scene, drawn small and scaled up to --size
HEIGHT, WIDTH = 1080, 1920  # source frames (--size)
EMBED = False  # --embed included: every tracked frame is encoded as it is reached
CLICK = np.array([[40.0, 48.0]], dtype=np.float32)


def click(obj_id: int) -> np.ndarray:
    """Object 1 on the moving square, others spread over the frame (source pixels)."""
    if obj_id == 1:
        xy = CLICK
    else:
        xy = np.array([[8.0 + (obj_id * 37) % (PATTERN_W - 16),
                        8.0 + (obj_id * 23) % (PATTERN_H - 16)]], dtype=np.float32)
    return (xy * np.array([WIDTH / PATTERN_W, HEIGHT / PATTERN_H])).astype(np.float32)


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
    rgb = rng.integers(0, 80, size=(PATTERN_H, PATTERN_W, 3), dtype=np.uint8)
    x0 = 20 + 6 * t
    rgb[30:70, x0 : x0 + 40] = (230, 200, 40)
    rows = np.arange(HEIGHT) * PATTERN_H // HEIGHT
    cols = np.arange(WIDTH) * PATTERN_W // WIDTH
    return np.ascontiguousarray(rgb[rows][:, cols])


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


def run_ours(model_id: str, checkpoint: Path, checkpoints: list[int], objects: int,
             tracking_dtype: str = "float32") -> dict[str, Any]:
    from sam2_shared.inference.video import FrameSource, Sam2VideoModel

    model = Sam2VideoModel.from_pretrained(model_id, checkpoint, device="cpu",
                                           tracking_dtype=tracking_dtype)
    num_frames = max(checkpoints)
    if EMBED:
        source = FrameSource(num_frames, (HEIGHT, WIDTH),
                             lambda i: model.embed_frames([frame(i % DISTINCT_FRAMES)])[0])
    else:
        embeddings = model.embed_frames([frame(t) for t in range(DISTINCT_FRAMES)])
        model.encoder = None  # the tracking side does not need Hiera any more
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
    fp32_pixels: list[int] = []
    bf16_pixels: list[int] = []
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
            fp32_pixels.append(int((ref.logits[o] > 0).sum()))
            bf16_pixels.append(int((got.logits[o] > 0).sum()))
            sure = np.abs(ref.logits[o]) > margin
            margin_ious.append(mask_iou((ref.logits[o] > 0) & sure, (got.logits[o] > 0) & sure))
            score_flips += int((ref.object_score_logits[o] > 0)
                               != (got.object_score_logits[o] > 0))
    return {"ms_float32": 1000 * statistics.median(times["float32"]),
            "ms_bfloat16": 1000 * statistics.median(times["bfloat16"]),
            "iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
            "margin": margin, "margin_iou_mean": float(np.mean(margin_ious)),
            "margin_iou_min": float(np.min(margin_ious)), "score_flips": score_flips,
            "frames": num_frames, "objects": objects,
            "per_frame_iou": [round(iou, 4) for iou in ious],
            "fp32_mask_pixels": fp32_pixels, "bf16_mask_pixels": bf16_pixels}


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
        # Warm-up in init_state comes before frame_of is set; --embed included: no memo.
        if EMBED or image.data_ptr() not in frame_of:
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
        # The distinct frames are encoded up front, untimed.
        for t in range(0 if EMBED else min(DISTINCT_FRAMES, num_frames)):
            forward_image_memoised(state["images"][t].float().unsqueeze(0))
        for obj_id in range(1, objects + 1):
            predictor.add_new_points_or_box(state, 0, obj_id, points=click(obj_id),
                                            labels=np.array([1], np.int32))
        return track((o for o in predictor.propagate_in_video(state)), checkpoints)


def child(args: argparse.Namespace) -> None:
    global TRIM, EMBED
    TRIM, EMBED = args.trim, args.embed == "included"
    torch.set_num_threads(args.threads)
    checkpoints = [int(n) for n in args.frames.split(",")]
    checkpoint = Path(args.checkpoint)
    if args.impl == "reference":
        result = run_reference(args.model, checkpoint, checkpoints, int(args.objects))
    else:
        result = run_ours(args.model, checkpoint, checkpoints, int(args.objects),
                          "bfloat16" if args.impl == "ours-bf16" else "float32")
    print("RESULT " + json.dumps(result), flush=True)


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
    parser.add_argument("--objects", default="1", help="comma-separated object counts, one "
                        "row each: objects clicked on frame 0 and tracked together")
    parser.add_argument("--impls", default="reference,ours,ours-bf16",
                        help="comma-separated: reference, ours, ours-bf16")
    parser.add_argument("--embed", choices=("excluded", "included", "both"), default="excluded",
                        help="time per frame without or with encoding each frame")
    parser.add_argument("--rounds", type=int, default=1, help="run the implementations in "
                        "turn this many times; medians")
    parser.add_argument("--size", default="1920x1080", help="source frame WIDTHxHEIGHT")
    parser.add_argument("--out", help="append the table to this Markdown file")
    parser.add_argument("--trim", action="store_true", help="malloc_trim before each RSS read "
                        "(separates memory in use from heap the allocator keeps)")
    parser.add_argument("--iou-frames", type=int, help="instead of the table: track this many "
                        "frames with ours in float32 and bfloat16 side by side, report times "
                        "and the bfloat16 masks' IoU against float32")
    parser.add_argument("--margin", type=float, default=1.0, help="IoU also over the pixels "
                        "where |float32 logit| > margin")
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global HEIGHT, WIDTH
    from tests.helpers.scratch import use_scratch_tempdir

    use_scratch_tempdir("sam2-bench-", remove_at_exit=True)
    WIDTH, HEIGHT = (int(n) for n in args.size.lower().split("x"))
    if args.impl:
        child(args)
        return
    if args.iou_frames:
        torch.set_num_threads(args.threads)
        checkpoint = present_checkpoint(args.model, Path(tempfile.mkdtemp(prefix="bench-ckpt-")))
        print(json.dumps(run_precision_iou(args.model, checkpoint, args.iou_frames,
                                           int(args.objects), args.margin)))
        return
    if (Path.cwd() / "sam2").is_dir():
        raise SystemExit("run from a directory without a sam2/ folder")
    checkpoint = present_checkpoint(args.model, Path(tempfile.mkdtemp(prefix="bench-ckpt-")))
    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        raise SystemExit(f"unknown --impls {sorted(unknown)}")
    embeds = ("excluded", "included") if args.embed == "both" else (args.embed,)
    rows = [(int(n), embed) for n in args.objects.split(",") for embed in embeds]
    runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for objects, embed in rows:
            for impl in impls:
                runs.setdefault((objects, embed, impl), []).append(
                    run_child(args, impl, objects, embed, checkpoint))
    table = format_table(args, impls, rows, runs)
    print(table)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + table)


def run_child(args: argparse.Namespace, impl: str, objects: int, embed: str,
              checkpoint: Path) -> dict[str, Any]:
    started = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(
        [sys.executable, __file__, "--impl", impl, "--model", args.model, "--frames",
         args.frames, "--threads", str(args.threads), "--checkpoint", str(checkpoint),
         "--objects", str(objects), "--embed", embed, "--size", args.size,
         *(["--trim"] if args.trim else [])],
        capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{impl} failed:\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    print(f"{impl}, {objects} object(s), embedding {embed}: {result} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def format_table(args: argparse.Namespace, impls: list[str], rows: list[tuple[int, str]],
                 runs: dict[tuple[int, str, str], list[dict[str, Any]]]) -> str:
    counts = [int(n) for n in args.frames.split(",")]
    mib = 1024 * 1024
    lines = [
        f"### Tracking ({cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
        f"{args.model}, {WIDTH}x{HEIGHT} source frames, {max(counts)} frames, "
        f"{args.rounds} round(s))",
        "",
        "| objects | frame embedding | implementation | ms per frame, all objects (median) "
        "| vs reference | " + " | ".join(f"RSS after {n} frames (MiB)" for n in counts) + " |",
        "|---|---|---|---|---|" + "---|" * len(counts),
    ]
    for objects, embed in rows:
        ms = {impl: 1000 * statistics.median(r["per_frame_s"] for r in runs[objects, embed, impl])
              for impl in impls}
        for impl in impls:
            last = runs[objects, embed, impl][-1]
            ratio = f"{ms['reference'] / ms[impl]:.2f}x" if "reference" in ms else "-"
            lines.append(f"| {objects} | {embed} | {NAMES[impl]} | {ms[impl]:.0f} | {ratio} | "
                         + " | ".join(f"{last['rss'][str(n)] / mib:.0f}" for n in counts) + " |")
    return "\n".join(lines) + "\n"


IMPLS = ("reference", "ours", "ours-bf16")
NAMES = {"reference": "reference `propagate_in_video`", "ours": "ours `VideoSession` fp32",
         "ours-bf16": "ours `VideoSession` bf16 (`--tracking-dtype bfloat16`)"}


if __name__ == "__main__":
    main()
