"""A minimal client of the tiers' HTTP port for tests and benchmarks: Connect unary and
streaming, gRPC-Web, written from the protocols' specifications (not with the server's
code), so that a test compares the server against the protocol rather than against itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpRpcClient:
    """One keep-alive HTTP/1.1 connection to ``base_url`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, base_url: str, timeout_s: float = 120.0) -> None:
        parts = urlsplit(base_url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                                     timeout=timeout_s)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> HttpRpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> HttpReply:
        self.connection.request(method, path, body=body or None, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        return HttpReply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         data)

    def post(self, path: str, body: bytes, content_type: str,
             headers: dict[str, str] | None = None) -> HttpReply:
        return self.request("POST", path, body, {"content-type": content_type,
                                                  **(headers or {})})

    def connect_json(self, path: str, message: Message | dict[str, Any],
                     headers: dict[str, str] | None = None) -> HttpReply:
        """Connect unary with ``application/json`` (a message is sent in its JSON form)."""
        document = (json_format.MessageToDict(message) if isinstance(message, Message)
                    else message)
        return self.post(path, json.dumps(document).encode(), "application/json", headers)

    def connect_proto(self, path: str, message: Message,
                      headers: dict[str, str] | None = None) -> HttpReply:
        return self.post(path, message.SerializeToString(), "application/proto", headers)

    def connect_stream(self, path: str, messages: list[Message], codec: str = "proto",
                       headers: dict[str, str] | None = None
                       ) -> tuple[HttpReply, list[bytes], dict[str, Any]]:
        """Connect streaming: (reply, response messages' bytes, end-of-stream JSON)."""
        body = b"".join(envelope(0, _encode(m, codec)) for m in messages)
        reply = self.post(path, body, f"application/connect+{codec}", headers)
        frames = split_frames(reply.body)
        assert frames and frames[-1][0] == 0x02, f"no end-of-stream message: {frames[-1:]}"
        return reply, [data for flags, data in frames[:-1]], json.loads(frames[-1][1])

    def grpc_web(self, path: str, message: Message, text: bool = False,
                 headers: dict[str, str] | None = None
                 ) -> tuple[HttpReply, list[bytes], dict[str, str]]:
        """gRPC-Web (binary or text): (reply, response messages' bytes, trailers)."""
        body = envelope(0, message.SerializeToString())
        content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
        reply = self.post(path, base64.b64encode(body) if text else body, content_type,
                          {"x-grpc-web": "1", **(headers or {})})
        data = _decode_base64_chunks(reply.body) if text else reply.body
        frames = split_frames(data)
        assert frames and frames[-1][0] == 0x80, f"no trailers: {frames[-1:]}"
        trailers = {}
        for line in frames[-1][1].decode().split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                trailers[name.strip().lower()] = value.strip()
        return reply, [payload for flags, payload in frames[:-1]], trailers


def envelope(flags: int, data: bytes) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(data):
        flags, length = struct.unpack_from(">BI", data, offset)
        frames.append((flags, data[offset + 5:offset + 5 + length]))
        offset += 5 + length
    return frames


def _decode_base64_chunks(data: bytes) -> bytes:
    """gRPC-Web-text bodies may be several base64 runs, each padded: decode them in turn."""
    out, rest = b"", data
    while rest:
        end = rest.find(b"=")
        if end < 0:
            return out + base64.b64decode(rest)
        end = end + 2 if rest[end + 1:end + 2] == b"=" else end + 1
        out += base64.b64decode(rest[:end])
        rest = rest[end:]
    return out


def _encode(message: Message, codec: str) -> bytes:
    if codec == "json":
        return json.dumps(json_format.MessageToDict(message)).encode()
    return message.SerializeToString()


def status_of_trailers(trailers: dict[str, str]) -> status_pb2.Status:
    """The ``google.rpc.Status`` of gRPC-Web trailers (code and message only without details)."""
    packed = trailers.get("grpc-status-details-bin")
    if packed:
        return status_pb2.Status.FromString(base64.b64decode(packed + "=" * (-len(packed) % 4)))
    return status_pb2.Status(code=int(trailers["grpc-status"]),
                             message=trailers.get("grpc-message", ""))


def detail_of_connect_error(error: dict[str, Any], message_cls: type[Message]) -> Message | None:
    """The detail of type ``message_cls`` of a Connect error JSON (its base64 ``value``)."""
    name = message_cls.DESCRIPTOR.full_name
    for detail in error.get("details", []):
        if detail["type"] == name:
            value = detail["value"]
            return message_cls.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
    return None
