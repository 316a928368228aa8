"""The one self-describing, checksummed byte format of the shared store: embeddings,
low-res logits and video tracking sessions.

This is what the shared store holds and also the wire format of ``GetEmbedding`` /
``PutEmbedding`` (export/import), so it is documented here in full.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic            b"SAM2BLOB"
    8       2     format_version   uint16, currently 1
    10      2     reserved         uint16, 0
    12      4     metadata_nbytes  uint32, length M of the JSON block
    16      4     metadata_crc32   uint32, zlib.crc32 of the JSON block
    20      M     metadata         UTF-8 JSON object (below)
    20+M    P     payload          raw tensors, back to back, C order, little-endian

Metadata keys:

- ``format_version``: same as the header's.
- ``kind``: ``"embedding"``, ``"logits"`` or ``"video_session"``.
- ``dtype``: storage dtype of the tensors: ``"float32"``, ``"float16"`` or ``"bfloat16"``
  (bfloat16 is the upper half of an IEEE float32, stored as its 2 raw bytes).
- ``tensors``: list of ``{"name", "shape", "offset", "nbytes"}``, offsets relative to the
  payload start; an entry may carry its own ``"dtype"`` (also ``"int32"``), which then
  overrides the entry's (sessions mix float32, bfloat16 and int32 tensors). An embedding
  has exactly ``image_embed`` [1, 256, 64, 64], ``high_res_feats_0`` [1, 32, 256, 256] and
  ``high_res_feats_1`` [1, 64, 128, 128], in that order; logits have one tensor ``logits``
  [C, 256, 256], always float32.
- ``payload_nbytes`` and ``payload_sha256`` (hex) of the whole payload.
- embeddings only: ``embedding_id``, ``model_id``, ``original_hw`` ([H, W] pixels).
- sessions only: ``session`` (the ``VideoSession.to_state`` metadata: model id, frame count,
  video size, objects naming their tensors) and ``tracking`` (the tier's: frame embedding
  ids, revision). Their tensors have any shape; names are ``t0``, ``t1``, ...

The JSON block is covered by the CRC32 in the header and the payload by its SHA-256, so a
flipped byte anywhere is caught. Decoding checks all of the above and raises
``CorruptEntryError`` on any mismatch; it never returns partially checked data.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import CorruptEntryError, InvalidInputError

StorageDtype = Literal["float32", "float16", "bfloat16"]

MAGIC = b"SAM2BLOB"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHII")
# A JSON block bigger than this is not ours: refuse before parsing it.
MAX_METADATA_NBYTES = 64 * 1024
# Sessions list every memory entry of every object (~2 KiB per object and frame window).
MAX_SESSION_METADATA_NBYTES = 8 * 1024 * 1024
MAX_SESSION_TENSORS = 100_000

STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
# Numpy view of each storage dtype's bytes; bfloat16 travels as raw int16.
_NUMPY_DTYPE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2"),
                "int32": np.dtype("<i4")}
_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int32": torch.int32}
_DTYPE_NAME = {dtype: name for name, dtype in _TORCH_DTYPE.items()}

EMBEDDING_SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("image_embed", (1, 256, 64, 64)),
    ("high_res_feats_0", (1, 32, 256, 256)),
    ("high_res_feats_1", (1, 64, 128, 128)),
)
LOGITS_HW = (256, 256)
# The largest entry an embedding can be: float32 tensors, the header and the metadata limit.
MAX_EMBEDDING_ENTRY_NBYTES = (
    HEADER.size + MAX_METADATA_NBYTES
    + sum(int(np.prod(shape)) for _, shape in EMBEDDING_SHAPES) * 4
)


def _tensor_bytes(tensor: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """CPU, contiguous, little-endian numpy view of ``tensor`` cast to the storage dtype."""
    cast = tensor.detach().to(device="cpu", dtype=_TORCH_DTYPE[storage_dtype]).contiguous()
    if storage_dtype == "bfloat16":
        cast = cast.view(torch.int16)  # numpy has no bfloat16; keep the raw bits
    # reshape: ascontiguousarray makes 0-d arrays 1-d
    return np.ascontiguousarray(cast.numpy(), dtype=_NUMPY_DTYPE[storage_dtype]).reshape(
        tuple(cast.shape))


def _pack(kind: str, storage_dtype: str, named: Sequence[tuple[str, np.ndarray]],
          extra: dict[str, Any], dtypes: Sequence[str] | None = None) -> bytes:
    digest = hashlib.sha256()
    tensors = []
    offset = 0
    for index, (name, array) in enumerate(named):
        digest.update(memoryview(array).cast("B"))
        entry = {"name": name, "shape": list(array.shape), "offset": offset,
                 "nbytes": array.nbytes}
        if dtypes is not None:
            entry["dtype"] = dtypes[index]
        tensors.append(entry)
        offset += array.nbytes
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "dtype": storage_dtype,
        "tensors": tensors,
        "payload_nbytes": offset,
        "payload_sha256": digest.hexdigest(),
        **extra,
    }
    meta_bytes = json.dumps(metadata, separators=(",", ":"), sort_keys=True).encode()
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(meta_bytes), zlib.crc32(meta_bytes))
    return b"".join([header, meta_bytes, *(memoryview(a).cast("B") for _, a in named)])


def encode_embedding(embedding: ImageEmbedding, storage_dtype: StorageDtype = "float16") -> bytes:
    """Serialise ``embedding`` with its tensors cast to ``storage_dtype``."""
    if storage_dtype not in STORAGE_DTYPES:
        raise InvalidInputError(
            f"storage dtype {storage_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}"
        )
    tensors = (embedding.image_embed, *embedding.high_res_feats)
    if len(tensors) != len(EMBEDDING_SHAPES):
        raise InvalidInputError(f"expected 2 high-res feature maps, got {len(tensors) - 1}")
    named = []
    for (name, shape), tensor in zip(EMBEDDING_SHAPES, tensors, strict=True):
        if tuple(tensor.shape) != shape:
            raise InvalidInputError(
                f"{name} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        named.append((name, _tensor_bytes(tensor, storage_dtype)))
    height, width = (int(v) for v in embedding.original_hw)
    extra = {
        "embedding_id": embedding.embedding_id,
        "model_id": embedding.model_id,
        "original_hw": [height, width],
    }
    return _pack("embedding", storage_dtype, named, extra)


def encode_logits(logits: np.ndarray) -> bytes:
    """Serialise low-res mask logits [C, 256, 256] as float32 (exact)."""
    array = np.asarray(logits)
    if array.ndim != 3 or array.shape[1:] != LOGITS_HW or array.shape[0] < 1:
        raise InvalidInputError(f"logits must be [C, 256, 256], got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"logits must be floating point, got {array.dtype}")
    return _pack("logits", "float32", [("logits", np.ascontiguousarray(array, "<f4"))], {})


def read_metadata(data: bytes | bytearray | memoryview,
                  max_metadata_nbytes: int = MAX_METADATA_NBYTES) -> dict[str, Any]:
    """Check the header and metadata block of ``data`` and return the metadata.

    The payload is not checked here (see ``decode_embedding`` / ``decode_logits``).
    """
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise CorruptEntryError(f"entry is {len(view)} bytes, shorter than its header")
    magic, version, _reserved, meta_nbytes, meta_crc = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntryError("entry does not start with the SAM2BLOB magic")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(
            f"entry has format version {version}; this build reads version {FORMAT_VERSION}"
        )
    if meta_nbytes > max_metadata_nbytes or HEADER.size + meta_nbytes > len(view):
        raise CorruptEntryError(f"metadata length {meta_nbytes} does not fit the entry")
    meta_bytes = view[HEADER.size : HEADER.size + meta_nbytes]
    if zlib.crc32(meta_bytes) != meta_crc:
        raise CorruptEntryError("metadata checksum mismatch")
    try:
        metadata = json.loads(bytes(meta_bytes))
    except (ValueError, RecursionError) as exc:  # JSON, Unicode errors; absurd nesting
        raise CorruptEntryError(f"metadata is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(metadata, dict) or metadata.get("format_version") != version:
        raise CorruptEntryError("metadata format version disagrees with the header")
    metadata["_payload_offset"] = HEADER.size + meta_nbytes
    return metadata


def _unpack(data: bytes | bytearray | memoryview, kind: str,
            expected: Sequence[tuple[str, tuple[int, ...] | None]],
            max_metadata_nbytes: int = MAX_METADATA_NBYTES) -> tuple[dict, list]:
    """Verify ``data`` fully; return (metadata, [(name, shape, numpy view)]).

    ``expected`` names the tensors in order, with their shapes (None: any shape).
    """
    metadata = read_metadata(data, max_metadata_nbytes)
    view = memoryview(data)
    if metadata.get("kind") != kind:
        raise CorruptEntryError(f"entry holds {metadata.get('kind')!r}, expected {kind!r}")
    storage_dtype = metadata.get("dtype")
    if storage_dtype not in STORAGE_DTYPES:
        raise CorruptEntryError(f"unknown storage dtype {storage_dtype!r}")
    payload = view[metadata["_payload_offset"] :]
    if len(payload) != metadata.get("payload_nbytes"):
        raise CorruptEntryError(
            f"payload is {len(payload)} bytes, metadata says {metadata.get('payload_nbytes')}"
        )
    if hashlib.sha256(payload).hexdigest() != metadata.get("payload_sha256"):
        raise CorruptEntryError("payload checksum mismatch")
    tensors = metadata.get("tensors")
    if not isinstance(tensors, list) or len(tensors) != len(expected):
        raise CorruptEntryError(f"entry lists {tensors!r}, expected {len(expected)} tensors")
    arrays = []
    offset = 0
    for entry, (name, shape) in zip(tensors, expected, strict=True):
        raw_shape = entry.get("shape") if isinstance(entry, dict) else None
        got_shape = tuple(raw_shape) if isinstance(raw_shape, list) else ()
        dtype = entry.get("dtype", storage_dtype) if isinstance(entry, dict) else None
        # A JSON list or object as dtype must not reach the dict lookup (unhashable).
        np_dtype = _NUMPY_DTYPE.get(dtype) if isinstance(dtype, str) else None
        ok = (
            np_dtype is not None
            and isinstance(entry, dict)
            and entry.get("name") == name
            and (got_shape == shape if shape is not None else True)
            and isinstance(raw_shape, list)
            and all(isinstance(d, int) and d > 0 for d in got_shape)
            and entry.get("offset") == offset
            and entry.get("nbytes") == math.prod(got_shape) * np_dtype.itemsize  # exact ints
        )
        if not ok:
            raise CorruptEntryError(f"tensor entry {entry!r} does not match {name} {shape}")
        count = entry["nbytes"] // np_dtype.itemsize
        array = np.frombuffer(payload, np_dtype, count, offset)
        arrays.append((name, got_shape, array, dtype))
        offset += entry["nbytes"]
    if offset != len(payload):
        raise CorruptEntryError("tensor entries do not cover the payload")
    return metadata, arrays


def _to_torch(array: np.ndarray, shape: tuple[int, ...], storage_dtype: str,
              keep_storage_dtype: bool) -> torch.Tensor:
    if storage_dtype == "bfloat16" and keep_storage_dtype:
        tensor = torch.from_numpy(array.copy()).view(torch.bfloat16)
    elif storage_dtype == "bfloat16":
        # bfloat16 bits are the top half of a float32: shifting is exact and ~10x faster
        # than torch's CPU upcast.
        bits = np.empty(array.shape, np.uint32)
        np.left_shift(array.view(np.uint16), 16, out=bits, dtype=np.uint32)
        tensor = torch.from_numpy(bits.view(np.float32))
    elif keep_storage_dtype:
        tensor = torch.from_numpy(array.copy())
    else:
        tensor = torch.from_numpy(array.astype(np.float32))  # astype copies: writable, owned
    return tensor.reshape(shape)


def decode_embedding(
    data: bytes | bytearray | memoryview,
    *,
    expected_embedding_id: str | None = None,
    expected_model_id: str | None = None,
    keep_storage_dtype: bool = False,
) -> ImageEmbedding:
    """Verify and deserialise an embedding entry.

    Arguments:
        data: bytes from ``encode_embedding``.
        expected_embedding_id / expected_model_id: when given, the entry must carry them.
        keep_storage_dtype: return tensors in the stored dtype instead of float32.

    Raises:
        CorruptEntryError: on any format, checksum, shape or identity mismatch.
    """
    metadata, arrays = _unpack(data, "embedding", EMBEDDING_SHAPES)
    embedding_id = metadata.get("embedding_id")
    model_id = metadata.get("model_id")
    hw = metadata.get("original_hw")
    if not isinstance(embedding_id, str) or not isinstance(model_id, str):
        raise CorruptEntryError("entry has no embedding id or model id")
    if expected_embedding_id is not None and embedding_id != expected_embedding_id:
        raise CorruptEntryError(
            f"entry is embedding {embedding_id!r}, expected {expected_embedding_id!r}"
        )
    if expected_model_id is not None and model_id != expected_model_id:
        raise CorruptEntryError(f"entry is for model {model_id!r}, expected {expected_model_id!r}")
    hw_ok = isinstance(hw, list) and len(hw) == 2
    if not (hw_ok and all(isinstance(v, int) and v > 0 for v in hw)):
        raise CorruptEntryError(f"entry has invalid original_hw {hw!r}")
    storage_dtype = metadata["dtype"]
    image_embed, feats_0, feats_1 = (
        _to_torch(array, shape, storage_dtype, keep_storage_dtype)
        for _, shape, array, _ in arrays
    )
    return ImageEmbedding(
        image_embed=image_embed,
        high_res_feats=(feats_0, feats_1),
        original_hw=(hw[0], hw[1]),
        model_id=model_id,
        embedding_id=embedding_id,
    )


def decode_logits(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Verify and deserialise a logits entry to a writable float32 [C, 256, 256] array."""
    metadata, arrays = _unpack(data, "logits", [("logits", None)])
    (_, shape, array, _), = arrays
    if metadata["dtype"] != "float32" or len(shape) != 3 or shape[1:] != LOGITS_HW:
        raise CorruptEntryError(f"logits entry has {metadata['dtype']} {list(shape)}")
    return array.reshape(shape).copy()


def encode_session(state: dict[str, Any], tensors: Sequence[tuple[str, torch.Tensor]],
                   tracking: dict[str, Any]) -> bytes:
    """Serialise a video session (``VideoSession.to_state``) and the tier's ``tracking``
    metadata; each tensor keeps its dtype (float32, bfloat16 or int32)."""
    named, dtypes = [], []
    for name, tensor in tensors:
        dtype = _DTYPE_NAME.get(tensor.dtype)
        if dtype is None or dtype == "float16":
            raise InvalidInputError(f"cannot store session tensors of dtype {tensor.dtype}")
        named.append((name, _tensor_bytes(tensor, dtype)))
        dtypes.append(dtype)
    return _pack("video_session", "float32", named, {"session": state, "tracking": tracking},
                 dtypes)


def decode_session(
    data: bytes | bytearray | memoryview,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Verify a session entry; return (session state, {name: tensor}, tracking metadata).

    Tensors come back in their stored dtype, on the CPU, owned and writable.
    """
    probe = read_metadata(data, MAX_SESSION_METADATA_NBYTES)
    listed = probe.get("tensors")
    if not isinstance(listed, list) or len(listed) > MAX_SESSION_TENSORS:
        raise CorruptEntryError("session entry lists no tensors or too many")
    expected = [(entry.get("name") if isinstance(entry, dict) else None, None)
                for entry in listed]
    if [name for name, _ in expected] != [f"t{i}" for i in range(len(expected))]:
        raise CorruptEntryError("session tensors are not named t0, t1, ... in order")
    metadata, arrays = _unpack(data, "video_session", expected, MAX_SESSION_METADATA_NBYTES)
    state, tracking = metadata.get("session"), metadata.get("tracking")
    if not isinstance(state, dict) or not isinstance(tracking, dict):
        raise CorruptEntryError("session entry has no session or tracking metadata")
    tensors = {}
    for name, shape, array, dtype in arrays:
        tensor = torch.from_numpy(array.copy()).reshape(shape)
        tensors[name] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
    return state, tensors, tracking
