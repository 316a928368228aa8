"""Hostile bytes for tests: forged image headers, decompression bombs, store entries with
absurd metadata, COCO RLE counts that claim huge masks, PutEmbedding message streams.

Each builder is small and cheap on the sending side; what it costs a careless receiver is in
its docstring.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator, Sequence

from sam2_shared.api.v1 import encoder_pb2
from sam2_shared.store import codec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


def _gray_png(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims ``width`` x ``height`` but whose data is two bytes:
    a bomb's header, ~60 bytes."""
    return _gray_png(width, height, zlib.compress(b"\0\0"))


def png_bomb(width: int, height: int) -> bytes:
    """A complete, valid 8-bit gray PNG of zeros: ``width * height`` bytes once decoded
    (3x that as RGB) from a file ~1000x smaller (12000 x 12000: 140 KiB)."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + a row of zeros
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return _gray_png(width, height, b"".join(parts))


def radiance_hdr_header(width: int, height: int) -> bytes:
    """A Radiance HDR header claiming ``width`` x ``height`` float RGB pixels (12 bytes each
    once decoded), plus a little data."""
    return (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n"
            + f"-Y {height} +X {width}\n".encode() + bytes(64))


def coco_rle_counts(runs: Sequence[int]) -> str:
    """COCO compressed counts of ``runs`` (alternating background/foreground run lengths,
    column-major): a handful of characters can claim a mask of any size."""
    out: list[str] = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        while True:
            digit = value & 0x1F
            value >>= 5
            more = value != -1 if digit & 0x10 else value != 0
            out.append(chr(48 + (digit | 0x20 if more else digit)))
            if not more:
                break
    return "".join(out)


def codec_entry(metadata: bytes, payload: bytes = b"") -> bytes:
    """A store entry (``sam2_shared.store.codec``) with this JSON block, its CRC right."""
    header = codec.HEADER.pack(codec.MAGIC, codec.FORMAT_VERSION, 0, len(metadata),
                               zlib.crc32(metadata))
    return header + metadata + payload


def nested_metadata_entry(depth: int = 30_000) -> bytes:
    """An entry whose JSON block is ``depth`` nested lists: within the 64 KiB metadata limit,
    beyond Python's recursion limit."""
    return codec_entry(b"[" * depth + b"]" * depth)


def blob_header(data: bytes, model_id: str, *, size_bytes: int | None = None,
                embedding_id: str = "") -> encoder_pb2.EmbeddingBlobHeader:
    """The PutEmbedding header that honestly describes ``data`` (``size_bytes`` may lie)."""
    header = encoder_pb2.EmbeddingBlobHeader(
        size_bytes=len(data) if size_bytes is None else size_bytes,
        sha256=hashlib.sha256(data).hexdigest(),
        format=f"sam2-embedding-v{codec.FORMAT_VERSION}")
    header.embedding.model_id = model_id
    header.embedding.embedding_id = embedding_id
    return header


def put_embedding_messages(header: encoder_pb2.EmbeddingBlobHeader, data: bytes,
                           chunk_bytes: int = 1 << 20
                           ) -> Iterator[encoder_pb2.PutEmbeddingRequest]:
    """The PutEmbedding request stream: the header with the first chunk, then the rest."""
    yield encoder_pb2.PutEmbeddingRequest(header=header, chunk=data[:chunk_bytes])
    for start in range(chunk_bytes, len(data), chunk_bytes):
        yield encoder_pb2.PutEmbeddingRequest(chunk=data[start : start + chunk_bytes])
