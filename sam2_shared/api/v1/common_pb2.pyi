from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColorFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLOR_FORMAT_UNSPECIFIED: _ClassVar[ColorFormat]
    COLOR_FORMAT_GRAY: _ClassVar[ColorFormat]
    COLOR_FORMAT_RGB: _ClassVar[ColorFormat]
    COLOR_FORMAT_BGR: _ClassVar[ColorFormat]
    COLOR_FORMAT_RGBA: _ClassVar[ColorFormat]
    COLOR_FORMAT_BGRA: _ClassVar[ColorFormat]

class PointLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POINT_LABEL_UNSPECIFIED: _ClassVar[PointLabel]
    POINT_LABEL_FOREGROUND: _ClassVar[PointLabel]
    POINT_LABEL_BACKGROUND: _ClassVar[PointLabel]

class MaskFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_FORMAT_UNSPECIFIED: _ClassVar[MaskFormat]
    MASK_FORMAT_COCO_RLE: _ClassVar[MaskFormat]
    MASK_FORMAT_PNG: _ClassVar[MaskFormat]
    MASK_FORMAT_RAW_BITS: _ClassVar[MaskFormat]
COLOR_FORMAT_UNSPECIFIED: ColorFormat
COLOR_FORMAT_GRAY: ColorFormat
COLOR_FORMAT_RGB: ColorFormat
COLOR_FORMAT_BGR: ColorFormat
COLOR_FORMAT_RGBA: ColorFormat
COLOR_FORMAT_BGRA: ColorFormat
POINT_LABEL_UNSPECIFIED: PointLabel
POINT_LABEL_FOREGROUND: PointLabel
POINT_LABEL_BACKGROUND: PointLabel
MASK_FORMAT_UNSPECIFIED: MaskFormat
MASK_FORMAT_COCO_RLE: MaskFormat
MASK_FORMAT_PNG: MaskFormat
MASK_FORMAT_RAW_BITS: MaskFormat

class Image(_message.Message):
    __slots__ = ("encoded_bytes", "raw")
    ENCODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded_bytes: bytes
    raw: RawImage
    def __init__(self, encoded_bytes: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("pixels", "height_px", "width_px", "channel_count", "color_format")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    COLOR_FORMAT_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height_px: int
    width_px: int
    channel_count: int
    color_format: ColorFormat
    def __init__(self, pixels: _Optional[bytes] = ..., height_px: _Optional[int] = ..., width_px: _Optional[int] = ..., channel_count: _Optional[int] = ..., color_format: _Optional[_Union[ColorFormat, str]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x_px", "y_px", "label")
    X_PX_FIELD_NUMBER: _ClassVar[int]
    Y_PX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    x_px: float
    y_px: float
    label: PointLabel
    def __init__(self, x_px: _Optional[float] = ..., y_px: _Optional[float] = ..., label: _Optional[_Union[PointLabel, str]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x_min_px", "y_min_px", "x_max_px", "y_max_px")
    X_MIN_PX_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_PX_FIELD_NUMBER: _ClassVar[int]
    X_MAX_PX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_PX_FIELD_NUMBER: _ClassVar[int]
    x_min_px: float
    y_min_px: float
    x_max_px: float
    y_max_px: float
    def __init__(self, x_min_px: _Optional[float] = ..., y_min_px: _Optional[float] = ..., x_max_px: _Optional[float] = ..., y_max_px: _Optional[float] = ...) -> None: ...

class EncodedMask(_message.Message):
    __slots__ = ("height_px", "width_px", "coco_rle_counts", "png_data", "packed_bits", "area_px", "bbox")
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    COCO_RLE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PNG_DATA_FIELD_NUMBER: _ClassVar[int]
    PACKED_BITS_FIELD_NUMBER: _ClassVar[int]
    AREA_PX_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    height_px: int
    width_px: int
    coco_rle_counts: str
    png_data: bytes
    packed_bits: bytes
    area_px: int
    bbox: Box
    def __init__(self, height_px: _Optional[int] = ..., width_px: _Optional[int] = ..., coco_rle_counts: _Optional[str] = ..., png_data: _Optional[bytes] = ..., packed_bits: _Optional[bytes] = ..., area_px: _Optional[int] = ..., bbox: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("embedding_id", "model_id", "height_px", "width_px")
    EMBEDDING_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    embedding_id: str
    model_id: str
    height_px: int
    width_px: int
    def __init__(self, embedding_id: _Optional[str] = ..., model_id: _Optional[str] = ..., height_px: _Optional[int] = ..., width_px: _Optional[int] = ...) -> None: ...
