"""The gRPC services of a tier over HTTP/1.1: the Connect protocol and gRPC-Web.

``RpcGateway`` calls the very method handlers the gRPC server has (the same servicer
objects, registered a second time into a ``HandlerTable``) through the same interceptors
(metrics, auth, the error table), with ``HttpServicerContext`` standing in for gRPC's
``ServicerContext``. Nothing here implements an RPC; it only translates the framing:

- Connect unary: ``POST /sam2.v1.<Service>/<Method>``, body one message,
  ``application/json`` (the proto3 JSON mapping) or ``application/proto``; an error is a
  JSON body ``{code, message, details}`` with the HTTP status Connect assigns to the code.
- Connect streaming (``application/connect+json`` / ``+proto``) and gRPC-Web
  (``application/grpc-web[+proto|+json]``, ``application/grpc-web-text``): the body is a
  sequence of envelopes (1 flag byte, 4-byte big-endian length, message); the response
  streams envelopes and ends with Connect's end-of-stream JSON or gRPC-Web's trailers.

Client-streaming and bidirectional methods read the whole request body first (HTTP/1.1 is
half-duplex), so over HTTP ``SegmentStream`` answers once the client has sent everything.
Requests may be gzip-compressed (Connect clients such as connect-python compress by default),
decompressed up to the message limit; answers are not compressed (masks are RLE already).
The HTTP server around this (connections, limits, CORS, static files) is ``http_server``.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from sam2_shared.errors import InvalidInputError, ResourceExhaustedError
from sam2_shared.wire.status import to_rpc_status

# Connect's HTTP status for each code (connectrpc.com/docs/protocol, "Error Codes").
CONNECT_HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# Envelope flags: Connect's end-of-stream message, gRPC-Web's trailers, compression.
_FLAG_COMPRESSED = 0x01
_FLAG_CONNECT_END = 0x02
_FLAG_GRPC_WEB_TRAILERS = 0x80
_ENVELOPE_HEADER = struct.Struct(">BI")

# JSON bodies bigger than this are parsed and written in a thread, off the event loop
# (a 12 MP JPEG is several MB of base64).
_JSON_OFF_LOOP_BYTES = 256 * 1024


def connect_code_name(code: grpc.StatusCode) -> str:
    """``grpc.StatusCode.NOT_FOUND`` -> ``"not_found"`` (Connect spells CANCELLED "canceled")."""
    return "canceled" if code is grpc.StatusCode.CANCELLED else code.name.lower()


# --- content types --------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """How one request is framed: ``name`` (metrics label), codec, envelopes or not."""

    name: str  # "connect" or "grpc_web"
    codec: str  # "json" or "proto"
    enveloped: bool  # False: Connect unary, the body is the message
    text: bool = False  # gRPC-Web-text: the body is base64
    response_content_type: str = ""


_PROTOCOLS = {
    "application/json": Protocol("connect", "json", False, False, "application/json"),
    "application/proto": Protocol("connect", "proto", False, False, "application/proto"),
    "application/connect+json": Protocol("connect", "json", True, False,
                                         "application/connect+json"),
    "application/connect+proto": Protocol("connect", "proto", True, False,
                                          "application/connect+proto"),
    "application/grpc-web": Protocol("grpc_web", "proto", True, False,
                                     "application/grpc-web+proto"),
    "application/grpc-web+proto": Protocol("grpc_web", "proto", True, False,
                                           "application/grpc-web+proto"),
    "application/grpc-web+json": Protocol("grpc_web", "json", True, False,
                                          "application/grpc-web+json"),
    "application/grpc-web-text": Protocol("grpc_web", "proto", True, True,
                                          "application/grpc-web-text+proto"),
    "application/grpc-web-text+proto": Protocol("grpc_web", "proto", True, True,
                                                "application/grpc-web-text+proto"),
}
SUPPORTED_CONTENT_TYPES = tuple(_PROTOCOLS)


def protocol_of(content_type: str) -> Protocol | None:
    """The protocol of a ``Content-Type`` header (parameters such as charset ignored)."""
    return _PROTOCOLS.get(content_type.split(";", 1)[0].strip().lower())


def parse_timeout_s(headers: dict[str, str]) -> float | None:
    """The call's timeout from ``connect-timeout-ms`` or gRPC-Web's ``grpc-timeout``."""
    text = headers.get("connect-timeout-ms")
    if text is not None:
        if not text.isdigit() or len(text) > 10:
            raise InvalidInputError(f"Connect-Timeout-Ms must be at most 10 digits, got {text!r}")
        return int(text) / 1000.0
    text = headers.get("grpc-timeout")
    if text is None:
        return None
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(text) < 2 or len(text) > 9 or not text[:-1].isdigit() or text[-1] not in units:
        raise InvalidInputError(f"grpc-timeout must be 1-8 digits and a unit, got {text!r}")
    return int(text[:-1]) * units[text[-1]]


# --- messages and envelopes -------------------------------------------------------------


def decode_message(cls: type[Message], data: bytes, codec: str) -> Message:
    """One request message from its bytes; a readable INVALID_ARGUMENT if it is not one."""
    name = cls.DESCRIPTOR.full_name
    try:
        if codec == "json":
            return json_format.Parse(data.decode("utf-8"), cls())
        return cls.FromString(data)
    except (json_format.ParseError, UnicodeDecodeError, DecodeError, RecursionError,
            ValueError) as exc:
        raise InvalidInputError(f"the request body is not a {name} in {codec.upper()}: {exc}",
                                reason="INVALID_REQUEST_BODY") from None


def encode_message(message: Message, codec: str) -> bytes:
    if codec == "json":
        return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()
    return message.SerializeToString()


def envelope(flags: int, data: bytes) -> bytes:
    return _ENVELOPE_HEADER.pack(flags, len(data)) + data


def split_envelopes(body: bytes, encoding: str, max_bytes: int) -> list[bytes]:
    """The messages of an enveloped request body, compressed ones decompressed."""
    messages, offset = [], 0
    while offset < len(body):
        if len(body) - offset < _ENVELOPE_HEADER.size:
            raise InvalidInputError("the request body ends inside an envelope header",
                                    reason="INVALID_REQUEST_BODY")
        flags, length = _ENVELOPE_HEADER.unpack_from(body, offset)
        offset += _ENVELOPE_HEADER.size
        if length > len(body) - offset:
            raise InvalidInputError(f"an envelope declares {length} bytes but only "
                                    f"{len(body) - offset} follow", reason="INVALID_REQUEST_BODY")
        data = body[offset:offset + length]
        if flags & _FLAG_COMPRESSED:
            data = decompress(data, encoding or "gzip", max_bytes)
        if not flags & (_FLAG_CONNECT_END | _FLAG_GRPC_WEB_TRAILERS):
            messages.append(data)
        offset += length
    return messages


def decompress(data: bytes, encoding: str, max_bytes: int) -> bytes:
    """``data`` in ``encoding`` (identity or gzip, what Connect clients send) decompressed,
    at most ``max_bytes`` of it (a small gzip body can expand a thousandfold)."""
    if encoding in ("", "identity"):
        return data
    if encoding != "gzip":
        raise ProtocolError(CallStatus(grpc.StatusCode.UNIMPLEMENTED,
                                       f"{encoding!r} compression is not supported: send gzip "
                                       "or identity"))
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidInputError(f"the request is not valid gzip: {exc}",
                                reason="INVALID_REQUEST_BODY") from None
    if len(out) > max_bytes:
        raise ResourceExhaustedError(
            f"the request decompresses to more than the {max_bytes} bytes this server accepts "
            "(--max-message-mb)", reason="MESSAGE_TOO_LARGE", limit=str(max_bytes))
    if not inflater.eof:
        raise InvalidInputError("the gzip request ends early", reason="INVALID_REQUEST_BODY")
    return out


# --- the final status of a call -------------------------------------------------------


@dataclass
class CallStatus:
    """How a call ended: code, message and the ``google.rpc.Status`` details."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    details: Sequence[Any] = ()  # google.protobuf.Any

    @classmethod
    def of_exception(cls, exc: BaseException) -> CallStatus:
        """From the one error table (``sam2_shared.wire.status``)."""
        return cls.of_rpc_status(to_rpc_status(exc))

    @classmethod
    def of_rpc_status(cls, status: status_pb2.Status) -> CallStatus:
        return cls(_CODE_OF_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN), status.message,
                   list(status.details))

    def connect_error(self) -> dict[str, Any]:
        """Connect's error object; each detail's bytes base64 without padding, plus a
        ``debug`` rendering of the ones we know (ErrorInfo, RetryInfo) for curl users."""
        details = []
        for detail in self.details:
            entry = {"type": detail.type_url.rpartition("/")[2],
                     "value": base64.b64encode(detail.value).decode().rstrip("=")}
            for known in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                if detail.Is(known.DESCRIPTOR):
                    unpacked = known()
                    detail.Unpack(unpacked)
                    entry["debug"] = json_format.MessageToDict(unpacked)
            details.append(entry)
        error: dict[str, Any] = {"code": connect_code_name(self.code), "message": self.message}
        if details:
            error["details"] = details
        return error

    def grpc_web_trailers(self) -> bytes:
        lines = [f"grpc-status: {self.code.value[0]}"]
        if self.code is not grpc.StatusCode.OK:
            lines.append(f"grpc-message: {_percent_encode(self.message)}")
            status = status_pb2.Status(code=self.code.value[0], message=self.message,
                                       details=self.details)
            packed = base64.b64encode(status.SerializeToString()).decode()
            lines.append(f"grpc-status-details-bin: {packed}")
        return ("\r\n".join(lines) + "\r\n").encode()


def _percent_encode(text: str) -> str:
    """gRPC's encoding of grpc-message: printable ASCII but ``%`` as is, the rest %XX."""
    return "".join(
        char if " " <= char <= "~" and char != "%" else quote(char, safe="")
        for char in text)


class ProtocolError(Exception):
    """A request the protocol layer answers itself, with ``status``."""

    def __init__(self, status: CallStatus) -> None:
        super().__init__(status.message)
        self.status = status


class _CallDetails(NamedTuple):
    """What interceptors see of a call (``grpc.HandlerCallDetails``), plus its protocol."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]
    protocol: str


class HttpServicerContext:
    """The part of ``grpc.aio.ServicerContext`` that servicers and interceptors use.

    ``abort`` records the status and raises ``grpc.aio.AbortError`` exactly as gRPC does,
    so the interceptors' handling of aborts is the same on both ports.
    """

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str,
                 deadline: float | None,
                 write: Callable[[Message], Awaitable[None]]) -> None:
        self._metadata = metadata
        self._peer = peer
        self._deadline = deadline
        self._write = write
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, Any]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, Any]]) -> None:
        return None  # HTTP headers go out with the first response message

    async def write(self, message: Message) -> None:
        await self._write(message)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Iterable[tuple[str, Any]] = ()) -> None:
        self._code, self._details = code, details
        self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self._code is not None

    def final_status(self) -> CallStatus:
        """The status an abort (or ``set_code``) left; OK when neither happened."""
        for key, value in self._trailing:
            if key == "grpc-status-details-bin":
                return CallStatus.of_rpc_status(status_pb2.Status.FromString(value))
        return CallStatus(self._code or grpc.StatusCode.OK, self._details)


# --- the handlers and the gateway -----------------------------------------------------


class HandlerTable:
    """Stands in for the gRPC server when a servicer registers itself: keeps its method
    handlers by path (``/sam2.v1.DecoderService/Segment``)."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            self.handlers[f"/{service}/{method}"] = handler

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        return None  # the same handlers arrive by add_registered_method_handlers


def _message_classes(path: str) -> tuple[type[Message], type[Message]] | None:
    """The request and response classes of ``path`` from the protos' descriptors (None for
    a method registered without one: it is not offered over HTTP)."""
    service, _, method = path.lstrip("/").partition("/")
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return None
    return (message_factory.GetMessageClass(found.input_type),
            message_factory.GetMessageClass(found.output_type))


@dataclass
class GatewayStats:
    """Calls made, and calls turned away because the server was busy."""

    calls: int = 0
    busy: int = 0


class RpcGateway:
    """Runs one HTTP request as a call of a registered gRPC method.

    Arguments:
        table: the handlers, registered by the tier's servicers (and health).
        interceptors: the gRPC server's, outermost first, error mapping last.
        max_concurrent_calls: calls in progress at once; beyond, RESOURCE_EXHAUSTED
            reason SERVER_BUSY (0: no limit).
    """

    def __init__(self, table: HandlerTable, interceptors: Sequence[grpc.aio.ServerInterceptor],
                 *, max_concurrent_calls: int = 0) -> None:
        self.interceptors = tuple(interceptors)
        self.max_concurrent_calls = max_concurrent_calls
        self.active_calls = 0
        self.stats = GatewayStats()
        self._classes = {path: classes for path in table.handlers
                         if (classes := _message_classes(path)) is not None}
        self.handlers = {path: table.handlers[path] for path in self._classes}

    def method_exists(self, path: str) -> bool:
        return path in self.handlers

    async def _intercepted(self, details: _CallDetails) -> grpc.RpcMethodHandler:
        """The handler as the interceptor chain returns it (as grpc.aio builds it)."""
        handler = self.handlers[details.method]

        async def innermost(_details: Any) -> grpc.RpcMethodHandler:
            return handler

        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]] = innermost
        for interceptor in reversed(self.interceptors):
            continuation = _bind(interceptor, continuation)
        return await continuation(details)

    async def call(
        self, path: str, protocol: Protocol, messages: Sequence[bytes],
        metadata: tuple[tuple[str, str], ...], peer: str, timeout_s: float | None,
        send: Callable[[bytes], Awaitable[None]],
    ) -> CallStatus:
        """Call ``path`` with the request ``messages`` (encoded in ``protocol``'s codec);
        each response message goes to ``send`` encoded; returns the final status."""
        if self.max_concurrent_calls and self.active_calls >= self.max_concurrent_calls:
            self.stats.busy += 1
            return CallStatus.of_exception(ResourceExhaustedError(
                f"this server is handling {self.max_concurrent_calls} requests, the most it "
                "takes at once; retry shortly", reason="SERVER_BUSY",
                limit=str(self.max_concurrent_calls)))
        self.active_calls += 1
        self.stats.calls += 1
        try:
            # Its own task: context variables the interceptors set (the caller) stay in it,
            # never leaking into the next request on the same connection.
            return await asyncio.create_task(
                self._call(path, protocol, messages, metadata, peer, timeout_s, send))
        finally:
            self.active_calls -= 1

    async def _call(
        self, path: str, protocol: Protocol, messages: Sequence[bytes],
        metadata: tuple[tuple[str, str], ...], peer: str, timeout_s: float | None,
        send: Callable[[bytes], Awaitable[None]],
    ) -> CallStatus:
        request_cls, _ = self._classes[path]
        handler = self.handlers[path]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        async def write(message: Message) -> None:
            await send(await _off_loop_if_big(encode_message, message, protocol.codec,
                                              size=message.ByteSize()))

        context = HttpServicerContext(metadata, peer, deadline, write)
        try:
            decoded = [await _off_loop_if_big(decode_message, request_cls, data, protocol.codec,
                                              size=len(data)) for data in messages]
            if not (handler.request_streaming or len(decoded) == 1):
                raise InvalidInputError(f"{path} takes exactly one request message, got "
                                        f"{len(decoded)}", reason="INVALID_REQUEST_BODY")
        except InvalidInputError as exc:
            return CallStatus.of_exception(exc)
        resolved = await self._intercepted(_CallDetails(path, metadata, protocol.name))
        behaviour = (resolved.unary_unary or resolved.unary_stream or resolved.stream_unary
                     or resolved.stream_stream)
        request: Any = _iterate(decoded) if handler.request_streaming else decoded[0]
        try:
            async with asyncio.timeout(timeout_s):
                result = behaviour(request, context)
                if not handler.response_streaming:
                    await write(await result)
                elif inspect.isasyncgen(result):
                    try:
                        async for response in result:
                            await write(response)
                    except (ConnectionError, asyncio.CancelledError):
                        context.set_code(grpc.StatusCode.CANCELLED)  # the client went away
                        raise
                    finally:
                        await result.aclose()
                else:
                    await result  # a coroutine writing with context.write
        except grpc.aio.AbortError:
            pass
        except TimeoutError:
            return CallStatus(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return context.final_status()


def _bind(interceptor: grpc.aio.ServerInterceptor,
          continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]]
          ) -> Callable[[Any], Awaitable[grpc.RpcMethodHandler]]:
    async def step(details: Any) -> grpc.RpcMethodHandler:
        return await interceptor.intercept_service(continuation, details)

    return step


async def _iterate(messages: Sequence[Message]) -> AsyncIterator[Message]:
    for message in messages:
        yield message


async def _off_loop_if_big(function: Callable[..., Any], *args: Any, size: int) -> Any:
    if size > _JSON_OFF_LOOP_BYTES:
        return await asyncio.to_thread(function, *args)
    return function(*args)
