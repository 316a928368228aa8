"""Semantics of the in-process API (``Sam2Model``) on the tiny model with random weights.

Encoding one image takes seconds here, so the module encodes two images once (in one
batched call) and every test reuses those embeddings. Tests that exercise the caches build
a ``Sam2Model`` view that shares the module's network but has its own fresh caches; tests
that pass the same pixels in another form get the module's embedding back as a cache hit
instead of encoding again. Parity with Meta's reference is tested in tests/parity/.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam2_shared import (
    ImageEmbedding,
    Prompt,
    Sam2BatchedPrediction,
    Sam2ImageEmbeddingsInMemoryCache,
    Sam2LowResolutionMasksInMemoryCache,
    Sam2Model,
    Sam2Prediction,
)
from sam2_shared.errors import InvalidInputError
from sam2_shared.model.common import TensorMemo
from tests.helpers.synthetic_images import synthetic_rgb

TINY = "sam2.1/hiera_tiny"
A_HW = (90, 120)  # image A: landscape, colour
B_HW = (150, 70)  # image B: portrait, gray
LOGITS_ATOL = 1e-4
BOX_A1 = [10.0, 20.0, 60.0, 80.0]
BOX_A2 = [70.0, 5.0, 115.0, 45.0]
BOX_B = [5.0, 30.0, 60.0, 140.0]


@dataclasses.dataclass
class Fixture:
    model: Sam2Model  # no caches
    a_rgb: np.ndarray
    a_bgr: np.ndarray
    b_gray: np.ndarray  # HxW
    a: ImageEmbedding
    b: ImageEmbedding


@pytest.fixture(scope="module")
def fx(tiny_checkpoint: Path) -> Fixture:
    model = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint)
    a_rgb = synthetic_rgb(*A_HW, seed=0)
    a_bgr = np.ascontiguousarray(a_rgb[:, :, ::-1])
    b_gray = cv2.cvtColor(synthetic_rgb(*B_HW, seed=1), cv2.COLOR_RGB2GRAY)
    b_bgr = np.repeat(b_gray[:, :, None], 3, axis=2)
    a, b = model.embed_images([a_bgr, b_bgr])  # BGR is the default
    return Fixture(model, a_rgb, a_bgr, b_gray, a, b)


def _view(
    model: Sam2Model,
    embeddings: Sam2ImageEmbeddingsInMemoryCache | None = None,
    low_res: Sam2LowResolutionMasksInMemoryCache | None = None,
) -> Sam2Model:
    """The same network with other caches (no weights are copied)."""
    return Sam2Model(
        model.config,
        model.encoder,
        model.decoder,
        sam2_image_embeddings_cache=embeddings,
        sam2_low_resolution_masks_cache=low_res,
    )


def _prefilled(fx: Fixture) -> tuple[Sam2Model, Sam2ImageEmbeddingsInMemoryCache]:
    cache = Sam2ImageEmbeddingsInMemoryCache(size_limit=4)
    for embedding in (fx.a, fx.b):
        cache.save_embeddings(embedding.embedding_id, embedding)
    return _view(fx.model, embeddings=cache), cache


def _same_tensors(x: ImageEmbedding, y: ImageEmbedding, atol: float = 0.0) -> bool:
    pairs = [(x.image_embed, y.image_embed), *zip(x.high_res_feats, y.high_res_feats, strict=True)]
    return all(torch.allclose(p, q, rtol=0.0, atol=atol) for p, q in pairs)


def _numpy(prediction: Sam2Prediction | Sam2BatchedPrediction) -> Sam2BatchedPrediction:
    """The [P, C, ...] values of a prediction as numpy arrays."""
    if isinstance(prediction, Sam2Prediction):
        prediction = prediction.batched
    return prediction.converted(np.asarray)


def _assert_same_prediction(
    got: Sam2Prediction | Sam2BatchedPrediction,
    expected: Sam2Prediction | Sam2BatchedPrediction,
    atol: float = LOGITS_ATOL,
) -> None:
    got, expected = _numpy(got), _numpy(expected)
    assert got.logits.shape == expected.logits.shape
    np.testing.assert_allclose(got.logits, expected.logits, rtol=0, atol=atol)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=atol)
    np.testing.assert_allclose(
        got.object_score_logits, expected.object_score_logits, rtol=0, atol=atol
    )
    assert got.masks.shape == expected.masks.shape
    # Masks may only flip where the logit sits at the threshold.
    assert (got.masks != expected.masks).mean() <= 1e-3


@pytest.fixture(scope="module")
def box_a1(fx: Fixture) -> Sam2Prediction:
    """Image A with the box BOX_A1, decoded alone (a reference several tests compare to)."""
    (prediction,) = fx.model.segment_images(embeddings=fx.a, boxes=BOX_A1)
    return prediction


# ----- image inputs -------------------------------------------------------------------------


def test_bgr_default_and_rgb_flag_give_the_same_embedding(fx: Fixture) -> None:
    (from_rgb,) = fx.model.embed_images(fx.a_rgb, input_color_format="rgb")
    assert from_rgb.embedding_id == fx.a.embedding_id
    assert from_rgb.original_hw == fx.a.original_hw == A_HW
    # fx.a came from a batch of two images; batching must not change an embedding.
    assert _same_tensors(from_rgb, fx.a, atol=1e-4)
    # The same RGB array read as BGR is another picture.
    swapped = fx.model.embedding_id(fx.model.decode_image(fx.a_rgb))
    assert swapped != fx.a.embedding_id


def test_encoded_bytes_and_file_paths_give_the_same_embedding_id(
    fx: Fixture, tmp_path: Path
) -> None:
    view, cache = _prefilled(fx)
    ok, png = cv2.imencode(".png", fx.a_bgr)
    assert ok
    path = tmp_path / "a.png"
    path.write_bytes(png.tobytes())
    inputs: list[Any] = [png.tobytes(), bytearray(png.tobytes()), str(path), path]
    embeddings = view.embed_images(inputs)
    assert [e.embedding_id for e in embeddings] == [fx.a.embedding_id] * len(inputs)
    assert cache.hits == len(inputs) and cache.misses == 0  # nothing was re-encoded
    assert all(_same_tensors(e, fx.a) for e in embeddings)


def test_gray_and_four_channel_arrays(fx: Fixture) -> None:
    view, cache = _prefilled(fx)
    alpha = np.full((*A_HW, 1), 77, np.uint8)
    inputs: list[tuple[np.ndarray, str, str]] = [
        (fx.b_gray, "bgr", fx.b.embedding_id),
        (fx.b_gray[:, :, None], "bgr", fx.b.embedding_id),
        (np.concatenate([fx.a_bgr, alpha], axis=2), "bgr", fx.a.embedding_id),
        (np.concatenate([fx.a_rgb, alpha], axis=2), "rgb", fx.a.embedding_id),
    ]
    for image, color_format, expected_id in inputs:
        (embedding,) = view.embed_images(image, input_color_format=color_format)
        assert embedding.embedding_id == expected_id
    assert cache.misses == 0


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32, 3), np.float32),
        np.zeros((32, 32, 2), np.uint8),
        "definitely/not/an/image/file.png",
        b"not an image",
        7,
        None,
        [],
    ],
    ids=["float-array", "two-channels", "missing-path", "garbage-bytes", "int", "none", "empty"],
)
def test_invalid_image_inputs_are_value_errors(fx: Fixture, image: Any) -> None:
    with pytest.raises(ValueError):
        fx.model.embed_images(image)


def test_unknown_color_format_is_refused(fx: Fixture) -> None:
    with pytest.raises(ValueError, match="input_color_format"):
        fx.model.embed_images(fx.a_bgr, input_color_format="hsv")


# ----- batch semantics ----------------------------------------------------------------------



def test_one_image_or_a_list_of_one(fx: Fixture) -> None:
    point, label = [[35.0, 50.0]], [1]
    (single,) = fx.model.segment_images(
        embeddings=fx.a, point_coordinates=point, point_labels=label
    )
    (listed,) = fx.model.segment_images(
        embeddings=[fx.a], point_coordinates=[point], point_labels=[label]
    )
    _assert_same_prediction(listed, single, atol=0.0)
    # Raw images (here: cache hits) behave like their embeddings, single or listed.
    view, _ = _prefilled(fx)
    (from_image,) = view.segment_images(
        images=fx.a_bgr, point_coordinates=point, point_labels=label
    )
    (from_list,) = view.segment_images(
        images=[fx.a_bgr], point_coordinates=[point], point_labels=[label]
    )
    _assert_same_prediction(from_image, single, atol=0.0)
    _assert_same_prediction(from_list, single, atol=0.0)


def test_two_images_with_their_own_prompt_lists(fx: Fixture) -> None:
    predictions = fx.model.segment_images(
        embeddings=[fx.a, fx.b], boxes=[[BOX_A1, BOX_A2], [BOX_B]]
    )
    assert len(predictions) == 2
    first, second = predictions
    assert first.masks.shape == (2, 3, *A_HW) and first.masks.dtype == torch.bool
    assert second.masks.shape == (3, *B_HW)  # one prompt: no prompt axis
    assert second.batched.masks.shape == (1, 3, *B_HW)
    for prediction, rows in ((first, 2), (second, 1)):
        batched = prediction.batched
        assert batched.scores.shape == (rows, 3)
        assert batched.logits.shape == (rows, 3, 256, 256)
        assert batched.logits.dtype == torch.float32
        assert batched.object_score_logits.shape == (rows,)
        assert batched.best_indices.shape == (rows,)
    # Each image's rows are that image's own predictions.
    (alone,) = fx.model.segment_images(embeddings=fx.b, boxes=BOX_B)
    _assert_same_prediction(second, alone)


def test_several_boxes_give_one_row_each(fx: Fixture, box_a1: Sam2Prediction) -> None:
    (both,) = fx.model.segment_images(embeddings=fx.a, boxes=[BOX_A1, BOX_A2])
    assert both.masks.shape == (2, 3, *A_HW)
    (box_a2,) = fx.model.segment_images(embeddings=fx.a, boxes=BOX_A2)
    _assert_same_prediction(_row(both, 0), box_a1)
    _assert_same_prediction(_row(both, 1), box_a2)


def test_boxes_with_shared_points(fx: Fixture) -> None:
    points, labels = [[40.0, 50.0], [100.0, 20.0]], [1, 0]
    (shared,) = fx.model.segment_images(
        embeddings=fx.a, boxes=[BOX_A1, BOX_A2], point_coordinates=points, point_labels=labels
    )
    assert shared.masks.shape == (2, 3, *A_HW)
    for row, box in enumerate((BOX_A1, BOX_A2)):
        (alone,) = fx.model.segment_images(
            embeddings=fx.a, boxes=box, point_coordinates=points, point_labels=labels
        )
        _assert_same_prediction(_row(shared, row), alone)


def _row(prediction: Sam2Prediction, row: int) -> Sam2BatchedPrediction:
    return prediction.batched.converted(lambda values: values[row : row + 1])


@pytest.mark.parametrize(
    "arguments",
    [
        {"boxes": [BOX_A1, BOX_A2], "point_coordinates": [[[1, 1]], [[2, 2]], [[3, 3]]],
         "point_labels": [[1], [1], [1]]},
        {"point_coordinates": [[[1, 1]], [[2, 2]]], "point_labels": [[1], [1], [1]]},
        {"point_coordinates": [[1, 1]]},
        {},
    ],
    ids=["2-boxes-3-point-sets", "2-point-sets-3-label-sets", "points-without-labels", "nothing"],
)
def test_inconsistent_prompt_counts_are_invalid(fx: Fixture, arguments: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        fx.model.segment_images(embeddings=fx.a, **arguments)


def test_per_image_lists_must_match_the_images(fx: Fixture) -> None:
    three = [np.array(BOX_A1)] * 3
    with pytest.raises(ValueError, match=r"boxes is a list of 3 .* 2 image.*1 or 2"):
        fx.model.segment_images(embeddings=[fx.a, fx.b], boxes=three)


def test_single_mask_output(fx: Fixture) -> None:
    (prediction,) = fx.model.segment_images(
        embeddings=fx.b, boxes=[BOX_B, [10.0, 10.0, 50.0, 50.0]], multimask_output=False
    )
    assert prediction.masks.shape == (2, 1, *B_HW)
    assert prediction.scores.shape == (2, 1)
    assert prediction.logits.shape == (2, 1, 256, 256)
    assert (prediction.batched.best_indices == 0).all()


def test_masks_are_thresholded_upsampled_logits(fx: Fixture) -> None:
    (prediction,) = fx.model.segment_images(
        embeddings=fx.a, point_coordinates=[[[35.0, 50.0]], [[90.0, 25.0]]],
        point_labels=[[1], [1]],
    )
    assert prediction.masks.shape == (2, 3, *A_HW) and prediction.masks.dtype == torch.bool
    assert prediction.logits.dtype == torch.float32
    prediction = _numpy(prediction)
    logits = prediction.logits
    assert logits.shape == (2, 3, 256, 256) and logits.dtype == np.float32
    assert np.abs(logits).max() <= 32.0
    assert 0.0 < prediction.masks.mean() < 1.0  # informative masks, not all on or all off
    upsampled = F.interpolate(
        torch.from_numpy(logits), size=A_HW, mode="bilinear", align_corners=False
    ).numpy()
    # Returned logits are clamped to +-32, the masks are not: they can differ only next to
    # clamped low-res values, so compare where no clamping happened nearby.
    clamped_near = F.max_pool2d(
        torch.from_numpy((np.abs(logits) >= 32.0).astype(np.float32)), 3, 1, 1
    )
    clamped_near = F.interpolate(clamped_near, size=A_HW, mode="nearest").numpy() > 0
    comparable = ~clamped_near & (np.abs(upsampled) > 1e-4)
    assert comparable.mean() > 0.5
    assert np.array_equal(prediction.masks[comparable], (upsampled > 0)[comparable])
    assert (prediction.masks == (upsampled > 0)).mean() >= 0.99


# ----- batched decoding ---------------------------------------------------------------------


def test_batched_decode_equals_one_by_one(fx: Fixture) -> None:
    (earlier,) = fx.model.segment_images(embeddings=fx.a, boxes=BOX_A1)
    mask = earlier.logits[earlier.scores.argmax()].numpy()
    points2 = np.array([[40.0, 50.0], [100.0, 20.0]], np.float32)
    prompts = [
        Prompt(point_coords=np.array([[35.0, 50.0]]), point_labels=np.array([1])),
        Prompt(point_coords=points2, point_labels=np.array([1, 0])),
        Prompt(box=np.array(BOX_A1)),
        Prompt(point_coords=np.array([[90.0, 25.0]]), point_labels=np.array([1])),
        Prompt(box=np.array(BOX_A2), point_coords=points2, point_labels=np.array([1, 1])),
        Prompt(mask_input=mask),
        Prompt(point_coords=np.array([[35.0, 50.0]]), point_labels=np.array([1]), mask_input=mask),
        Prompt(point_coords=np.array([[60.0, 60.0]]), point_labels=np.array([1]),
               multimask_output=False),
        Prompt(box=np.array(BOX_A2), multimask_output=False),
    ]
    batched = fx.model.decode_prompts(fx.a, prompts)
    assert len(batched) == len(prompts)
    for prompt, got in zip(prompts, batched, strict=True):
        (alone,) = fx.model.decode_prompts(fx.a, [prompt])
        channels = 3 if prompt.multimask_output else 1
        assert got.logits.shape == (1, channels, 256, 256)
        _assert_same_prediction(got, alone)


def test_remembered_image_work_follows_the_image(fx: Fixture) -> None:
    """The decoder keeps the last images' per-image work (skip features in blocked order, the
    first layer's image side); a decode must never use another image's, nor that of
    tensors written in place since."""
    decoder = fx.model.decoder.sam_mask_decoder
    click = [Prompt(point_coords=np.array([[35.0, 50.0]]), point_labels=np.array([1]))]

    def fresh(embedding: ImageEmbedding) -> Sam2BatchedPrediction:
        decoder._skip_memo, decoder._image_memo = TensorMemo(2), TensorMemo(2)
        return fx.model.decode_prompts(embedding, click)[0]

    a_fresh, b_fresh = fresh(fx.a), fresh(fx.b)
    assert not np.allclose(a_fresh.logits, b_fresh.logits, atol=1e-3)
    for embedding, expected in ((fx.a, a_fresh), (fx.b, b_fresh), (fx.a, a_fresh),
                                (fx.b, b_fresh)):
        # Within float rounding: the first layer's image side changes the order of sums.
        _assert_same_prediction(fx.model.decode_prompts(embedding, click)[0], expected)
    a_again = dataclasses.replace(  # same values, other tensors
        fx.a, image_embed=fx.a.image_embed.clone(memory_format=torch.channels_last),
        high_res_feats=tuple(t.clone(memory_format=torch.channels_last)
                             for t in fx.a.high_res_feats))
    _assert_same_prediction(fx.model.decode_prompts(a_again, click)[0], a_fresh)
    assert len(decoder._skip_memo) == len(decoder._image_memo) == 2  # the oldest dropped

    for tensor in (a_again.high_res_feats[0], a_again.image_embed):
        tensor.mul_(-1.0)  # written in place (normal tensors count versions)
        changed = fx.model.decode_prompts(a_again, click)[0]
        assert not np.allclose(changed.logits, a_fresh.logits, atol=1e-3)
        _assert_same_prediction(changed, fresh(a_again))

    # One weight written in place (a state dict loaded in place does this to every weight):
    # what the memo was made from changes under the same embedding.
    a_fresh = fresh(fx.a)
    weights = dict(decoder.named_parameters())
    for name in ("transformer.layers.0.cross_attn_token_to_image.k_proj.weight",
                 "transformer.layers.0.cross_attn_token_to_image.v_proj.bias",
                 "transformer.layers.0.cross_attn_image_to_token.q_proj.weight",
                 "output_upscaling.3.bias"):
        for _ in range(2):  # seen twice: everything remembered with the current weights
            fx.model.decode_prompts(fx.a, click)
        before = weights[name].detach().clone()
        try:
            with torch.no_grad():
                weights[name].mul_(1.5).add_(0.1)
            changed = fx.model.decode_prompts(fx.a, click)[0]
            assert not np.allclose(changed.logits, a_fresh.logits, atol=1e-4), name
            _assert_same_prediction(changed, fresh(fx.a))
        finally:
            with torch.no_grad():
                weights[name].copy_(before)
    _assert_same_prediction(fx.model.decode_prompts(fx.a, click)[0], a_fresh)


def test_compiled_decoder_gives_the_eager_results(tiny_checkpoint: Path, fx: Fixture) -> None:
    """``compile_decoder=True``: one-prompt forwards go through torch.compile (inductor), with
    the eager numbers; forwards of several prompts stay eager."""
    compiled = Sam2Model.from_pretrained(TINY, checkpoint=tiny_checkpoint, parts="decoder",
                                         compile_decoder=True)
    decoder = compiled.decoder.sam_mask_decoder
    inner, batch_sizes = decoder._one_prompt_upscaling, []

    def counting(*args: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(args[0].shape[0])
        return inner(*args)

    decoder._one_prompt_upscaling = counting
    (earlier,) = fx.model.segment_images(embeddings=fx.a, boxes=BOX_A1)
    prompts = [
        Prompt(point_coords=np.array([[35.0, 50.0]]), point_labels=np.array([1])),
        Prompt(box=np.array(BOX_A2), point_coords=np.array([[90.0, 25.0]]),
               point_labels=np.array([0])),
        Prompt(mask_input=earlier.logits[0].numpy()),
        Prompt(point_coords=np.array([[60.0, 60.0]]), point_labels=np.array([1]),
               multimask_output=False),
    ]
    for prompt in prompts:
        (got,) = compiled.decode_prompts(fx.a, [prompt])
        (eager,) = fx.model.decode_prompts(fx.a, [prompt])
        _assert_same_prediction(got, eager)
    assert batch_sizes == [1] * len(prompts)
    pair = compiled.decode_prompts(fx.a, prompts[:1] * 2)
    assert batch_sizes == [1] * len(prompts)  # two prompts: the eager code
    _assert_same_prediction(pair[1], fx.model.decode_prompts(fx.a, prompts[:1])[0])

    def no_compiler(*args: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    decoder._one_prompt_upscaling = no_compiler  # a compile that fails: eager, from then on
    (got,) = compiled.decode_prompts(fx.a, prompts[:1])
    _assert_same_prediction(got, fx.model.decode_prompts(fx.a, prompts[:1])[0])
    assert decoder._one_prompt_upscaling is None


# ----- embeddings cache ---------------------------------------------------------------------


def test_embeddings_cache_hit_and_lru_eviction(fx: Fixture) -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache(size_limit=1)
    cache.save_embeddings(fx.b.embedding_id, fx.b)
    view = _view(fx.model, embeddings=cache)

    (first,) = view.embed_images(fx.a_bgr)  # miss: encoded, stored, and B is evicted
    assert (cache.misses, cache.hits, cache.evictions) == (1, 0, 1)
    assert fx.a.embedding_id in cache and fx.b.embedding_id not in cache
    assert len(cache) == 1
    assert _same_tensors(first, fx.a, atol=1e-4)

    (second,) = view.embed_images(fx.a_bgr)  # hit: the stored tensors, not a new encode
    assert (cache.misses, cache.hits) == (1, 1)
    assert second.embedding_id == first.embedding_id
    assert _same_tensors(second, first)



def test_embeddings_cache_send_to_cpu(fx: Fixture) -> None:
    to_cpu = Sam2ImageEmbeddingsInMemoryCache(size_limit=2, send_to_cpu=True)
    to_cpu.save_embeddings(fx.a.embedding_id, fx.a)
    stored = to_cpu.retrieve_embeddings(fx.a.embedding_id)
    assert stored is not None and stored.image_embed.device.type == "cpu"
    moved = to_cpu.retrieve_embeddings(fx.a.embedding_id, device="meta")
    assert moved is not None and moved.image_embed.device.type == "meta"
    assert all(t.device.type == "meta" for t in moved.high_res_feats)

    kept = Sam2ImageEmbeddingsInMemoryCache(size_limit=2, send_to_cpu=False)
    kept.save_embeddings(fx.a.embedding_id, fx.a)
    assert kept.retrieve_embeddings(fx.a.embedding_id) is fx.a  # no copy made


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_gpu_caches_embeddings_on_cpu(tiny_checkpoint: Path, fx: Fixture) -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache(size_limit=2, send_to_cpu=True)
    model = Sam2Model.from_pretrained(
        TINY, checkpoint=tiny_checkpoint, device="cuda", sam2_image_embeddings_cache=cache
    )
    (embedding,) = model.embed_images(fx.a_bgr)
    assert embedding.image_embed.device.type == "cuda"
    stored = cache.retrieve_embeddings(embedding.embedding_id)
    assert stored is not None
    assert {t.device.type for t in (stored.image_embed, *stored.high_res_feats)} == {"cpu"}
    (again,) = model.embed_images(fx.a_bgr)
    assert again.image_embed.device.type == "cuda" and cache.hits == 1
    (prediction,) = model.segment_images(embeddings=again, boxes=BOX_A1)
    (on_cpu,) = fx.model.segment_images(embeddings=fx.a, boxes=BOX_A1)
    assert (prediction.masks != on_cpu.masks).mean() < 0.01


# ----- low-res mask cache: click-by-click refinement ----------------------------------------

FIRST_CLICK = [[35.0, 50.0]]
SECOND_CLICK = [[35.0, 50.0], [100.0, 20.0]]


def _click(model: Sam2Model, embedding: ImageEmbedding, **kwargs: Any) -> Sam2Prediction:
    (prediction,) = model.segment_images(embeddings=embedding, **kwargs)
    return prediction


def test_extending_clicks_start_from_the_earlier_logits(fx: Fixture) -> None:
    low_res = Sam2LowResolutionMasksInMemoryCache(size_limit=10)
    view = _view(fx.model, low_res=low_res)
    first = _click(view, fx.a, point_coordinates=FIRST_CLICK, point_labels=[1],
                   use_mask_input_cache=True)
    assert len(low_res) == 1 and fx.a.embedding_id in low_res
    prior = first.logits[first.scores.argmax()]  # the best candidate's (256, 256) logits

    refined = _click(view, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0],
                     use_mask_input_cache=True)
    assert low_res.hits == 1
    explicit = _click(fx.model, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0],
                      mask_input=prior)
    _assert_same_prediction(refined, explicit, atol=1e-5)
    # ... and the prior mattered: without it the result is another one.
    plain = _click(fx.model, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0])
    assert np.abs(plain.logits - refined.logits).max() > 1e-2


def test_prompts_that_do_not_extend_ignore_the_cache(fx: Fixture) -> None:
    low_res = Sam2LowResolutionMasksInMemoryCache(size_limit=10)
    view = _view(fx.model, low_res=low_res)
    _click(view, fx.a, point_coordinates=FIRST_CLICK, point_labels=[1], use_mask_input_cache=True)
    not_extending: list[dict[str, Any]] = [
        {"point_coordinates": [[100.0, 20.0], [35.0, 50.0]], "point_labels": [0, 1]},  # order
        {"point_coordinates": [[35.0, 50.0], [100.0, 20.0]], "point_labels": [0, 1]},  # label
        {"point_coordinates": SECOND_CLICK, "point_labels": [1, 0], "boxes": BOX_A1},  # box
    ]
    for prompt in not_extending:
        with_cache = _click(view, fx.a, use_mask_input_cache=True, **prompt)
        without = _click(fx.model, fx.a, **prompt)
        _assert_same_prediction(with_cache, without, atol=0.0)
    assert low_res.hits == 0
    # An extending prompt with the cache switched off is not refined either.
    off = _click(view, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0],
                 use_mask_input_cache=False)
    plain = _click(fx.model, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0])
    _assert_same_prediction(off, plain, atol=0.0)


def test_explicit_mask_input_wins_over_the_cache(fx: Fixture) -> None:
    low_res = Sam2LowResolutionMasksInMemoryCache(size_limit=10)
    view = _view(fx.model, low_res=low_res)
    _click(view, fx.a, point_coordinates=FIRST_CLICK, point_labels=[1], use_mask_input_cache=True)
    other = _click(fx.model, fx.a, boxes=BOX_A2)
    given = other.logits[0]
    got = _click(view, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0],
                 mask_input=given, use_mask_input_cache=True)
    expected = _click(fx.model, fx.a, point_coordinates=SECOND_CLICK, point_labels=[1, 0],
                      mask_input=given)
    _assert_same_prediction(got, expected, atol=0.0)


# ----- invalid prompts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        {"point_coordinates": [[np.nan, 10.0]], "point_labels": [1]},
        {"point_coordinates": [[10.0, np.inf]], "point_labels": [1]},
        {"point_coordinates": [[121.0, 10.0]], "point_labels": [1]},
        {"point_coordinates": [[10.0, -1.0]], "point_labels": [1]},
        {"point_coordinates": [[10.0, 10.0], [20.0, 20.0]], "point_labels": [1]},
        {"point_coordinates": [[10.0, 10.0]], "point_labels": [2]},
        {"point_coordinates": [[10.0, 10.0, 3.0]], "point_labels": [1]},
        {"boxes": [50.0, 10.0, 50.0, 40.0]},
        {"boxes": [60.0, 10.0, 20.0, 40.0]},
        {"boxes": [0.0, 0.0, 200.0, 50.0]},
        {"boxes": [0.0, 0.0, np.nan, 50.0]},
        {"boxes": [1.0, 2.0, 3.0]},
        {"mask_input": np.zeros((128, 128), np.float32)},
        {"mask_input": np.full((256, 256), np.nan, np.float32)},
        {"point_coordinates": "here", "point_labels": [1]},
    ],
    ids=[
        "nan-point", "inf-point", "x-outside", "y-negative", "label-count", "label-value",
        "point-three-coords", "zero-width-box", "inverted-box", "box-outside", "nan-box",
        "box-three-numbers", "mask-wrong-shape", "nan-mask", "string-points",
    ],
)
def test_bad_prompts_are_invalid_and_the_model_still_works(
    fx: Fixture, box_a1: Sam2Prediction, arguments: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInputError):
        fx.model.segment_images(embeddings=fx.a, **arguments)
    after = _click(fx.model, fx.a, boxes=BOX_A1)
    _assert_same_prediction(after, box_a1, atol=0.0)


def test_one_bad_prompt_fails_the_whole_call_and_caches_nothing(fx: Fixture) -> None:
    low_res = Sam2LowResolutionMasksInMemoryCache(size_limit=10)
    view = _view(fx.model, low_res=low_res)
    with pytest.raises(InvalidInputError, match="outside"):
        view.segment_images(
            embeddings=fx.a, point_coordinates=[[[10.0, 10.0]], [[500.0, 10.0]]],
            point_labels=[[1], [1]], use_mask_input_cache=True,
        )
    assert len(low_res) == 0


def test_points_on_the_image_edge_are_valid(fx: Fixture) -> None:
    height, width = A_HW
    prediction = _click(
        fx.model, fx.a, point_coordinates=[[0.0, 0.0], [float(width), float(height)]],
        point_labels=[1, 0], boxes=[0.0, 0.0, float(width), float(height)],
    )
    assert prediction.masks.shape == (3, *A_HW)


def test_embedding_of_another_model_is_refused(fx: Fixture) -> None:
    foreign = dataclasses.replace(fx.a, model_id="sam2/hiera_tiny")
    with pytest.raises(InvalidInputError) as caught:
        fx.model.segment_images(embeddings=foreign, boxes=BOX_A1)
    assert "sam2/hiera_tiny" in str(caught.value) and TINY in str(caught.value)
    with pytest.raises(InvalidInputError):
        fx.model.decode_prompts(foreign, [Prompt(box=np.array(BOX_A1))])
