"""The decoder bounds what one request, and one merged decode, may produce before any mask is
made: full-size masks (candidates x H x W, 1 byte each) exist at once, so 64 box prompts on a
12 MP photo would allocate ~2.3 GB. Over the bound: INVALID_ARGUMENT naming the numbers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from decoder_service.segmenter import DecoderStats, Segmenter, _BatchDecoder, _Job, mask_pixels
from sam2_shared.errors import InvalidInputError, LogitsNotFoundError
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.prompts import Prompt
from sam2_shared.store import open_store
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


def test_merged_decodes_respect_the_bound(model: Sam2Model) -> None:
    [embedding] = model.embed_images(synthetic_rgb(*HW, seed=2), input_color_format="rgb")
    per_job = 3 * HW[0] * HW[1]
    calls: list[int] = []
    real = model.decode_prompts

    class Counting:
        decoder = model.decoder

        def decode_prompts(self, embedding, prompts):  # noqa: ANN001, ANN202
            calls.append(len(prompts))
            return real(embedding, prompts)

    batch = _BatchDecoder(Counting(), max_batch_prompts=64, batching=True,  # type: ignore[arg-type]
                          stats=DecoderStats(),
                          max_mask_pixels=2 * per_job)
    jobs = [_Job(embedding, boxes(1)) for _ in range(5)]
    outcomes = batch(jobs)
    assert all(isinstance(o, list) and len(o) == 1 for o in outcomes)
    assert calls == [2, 2, 1]  # never more than two jobs' masks at once


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
