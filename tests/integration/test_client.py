"""``Sam2Client`` against real tiers on 127.0.0.1: the same predictions as ``Sam2Model``,
uploads only on a miss, errors as domain exceptions."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from sam2_shared.client import EmbeddingRef, Sam2Client
from sam2_shared.errors import EmbeddingNotFoundError, InvalidInputError, UnknownModelError
from sam2_shared.inference.sam2_model import Sam2Model, cpu_has_native_bf16
from sam2_shared.prompts import Prompt, Sam2Prediction
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"


@pytest.fixture(scope="module")
def store() -> str:
    return "diskcache://" + tempfile.mkdtemp(prefix="sam2-client-test-")


@pytest.fixture(scope="module")
def tiers(tiny_checkpoint: Path, store: str) -> Iterator[tuple[TierProcess, TierProcess]]:
    encoder = encoder_process(tiny_checkpoint, store, "--store-dtype", "float32").start()
    try:
        decoder = decoder_process(tiny_checkpoint, store, "--encoder-address",
                                  encoder.address).start()
        try:
            yield encoder, decoder
        finally:
            decoder.stop()
    finally:
        encoder.stop()


@pytest.fixture()
def client(tiers) -> Iterator[Sam2Client]:
    encoder, decoder = tiers
    with Sam2Client(encoder=encoder.address, decoder=decoder.address, model_id=MODEL_ID) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained(MODEL_ID, tiny_checkpoint)


def assert_same_prediction(got: Sam2Prediction, want: Sam2Prediction) -> None:
    """Same types (CPU tensors), shapes and values, the user's and the batched ones."""
    assert type(got.masks) is type(want.masks)
    assert got.masks.shape == want.masks.shape and got.masks.dtype == want.masks.dtype
    assert got.batched.masks.shape == want.batched.masks.shape
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    np.testing.assert_allclose(got.object_score_logits, want.object_score_logits, atol=1e-4)


def test_same_predictions_as_the_in_process_model(client: Sam2Client, model: Sam2Model) -> None:
    bgr = synthetic_rgb(200, 300, seed=5)[:, :, ::-1].copy()  # BGR, the default colour order
    calls = [
        dict(point_coordinates=[[90, 110]], point_labels=[1]),
        dict(point_coordinates=[[[90, 110], [200, 50]], [[40, 40], [250, 150]]],
             point_labels=[[1, 0], [1, 1]]),
        dict(boxes=[[20, 30, 150, 180], [160, 20, 290, 90]], multimask_output=False),
        dict(point_coordinates=[[90, 110]], point_labels=[1], boxes=[20, 30, 150, 180]),
    ]
    for kwargs in calls:
        [got] = client.segment_images(bgr, **kwargs)
        [want] = model.segment_images(bgr, use_mask_input_cache=False, **kwargs)
        assert_same_prediction(got, want)
    # a list of images (and encoded bytes) gives one prediction per image
    png = cv2.imencode(".png", bgr)[1].tobytes()
    got = client.segment_images([bgr, png], point_coordinates=[[[5, 5]], [[100, 100]]],
                                point_labels=[[1], [1]])
    want = model.segment_images([bgr, png], point_coordinates=[[[5, 5]], [[100, 100]]],
                                point_labels=[[1], [1]], use_mask_input_cache=False)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert_same_prediction(g, w)
    # refinement with mask_input, as in process
    [first] = client.segment_images(bgr, point_coordinates=[[90, 110]], point_labels=[1])
    mask_input = first.logits[first.scores.argmax()]
    [got_refined] = client.segment_images(bgr, point_coordinates=[[90, 110], [60, 60]],
                                          point_labels=[1, 0], mask_input=mask_input)
    [want_refined] = model.segment_images(bgr, point_coordinates=[[90, 110], [60, 60]],
                                          point_labels=[1, 0], mask_input=mask_input,
                                          use_mask_input_cache=False)
    assert_same_prediction(got_refined, want_refined)


def test_default_upscaling_dtype_answers_as_the_in_process_model_with_it(
    tiers, store: str, tiny_checkpoint: Path
) -> None:
    """The decoder's default ``--upscaling-dtype auto``: bfloat16 on a CPU with native bf16
    (this one: AVX512-BF16), float32 elsewhere; either way its answers are the in-process
    model's with the same setting, exactly."""
    encoder, _ = tiers
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    model = Sam2Model.from_pretrained(MODEL_ID, tiny_checkpoint, upscaling_dtype=dtype)
    bgr = synthetic_rgb(200, 300, seed=6)[:, :, ::-1].copy()
    with decoder_process(tiny_checkpoint, store, "--upscaling-dtype", "auto",
                         "--encoder-address", encoder.address) as decoder:
        deadline = time.monotonic() + 30  # the line is logged just after SERVING
        while f"upscaling {dtype}" not in decoder.log_tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"upscaling {dtype}" in decoder.log_tail()
        with Sam2Client(encoder=encoder.address, decoder=decoder.address,
                        model_id=MODEL_ID) as client:
            for kwargs in (dict(point_coordinates=[[90, 110]], point_labels=[1]),
                           dict(boxes=[[20, 30, 150, 180], [160, 20, 290, 90]],
                                multimask_output=False)):
                [got] = client.segment_images(bgr, **kwargs)
                [want] = model.segment_images(bgr, use_mask_input_cache=False, **kwargs)
                assert_same_prediction(got, want)


def test_uploads_only_on_a_miss(client: Sam2Client) -> None:
    rgb = synthetic_rgb(120, 160, seed=42)
    client.segment_images(rgb, point_coordinates=[[10, 10]], point_labels=[1],
                          input_color_format="rgb")
    assert client.stats.images_uploaded == 1  # miss: asked the decoder, uploaded, asked again
    assert client.stats.segment_calls == 2
    client.segment_images(rgb, point_coordinates=[[50, 60]], point_labels=[1],
                          input_color_format="rgb")
    assert client.stats.images_uploaded == 1  # hit: no encoder call at all
    assert client.stats.segment_calls == 3


def test_embed_images_returns_references_usable_for_segmenting(client: Sam2Client,
                                                               model: Sam2Model) -> None:
    rgb = synthetic_rgb(100, 140, seed=7)
    [first] = client.embed_images(rgb, input_color_format="rgb")
    assert isinstance(first, EmbeddingRef)
    assert first.original_hw == (100, 140) and first.model_id == MODEL_ID
    assert first.embedding_id == model.embedding_id(rgb)  # content id agrees across tiers
    [again] = client.embed_images([rgb], input_color_format="rgb")
    assert again.already_stored and again.embedding_id == first.embedding_id
    [got] = client.segment_images(embeddings=first, point_coordinates=[[70, 50]],
                                  point_labels=[1])
    [want] = model.segment_images(rgb, point_coordinates=[[70, 50]], point_labels=[1],
                                  input_color_format="rgb", use_mask_input_cache=False)
    assert_same_prediction(got, want)


def test_handles_only_when_asked(client: Sam2Client) -> None:
    """``segment_images`` gets its logits inline and asks for no handles (no store write per
    click on the decoder); ``segment_prompts`` gets them by default."""
    [ref] = client.embed_images(synthetic_rgb(100, 140, seed=8), input_color_format="rgb")
    prompt = Prompt(np.array([[70.0, 50.0]], np.float32), np.array([1], np.int32))
    bare_rows, bare = client.segment_prompts(ref, [prompt], logits_handles=False)
    rows, handles = client.segment_prompts(ref, [prompt])
    assert bare == [["", "", ""]] and all(handles[0])
    np.testing.assert_array_equal(bare_rows[0].logits, rows[0].logits)


def test_client_without_encoder_lets_the_decoder_fetch_the_embedding(tiers) -> None:
    _, decoder = tiers
    rgb = synthetic_rgb(90, 130, seed=77)
    with Sam2Client(decoder=decoder.address, model_id=MODEL_ID) as client:
        [prediction] = client.segment_images(rgb, boxes=[10, 10, 100, 80],
                                             input_color_format="rgb")
        assert prediction.masks.shape == (3, 90, 130)
        assert client.stats.segment_calls == 2 and client.stats.images_uploaded == 0


def test_errors_are_domain_exceptions(client: Sam2Client, tiers) -> None:
    rgb = synthetic_rgb(100, 100, seed=3)
    with pytest.raises(InvalidInputError, match="outside"):
        client.segment_images(rgb, point_coordinates=[[500, 5]], point_labels=[1])
    with pytest.raises(InvalidInputError):  # label/point count mismatch
        client.segment_images(rgb, point_coordinates=[[5, 5], [6, 6]], point_labels=[1, 0, 1])
    with pytest.raises(InvalidInputError, match="degenerate"):
        client.segment_images(rgb, boxes=[10, 10, 10, 40])
    with pytest.raises(InvalidInputError):
        client.segment_images(rgb, point_coordinates=[[5, 5]], point_labels=[1],
                              mask_input=np.zeros((64, 64), np.float32))
    missing = EmbeddingRef("f" * 64, MODEL_ID, (100, 100))
    with pytest.raises(EmbeddingNotFoundError) as caught:
        client.segment_images(embeddings=missing, point_coordinates=[[5, 5]], point_labels=[1])
    assert caught.value.reason == "EMBEDDING_NOT_FOUND"
    with pytest.raises(InvalidInputError):
        client.embed_images(b"definitely not an image")
    encoder, decoder = tiers
    with Sam2Client(encoder=encoder.address, decoder=decoder.address,
                    model_id="sam2.1/hiera_small") as wrong_model:
        with pytest.raises(UnknownModelError) as caught_model:
            wrong_model.segment_images(rgb, point_coordinates=[[5, 5]], point_labels=[1])
        assert caught_model.value.reason == "UNKNOWN_MODEL"
