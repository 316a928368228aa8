"""The one builder of the network's parts: every caller (the in-process models, checkpoint
checks, tests) makes its modules here.

Parts: ``"encoder"`` (``Sam2EncoderPart``), ``"decoder"`` (``Sam2DecoderPart``),
``"tracker"`` (``Sam2TrackerPart``, the video-only weights).
"""

from __future__ import annotations

from torch import nn

from sam2_shared.model.config import Sam2Config
from sam2_shared.model.parts import Sam2DecoderPart, Sam2EncoderPart
from sam2_shared.model.tracker import Sam2TrackerPart

PARTS = ("encoder", "decoder", "tracker")


def build_part(config: Sam2Config, part: str) -> nn.Module:
    """A freshly initialised part (in eval mode) of the model ``config`` describes."""
    if part == "encoder":
        return Sam2EncoderPart(config).eval()
    if part == "decoder":
        return Sam2DecoderPart(config).eval()
    if part == "tracker":
        return Sam2TrackerPart(config).eval()
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def build_encoder(config: Sam2Config) -> Sam2EncoderPart:
    return build_part(config, "encoder")  # type: ignore[return-value]


def build_decoder(config: Sam2Config) -> Sam2DecoderPart:
    return build_part(config, "decoder")  # type: ignore[return-value]


def build_tracker(config: Sam2Config) -> Sam2TrackerPart:
    """Video-only weights (memory attention/encoder, object pointers); see ``model.tracker``."""
    return build_part(config, "tracker")  # type: ignore[return-value]
