"""The SAM 2 network in plain PyTorch, one module per part.

Shape letters used in docstrings:
    B  batch (images for the encoder, prompts for the decoder)
    C  channels
    H, W  spatial size of a feature map (image frame: 1024 x 1024)
    N  number of sparse prompt tokens
    M  number of mask outputs (4 from the decoder, 3 or 1 returned)

Module attribute names follow Meta's state-dict keys so official checkpoints load
strictly (see ``sam2_shared.inference.checkpoints``). Nothing here knows about files, numpy,
stores or gRPC; device and dtype are decided by the caller.

The builders are imported lazily (PEP 562) so that ``sam2_shared.model.config`` (model ids,
no torch) can be used by the client without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sam2_shared.model.config import MODEL_CONFIGS, Sam2Config, get_config

if TYPE_CHECKING:
    from sam2_shared.model.build import build_decoder, build_encoder, build_part
    from sam2_shared.model.parts import Sam2DecoderPart, Sam2EncoderPart

_LAZY = {
    "Sam2DecoderPart": "sam2_shared.model.parts",
    "Sam2EncoderPart": "sam2_shared.model.parts",
    "build_decoder": "sam2_shared.model.build",
    "build_encoder": "sam2_shared.model.build",
    "build_part": "sam2_shared.model.build",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sam2_shared.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

__all__ = [
    "MODEL_CONFIGS",
    "Sam2Config",
    "Sam2DecoderPart",
    "Sam2EncoderPart",
    "build_decoder",
    "build_encoder",
    "build_part",
    "get_config",
]
