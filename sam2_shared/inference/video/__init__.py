"""Video object tracking with bounded, serialisable state (Meta's ``SAM2VideoPredictor``
semantics; see ``session``).

- ``frames``: frame features on demand, one frame's result, video-frame embedding;
- ``model``: ``Sam2VideoModel``, the parts tracking needs, loaded once;
- ``state``: one object's bounded memory;
- ``session``: ``VideoSession``, the prompt / propagate state machine.
"""

from sam2_shared.inference.video.frames import (
    VIDEO_PREPROCESS_VERSION,
    FrameResult,
    FrameSource,
    encode_video_frames,
)
from sam2_shared.inference.video.model import TRACKING_DTYPES, Sam2VideoModel
from sam2_shared.inference.video.session import VideoSession

__all__ = [
    "VIDEO_PREPROCESS_VERSION",
    "FrameResult",
    "FrameSource",
    "Sam2VideoModel",
    "TRACKING_DTYPES",
    "VideoSession",
    "encode_video_frames",
]
