"""ScratchBuffers: per-thread buffers reused between forwards, and a mask decoder that uses
them still gives every forward's outputs their own memory, on every thread. Also: a multimask
forward makes only the masks it returns (mask tokens 1..3)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from sam2_shared.model import common
from sam2_shared.model import transformer as transformer_module
from sam2_shared.model.common import ScratchBuffers
from sam2_shared.model.mask_decoder import MaskDecoder
from sam2_shared.model.transformer import TwoWayTransformer

CHANNELS, SIDE = 64, 16  # a 16x16 image embedding of 64 channels


@pytest.fixture
def every_size_qualifies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small tensors stand in for the 64 MiB maps (the same code path, in milliseconds)."""
    monkeypatch.setattr(common, "_FRESH_MAPPING_BYTES", 0)


def _in_thread(make: object) -> torch.Tensor:
    """``make()`` on another thread, with autograd off there too (a per-thread setting)."""
    result: list[torch.Tensor] = []

    def run() -> None:
        with torch.no_grad():
            result.append(make())  # type: ignore[operator]

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return result[0]


@pytest.mark.usefixtures("every_size_qualifies")
def test_one_buffer_per_name_thread_and_mode() -> None:
    scratch = ScratchBuffers(max_bytes=1024)
    like = torch.zeros(1)
    with torch.no_grad():
        first = scratch.empty("a", (4, 8), like)
        assert first.shape == (4, 8) and first.dtype == like.dtype
        smaller = scratch.empty("a", (2, 8), like)
        assert smaller.data_ptr() == first.data_ptr()  # the same memory again
        other = scratch.empty("b", (4, 8), like)
        assert other.data_ptr() != first.data_ptr()
        assert scratch.kept_bytes() == 2 * 32 * 4
        # another thread has its own buffers
        theirs = _in_thread(lambda: scratch.empty("a", (4, 8), like))
        assert theirs.data_ptr() != first.data_ptr()
        # beyond max_bytes: a plain tensor, nothing more kept
        assert scratch.empty("c", (200,), like).data_ptr() not in (first.data_ptr(),
                                                                   other.data_ptr())
        assert scratch.kept_bytes() == 2 * 32 * 4
        # one oversized request for a kept name does not cost it its buffer
        assert scratch.empty("a", (240,), like).data_ptr() != first.data_ptr()
        assert scratch.empty("a", (4, 8), like).data_ptr() == first.data_ptr()
        # a larger request replaces the name's buffer
        grown = scratch.empty("a", (8, 8), like)
        assert grown.shape == (8, 8) and scratch.kept_bytes() == (64 + 32) * 4
    with torch.inference_mode():  # inference tensors get buffers of their own
        frozen = scratch.empty("a", (4, 8), like)
        assert frozen.is_inference() and frozen.data_ptr() != grown.data_ptr()
    # with autograd on: always a new tensor
    assert scratch.empty("a", (4, 8), like).data_ptr() != grown.data_ptr()
    # copies and pickles start empty (a cache of this process's threads)
    assert copy.deepcopy(scratch).kept_bytes() == 0
    assert pickle.loads(pickle.dumps(scratch)).max_bytes == 1024


def test_small_requests_are_plain_tensors() -> None:
    scratch = ScratchBuffers(max_bytes=1 << 30)
    with torch.no_grad():
        first = scratch.empty("a", (4, 8), torch.zeros(1))
        assert scratch.empty("a", (4, 8), torch.zeros(1)).data_ptr() != first.data_ptr()
    assert scratch.kept_bytes() == 0


def _decoder() -> MaskDecoder:
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=CHANNELS, num_heads=8, mlp_dim=128)
    return MaskDecoder(transformer_dim=CHANNELS, transformer=transformer).eval()


def _forward(decoder: MaskDecoder, inputs: dict[str, torch.Tensor], seed: int
             ) -> tuple[torch.Tensor, ...]:
    tokens = torch.randn(6, 3, CHANNELS, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return decoder.predict_masks(inputs["image"], inputs["pe"], tokens, inputs["dense"],
                                     (inputs["s0"], inputs["s1"]))


@pytest.mark.usefixtures("every_size_qualifies")
def test_outputs_survive_the_next_forward_on_any_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several bands of the image update: a forward's image states go into the buffers (one
    # band's results are its own tensors).
    monkeypatch.setattr(transformer_module, "_BAND_PROMPT_TOKENS", 512)
    decoder = _decoder()
    inputs = {
        "image": torch.randn(1, CHANNELS, SIDE, SIDE), "pe": torch.randn(1, CHANNELS, SIDE, SIDE),
        "dense": torch.randn(1, CHANNELS, 1, 1).expand(1, CHANNELS, SIDE, SIDE),
        "s0": torch.randn(1, CHANNELS // 8, 4 * SIDE, 4 * SIDE),
        "s1": torch.randn(1, CHANNELS // 4, 2 * SIDE, 2 * SIDE),
    }
    first = _forward(decoder, inputs, seed=1)
    second = _forward(decoder, inputs, seed=2)  # reuses the buffers the first one used
    assert decoder.transformer._scratch.kept_bytes() > 0
    again = _forward(decoder, inputs, seed=1)
    for held, fresh, other in zip(first, again, second, strict=True):
        assert torch.equal(held, fresh)  # the held outputs were not overwritten
        assert not torch.equal(held, other)
    # Two threads at once, each with its own buffers: each gets the single-thread answer.
    barrier = threading.Barrier(2)
    results: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(seed: int) -> None:
        barrier.wait()
        for _ in range(20):
            results[seed] = _forward(decoder, inputs, seed)

    workers = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for seed, expected in ((1, first), (2, second)):
        for got, want in zip(results[seed], expected, strict=True):
            assert torch.equal(got, want)


def test_multimask_output_makes_the_masks_of_tokens_1_to_3_only() -> None:
    decoder = _decoder()
    image = torch.randn(1, CHANNELS, SIDE, SIDE)
    pe = torch.randn(1, CHANNELS, SIDE, SIDE)
    dense = torch.randn(1, CHANNELS, 1, 1).expand(1, CHANNELS, SIDE, SIDE)
    skips = (torch.randn(1, CHANNELS // 8, 4 * SIDE, 4 * SIDE),
             torch.randn(1, CHANNELS // 4, 2 * SIDE, 2 * SIDE))
    tokens = torch.randn(3, 3, CHANNELS)
    with torch.inference_mode():
        every = decoder.predict_masks(image, pe, tokens, dense, skips)
        multi = decoder(image, pe, tokens, dense, True, skips)
        single = decoder(image, pe, tokens, dense, False, skips)
    assert every[0].shape[1] == 4 and multi.masks.shape[1] == 3 and single.masks.shape[1] == 1
    torch.testing.assert_close(multi.masks, every[0][:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(multi.iou_scores, every[1][:, 1:])
    with pytest.raises(ValueError, match="mask tokens 1"):
        decoder.select_outputs(*every, multimask_output=True)  # all 4: not what it takes
