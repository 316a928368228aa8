"""sam2-serving shared code: the SAM 2 network, the in-process API, stores, client."""

from sam2_shared.caches import Sam2ImageEmbeddingsInMemoryCache, Sam2LowResolutionMasksInMemoryCache
from sam2_shared.embedding import ImageEmbedding
from sam2_shared.predictor import Sam2Model
from sam2_shared.prompts import Prompt, Sam2Prediction

__all__ = [
    "ImageEmbedding",
    "Prompt",
    "Sam2ImageEmbeddingsInMemoryCache",
    "Sam2LowResolutionMasksInMemoryCache",
    "Sam2Model",
    "Sam2Prediction",
]
