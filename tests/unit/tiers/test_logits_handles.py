"""Logits handles are written to the shared store behind the response, yet any replica can
resolve them: a replica that misses a handle made moments ago waits for its write to land."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from decoder_service.segmenter import Segmenter
from sam2_shared.errors import LogitsNotFoundError
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.prompts import Prompt
from sam2_shared.store import open_store
from tests.helpers.synthetic_images import synthetic_rgb

HW = (96, 128)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained("sam2.1/hiera_tiny", tiny_checkpoint)


class SlowLogitsWrites:
    """A store whose logits writes take ``delay_s`` (a loaded shared store)."""

    def __init__(self, store: Any, delay_s: float) -> None:
        self.store, self.delay_s = store, delay_s
        self.written = threading.Event()

    def put_logits(self, *args: Any) -> None:
        time.sleep(self.delay_s)
        self.store.put_logits(*args)
        self.written.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_handle_resolves_on_another_replica_before_its_write_lands(model: Sam2Model) -> None:
    async def main() -> None:
        shared = open_store("memory://")
        [embedding] = model.embed_images(synthetic_rgb(*HW, seed=2), input_color_format="rgb")
        shared.put_embedding(embedding)
        slow = SlowLogitsWrites(shared, delay_s=3.0)  # far beyond a cold first decode
        # The reader waits up to its grace for the write: longer than the write's delay.
        writer = Segmenter(model, slow)  # type: ignore[arg-type]
        other = Segmenter(model, shared, logits_write_grace_s=10.0)
        try:
            started = time.perf_counter()
            result = await writer.segment(
                [Prompt(np.array([[40.0, 30.0]], np.float32), np.array([1], np.int32))],
                embedding_id=embedding.embedding_id)
            answered_s = time.perf_counter() - started
            handle = result.logits_handles[0][2]
            assert not slow.written.is_set() and answered_s < slow.delay_s  # not waited for
            logits = await asyncio.to_thread(other.resolve_logits, handle)  # before it lands
            assert slow.written.is_set()
            np.testing.assert_array_equal(logits, result.predictions[0].logits[0, 2])
            np.testing.assert_array_equal(writer.resolve_logits(handle), logits)  # local LRU
            # A handle that was never made, with an old time stamp: answered at once.
            token = handle.rpartition(".")[0]
            unknown = "00000000001" + token[11:] + ".0"
            started = time.perf_counter()
            with pytest.raises(LogitsNotFoundError):
                other.resolve_logits(unknown)
            assert time.perf_counter() - started < 0.2
        finally:
            await writer.close()
            await other.close()

    asyncio.run(main())


def test_a_recent_handle_whose_write_never_lands_is_not_found_after_the_grace(
        model: Sam2Model) -> None:
    async def main() -> None:
        segmenter = Segmenter(model, open_store("memory://"), logits_write_grace_s=0.3)
        try:
            stamp = f"{int(time.time() * 1000):011x}"
            started = time.perf_counter()
            with pytest.raises(LogitsNotFoundError):
                await asyncio.to_thread(segmenter.resolve_logits, stamp + "ab" * 12 + ".0")
            waited = time.perf_counter() - started
            assert 0.2 <= waited < 2.0
        finally:
            await segmenter.close()

    asyncio.run(main())


class CountingLogitsWrites:
    """A store that counts its logits writes."""

    def __init__(self, store: Any) -> None:
        self.store, self.writes = store, 0

    def put_logits(self, *args: Any) -> None:
        self.writes += 1
        self.store.put_logits(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_no_handles_asked_means_no_logits_kept(model: Sam2Model) -> None:
    """``logits_handles=False`` (the wire's ``omit_logits_handles``): the same predictions, no
    handle, nothing written to the store or cached; the default still makes and writes them."""
    async def main() -> None:
        store = CountingLogitsWrites(open_store("memory://"))
        [embedding] = model.embed_images(synthetic_rgb(*HW, seed=4), input_color_format="rgb")
        store.put_embedding(embedding)
        segmenter = Segmenter(model, store)  # type: ignore[arg-type]
        prompts = [Prompt(np.array([[40.0, 30.0]], np.float32), np.array([1], np.int32))]
        try:
            bare = await segmenter.segment(prompts, embedding_id=embedding.embedding_id,
                                           logits_handles=False)
            assert bare.logits_handles is None and len(segmenter.logits_cache) == 0
            full = await segmenter.segment(prompts, embedding_id=embedding.embedding_id)
            assert len(full.logits_handles[0]) == 3
            np.testing.assert_array_equal(bare.predictions[0].logits, full.predictions[0].logits)
        finally:
            await segmenter.close()  # waits for the writes behind the responses
        assert store.writes == 1  # the full request's; none for the bare one

    asyncio.run(main())
