"""Video parity scenarios: a synthetic clip at any size, a script of user actions, and one
runner per side (Meta's ``SAM2VideoPredictor``, our ``VideoSession``, our
``TrackingService`` through ``Sam2TrackingClient``) that plays the script and records every
mask it returns, plus the comparison of two recordings.

Prompts are written in fractions of the frame (x of the width, y of the height), so one
script runs on frames of any size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tests.helpers.reference import config_for

# ----------------------------------------------------------------------------- the clip


@dataclass(frozen=True)
class Clip:
    """Frame t: gradient background with texture, a red disc moving right and a green
    rectangle moving down (positions relative to the frame, so any size shows both)."""

    name: str
    num_frames: int
    height: int
    width: int

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        y = (np.arange(self.height, dtype=np.float32)[:, None] + 0.5) / self.height
        x = (np.arange(self.width, dtype=np.float32)[None, :] + 0.5) / self.width
        return y, x

    def shape_mask(self, shape: str, t: int) -> np.ndarray:
        """[H, W] bool: the "disc" or the "rect" on frame t."""
        y, x = self._grid()
        if shape == "disc":
            return ((x - disc_x(t)) / 0.12) ** 2 + ((y - 0.55) / 0.16) ** 2 <= 1.0
        top = rect_top(t)
        return (x >= 0.62) & (x <= 0.85) & (y >= top) & (y <= top + 0.25)

    def frame(self, t: int) -> np.ndarray:
        y, x = self._grid()
        image = np.empty((self.height, self.width, 3), dtype=np.float32)
        image[..., 0] = 50 + 120 * x
        image[..., 1] = 70 + 100 * y
        image[..., 2] = 120 + 40 * np.sin(2 * np.pi * (4 * x + 3 * y))
        image[self.shape_mask("disc", t)] = (220, 40, 40)
        image[self.shape_mask("rect", t)] = (40, 190, 80)
        noise = np.random.default_rng(t).normal(0, 4, image.shape)
        return np.clip(image + noise, 0, 255).astype(np.uint8)

    def write_jpegs(self, folder: Path) -> Path:
        """The frames as ``<t>.jpg`` (the folder layout Meta's ``init_state`` reads)."""
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(self.num_frames):
            Image.fromarray(self.frame(t)).save(folder / f"{t}.jpg", quality=95)
        return folder

    def decoded_frames(self, folder: Path) -> list[np.ndarray]:
        """The JPEGs' pixels, as the reference decodes them."""
        return [np.array(Image.open(folder / f"{t}.jpg").convert("RGB"))
                for t in range(self.num_frames)]

    def pixels(self, fractions: Sequence[float]) -> np.ndarray:
        """(x, y, x, y, ...) fractions of the frame -> float32 pixels, same layout."""
        scale = np.tile(np.array([self.width, self.height], np.float32), len(fractions) // 2)
        return np.asarray(fractions, np.float32) * scale


def disc_x(t: int) -> float:
    return 0.25 + 0.04 * t


def rect_top(t: int) -> float:
    return 0.10 + 0.04 * t


def disc_centre(t: int) -> tuple[float, float]:
    return (disc_x(t), 0.55)


def rect_centre(t: int) -> tuple[float, float]:
    return (0.735, rect_top(t) + 0.125)


def rect_box(t: int) -> tuple[float, float, float, float]:
    return (0.60, rect_top(t) - 0.02, 0.87, rect_top(t) + 0.27)


# ----------------------------------------------------------------------------- the script


@dataclass(frozen=True)
class Points:
    """Clicks and/or a box (fractions) for an object on a frame. ``fresh``: the object has
    not been tracked on this frame, so its mask comes without memory (the prompted-frame
    bar applies to it)."""

    label: str
    frame: int
    obj: int
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    clear_old: bool = True
    fresh: bool = True


@dataclass(frozen=True)
class Mask:
    """A mask prompt: the clip's ``shape`` ("disc" or "rect") on this frame."""

    label: str
    frame: int
    obj: int
    shape: str
    fresh: bool = True


@dataclass(frozen=True)
class Clear:
    """Remove an object's prompts on a frame (in process only: the service has no call)."""

    label: str
    frame: int
    obj: int


@dataclass(frozen=True)
class Remove:
    label: str
    obj: int


@dataclass(frozen=True)
class Propagate:
    label: str
    start: int | None = None
    reverse: bool = False
    max_frames: int | None = None


Step = Points | Mask | Clear | Remove | Propagate


@dataclass
class Output:
    """One mask set a call returned. ``logits`` [O, H, W] (the service returns masks only:
    ``logits`` is None there and ``masks`` is set)."""

    label: str
    frame: int
    obj_ids: list[int]
    logits: np.ndarray | None
    masks: np.ndarray = field(init=False)
    fresh_obj: int | None = None  # the object whose mask is memory-free (prompted bar)

    def __post_init__(self) -> None:
        if self.logits is not None:
            self.masks = self.logits > 0


def set_masks(output: Output, masks: np.ndarray) -> Output:
    output.masks = masks
    return output


def _fresh(step: Step) -> int | None:
    return step.obj if isinstance(step, (Points, Mask)) and step.fresh else None


def _click_arrays(clip: Clip, step: Points) -> dict[str, Any]:
    points = clip.pixels([v for p in step.points for v in p]).reshape(-1, 2) \
        if step.points else None
    labels = np.array(step.labels, np.int32) if step.points else None
    box = clip.pixels(step.box) if step.box is not None else None
    return {"points": points, "labels": labels, "box": box}


# ----------------------------------------------------------------------------- runners


class ReferencePredictor:
    """Meta's predictor as users build it (``build_sam2_video_predictor``), with its image
    encoder memoised on the frame's pixels (deterministic; the predictor caches one frame
    only and would re-encode frames many times), shared by every clip it runs."""

    def __init__(self, model_id: str, checkpoint: Path) -> None:
        if (Path.cwd() / "sam2").is_dir():
            raise RuntimeError("run the reference from a directory without a sam2/ folder")
        from sam2.build_sam import build_sam2_video_predictor

        self.predictor = build_sam2_video_predictor(config_for(model_id), str(checkpoint),
                                                    device="cpu")
        self.memo: dict[bytes, dict[str, Any]] = {}
        encode = self.predictor.forward_image

        def forward_image_memoised(image: torch.Tensor) -> dict[str, Any]:
            key = pixels_key(image)
            if key not in self.memo:
                self.memo[key] = encode(image)
            out = self.memo[key]
            return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}

        self.predictor.forward_image = forward_image_memoised
        # Reference CPU bug: memories are stored in bfloat16 and concatenated with the
        # float32 object pointers (type promotion makes the bank float32). On a frame before
        # an object's first prompt there are no pointers yet, the bank stays bfloat16 and
        # memory attention's k_proj fails with a dtype mismatch (on GPU autocast hides it).
        # Promote the bank as torch.cat does in every other case.
        attend = self.predictor.memory_attention.forward

        def memory_attention_promoted(*args: Any, **kwargs: Any) -> torch.Tensor:
            for name in ("memory", "memory_pos"):
                if kwargs[name].dtype == torch.bfloat16:
                    kwargs[name] = kwargs[name].float()
            return attend(*args, **kwargs)

        self.predictor.memory_attention.forward = memory_attention_promoted

    @property
    def no_mem_embed(self) -> torch.Tensor:
        return self.predictor.no_mem_embed.detach()

    def run(self, clip: Clip, folder: Path, steps: Sequence[Step]) -> ReferenceRun:
        import warnings

        predictor, outputs = self.predictor, []

        def keep(step: Step, frame: int, obj_ids: list[int], masks: torch.Tensor) -> None:
            logits = masks[:, 0].float().numpy().copy()
            outputs.append(Output(step.label, int(frame), list(obj_ids), logits, _fresh(step)))

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fill-hole "no CUDA extension" warning
            state = predictor.init_state(str(folder))
            for step in steps:
                if isinstance(step, Points):
                    keep(step, *predictor.add_new_points_or_box(
                        state, step.frame, step.obj, clear_old_points=step.clear_old,
                        **_click_arrays(clip, step)))
                elif isinstance(step, Mask):
                    mask = clip.shape_mask(step.shape, step.frame)
                    keep(step, *predictor.add_new_mask(state, step.frame, step.obj, mask))
                elif isinstance(step, Clear):
                    keep(step, *predictor.clear_all_prompts_in_frame(state, step.frame,
                                                                     step.obj))
                elif isinstance(step, Remove):
                    obj_ids, updated = predictor.remove_object(state, step.obj, strict=True)
                    for frame, masks in updated:
                        keep(step, frame, obj_ids, masks)
                    if not updated:
                        outputs.append(Output(step.label, -1, list(obj_ids), None))
                else:
                    for frame, obj_ids, masks in predictor.propagate_in_video(
                            state, start_frame_idx=step.start, reverse=step.reverse,
                            max_frame_num_to_track=step.max_frames):
                        keep(step, frame, obj_ids, masks)
            # Every frame's features for our side (frames the script never touched are
            # encoded here; in a full run another case has encoded them already).
            features = [predictor.forward_image(state["images"][t][None])
                        for t in range(clip.num_frames)]
        return ReferenceRun(outputs, state["images"], features)


def pixels_key(image: torch.Tensor) -> bytes:
    return hashlib.sha1(image.detach().contiguous().numpy().tobytes()).digest()


@dataclass
class ReferenceRun:
    outputs: list[Output]
    images: torch.Tensor  # [T, 3, 1024, 1024] the reference's preprocessed frames
    features: list[dict[str, Any]]  # per frame: forward_image's output


def reference_embeddings(model_id: str, clip: Clip, run: ReferenceRun,
                         no_mem_embed: torch.Tensor) -> list[Any]:
    """The reference's frame features as our ``ImageEmbedding``s (encodes are shared; our
    encoder on video frames is checked separately in ``test_video_frame_encoding``)."""
    from sam2_shared.embedding import ImageEmbedding

    embeddings = []
    for t, features in enumerate(run.features):
        fpn = features["backbone_fpn"]
        embeddings.append(ImageEmbedding(
            image_embed=fpn[2] + no_mem_embed.reshape(1, -1, 1, 1),
            high_res_feats=(fpn[0], fpn[1]),
            original_hw=(clip.height, clip.width),
            model_id=model_id,
            embedding_id=hashlib.sha256(f"parity {clip.name} {t}".encode()).hexdigest(),
        ))
    return embeddings


def run_ours(model: Any, clip: Clip, embeddings: Sequence[Any],
             steps: Sequence[Step]) -> list[Output]:
    """The script on our ``VideoSession`` in process."""
    session = model.start_session(list(embeddings))
    outputs: list[Output] = []

    def keep(step: Step, result: Any) -> None:
        frame, obj_ids, logits, _ = result
        outputs.append(Output(step.label, frame, list(obj_ids), logits, _fresh(step)))

    for step in steps:
        if isinstance(step, Points):
            arrays = _click_arrays(clip, step)
            keep(step, session.add_points(step.frame, step.obj, clear_old_points=step.clear_old,
                                          **arrays))
        elif isinstance(step, Mask):
            keep(step, session.add_mask(step.frame, step.obj,
                                        clip.shape_mask(step.shape, step.frame)))
        elif isinstance(step, Clear):
            keep(step, session.clear_prompts(step.frame, step.obj))
        elif isinstance(step, Remove):
            obj_ids, updated = session.remove_object(step.obj)
            for result in updated:
                keep(step, result)
            if not updated:
                outputs.append(Output(step.label, -1, list(obj_ids), None))
        else:
            for result in session.propagate(step.start, step.max_frames, step.reverse):
                keep(step, result)
    return outputs


def run_service(client: Any, clip: Clip, frame_ids: Sequence[str],
                steps: Sequence[Step]) -> list[Output]:
    """The script through ``TrackingService`` with ``Sam2TrackingClient`` (masks only;
    ``RemoveObject`` answers the remaining ids, not masks)."""
    session_id = client.start_session(list(frame_ids)).session_id
    outputs: list[Output] = []

    def keep(step: Step, frame: Any) -> None:
        output = Output(step.label, frame.frame_index, list(frame.object_ids), None,
                        _fresh(step))
        outputs.append(set_masks(output, frame.masks))

    try:
        for step in steps:
            if isinstance(step, Points):
                keep(step, client.add_prompt(session_id, step.frame, step.obj,
                                             keep_old_points=not step.clear_old,
                                             **_click_arrays(clip, step)))
            elif isinstance(step, Mask):
                keep(step, client.add_prompt(session_id, step.frame, step.obj,
                                             mask=clip.shape_mask(step.shape, step.frame)))
            elif isinstance(step, Remove):
                outputs.append(Output(step.label, -1, client.remove_object(session_id, step.obj),
                                      None))
            elif isinstance(step, Propagate):
                for frame in client.propagate(session_id, step.start, step.reverse,
                                              step.max_frames):
                    keep(step, frame)
            else:
                raise ValueError(f"the service has no call for {step}")
    finally:
        client.close_session(session_id)
    return outputs


# ----------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    worst_iou: float = 1.0
    worst_iou_where: str = ""
    worst_prompted_logit: float = 0.0
    worst_tracked_logit: float = 0.0
    worst_tracked_where: str = ""
    visible: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"worst IoU {self.worst_iou:.6f} ({self.worst_iou_where}), worst |logit diff| "
                f"prompted {self.worst_prompted_logit:.2e}, tracked "
                f"{self.worst_tracked_logit:.2e} ({self.worst_tracked_where})")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(reference: Sequence[Output], ours: Sequence[Output], *, iou_bar: float,
            prompted_bar: float | None = None, tracked_bar: float | None = None) -> Comparison:
    """Every mask of ``ours`` against ``reference`` (same calls, same order): IoU on every
    frame and object; logits (where both have them) within ``prompted_bar`` for a prompted
    object's memory-free mask, ``tracked_bar`` for everything else."""
    got = [(o.label, o.frame, o.obj_ids) for o in ours]
    want = [(o.label, o.frame, o.obj_ids) for o in reference]
    assert got == want, f"calls differ:\n ours      {got}\n reference {want}"
    result = Comparison()
    for ref, our in zip(reference, ours, strict=True):
        if ref.logits is None:  # a removal that answered ids only
            continue
        assert our.masks.shape == ref.masks.shape, (ref.label, our.masks.shape,
                                                    ref.masks.shape)
        for index, obj_id in enumerate(ref.obj_ids):
            where = f"{ref.label} frame {ref.frame} object {obj_id}"
            iou = mask_iou(ref.masks[index], our.masks[index])
            result.visible += int(ref.masks[index].any())
            if iou < result.worst_iou:
                result.worst_iou, result.worst_iou_where = iou, where
            problem = [f"IoU {iou:.5f}"] if iou < iou_bar else []
            if our.logits is not None and prompted_bar is not None and tracked_bar is not None:
                diff = float(np.abs(ref.logits[index] - our.logits[index]).max())
                if obj_id == ref.fresh_obj:
                    result.worst_prompted_logit = max(result.worst_prompted_logit, diff)
                    bar = prompted_bar
                else:
                    if diff > result.worst_tracked_logit:
                        result.worst_tracked_logit, result.worst_tracked_where = diff, where
                    bar = tracked_bar
                if diff > bar:
                    problem.append(f"|d| {diff:.2e} > {bar:.0e}")
            if problem:
                result.failures.append(f"{where}: {', '.join(problem)}")
    return result
