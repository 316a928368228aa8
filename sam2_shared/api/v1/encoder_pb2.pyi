from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.rpc import status_pb2 as _status_pb2
from sam2_shared.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedImagesRequest(_message.Message):
    __slots__ = ("model_id", "images", "video_frame")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FRAME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    video_frame: bool
    def __init__(self, model_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., video_frame: _Optional[bool] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedImageResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedImageResult, _Mapping]]] = ...) -> None: ...

class EmbedImageResult(_message.Message):
    __slots__ = ("status", "embedding", "already_stored")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    embedding: _common_pb2.Embedding
    already_stored: bool
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., already_stored: _Optional[bool] = ...) -> None: ...

class GetEmbeddingRequest(_message.Message):
    __slots__ = ("embedding_id", "chunk_size_bytes")
    EMBEDDING_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    embedding_id: str
    chunk_size_bytes: int
    def __init__(self, embedding_id: _Optional[str] = ..., chunk_size_bytes: _Optional[int] = ...) -> None: ...

class GetEmbeddingResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EmbeddingBlobHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[EmbeddingBlobHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutEmbeddingRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EmbeddingBlobHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[EmbeddingBlobHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutEmbeddingResponse(_message.Message):
    __slots__ = ("embedding", "already_stored")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Embedding
    already_stored: bool
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., already_stored: _Optional[bool] = ...) -> None: ...

class EmbeddingBlobHeader(_message.Message):
    __slots__ = ("embedding", "size_bytes", "sha256", "format")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Embedding
    size_bytes: int
    sha256: str
    format: str
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...
