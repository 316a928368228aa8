"""The decoder bounds the full-size mask pixels (candidates x H x W) one request may produce
before any is made (over the bound: INVALID_ARGUMENT naming the numbers), and makes them one
candidate at a time: the model thread returns low-res logits, the wire encoding upsamples."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from decoder_service.segmenter import DecoderStats, Segmenter, _BatchDecoder, _Job, mask_pixels
from sam2_shared import wire
from sam2_shared.errors import InvalidInputError, LogitsNotFoundError
from sam2_shared.inference.sam2_model import DeferredMasks, Sam2Model
from sam2_shared.prompts import Prompt
from sam2_shared.store import open_store
from sam2_shared.wire import masks as mask_codec
from sam2_shared.wire.masks import MaskEncoding
from tests.helpers.synthetic_images import synthetic_rgb

HW = (120, 160)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained("sam2.1/hiera_tiny", tiny_checkpoint)


def boxes(count: int, multimask: bool = True) -> list[Prompt]:
    return [Prompt(box=np.array([10.0, 10.0, 60.0 + i, 60.0]), multimask_output=multimask)
            for i in range(count)]


def test_mask_pixels_counts_candidates() -> None:
    assert mask_pixels(boxes(2), HW) == 6 * 120 * 160
    assert mask_pixels(boxes(2, multimask=False), HW) == 2 * 120 * 160


def test_request_over_the_bound_is_refused_before_decoding(model: Sam2Model) -> None:
    async def main() -> None:
        store = open_store("memory://")
        [embedding] = model.embed_images(synthetic_rgb(*HW, seed=1), input_color_format="rgb")
        store.put_embedding(embedding)
        limit = 4 * 3 * HW[0] * HW[1]  # four multimask prompts
        decoder = Segmenter(model, store, max_mask_pixels=limit)
        try:
            ok = await decoder.segment(boxes(4), embedding_id=embedding.embedding_id)
            assert len(ok.predictions) == 4
            with pytest.raises(InvalidInputError) as refused:
                await decoder.segment(boxes(5), embedding_id=embedding.embedding_id)
            message = str(refused.value)
            assert "5 prompts with 15 mask candidates on a 160x120 image" in message
            assert f"{5 * 3 * 120 * 160:,} mask pixels; the limit is {limit:,}" in message
            assert refused.value.metadata == {"mask_pixels": str(5 * 3 * 120 * 160),
                                              "limit": str(limit)}
            assert decoder.stats.prompts_decoded == 4  # nothing of the refused one decoded
            single = await decoder.segment(boxes(12, multimask=False),
                                           embedding_id=embedding.embedding_id)
            assert len(single.predictions) == 12  # one candidate each: 12 fit
        finally:
            await decoder.close()

    asyncio.run(main())


def test_merged_decodes_make_no_full_size_mask(model: Sam2Model) -> None:
    """Merging is bounded by prompts only: the model thread returns deferred masks."""
    [embedding] = model.embed_images(synthetic_rgb(*HW, seed=2), input_color_format="rgb")
    calls: list[int] = []
    real = model.decode_prompts

    class Counting:
        decoder = model.decoder
        device = model.device

        def decode_prompts(self, embedding, prompts, **options):  # noqa: ANN001, ANN003, ANN202
            calls.append(len(prompts))
            return real(embedding, prompts, **options)

    batch = _BatchDecoder(Counting(), max_batch_prompts=4, batching=True,  # type: ignore[arg-type]
                          stats=DecoderStats())
    outcomes = batch([_Job(embedding, boxes(1)) for _ in range(5)])
    assert calls == [4, 1]
    calls.clear()
    [big] = batch([_Job(embedding, boxes(10))])  # one request over the bound: 3 forwards
    assert calls == [4, 4, 2] and len(big) == 10  # type: ignore[arg-type]
    rows = [row for outcome in outcomes for row in outcome]  # type: ignore[union-attr]
    assert all(isinstance(row.masks, DeferredMasks) for row in rows)
    assert rows[0].masks.shape == (1, 3, *HW)


@pytest.mark.parametrize("encoding", list(MaskEncoding))
def test_wire_masks_equal_the_in_process_masks(model: Sam2Model, encoding: MaskEncoding) -> None:
    """Deferred masks encoded one candidate at a time are bit-identical to ``segment_images``'s
    masks, with the same scores, logits, areas and boxes."""
    hw = (301, 457)  # odd sizes: the upsampling is not a whole multiple
    [embedding] = model.embed_images(synthetic_rgb(*hw, seed=3), input_color_format="rgb")
    box_list = [[10.0, 20.0, 200.0, 250.0], [100.5, 3.0, 456.0, 300.0], [0.0, 0.0, 60.0, 61.0]]
    points = np.array([[[50.0, 60.0]], [[300.0, 150.0]], [[5.0, 290.0]]], np.float32)
    [want] = model.segment_images(
        embeddings=embedding, boxes=np.array(box_list, np.float32), point_coordinates=points,
        point_labels=np.ones((3, 1), np.int32), use_mask_input_cache=False,
    )
    prompts = [Prompt(points[i], np.ones(1, np.int32), np.array(box_list[i], np.float32))
               for i in range(3)]
    rows = model.decode_prompts(embedding, prompts, deferred_masks=True)
    results = wire.prompt_results_to_proto(rows, encoding, include_logits=True)
    got, _ = wire.prediction_from_proto(results)
    want_masks = want.batched.masks.cpu().numpy()
    assert want_masks.shape == (3, 3, *hw) and want_masks.any() and not want_masks.all()
    np.testing.assert_array_equal(got.masks, want_masks)
    np.testing.assert_array_equal(got.scores, want.batched.scores.cpu().numpy())
    np.testing.assert_array_equal(got.logits, want.batched.logits.cpu().numpy())
    flat = want_masks.reshape(-1, *hw)
    masks = [candidate.mask for result in results for candidate in result.candidates]
    assert [m.area_px for m in masks] == mask_codec.mask_areas(flat).tolist()
    assert [[m.bbox.x_min_px, m.bbox.y_min_px, m.bbox.x_max_px, m.bbox.y_max_px]
            for m in masks] == mask_codec.mask_bboxes(flat).tolist()
    np.testing.assert_array_equal(np.asarray(rows[1].masks)[0], want_masks[1])  # all at once


@pytest.mark.parametrize("handle", ["tok.²", "tok.٣", "tok.99999999999999999999", "tok.", ".1"])
def test_odd_logits_handles_are_not_found(model: Sam2Model, handle: str) -> None:
    async def main() -> None:
        segmenter = Segmenter(model, open_store("memory://"))
        try:
            with pytest.raises(LogitsNotFoundError):
                segmenter.resolve_logits(handle)
        finally:
            await segmenter.close()

    asyncio.run(main())
