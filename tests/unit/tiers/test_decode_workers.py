"""Decode workers: on a CPU several batches decode at once and share torch's threads; a
batch alone uses them all; answers do not depend on how requests were batched."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from decoder_service.cli import resolve_decode_workers
from decoder_service.segmenter import Segmenter, _BatchDecoder, _Job
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.prompts import Prompt
from sam2_shared.store import open_store
from tests.helpers.synthetic_images import synthetic_rgb

HW = (96, 128)


@pytest.fixture
def two_threads() -> Any:
    """torch at two threads or more in this thread (the sharing needs two), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


class ThreadCountingModel:
    """Stands in for ``Sam2Model``: records torch's thread count in each forward, and keeps
    each forward inside until ``at_once`` of them are."""

    device = torch.device("cpu")

    def __init__(self, at_once: int = 1) -> None:
        self.counts: list[int] = []
        self._all_inside = threading.Barrier(at_once, timeout=5)

    def decode_prompts(self, embedding: Any, prompts: list[Prompt], deferred_masks: bool
                       ) -> list[str]:
        self.counts.append(torch.get_num_threads())
        self._all_inside.wait()
        return ["row"] * len(prompts)


def _jobs(count: int) -> list[_Job]:
    embedding = SimpleNamespace(embedding_id="e")
    return [_Job(embedding, [Prompt(np.zeros((1, 2), np.float32), np.ones(1, np.int32))])
            for _ in range(count)]  # type: ignore[arg-type]


def test_a_batch_alone_uses_every_thread(two_threads: int) -> None:
    model = ThreadCountingModel()
    decoder = _BatchDecoder(model, 16, True, SimpleNamespace(add=lambda **_: None),
                            threads=two_threads)  # type: ignore[arg-type]
    torch.set_num_threads(1)  # as a worker thread left by a shared batch
    assert decoder(_jobs(3)) == [["row"]] * 3
    assert model.counts == [two_threads]


def test_batches_at_once_share_the_threads_and_give_them_back(two_threads: int) -> None:
    model = ThreadCountingModel(at_once=2)
    decoder = _BatchDecoder(model, 16, True, SimpleNamespace(add=lambda **_: None),
                            threads=two_threads)  # type: ignore[arg-type]
    both_inside = threading.Barrier(2, timeout=5)
    share = decoder._share_threads

    def share_once_both_are_inside() -> None:
        both_inside.wait()
        share()

    decoder._share_threads = share_once_both_are_inside  # type: ignore[method-assign]
    after: list[int] = []

    def worker() -> None:
        decoder(_jobs(2))
        after.append(torch.get_num_threads())

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(10)
    assert sorted(model.counts) == [two_threads // 2] * 2
    assert after == [two_threads] * 2  # each worker thread is given all of them back
    fresh: list[int] = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [two_threads]  # and so is a thread that starts using torch later


@pytest.mark.parametrize(("setting", "device", "compiled", "threads", "expected"), [
    (0, "cpu", False, 2, 2), (0, "cpu", False, 1, 1), (0, "cuda", False, 8, 1),
    (0, "cpu", True, 2, 1), (3, "cpu", True, 2, 3), (1, "cpu", False, 16, 1)])
def test_auto_decode_workers(setting: int, device: str, compiled: bool, threads: int,
                             expected: int) -> None:
    assert resolve_decode_workers(setting, device, compiled, threads) == expected


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained("sam2.1/hiera_tiny", tiny_checkpoint)


def test_two_workers_answer_as_one_does(model: Sam2Model, two_threads: int) -> None:
    """Many concurrent clicks through two decode workers (batches at once, one thread each)
    get the same masks and scores as through one worker: the batching does not show."""
    rng = np.random.default_rng(0)
    clicks = [Prompt(rng.uniform((0, 0), (HW[1], HW[0]), (1, 2)).astype(np.float32),
                     np.ones(1, np.int32)) for _ in range(24)]

    async def answers(decode_workers: int) -> tuple[list[Any], int]:
        store = open_store("memory://")
        [embedding] = model.embed_images(synthetic_rgb(*HW, seed=5), input_color_format="rgb")
        store.put_embedding(embedding)
        segmenter = Segmenter(model, store, decode_workers=decode_workers)
        assert segmenter.batcher.workers == decode_workers
        try:
            results = await asyncio.gather(*(
                segmenter.segment([click], embedding_id=embedding.embedding_id,
                                  logits_handles=False) for click in clicks))
            return ([(r.predictions[0].scores, r.predictions[0].masks[0, 0])
                     for r in results], segmenter.batcher.stats.batches)
        finally:
            await segmenter.close()

    one, _ = asyncio.run(answers(1))
    two, batches = asyncio.run(answers(2))
    assert batches > 1
    for (scores_1, masks_1), (scores_2, masks_2) in zip(one, two, strict=True):
        np.testing.assert_allclose(scores_2, scores_1, atol=1e-5)
        assert masks_2.shape == masks_1.shape
        assert (masks_2 != masks_1).mean() < 1e-4


def test_a_lone_click_starts_beside_a_running_batch(
        model: Sam2Model, two_threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A click that arrives while a batch decodes goes to the free worker at once instead of
    waiting for more clicks or for the running batch (which here waits for it)."""
    store = open_store("memory://")
    [embedding] = model.embed_images(synthetic_rgb(*HW, seed=5), input_color_format="rgb")
    store.put_embedding(embedding)
    first_inside = threading.Event()
    both_inside = threading.Barrier(2, timeout=10)
    decode = model.decode_prompts

    def decode_beside_another(*args: Any, **kwargs: Any) -> Any:
        first_inside.set()
        both_inside.wait()  # broken (an error) unless the second click starts meanwhile
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode_prompts", decode_beside_another)
    click = Prompt(np.array([[40.0, 30.0]], np.float32), np.ones(1, np.int32))

    async def two_clicks() -> int:
        segmenter = Segmenter(model, store, decode_workers=2)
        try:
            first = asyncio.create_task(segmenter.segment(
                [click], embedding_id=embedding.embedding_id, logits_handles=False))
            assert await asyncio.to_thread(first_inside.wait, 10)
            try:
                await segmenter.segment([click], embedding_id=embedding.embedding_id,
                                        logits_handles=False)
                await first
            except threading.BrokenBarrierError:
                pytest.fail("the second click waited for the first click's batch to end")
            finally:
                first.cancel()
            return segmenter.batcher.stats.batches
        finally:
            await segmenter.close()

    assert asyncio.run(two_clicks()) == 2
