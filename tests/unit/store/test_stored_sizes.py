"""An embedding's size is data read from the store: one claiming more pixels than the tier
accepts is a counted corrupt miss (never allocated as masks), and an upload claiming it is
refused."""

from __future__ import annotations

import pytest
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import CorruptEntryError
from sam2_shared.store import codec, open_store

MODEL_ID = "sam2.1/hiera_tiny"


def embedding(hw: tuple[int, int], embedding_id: str = "cd" * 32) -> ImageEmbedding:
    tensors = [torch.zeros(shape) for _, shape in codec.EMBEDDING_SHAPES]
    return ImageEmbedding(tensors[0], (tensors[1], tensors[2]), hw, MODEL_ID, embedding_id)


def test_an_entry_claiming_a_huge_image_is_a_corrupt_miss() -> None:
    store = open_store("memory://", max_image_pixels=1_000_000)
    store.put_embedding(embedding((100_000, 100_000)))
    assert store.get_embedding("cd" * 32, MODEL_ID) is None
    assert store.stats.corrupt == 1
    store.put_embedding(embedding((1000, 1000), "ef" * 32))
    assert store.get_embedding("ef" * 32, MODEL_ID) is not None  # at the limit: fine


def test_an_upload_claiming_a_huge_image_is_refused() -> None:
    store = open_store("memory://", max_image_pixels=1_000_000)
    data = codec.encode_embedding(embedding((50_000, 50_000)), "float16")
    with pytest.raises(CorruptEntryError, match="50000x50000 image, over the limit"):
        store.import_embedding(data, expected_model_id=MODEL_ID)
