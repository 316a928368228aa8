from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.inference.caches import (
    LruCache,
    PromptSignature,
    Sam2ImageEmbeddingsInMemoryCache,
    Sam2LowResolutionMasksInMemoryCache,
)
from sam2_shared.prompts import Prompt

# ----- LruCache ---------------------------------------------------------------------------


def test_get_refreshes_recency_so_lru_not_fifo_is_evicted() -> None:
    cache: LruCache[str, int] = LruCache(size_limit=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.keys() == ["a", "c"]
    assert cache.evictions == 1


def test_contains_does_not_refresh_or_count() -> None:
    cache: LruCache[str, int] = LruCache(size_limit=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert "a" in cache
    cache.put("c", 3)
    assert "a" not in cache  # membership test did not save it
    assert (cache.hits, cache.misses) == (0, 0)


def test_counters_and_default() -> None:
    cache: LruCache[str, int] = LruCache(size_limit=1)
    assert cache.get("x") is None
    assert cache.get("x", -1) == -1
    cache.put("x", 5)
    assert cache.get("x") == 5
    cache.put("y", 6)
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 1)


def test_replacing_a_key_updates_value_and_bytes_without_eviction() -> None:
    cache: LruCache[str, bytes] = LruCache(size_limit=2, max_bytes=100, size_of=len)
    cache.put("a", b"x" * 30)
    cache.put("b", b"y" * 30)
    cache.put("a", b"z" * 50)
    assert cache.get("a") == b"z" * 50
    assert cache.nbytes == 80 and len(cache) == 2 and cache.evictions == 0
    assert cache.keys() == ["b", "a"]


def test_byte_limit_evicts_lru_until_it_fits() -> None:
    cache: LruCache[str, bytes] = LruCache(size_limit=100, max_bytes=100, size_of=len)
    for key in "abcd":
        assert cache.put(key, b"." * 30)
    assert cache.keys() == ["b", "c", "d"] and cache.nbytes == 90
    cache.get("b")
    cache.put("e", b"." * 50)  # needs 40 more bytes: "c" then "d" go, "b" was refreshed
    assert cache.keys() == ["b", "e"] and cache.nbytes == 80
    assert cache.evictions == 3


def test_entry_larger_than_max_bytes_is_not_stored_and_replaces_nothing() -> None:
    cache: LruCache[str, bytes] = LruCache(size_limit=10, max_bytes=100, size_of=len)
    cache.put("small", b"." * 10)
    cache.put("big", b"." * 60)
    assert not cache.put("big", b"." * 101)
    assert "big" not in cache  # a stale value must not survive a failed replacement
    assert cache.keys() == ["small"] and cache.nbytes == 10 and cache.evictions == 0


def test_pop_clear_and_zero_limit() -> None:
    cache: LruCache[str, bytes] = LruCache(size_limit=3, max_bytes=100, size_of=len)
    cache.put("a", b"..")
    assert cache.pop("a") == b".." and cache.pop("a") is None
    cache.put("b", b"...")
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    disabled: LruCache[str, int] = LruCache(size_limit=0)
    assert not disabled.put("a", 1) and len(disabled) == 0


def test_bad_construction_rejected() -> None:
    with pytest.raises(ValueError):
        LruCache(size_limit=-1)
    with pytest.raises(ValueError, match="size_of"):
        LruCache(size_limit=1, max_bytes=10)


def test_thread_safety_under_concurrent_put_get() -> None:
    size_limit, max_bytes = 50, 2_000
    cache: LruCache[int, bytes] = LruCache(size_limit=size_limit, max_bytes=max_bytes, size_of=len)
    errors: list[str] = []
    gets_per_thread = 3_000
    threads_count = 8

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(gets_per_thread):
            key = rng.randrange(200)
            cache.put(key, bytes([key % 256]) * (1 + key % 60))
            value = cache.get(rng.randrange(200))
            if value is not None and len(value) != 1 + value[0] % 60:
                errors.append("value does not belong to its key")
            if len(cache) > size_limit or cache.nbytes > max_bytes:
                errors.append("limit exceeded")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.hits + cache.misses == gets_per_thread * threads_count
    keys = cache.keys()
    assert len(keys) == len(set(keys)) <= size_limit
    assert cache.nbytes == sum(1 + key % 60 for key in keys) <= max_bytes


# ----- embeddings cache -------------------------------------------------------------------


def _embedding(embedding_id: str, device: str = "cpu") -> ImageEmbedding:
    return ImageEmbedding(
        image_embed=torch.randn(1, 256, 4, 4, device=device),
        high_res_feats=(
            torch.randn(1, 32, 16, 16, device=device),
            torch.randn(1, 64, 8, 8, device=device),
        ),
        original_hw=(30, 40),
        model_id="sam2.1/hiera_tiny",
        embedding_id=embedding_id,
    )


def test_embeddings_cache_is_lru() -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache(size_limit=2)
    for key in ("a", "b"):
        cache.save_embeddings(key, _embedding(key))
    assert cache.retrieve_embeddings("a") is not None
    cache.save_embeddings("c", _embedding("c"))
    assert cache.retrieve_embeddings("b") is None
    assert "a" in cache and "c" in cache and len(cache) == 2
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)


def test_embeddings_cache_stores_a_cpu_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[str] = []
    original_to = ImageEmbedding.to

    def spy_to(self: ImageEmbedding, device: torch.device | str, dtype=None) -> ImageEmbedding:
        requested.append(str(device))
        return original_to(self, device, dtype)

    monkeypatch.setattr(ImageEmbedding, "to", spy_to)
    cache = Sam2ImageEmbeddingsInMemoryCache(send_to_cpu=True)
    cache.save_embeddings("a", _embedding("a"))
    assert requested == ["cpu"]
    stored = cache.retrieve_embeddings("a")
    assert stored is not None and stored.image_embed.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in stored.high_res_feats)


def test_embeddings_cache_moves_to_the_requested_device() -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache(send_to_cpu=True)
    original = _embedding("a")
    cache.save_embeddings("a", original)
    moved = cache.retrieve_embeddings("a", device="meta")  # a non-CPU device without a GPU
    assert moved is not None and moved.image_embed.device.type == "meta"
    assert all(t.device.type == "meta" for t in moved.high_res_feats)
    assert moved.embedding_id == "a" and moved.original_hw == (30, 40)
    again = cache.retrieve_embeddings("a")
    assert again is not None and again.image_embed.device.type == "cpu"
    torch.testing.assert_close(again.image_embed, original.image_embed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embeddings_cache_gpu_round_trip() -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache(send_to_cpu=True)
    on_gpu = _embedding("a", device="cuda")
    cache.save_embeddings("a", on_gpu)
    stored = cache.retrieve_embeddings("a")
    assert stored is not None and stored.image_embed.device.type == "cpu"
    back = cache.retrieve_embeddings("a", device="cuda")
    assert back is not None and back.high_res_feats[1].device.type == "cuda"
    torch.testing.assert_close(back.image_embed, on_gpu.image_embed)


def test_embeddings_cache_without_send_to_cpu_keeps_the_device() -> None:
    cache = Sam2ImageEmbeddingsInMemoryCache(send_to_cpu=False)
    cache.save_embeddings("a", _embedding("a").to("meta"))
    stored = cache.retrieve_embeddings("a")
    assert stored is not None and stored.image_embed.device.type == "meta"


def test_embeddings_cache_byte_bound() -> None:
    one = _embedding("x").nbytes
    cache = Sam2ImageEmbeddingsInMemoryCache(size_limit=100, max_bytes=2 * one)
    for key in "abc":
        cache.save_embeddings(key, _embedding(key))
    assert len(cache) == 2 and cache.nbytes == 2 * one and "a" not in cache


# ----- low-res masks cache ----------------------------------------------------------------


def _prompt(points: list[tuple[float, float, int]], box: list[float] | None = None) -> Prompt:
    return Prompt(
        point_coords=np.array([[x, y] for x, y, _ in points], np.float32) if points else None,
        point_labels=np.array([label for *_, label in points]) if points else None,
        box=None if box is None else np.array(box, np.float32),
    )


def _logits(value: float) -> np.ndarray:
    return np.full((256, 256), value, np.float32)


P1, P2, P3 = (10.0, 20.0, 1), (30.5, 40.25, 0), (50.0, 60.0, 1)


def test_refinement_finds_a_strict_prefix() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    cache.save_mask("img", _prompt([P1]), _logits(1.0))
    found = cache.find_refinement("img", _prompt([P1, P2]))
    assert found is not None and found.shape == (256, 256) and found.dtype == np.float32
    assert float(found[0, 0]) == 1.0
    assert (cache.hits, cache.misses) == (1, 0)


def test_refinement_prefers_the_longest_prefix() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    cache.save_mask("img", _prompt([P1, P2]), _logits(2.0))
    cache.save_mask("img", _prompt([P1]), _logits(1.0))
    found = cache.find_refinement("img", _prompt([P1, P2, P3]))
    assert found is not None and float(found[0, 0]) == 2.0


@pytest.mark.parametrize(
    ("cached", "new"),
    [
        (_prompt([P1]), _prompt([P1])),  # same prompt: not a strict prefix
        (_prompt([P1, P2]), _prompt([P1])),  # cached is longer
        (_prompt([P2]), _prompt([P1, P2])),  # not a prefix (order matters)
        (_prompt([P1]), _prompt([(10.0, 20.001, 1), P2])),  # coordinates must be exact
        (_prompt([P1]), _prompt([(10.0, 20.0, 0), P2])),  # labels must match
        (_prompt([P1], box=[0, 0, 5, 5]), _prompt([P1, P2], box=[0, 0, 5, 6])),  # other box
        (_prompt([P1], box=[0, 0, 5, 5]), _prompt([P1, P2])),  # box vs none
        (_prompt([P1]), _prompt([P1, P2], box=[0, 0, 5, 5])),  # none vs box
    ],
)
def test_refinement_misses(cached: Prompt, new: Prompt) -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    cache.save_mask("img", cached, _logits(1.0))
    assert cache.find_refinement("img", new) is None
    assert cache.misses == 1


def test_refinement_with_same_box_and_multimask_flag_ignored() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    box = [1.0, 2.0, 50.0, 60.0]
    cached = _prompt([], box=box)
    cached.multimask_output = True
    cache.save_mask("img", cached, _logits(3.0))
    new = _prompt([P1], box=box)
    new.multimask_output = False
    found = cache.find_refinement("img", new)
    assert found is not None and float(found[0, 0]) == 3.0


def test_refinement_is_per_image_and_compares_in_float32() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    cache.save_mask("img", _prompt([(0.1, 0.2, 1)]), _logits(1.0))
    assert cache.find_refinement("other", _prompt([(0.1, 0.2, 1), P2])) is None
    float64_prompt = Prompt(
        point_coords=np.array([[0.1, 0.2], [1.0, 1.0]], np.float64), point_labels=np.array([1, 1])
    )
    assert cache.find_refinement("img", float64_prompt) is not None
    assert PromptSignature.of(float64_prompt).points[0] == (
        float(np.float32(0.1)), float(np.float32(0.2)), 1
    )


def test_empty_prompt_is_not_saved_and_resaving_replaces() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    cache.save_mask("img", Prompt(mask_input=_logits(0.0)), _logits(9.0))
    assert len(cache) == 0
    cache.save_mask("img", _prompt([P1]), _logits(1.0))
    cache.save_mask("img", _prompt([P1]), _logits(5.0))
    assert len(cache) == 1
    found = cache.find_refinement("img", _prompt([P1, P2]))
    assert found is not None and float(found[0, 0]) == 5.0


def test_returned_and_saved_arrays_are_copies() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    logits = _logits(1.0)
    cache.save_mask("img", _prompt([P1]), logits)
    logits[...] = 7.0
    found = cache.find_refinement("img", _prompt([P1, P2]))
    assert found is not None and float(found[0, 0]) == 1.0
    found[...] = 8.0
    again = cache.find_refinement("img", _prompt([P1, P2]))
    assert again is not None and float(again[0, 0]) == 1.0


def test_masks_cache_counts_prompts_and_evicts_lru_image() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache(size_limit=4)
    cache.save_mask("a", _prompt([P1]), _logits(1.0))
    cache.save_mask("a", _prompt([P1, P2]), _logits(1.0))
    cache.save_mask("b", _prompt([P1]), _logits(2.0))
    cache.save_mask("c", _prompt([P1]), _logits(3.0))
    assert len(cache) == 4
    assert cache.find_refinement("a", _prompt([P1, P2, P3])) is not None  # refreshes "a"
    cache.save_mask("d", _prompt([P1]), _logits(4.0))
    assert "b" not in cache and "a" in cache and "c" in cache and "d" in cache
    assert len(cache) == 4 and cache.evictions == 1


def test_single_image_over_the_limit_drops_its_oldest_prompts() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache(size_limit=2)
    cache.save_mask("a", _prompt([P1]), _logits(1.0))
    cache.save_mask("a", _prompt([P1, P2]), _logits(2.0))
    cache.save_mask("a", _prompt([P3]), _logits(3.0))
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.find_refinement("a", _prompt([P1, P3])) is None  # [P1] was the oldest
    found = cache.find_refinement("a", _prompt([P1, P2, P3]))
    assert found is not None and float(found[0, 0]) == 2.0


def test_masks_cache_send_to_cpu_and_tensor_lookup() -> None:
    on_cpu = Sam2LowResolutionMasksInMemoryCache(send_to_cpu=True)
    on_cpu.save_mask("a", _prompt([P1]), torch.ones(1, 256, 256, dtype=torch.bfloat16))
    tensor = on_cpu.find_refinement_tensor("a", _prompt([P1, P2]))
    assert tensor is not None and tensor.device.type == "cpu"
    assert tensor.dtype == torch.float32 and tensor.shape == (256, 256)
    moved = on_cpu.find_refinement_tensor("a", _prompt([P1, P2]), device="meta")
    assert moved is not None and moved.device.type == "meta"

    on_device = Sam2LowResolutionMasksInMemoryCache(send_to_cpu=False)
    on_device.save_mask("a", _prompt([P1]), torch.ones(256, 256, device="meta"))
    kept = on_device.find_refinement_tensor("a", _prompt([P1, P2]))
    assert kept is not None and kept.device.type == "meta"


def test_masks_cache_rejects_wrong_logits_shape() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache()
    with pytest.raises(ValueError, match=r"\[256, 256\]"):
        cache.save_mask("a", _prompt([P1]), np.zeros((3, 256, 256), np.float32))


def test_masks_cache_thread_safety() -> None:
    cache = Sam2LowResolutionMasksInMemoryCache(size_limit=30)
    errors: list[str] = []
    points = [(float(i), float(i), 1) for i in range(6)]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            image = f"img{rng.randrange(8)}"
            length = rng.randrange(1, 6)
            cache.save_mask(image, _prompt(points[:length]), _logits(float(length)))
            found = cache.find_refinement(image, _prompt(points[: length + 1]))
            if found is not None and not 1.0 <= float(found[0, 0]) <= length:
                errors.append("refinement from a prompt that is not a prefix")
            if len(cache) > 30:
                errors.append("limit exceeded")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert 0 < len(cache) <= 30
    assert cache.hits + cache.misses == 6 * 300
