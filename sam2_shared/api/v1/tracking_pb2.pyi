from google.api import field_behavior_pb2 as _field_behavior_pb2
from sam2_shared.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartSessionRequest(_message.Message):
    __slots__ = ("model_id", "frame_embedding_ids", "video")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_EMBEDDING_IDS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    frame_embedding_ids: _containers.RepeatedScalarFieldContainer[str]
    video: bytes
    def __init__(self, model_id: _Optional[str] = ..., frame_embedding_ids: _Optional[_Iterable[str]] = ..., video: _Optional[bytes] = ...) -> None: ...

class StartSessionResponse(_message.Message):
    __slots__ = ("session_id", "frame_count", "height_px", "width_px", "frame_embedding_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    FRAME_EMBEDDING_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame_count: int
    height_px: int
    width_px: int
    frame_embedding_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., frame_count: _Optional[int] = ..., height_px: _Optional[int] = ..., width_px: _Optional[int] = ..., frame_embedding_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StartSessionFromFramesRequest(_message.Message):
    __slots__ = ("model_id", "frame")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    frame: _common_pb2.Image
    def __init__(self, model_id: _Optional[str] = ..., frame: _Optional[_Union[_common_pb2.Image, _Mapping]] = ...) -> None: ...

class StartSessionFromFramesResponse(_message.Message):
    __slots__ = ("session_id", "frame_count", "height_px", "width_px", "frame_embedding_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    FRAME_EMBEDDING_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame_count: int
    height_px: int
    width_px: int
    frame_embedding_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., frame_count: _Optional[int] = ..., height_px: _Optional[int] = ..., width_px: _Optional[int] = ..., frame_embedding_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AddPromptRequest(_message.Message):
    __slots__ = ("session_id", "frame_index", "object_id", "points", "box", "keep_old_points", "mask", "mask_format")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    KEEP_OLD_POINTS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame_index: int
    object_id: int
    points: _containers.RepeatedCompositeFieldContainer[_common_pb2.Point]
    box: _common_pb2.Box
    keep_old_points: bool
    mask: _common_pb2.EncodedMask
    mask_format: _common_pb2.MaskFormat
    def __init__(self, session_id: _Optional[str] = ..., frame_index: _Optional[int] = ..., object_id: _Optional[int] = ..., points: _Optional[_Iterable[_Union[_common_pb2.Point, _Mapping]]] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., keep_old_points: _Optional[bool] = ..., mask: _Optional[_Union[_common_pb2.EncodedMask, _Mapping]] = ..., mask_format: _Optional[_Union[_common_pb2.MaskFormat, str]] = ...) -> None: ...

class AddPromptResponse(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: FrameMasks
    def __init__(self, frame: _Optional[_Union[FrameMasks, _Mapping]] = ...) -> None: ...

class FrameMasks(_message.Message):
    __slots__ = ("frame_index", "objects")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    objects: _containers.RepeatedCompositeFieldContainer[ObjectMask]
    def __init__(self, frame_index: _Optional[int] = ..., objects: _Optional[_Iterable[_Union[ObjectMask, _Mapping]]] = ...) -> None: ...

class ObjectMask(_message.Message):
    __slots__ = ("object_id", "mask", "object_score_logit")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    OBJECT_SCORE_LOGIT_FIELD_NUMBER: _ClassVar[int]
    object_id: int
    mask: _common_pb2.EncodedMask
    object_score_logit: float
    def __init__(self, object_id: _Optional[int] = ..., mask: _Optional[_Union[_common_pb2.EncodedMask, _Mapping]] = ..., object_score_logit: _Optional[float] = ...) -> None: ...

class PropagateRequest(_message.Message):
    __slots__ = ("session_id", "start_frame_index", "reverse", "max_frames", "mask_format")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    REVERSE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_frame_index: int
    reverse: bool
    max_frames: int
    mask_format: _common_pb2.MaskFormat
    def __init__(self, session_id: _Optional[str] = ..., start_frame_index: _Optional[int] = ..., reverse: _Optional[bool] = ..., max_frames: _Optional[int] = ..., mask_format: _Optional[_Union[_common_pb2.MaskFormat, str]] = ...) -> None: ...

class PropagateResponse(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: FrameMasks
    def __init__(self, frame: _Optional[_Union[FrameMasks, _Mapping]] = ...) -> None: ...

class RemoveObjectRequest(_message.Message):
    __slots__ = ("session_id", "object_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    object_id: int
    def __init__(self, session_id: _Optional[str] = ..., object_id: _Optional[int] = ...) -> None: ...

class RemoveObjectResponse(_message.Message):
    __slots__ = ("remaining_object_ids",)
    REMAINING_OBJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    remaining_object_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, remaining_object_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResetSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
