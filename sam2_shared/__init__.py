"""sam2-serving shared code: the SAM 2 network, the in-process API, stores, client.

The in-process API is imported lazily (PEP 562), so that ``import sam2_shared.client`` or
``sam2_shared.prompts`` does not load torch and the network.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sam2_shared.embedding import ImageEmbedding
    from sam2_shared.inference.caches import (
        Sam2ImageEmbeddingsInMemoryCache,
        Sam2LowResolutionMasksInMemoryCache,
    )
    from sam2_shared.inference.sam2_model import Sam2Model
    from sam2_shared.prompts import Prompt, Sam2BatchedPrediction, Sam2Prediction

_EXPORTS = {
    "ImageEmbedding": "sam2_shared.embedding",
    "Prompt": "sam2_shared.prompts",
    "Sam2BatchedPrediction": "sam2_shared.prompts",
    "Sam2ImageEmbeddingsInMemoryCache": "sam2_shared.inference.caches",
    "Sam2LowResolutionMasksInMemoryCache": "sam2_shared.inference.caches",
    "Sam2Model": "sam2_shared.inference.sam2_model",
    "Sam2Prediction": "sam2_shared.prompts",
}
__all__ = [
    "ImageEmbedding",
    "Prompt",
    "Sam2BatchedPrediction",
    "Sam2ImageEmbeddingsInMemoryCache",
    "Sam2LowResolutionMasksInMemoryCache",
    "Sam2Model",
    "Sam2Prediction",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sam2_shared' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
