"""Our PyTorch decoder against ONNX Runtime and OpenVINO builds of the same per-prompt graph.

The graph is exactly what a click runs in ``Sam2Model.decode_prompts``: ``Sam2DecoderPart``
(prompt encoder + mask decoder, the image-side projections already folded in at encode time)
from the cached embedding (image_embed, feat_s0, feat_s1) and the prompts (coordinates in
the 1024 frame, labels) to the low-res logits, IoU scores and object score, multimask.
It is exported with ``torch.onnx.export`` (dynamo) into a temp dir, once per case with
static shapes (1 point; 16 boxes on one image), and run by ONNX Runtime (CPU EP) and
OpenVINO (CPU, fp32 precision hint: on AVX512-BF16 CPUs its default is bf16).

Parity: low-res logits and IoU scores against our PyTorch decoder on the same embedding,
and 1080p masks (``imaging.masks_from_low_res``, the function the service uses) against
ours and against Meta's ``SAM2ImagePredictor`` (random official-format weights).
Timing: calls alternate between the backends (ours, ORT, OpenVINO, ...) so background load
hits all alike; medians; ``--threads`` for all of them. "decoder" times the graph alone
on prepared inputs; "to 1080p masks" adds prompt preparation and the upsampling of every
candidate, as ``decode_prompts`` does, and Meta's ``predictor.predict`` beside it.

    pip install onnxruntime openvino onnx onnxscript   # not project dependencies
    python bench/bench_onnx.py [--threads 2] [--repeats 21] [--model sam2.1/hiera_tiny] \
        [--extra]   # also OpenVINO bf16 and ONNX Runtime dynamic int8, with IoU vs fp32

On a machine loaded beyond its cores, PyTorch at 2 threads collapses (its OpenMP threads
wait on each other in spin barriers while descheduled: ~1.2 s for a ~40 ms click at load 8 on
2 cores) while ONNX Runtime and OpenVINO degrade gracefully; compare there at ``--threads 1``
or set ``OMP_WAIT_POLICY=PASSIVE``, and read the load averages the header prints.

Needs the test dependencies too (Meta's ``sam2==1.1.0``; see scripts/setup_env.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_image import HEIGHT, WIDTH, alternate, bench_image, cpu_name, mask_iou  # noqa: E402
from sam2_shared import Sam2Model  # noqa: E402
from sam2_shared.embedding import ImageEmbedding  # noqa: E402
from sam2_shared.inference import imaging  # noqa: E402
from sam2_shared.inference.sam2_model import LOGITS_CLAMP  # noqa: E402
from sam2_shared.model.mask_decoder import DecoderOutput  # noqa: E402
from sam2_shared.model.parts import Sam2DecoderPart  # noqa: E402
from sam2_shared.model.prompt_encoder import (  # noqa: E402
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_POSITIVE,
)
from sam2_shared.prompts import Prompt  # noqa: E402
from tests.helpers.checkpoints import make_random_checkpoint  # noqa: E402
from tests.helpers.reference import ReferenceImage  # noqa: E402

INPUTS = ("image_embed", "feat_s0", "feat_s1", "coords", "labels")
OUTPUTS = ("masks", "iou_scores", "object_score_logits")
Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class PerPromptGraph(nn.Module):
    """``Sam2DecoderPart`` with tensors only in and out (multimask), for export."""

    def __init__(self, decoder: Sam2DecoderPart) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(
        self,
        image_embed: torch.Tensor,
        feat_s0: torch.Tensor,
        feat_s1: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.decoder(image_embed, (feat_s0, feat_s1), coords, labels, None, True,
                           batch_size=coords.shape[0])
        return out.masks, out.iou_scores, out.object_score_logits


def export(decoder: Sam2DecoderPart, feeds: dict[str, np.ndarray], path: Path) -> None:
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUTS)
    with torch.no_grad():
        torch.onnx.export(PerPromptGraph(decoder).eval(), args, str(path), dynamo=True,
                          input_names=list(INPUTS), output_names=list(OUTPUTS),
                          external_data=False, verbose=False)


def ort_runner(path: Path, threads: int, spinning: bool) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads steal the next backend's CPU on a shared 2-core machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def openvino_runner(path: Path, threads: int, precision: str) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request.infer(feeds, share_inputs=True)
        return [request.get_output_tensor(i).data.copy() for i in range(len(OUTPUTS))]

    return run


def int8_model(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def case_prompts(name: str) -> list[Prompt]:
    if name == "1 point":
        return [Prompt(np.array([[800.0, 450.0]], np.float32), np.array([LABEL_POSITIVE]))]
    rng = np.random.default_rng(0)
    corners = rng.uniform((0, 0), (WIDTH - 500, HEIGHT - 400), size=(16, 2))
    sizes = rng.uniform((60, 60), (500, 400), size=(16, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    return [Prompt(box=box) for box in boxes]


def graph_prompts(prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> coords [B, N, 2] in the 1024 frame and labels [B, N], as ``_prepare`` does."""
    hw = (HEIGHT, WIDTH)
    if prompts[0].box is not None:
        corners = np.stack([imaging.boxes_to_points(np.asarray(p.box, np.float32))[0]
                            for p in prompts])
        labels = np.tile(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.int32),
                         (len(prompts), 1))
    else:
        corners = np.stack([np.asarray(p.point_coords, np.float32) for p in prompts])
        labels = np.stack([np.asarray(p.point_labels, np.int32) for p in prompts])
    coords = np.stack([imaging.points_to_model_frame(c, hw) for c in corners])
    return coords.astype(np.float32), labels


def reference_call(reference: ReferenceImage, prompts: list[Prompt]) -> Callable[[], tuple]:
    predictor = reference.predictor
    if prompts[0].box is not None:
        boxes = np.stack([p.box for p in prompts])
        return lambda: predictor.predict(box=boxes, multimask_output=True)
    point, label = prompts[0].point_coords, prompts[0].point_labels
    return lambda: predictor.predict(point, label, multimask_output=True)


def iou_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and min mask IoU over [P, C, H, W] masks."""
    ious = [mask_iou(x, y) for x, y in zip(a.reshape(-1, *a.shape[-2:]),
                                           b.reshape(-1, *b.shape[-2:]))]
    return float(np.mean(ious)), float(np.min(ious))


def run_case(case: str, ours: Sam2Model, embedding: ImageEmbedding, reference: ReferenceImage,
             tmp: Path, args: argparse.Namespace) -> tuple[list, list, list[str]]:
    """Export, parity and timings of one case: (timing rows, parity rows, backend names)."""
    hw = (HEIGHT, WIDTH)
    prompts = case_prompts(case)
    image_feeds = {  # NCHW, as an ONNX graph takes them (made once per image, not timed)
        "image_embed": embedding.image_embed.contiguous().numpy(),
        "feat_s0": embedding.high_res_feats[0].contiguous().numpy(),
        "feat_s1": embedding.high_res_feats[1].contiguous().numpy(),
    }
    coords, labels = graph_prompts(prompts)
    feeds = {**image_feeds, "coords": coords, "labels": labels}
    path = tmp / f"decoder_{len(prompts)}.onnx"
    export(ours.decoder, feeds, path)
    runners = {
        "onnxruntime": ort_runner(path, args.threads, args.ort_spinning),
        "openvino": openvino_runner(path, args.threads, "f32"),
    }
    if args.extra:
        runners["openvino bf16"] = openvino_runner(path, args.threads, "bf16")
        runners["onnxruntime int8"] = ort_runner(int8_model(path), args.threads,
                                                 args.ort_spinning)
    coords_t, labels_t = torch.from_numpy(coords), torch.from_numpy(labels)

    @torch.inference_mode()
    def torch_decoder() -> DecoderOutput:
        return ours.decoder(embedding.image_embed, embedding.high_res_feats, coords_t, labels_t,
                            None, True, batch_size=len(prompts))

    def graph_to_masks(run: Runner) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            c, lab = graph_prompts(prompts)
            return imaging.masks_from_low_res(run({**image_feeds, "coords": c, "labels": lab})[0],
                                              hw)
        return call

    # Parity on the same embedding; Meta's predictor on its own encoding of the image.
    decoded = torch_decoder()
    mine_low, mine_scores = decoded.masks.numpy(), decoded.iou_scores.numpy()
    mine_masks = np.concatenate([np.asarray(p.masks)
                                 for p in ours.decode_prompts(embedding, prompts)])
    ref_masks, _, ref_low = reference_call(reference, prompts)()
    ref_masks = np.asarray(ref_masks).reshape(mine_masks.shape)
    ref_low = np.asarray(ref_low).reshape(mine_low.shape)
    parity = []
    for name, run in [("pytorch (ours)", lambda _: [mine_low, mine_scores]), *runners.items()]:
        low, scores = run(feeds)[:2]
        masks = mine_masks if name == "pytorch (ours)" else imaging.masks_from_low_res(low, hw)
        parity.append((case, name, float(np.abs(low - mine_low).max()),
                       float(np.abs(scores - mine_scores).max()),
                       *iou_stats(masks, mine_masks), *iou_stats(masks, ref_masks),
                       float(np.abs(np.clip(low, -LOGITS_CLAMP, LOGITS_CLAMP) - ref_low).max())))

    decoder_only = alternate(
        {"pytorch": torch_decoder, **{n: partial(r, feeds) for n, r in runners.items()}},
        args.repeats)
    to_masks = alternate({"pytorch": partial(ours.decode_prompts, embedding, prompts),
                          **{n: graph_to_masks(r) for n, r in runners.items()},
                          "meta reference": reference_call(reference, prompts)},
                         max(5, args.repeats // 2))
    rows = [(case, "decoder", decoder_only), (case, "to 1080p masks", to_masks)]
    return rows, parity, ["pytorch", *runners]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2.1/hiera_tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--ort-spinning", action="store_true",
                        help="let ONNX Runtime's threads spin between calls (its default)")
    parser.add_argument("--extra", action="store_true",
                        help="also OpenVINO bf16 and ONNX Runtime dynamic int8 (IoU vs fp32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    checkpoint = make_random_checkpoint(args.model)
    rgb = bench_image()
    reference = ReferenceImage(args.model, checkpoint)
    reference.set_image(rgb)
    ours = Sam2Model.from_pretrained(args.model, checkpoint=checkpoint)
    embedding = ours.prepare_embedding(ours.encode_rgb([rgb])[0])
    load_before = os.getloadavg()[0]
    rows, parity = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("1 point", "16 boxes"):
            case_rows, case_parity, names = run_case(case, ours, embedding, reference, Path(tmp),
                                                     args)
            rows += case_rows
            parity += case_parity

    print(f"{args.model}, fp32 unless named, {cpu_name()}, {args.threads} threads, torch "
          f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino "
          f"{openvino.__version__}, {WIDTH}x{HEIGHT}, multimask; medians of interleaved calls "
          f"on a shared machine (compare the ratios), 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs\n")
    header = " | ".join(f"{n} (ms)" for n in names)
    ratios = " | ".join(f"{n} / pytorch" for n in names[1:])
    print(f"| case | what | {header} | meta reference (ms) | {ratios} |")
    print("|---" * (2 * len(names) + 2) + "|")
    for case, what, timing in rows:
        ref = f"{timing['meta reference'] * 1e3:.1f}" if "meta reference" in timing else "-"
        cells = " | ".join(f"{timing[n] * 1e3:.1f}" for n in names)
        rel = " | ".join(f"{timing[n] / timing['pytorch']:.2f}" for n in names[1:])
        print(f"| {case} | {what} | {cells} | {ref} | {rel} |")
    print("\n| case | backend | max abs low-res logit diff vs pytorch | max abs IoU-score diff "
          "| mask IoU vs pytorch (mean / min) | mask IoU vs Meta (mean / min) "
          "| max abs clamped logit diff vs Meta |\n|---|---|---|---|---|---|---|")
    for case, name, dlow, dscore, m_mean, m_min, r_mean, r_min, dref in parity:
        print(f"| {case} | {name} | {dlow:.1e} | {dscore:.1e} | {m_mean:.5f} / {m_min:.5f} "
              f"| {r_mean:.5f} / {r_min:.5f} | {dref:.1e} |")


if __name__ == "__main__":
    main()
