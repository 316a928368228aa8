from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.rpc import status_pb2 as _status_pb2
from sam2_shared.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SegmentRequest(_message.Message):
    __slots__ = ("embedding_id", "image", "model_id", "prompts", "mask_format", "include_logits", "omit_logits_handles")
    EMBEDDING_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    OMIT_LOGITS_HANDLES_FIELD_NUMBER: _ClassVar[int]
    embedding_id: str
    image: _common_pb2.Image
    model_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    mask_format: _common_pb2.MaskFormat
    include_logits: bool
    omit_logits_handles: bool
    def __init__(self, embedding_id: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., model_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., mask_format: _Optional[_Union[_common_pb2.MaskFormat, str]] = ..., include_logits: _Optional[bool] = ..., omit_logits_handles: _Optional[bool] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("embedding", "results")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Embedding
    results: _containers.RepeatedCompositeFieldContainer[PromptResult]
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., results: _Optional[_Iterable[_Union[PromptResult, _Mapping]]] = ...) -> None: ...

class SegmentStreamRequest(_message.Message):
    __slots__ = ("request_id", "segment")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    segment: SegmentRequest
    def __init__(self, request_id: _Optional[str] = ..., segment: _Optional[_Union[SegmentRequest, _Mapping]] = ...) -> None: ...

class SegmentStreamResponse(_message.Message):
    __slots__ = ("request_id", "segment", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    segment: SegmentResponse
    error: _status_pb2.Status
    def __init__(self, request_id: _Optional[str] = ..., segment: _Optional[_Union[SegmentResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("points", "box", "logits_handle", "mask_logits", "multimask_output")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LOGITS_HANDLE_FIELD_NUMBER: _ClassVar[int]
    MASK_LOGITS_FIELD_NUMBER: _ClassVar[int]
    MULTIMASK_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[_common_pb2.Point]
    box: _common_pb2.Box
    logits_handle: str
    mask_logits: bytes
    multimask_output: bool
    def __init__(self, points: _Optional[_Iterable[_Union[_common_pb2.Point, _Mapping]]] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., logits_handle: _Optional[str] = ..., mask_logits: _Optional[bytes] = ..., multimask_output: _Optional[bool] = ...) -> None: ...

class PromptResult(_message.Message):
    __slots__ = ("candidates", "best_index", "object_score_logit")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    OBJECT_SCORE_LOGIT_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[MaskCandidate]
    best_index: int
    object_score_logit: float
    def __init__(self, candidates: _Optional[_Iterable[_Union[MaskCandidate, _Mapping]]] = ..., best_index: _Optional[int] = ..., object_score_logit: _Optional[float] = ...) -> None: ...

class MaskCandidate(_message.Message):
    __slots__ = ("mask", "score", "logits_handle", "logits")
    MASK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_HANDLE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    mask: _common_pb2.EncodedMask
    score: float
    logits_handle: str
    logits: bytes
    def __init__(self, mask: _Optional[_Union[_common_pb2.EncodedMask, _Mapping]] = ..., score: _Optional[float] = ..., logits_handle: _Optional[str] = ..., logits: _Optional[bytes] = ...) -> None: ...
