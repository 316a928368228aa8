"""The well-known SAM 2 model-API calls, verbatim, against ``Sam2Model`` and ``Sam2Client``.

Users of that API write ``model.embed_images(image)`` with one BGR image, bare arrays for the
prompts of that image, ``masks[scores.argmax()]`` for the best mask and ``.init(...)`` for the
caches. Each call runs in process and through real tiers (``--store-dtype float32``, so the
client's answers equal the in-process ones); the client without torch returns numpy arrays of
the same shapes and dtypes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from sam2_shared import (
    Sam2BatchedPrediction,
    Sam2ImageEmbeddingsInMemoryCache,
    Sam2LowResolutionMasksInMemoryCache,
    Sam2Model,
    Sam2Prediction,
)
from sam2_shared.client import Sam2Client
from sam2_shared.model.config import canonical_model_id
from sam2_shared.prompts import prompts_per_image
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import REPO_ROOT, TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
SAMPLE = REPO_ROOT / "samples" / "scene.jpg"
H, W = 720, 1280  # samples/scene.jpg


@pytest.fixture(scope="module")
def tiers(tiny_checkpoint: Path) -> Iterator[tuple[TierProcess, TierProcess]]:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-call-shapes-")
    with encoder_process(tiny_checkpoint, store, "--store-dtype", "float32") as encoder, \
            decoder_process(tiny_checkpoint, store, "--encoder-address",
                            encoder.address) as decoder:
        yield encoder, decoder


@pytest.fixture(scope="module")
def in_process(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained(MODEL_ID, checkpoint=tiny_checkpoint)


@pytest.fixture(scope="module")
def remote(tiers) -> Iterator[Sam2Client]:
    encoder, decoder = tiers
    with Sam2Client(encoder=encoder.address, decoder=decoder.address,
                    model_id=MODEL_ID) as client:
        yield client


@pytest.fixture(params=["in_process", "client"])
def model(request: pytest.FixtureRequest) -> Any:
    """Each test runs against both: the one-line switch."""
    return request.getfixturevalue("in_process" if request.param == "in_process" else "remote")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    bgr = cv2.imread(str(SAMPLE))
    assert bgr is not None and bgr.shape == (H, W, 3)
    return bgr


def assert_user_types(prediction: Sam2Prediction, leading: tuple[int, ...], candidates: int,
                      hw: tuple[int, int] = (H, W)) -> None:
    assert isinstance(prediction.masks, torch.Tensor) and prediction.masks.dtype == torch.bool
    assert prediction.masks.device.type == "cpu"
    assert tuple(prediction.masks.shape) == (*leading, candidates, *hw)
    assert prediction.scores.dtype == torch.float32
    assert tuple(prediction.scores.shape) == (*leading, candidates)
    assert prediction.logits.dtype == torch.float32
    assert tuple(prediction.logits.shape) == (*leading, candidates, 256, 256)
    assert tuple(prediction.object_score_logits.shape) == leading
    prompts = leading[0] if leading else 1
    assert tuple(prediction.batched.masks.shape) == (prompts, candidates, *hw)


# ----- the documented calls, verbatim ---------------------------------------------------


def test_documented_calls_verbatim(model: Any, image: np.ndarray) -> None:
    embeddings = model.embed_images(image)                     # one BGR image from cv2.imread
    results = model.segment_images(embeddings=embeddings,
                                   point_coordinates=np.array([[100, 150]]),
                                   point_labels=np.array([1]))
    masks = results[0].masks        # (num_masks, H, W), a bool torch.Tensor
    scores = results[0].scores      # (num_masks,)
    logits = results[0].logits      # (num_masks, 256, 256)
    best_mask = masks[scores.argmax()]                          # one H x W mask
    assert len(results) == 1
    assert_user_types(results[0], (), 3)
    assert tuple(best_mask.shape) == (H, W)
    best = int(np.argmax(scores.numpy()))
    assert torch.equal(best_mask, masks[best])
    assert float(scores[best]) == float(scores.max())

    results = model.segment_images(embeddings=embeddings, boxes=np.array([[50, 50, 200, 200]]))
    assert_user_types(results[0], (), 3)

    previous_logits = logits[scores.argmax()]                   # one candidate, (256, 256)
    refined = model.segment_images(embeddings=embeddings,
                                   point_coordinates=np.array([[100, 150], [400, 300]]),
                                   point_labels=np.array([1, 0]),
                                   mask_input=previous_logits)
    assert_user_types(refined[0], (), 3)
    as_one_stack = model.segment_images(embeddings=embeddings,
                                        point_coordinates=np.array([[100, 150], [400, 300]]),
                                        point_labels=np.array([1, 0]),
                                        mask_input=previous_logits[None])  # (1, 256, 256)
    assert torch.equal(as_one_stack[0].masks, refined[0].masks)
    plain = model.segment_images(embeddings=embeddings,
                                 point_coordinates=np.array([[100, 150], [400, 300]]),
                                 point_labels=np.array([1, 0]))
    assert not torch.allclose(plain[0].logits, refined[0].logits, atol=1e-3)  # it was used


def test_cache_init_constructors(tiny_checkpoint: Path, image: np.ndarray) -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache.init(size_limit=100, send_to_cpu=True)
    masks_cache = Sam2LowResolutionMasksInMemoryCache.init(size_limit=500, send_to_cpu=True)
    assert isinstance(cache, Sam2ImageEmbeddingsInMemoryCache) and cache.send_to_cpu
    assert masks_cache.size_limit == 500 and masks_cache.send_to_cpu
    model = Sam2Model.from_pretrained(
        "sam2.1_hiera_t", checkpoint=tiny_checkpoint,  # Meta's config-file spelling
        sam2_image_embeddings_cache=cache, sam2_low_resolution_masks_cache=masks_cache)
    assert model.model_id == MODEL_ID
    model.segment_images(image, point_coordinates=[[100, 150]], point_labels=[1])
    model.segment_images(image, point_coordinates=[[100, 150], [200, 150]], point_labels=[1, 1])
    assert cache.misses == 1 and cache.hits == 1  # the second click re-used the embedding
    assert masks_cache.hits == 1  # ... and started from the first click's logits


@pytest.mark.parametrize(
    ("spelling", "official"),
    [
        ("sam2/hiera_b_plus", "sam2/hiera_b_plus"),
        ("sam2.1/hiera_b_plus", "sam2.1/hiera_b_plus"),
        ("sam2.1_hiera_b+", "sam2.1/hiera_b_plus"),
        ("sam2_hiera_t", "sam2/hiera_tiny"),
        ("sam2_hiera_s.yaml", "sam2/hiera_small"),
        ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1/hiera_large"),
        ("sam2.1_hiera_base_plus.pt", "sam2.1/hiera_b_plus"),
        ("facebook/sam2.1-hiera-tiny", "sam2.1/hiera_tiny"),
    ],
)
def test_model_id_spellings(spelling: str, official: str) -> None:
    assert canonical_model_id(spelling) == official
    assert Sam2Client(decoder="127.0.0.1:1", model_id=spelling).model_id == official


def test_unknown_model_spelling_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model id 'sam3_hiera_t'.*sam2.1/hiera_tiny"):
        canonical_model_id("sam3_hiera_t")


# ----- every call shape, in process and through the client, same answers ----------------

CALL_SHAPES: dict[str, tuple[dict[str, Any], tuple[int, ...], int]] = {
    # name: (segment_images arguments, leading prompt axis, candidates)
    "point-bare-array": ({"point_coordinates": np.array([[100, 150]]),
                          "point_labels": np.array([1])}, (), 3),
    "point-nested-lists": ({"point_coordinates": [[100, 150]], "point_labels": [1]}, (), 3),
    "point-tensors": ({"point_coordinates": torch.tensor([[100.0, 150.0]]),
                       "point_labels": torch.tensor([1])}, (), 3),
    "point-list-of-one-array": ({"point_coordinates": [np.array([[100, 150]])],
                                 "point_labels": [np.array([1])]}, (), 3),
    "box-4": ({"boxes": np.array([50, 50, 200, 200])}, (), 3),
    "box-1x4": ({"boxes": np.array([[50, 50, 200, 200]])}, (), 3),
    "boxes-2x4": ({"boxes": np.array([[50, 50, 200, 200], [600, 300, 900, 600]])}, (2,), 3),
    "point-sets-2": ({"point_coordinates": np.array([[[100, 150], [120, 160]],
                                                     [[700, 400], [10, 10]]]),
                      "point_labels": np.array([[1, 1], [1, 0]])}, (2,), 3),
    "boxes-paired-with-point-sets": ({"boxes": np.array([[50, 50, 200, 200],
                                                         [600, 300, 900, 600]]),
                                      "point_coordinates": np.array([[[100, 150]], [[700, 400]]]),
                                      "point_labels": np.array([[1], [1]])}, (2,), 3),
    "single-mask": ({"point_coordinates": np.array([[100, 150]]), "point_labels": np.array([1]),
                     "multimask_output": False}, (), 1),
}


@pytest.mark.parametrize("name", sorted(CALL_SHAPES))
def test_call_shape_same_in_process_and_remote(name: str, in_process: Sam2Model,
                                               remote: Sam2Client, image: np.ndarray) -> None:
    arguments, leading, candidates = CALL_SHAPES[name]
    [want] = in_process.segment_images(image, **arguments)
    [got] = remote.segment_images(image, **arguments)
    for prediction in (want, got):
        assert_user_types(prediction, leading, candidates)
    assert_same_values(got, want)


def assert_same_values(got: Sam2Prediction, want: Sam2Prediction) -> None:
    """Through the tiers on float32 storage the answers are the in-process ones."""
    assert torch.equal(got.masks, want.masks)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.object_score_logits, want.object_score_logits, rtol=0,
                               atol=1e-4)


def test_mask_input_shapes_same_in_process_and_remote(in_process: Sam2Model,
                                                      remote: Sam2Client,
                                                      image: np.ndarray) -> None:
    [first] = in_process.segment_images(image, point_coordinates=np.array([[100, 150]]),
                                        point_labels=np.array([1]))
    best = first.logits[first.scores.argmax()]
    points = np.array([[100, 150], [400, 300]])
    labels = np.array([1, 0])
    for mask_input in (best, best[None], best.numpy(), best.tolist()):
        [want] = in_process.segment_images(image, point_coordinates=points, point_labels=labels,
                                           mask_input=mask_input)
        [got] = remote.segment_images(image, point_coordinates=points, point_labels=labels,
                                      mask_input=mask_input)
        assert_user_types(want, (), 3)
        assert_same_values(got, want)
    # B prompts, one mask each: (B, 256, 256) and (B, 1, 256, 256)
    two = torch.stack([best, first.logits[0]])
    sets, set_labels = np.array([[[100, 150]], [[400, 300]]]), np.array([[1], [1]])
    for mask_input in (two, two[:, None]):
        [want] = in_process.segment_images(image, point_coordinates=sets,
                                           point_labels=set_labels, mask_input=mask_input)
        [got] = remote.segment_images(image, point_coordinates=sets, point_labels=set_labels,
                                      mask_input=mask_input)
        assert_user_types(want, (2,), 3)
        assert_same_values(got, want)


def test_batches_of_images(model: Any, image: np.ndarray) -> None:
    other = np.ascontiguousarray(synthetic_rgb(200, 300, seed=11)[:, :, ::-1])
    hws = [(H, W), (200, 300)]
    # a bare array: the same prompt on every image
    results = model.segment_images([image, other], point_coordinates=np.array([[100, 150]]),
                                   point_labels=np.array([1]))
    assert len(results) == 2
    for prediction, hw in zip(results, hws, strict=True):
        assert_user_types(prediction, (), 3, hw)
    # a list of length 1 is broadcast; a list of length N gives each image its own
    broadcast = model.segment_images([image, other], boxes=[np.array([50, 50, 150, 150])])
    own = model.segment_images([image, other],
                               boxes=[np.array([[50, 50, 150, 150], [10, 10, 90, 90]]),
                                      np.array([10, 10, 90, 90])])
    assert_user_types(broadcast[1], (), 3, hws[1])
    assert_user_types(own[0], (2,), 3, hws[0])
    assert_user_types(own[1], (), 3, hws[1])
    # nested Python lists, one entry per image
    nested = model.segment_images([image, other], point_coordinates=[[[100, 150]], [[20, 30]]],
                                  point_labels=[[1], [1]])
    assert [tuple(p.masks.shape) for p in nested] == [(3, H, W), (3, 200, 300)]


# ----- clear errors, naming the argument ------------------------------------------------

BAD_CALLS: dict[str, tuple[Callable[[np.ndarray], dict[str, Any]], str]] = {
    "per-image-list-too-long": (
        lambda logits: {"boxes": [np.array([1, 1, 9, 9])] * 3},
        r"boxes is a list of 3 per-image entries for 2 image\(s\).*length 1 or 2"),
    "three-candidates-as-mask-input": (
        lambda logits: {"point_coordinates": np.array([[100, 150]]),
                        "point_labels": np.array([1]), "mask_input": logits},
        r"mask_input has 3 masks for one prompt.*logits\[scores.argmax\(\)\]"),
    "candidates-axis-in-mask-input": (
        lambda logits: {"point_coordinates": np.array([[100, 150]]),
                        "point_labels": np.array([1]), "mask_input": logits[None]},
        r"mask_input has shape \(1, 3, 256, 256\).*logits\[scores.argmax\(\)\]"),
    "wrong-mask-size": (
        lambda logits: {"mask_input": np.zeros((64, 64), np.float32)},
        r"mask_input must be \[256, 256\]"),
    "points-without-labels": (
        lambda logits: {"point_coordinates": np.array([[100, 150]])},
        r"point_labels are required"),
    "points-three-coordinates": (
        lambda logits: {"point_coordinates": np.array([[100, 150, 1]]),
                        "point_labels": np.array([1])},
        r"point_coordinates must be \[N, 2\] or \[B, N, 2\]"),
    "boxes-three-numbers": (
        lambda logits: {"boxes": np.array([1, 2, 3])},
        r"boxes must be \[4\] or \[B, 4\]"),
    "two-boxes-three-point-sets": (
        lambda logits: {"boxes": np.array([[1, 1, 9, 9], [2, 2, 8, 8]]),
                        "point_coordinates": np.zeros((3, 1, 2)),
                        "point_labels": np.ones((3, 1))},
        r"boxes has 2 prompts but another argument has 3"),
}


BAD_CALL_ARGUMENT = {  # the argument each error names (ErrorInfo metadata through the tiers)
    "per-image-list-too-long": "boxes",
    "three-candidates-as-mask-input": "mask_input",
    "candidates-axis-in-mask-input": "mask_input",
    "wrong-mask-size": "mask_input",
    "points-without-labels": "point_labels",
    "points-three-coordinates": "point_coordinates",
    "boxes-three-numbers": "boxes",
    "two-boxes-three-point-sets": "boxes",
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_call_shapes_are_value_errors_naming_the_argument(
    name: str, model: Any, image: np.ndarray
) -> None:
    make_arguments, message = BAD_CALLS[name]
    logits = np.zeros((3, 256, 256), np.float32)
    images = [image, image[:100, :100]] if name == "per-image-list-too-long" else image
    with pytest.raises(ValueError, match=message) as caught:
        model.segment_images(images, **make_arguments(logits))
    assert caught.value.metadata["argument"] == BAD_CALL_ARGUMENT[name]


# ----- the client where torch is not installed ------------------------------------------

NO_TORCH_CLIENT = r"""
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, NoTorch())
import cv2
import numpy as np
from sam2_shared.client import Sam2Client

encoder, decoder, sample = sys.argv[1:4]
with Sam2Client(encoder=encoder, decoder=decoder, model_id="sam2.1/hiera_tiny") as model:
    embeddings = model.embed_images(cv2.imread(sample))
    results = model.segment_images(embeddings=embeddings,
                                   point_coordinates=np.array([[100, 150]]),
                                   point_labels=np.array([1]))
    masks, scores, logits = results[0].masks, results[0].scores, results[0].logits
    best_mask = masks[scores.argmax()]
    print(json.dumps({
        "types": sorted({type(a).__name__ for a in (masks, scores, logits, best_mask)}),
        "masks": [list(masks.shape), str(masks.dtype)],
        "scores": [list(scores.shape), str(scores.dtype)],
        "logits": [list(logits.shape), str(logits.dtype)],
        "best_mask": list(best_mask.shape),
        "torch_loaded": "torch" in sys.modules,
        "masks_sum": int(masks.sum()),
    }))
"""


def test_client_without_torch_returns_numpy(tiers, remote: Sam2Client,
                                            image: np.ndarray) -> None:
    encoder, decoder = tiers
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CLIENT, encoder.address, decoder.address, str(SAMPLE)],
        capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["types"] == ["ndarray"]
    assert seen["masks"] == [[3, H, W], "bool"]
    assert seen["scores"] == [[3], "float32"]
    assert seen["logits"] == [[3, 256, 256], "float32"]
    assert seen["best_mask"] == [H, W]
    assert seen["torch_loaded"] is False
    [with_torch] = remote.segment_images(image, point_coordinates=np.array([[100, 150]]),
                                         point_labels=np.array([1]))
    assert seen["masks_sum"] == int(with_torch.masks.sum())  # the same masks


# ----- the argument rules on their own (numpy only, no model) ---------------------------


def _split(n_images: int, **arguments: Any) -> list[list[Any]]:
    values = {name: arguments.get(name) for name in
              ("point_coordinates", "point_labels", "boxes", "mask_input")}
    return prompts_per_image(n_images, *values.values(), multimask_output=True)


def test_rules_points_and_labels_pair_up_exactly() -> None:
    # [B, N, 2] with [B, N]: B prompts, each with its own labels
    [prompts] = _split(1, point_coordinates=np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]),
                       point_labels=np.array([[1, 0], [0, 1]]))
    assert [p.point_labels.tolist() for p in prompts] == [[1, 0], [0, 1]]
    # labels never silently broadcast over point sets or images
    with pytest.raises(ValueError, match=r"point_labels \(2, 1\) must match") as caught:
        _split(1, point_coordinates=np.zeros((1, 1, 2)), point_labels=np.ones((2, 1)))
    assert caught.value.metadata["argument"] == "point_labels"
    with pytest.raises(ValueError, match="must match point_coordinates"):
        _split(2, point_coordinates=np.array([[[1, 2]], [[3, 4]]]), point_labels=[[1], [0]])


def test_rules_labels_are_whole_zero_or_one() -> None:
    for labels in ([0.6], [1.9], [2], [-1], [2**40]):
        with pytest.raises(ValueError, match="point_labels must be 1 .* or 0") as caught:
            _split(1, point_coordinates=[[1, 2]], point_labels=labels)
        assert caught.value.metadata["argument"] == "point_labels"
    [[prompt]] = _split(1, point_coordinates=[[1, 2]], point_labels=[1.0])
    assert prompt.point_labels.dtype == np.int32 and prompt.point_labels.tolist() == [1]


def test_rules_nested_lists_with_several_images_are_per_image() -> None:
    two = [[0, 0, 9, 9], [5, 5, 20, 20]]
    first, second = _split(2, boxes=two)  # one box per image
    assert [p.box.tolist() for p in first] == [[0, 0, 9, 9]]
    assert [p.box.tolist() for p in second] == [[5, 5, 20, 20]]
    with pytest.raises(ValueError, match=r"boxes is a list of 2 per-image entries for 3"):
        _split(3, boxes=two)  # never silently "both boxes on every image"
    assert all(len(p) == 2 for p in _split(3, boxes=np.array(two)))  # a bare array is
    # a point list [[x, y]] is one image's points, for one image or several
    assert all(len(p) == 1 and p[0].point_coords.shape == (1, 2)
               for p in _split(3, point_coordinates=[[1, 2]], point_labels=[1]))
    [[one]] = _split(1, point_coordinates=[[1, 2], [3, 4]], point_labels=[1, 0])
    assert one.point_coords.shape == (2, 2)


def test_rules_candidates_as_mask_input_without_points_are_refused() -> None:
    three = np.zeros((3, 256, 256), np.float32)
    with pytest.raises(ValueError, match=r"3 masks and no points or boxes.*\(3, 1, 256, 256\)"):
        _split(1, mask_input=three)
    [prompts] = _split(1, mask_input=three[:, None])  # explicit prompt axis: 3 prompts
    assert len(prompts) == 3 and prompts[0].mask_input.shape == (256, 256)
    [prompts] = _split(1, mask_input=three[0])
    assert len(prompts) == 1


def test_rules_boxes_with_a_singleton_axis_and_tuples() -> None:
    [prompts] = _split(1, boxes=np.zeros((2, 1, 4)) + [0, 0, 5, 5])
    assert len(prompts) == 2 and prompts[0].box.shape == (4,)
    [prompts] = _split(1, boxes=(0, 0, 5, 5))
    assert len(prompts) == 1


def test_single_prompt_object_score_is_zero_dimensional() -> None:
    batched = Sam2BatchedPrediction(
        masks=np.zeros((1, 3, 4, 5), bool), scores=np.array([[0.1, 0.9, 0.3]], np.float32),
        logits=np.zeros((1, 3, 256, 256), np.float32),
        object_score_logits=np.array([0.5], np.float32))
    prediction = Sam2Prediction.from_batched(batched)
    assert isinstance(prediction.object_score_logits, np.ndarray)
    assert prediction.object_score_logits.shape == ()
    assert prediction.masks[prediction.scores.argmax()].shape == (4, 5)
    assert batched.best_indices.tolist() == [1]
