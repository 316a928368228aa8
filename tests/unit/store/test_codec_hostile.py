"""Entries written by someone else are parsed without ever escaping as INTERNAL: absurdly
nested metadata and non-ASCII digits are corrupt entries, and the largest valid embedding
entry fits the import limit exactly."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from sam2_shared.embedding import ImageEmbedding
from sam2_shared.errors import CorruptEntryError
from sam2_shared.store import codec, open_store
from tests.helpers.hostile_payloads import codec_entry


def test_deeply_nested_metadata_is_corrupt_not_a_crash() -> None:
    nested = b"[" * 30_000 + b"]" * 30_000  # within the 64 KiB limit, beyond recursion
    with pytest.raises(CorruptEntryError, match="RecursionError"):
        codec.read_metadata(codec_entry(nested))


def test_non_json_and_wrong_types_are_corrupt() -> None:
    for meta in (b"\xff\xfe", b"[]", json.dumps({"format_version": "1"}).encode()):
        with pytest.raises(CorruptEntryError):
            codec.read_metadata(codec_entry(meta))
    with pytest.raises(CorruptEntryError):
        codec.read_metadata(struct.pack("<8s", b"SAM2BLOB"))  # shorter than the header


def test_a_revision_of_unicode_digits_is_no_revision() -> None:
    store = open_store("memory://")
    store.blobs.put("session-rev/s", "²".encode())
    assert store.session_revision("s") is None


def test_the_largest_valid_embedding_fits_the_import_limit() -> None:
    tensors = [torch.zeros(shape) for _, shape in codec.EMBEDDING_SHAPES]
    fp32 = ImageEmbedding(tensors[0], (tensors[1], tensors[2]), (4000, 3000),
                          "sam2.1/hiera_b_plus", "ab" * 32)
    assert len(codec.encode_embedding(fp32, "float32")) <= codec.MAX_EMBEDDING_ENTRY_NBYTES
    assert codec.MAX_EMBEDDING_ENTRY_NBYTES < 17 << 20


def test_store_errors_name_no_host_url_or_driver_message() -> None:
    store = open_store("memory://")
    error = store.blobs.unavailable(
        "get emb/x", ConnectionRefusedError("redis://admin:pw@10.1.2.3:6379 refused"))
    text = str(error) + repr(error.metadata)
    assert "retry shortly" in text and error.reason == "STORE_UNAVAILABLE"
    for secret in ("10.1.2.3", "admin", "memory://", "ConnectionRefusedError", "emb/x"):
        assert secret not in text


def _with_first_tensor_entry(entry_update: dict) -> bytes:
    """A valid fp16 embedding entry whose first tensor entry is rewritten (checksums redone)."""
    tensors = [torch.zeros(shape) for _, shape in codec.EMBEDDING_SHAPES]
    embedding = ImageEmbedding(tensors[0], (tensors[1], tensors[2]), (40, 30),
                               "sam2.1/hiera_tiny", "cd" * 32)
    data = codec.encode_embedding(embedding, "float16")
    metadata = codec.read_metadata(data)
    payload = data[metadata.pop("_payload_offset"):]
    metadata["tensors"][0].update(entry_update)
    meta = json.dumps(metadata).encode()
    return codec_entry(meta, bytes(payload))


@pytest.mark.parametrize("update", [
    {"dtype": []}, {"dtype": {"float32": 1}}, {"dtype": 4},
    {"shape": [10**30, 1, 1, 1]}, {"shape": [1.5, 256, 64, 64]}, {"nbytes": "1"},
], ids=["dtype-list", "dtype-object", "dtype-number", "shape-huge", "shape-float", "nbytes-str"])
def test_odd_tensor_entries_are_corrupt_not_a_crash(update: dict) -> None:
    with pytest.raises(CorruptEntryError, match="does not match"):
        codec.decode_embedding(_with_first_tensor_entry(update))
    assert codec.decode_embedding(_with_first_tensor_entry({})).original_hw == (40, 30)
