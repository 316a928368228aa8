"""A small HTTP/1.1 server in the tier's own event loop: RPCs over Connect and gRPC-Web
(``connect.RpcGateway``), CORS, and static files (the decoder's click-to-segment page).

Deliberately minimal (no dependency): keep-alive, request bodies with ``Content-Length`` or
chunked (streaming clients send those), chunked responses for streams,
``Expect: 100-continue``. Every input is bounded before it costs
anything: the request head (``MAX_HEAD_BYTES``, ``MAX_HEADERS``), the body (the gRPC
message limit; a bigger one is refused unread and the connection closed), the time to
send a head or a body, open connections and calls in progress. A request the server
cannot use gets an answer in its protocol (a Connect error, gRPC-Web trailers, or a short
plain-text status for non-RPC paths) and the server goes on serving.

Paths: ``POST /<package>.<Service>/<Method>`` is an RPC; ``GET /`` serves ``index.html``
of the static folder and ``GET /<file>`` the file of that name (no subfolders, no dot
files, nothing outside the folder); ``OPTIONS`` answers CORS preflights for the origins
in ``cors_origins`` (``*`` for any).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from sam2_shared.errors import InvalidInputError, ResourceExhaustedError
from sam2_shared.serving.connect import (
    CONNECT_HTTP_STATUS,
    SUPPORTED_CONTENT_TYPES,
    CallStatus,
    Protocol,
    ProtocolError,
    RpcGateway,
    decompress,
    envelope,
    parse_timeout_s,
    protocol_of,
    split_envelopes,
)

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # request line and headers together
MAX_HEADERS = 64
HEAD_TIMEOUT_S = 30.0  # a connection idle (or sending a head) this long is closed
# After refusing a body unread: how long the rest of it is read and dropped before closing.
LINGER_S = 5.0
BODY_TIMEOUT_S = 120.0  # the longest a request body may take to arrive
DEFAULT_MAX_CONNECTIONS = 1024

# Request headers that describe the HTTP exchange, not the call: not passed as metadata.
_NOT_METADATA = frozenset({
    "host", "connection", "content-length", "content-type", "accept", "accept-encoding",
    "user-agent", "origin", "referer", "expect", "te", "keep-alive", "connect-timeout-ms",
    "connect-protocol-version", "grpc-timeout", "x-grpc-web", "x-user-agent",
    "content-encoding", "connect-content-encoding", "connect-accept-encoding", "grpc-encoding",
    "grpc-accept-encoding",
})
CORS_ALLOWED_HEADERS = ("authorization, content-type, x-api-key, connect-protocol-version, "
                        "connect-timeout-ms, connect-content-encoding, connect-accept-encoding, "
                        "grpc-timeout, grpc-encoding, grpc-accept-encoding, x-grpc-web, "
                        "x-user-agent")
CORS_EXPOSED_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin"
CORS_MAX_AGE_S = 7200

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".map": "application/json", ".png": "image/png",
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
    ".ico": "image/x-icon", ".wasm": "application/wasm", ".txt": "text/plain; charset=utf-8",
    ".webp": "image/webp",
}

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            411: "Length Required", 415: "Unsupported Media Type", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 499: "Client Closed Request",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            504: "Gateway Timeout"}


class _BadRequest(Exception):
    """A request refused before it is understood: plain-text ``status``, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        return self.version == "HTTP/1.1" and "close" not in connection


def parse_head(head: bytes) -> Request:
    """Request line and headers (``head`` ends with the blank line)."""
    try:
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise _BadRequest(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(400, f"unsupported HTTP version {version!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path = target.split("?", 1)[0]
    return Request(method, path, version, headers)


def _peer_of(writer: asyncio.StreamWriter) -> str:
    """gRPC's spelling of the client address (``ipv4:127.0.0.1:5432``), for the per-address
    session limit of the auth interceptor."""
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return "unknown"


class HttpServer:
    """Serves one tier's RPCs over HTTP/1.1 (see the module doc).

    Arguments:
        gateway: the tier's methods, called through its interceptors.
        max_body_bytes: largest request body (the gRPC message limit).
        cors_origins: origins allowed to call from a browser (``*``: any; empty: none).
        static_dir: folder served at ``/`` (None: no static files).
        max_connections: open connections at once; more are closed on accept.
    """

    def __init__(self, gateway: RpcGateway, *, max_body_bytes: int,
                 cors_origins: tuple[str, ...] = (), static_dir: Path | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.gateway = gateway
        self.max_body_bytes = max_body_bytes
        self.cors_origins = tuple(cors_origins)
        self.static_dir = static_dir.resolve() if static_dir is not None else None
        self.max_connections = max_connections
        self.port = 0
        self.connections_refused = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free one); returns the bound port."""
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, host, port, limit=MAX_HEAD_BYTES, reuse_address=True)
        except OSError as exc:
            raise OSError(f"cannot bind the HTTP server to {host}:{port}: {exc}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Accept nothing more; calls in progress get ``grace_s``; then close everything."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.gateway.active_calls and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # --- connections ------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= self.max_connections or task is None:
            self.connections_refused += 1
            writer.close()
            return
        self._connections.add(task)
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(HEAD_TIMEOUT_S):  # no task per request
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError):
                    break  # the client closed the connection, or left it idle
                except asyncio.LimitOverrunError:
                    await self._plain(writer, 431, f"the request head is over {MAX_HEAD_BYTES} "
                                      "bytes", keep_alive=False)
                    break
                try:
                    request = parse_head(head)
                    keep_alive = await self._handle(request, reader, writer)
                except _BadRequest as exc:
                    await self._plain(writer, exc.status, str(exc), keep_alive=False)
                    break
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away mid-request
        except asyncio.CancelledError:
            pass  # stop()
        except Exception:
            logger.exception("HTTP connection failed")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _handle(self, request: Request, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection may carry another."""
        cors = self._cors_headers(request)
        if request.method == "OPTIONS":
            return await self._preflight(request, writer, cors)
        if request.method == "POST" and request.path.count("/") == 2:
            return await self._rpc(request, reader, writer, cors)
        if request.headers.get("content-length", "0") != "0" or (
                "transfer-encoding" in request.headers):  # not read: the connection closes
            raise _BadRequest(400, "only RPCs (POST /<package>.<Service>/<Method>) take a body")
        if request.method in ("GET", "HEAD"):
            status, content_type, body = self._static(request.path)
            await self._respond(writer, status, content_type,
                                b"" if request.method == "HEAD" else body, cors,
                                request.keep_alive, content_length=len(body))
            return request.keep_alive
        await self._plain(writer, 405, "methods here: POST (RPCs), GET, HEAD, OPTIONS",
                          keep_alive=request.keep_alive,
                          extra={"allow": "GET, HEAD, POST, OPTIONS"})
        return request.keep_alive

    # --- CORS ---------------------------------------------------------------------------

    def _cors_headers(self, request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        if not origin or not ("*" in self.cors_origins or origin in self.cors_origins):
            return {}
        return {"access-control-allow-origin": origin, "vary": "Origin",
                "access-control-expose-headers": CORS_EXPOSED_HEADERS}

    async def _preflight(self, request: Request, writer: asyncio.StreamWriter,
                         cors: dict[str, str]) -> bool:
        if not cors:
            await self._plain(writer, 403, "this origin may not call this server (see "
                              "--http-cors-origins)", keep_alive=request.keep_alive)
            return request.keep_alive
        headers = {**cors, "access-control-allow-methods": "POST, GET, OPTIONS",
                   "access-control-allow-headers": CORS_ALLOWED_HEADERS,
                   "access-control-max-age": str(CORS_MAX_AGE_S)}
        await self._respond(writer, 204, None, b"", headers, request.keep_alive)
        return request.keep_alive

    # --- static files -------------------------------------------------------------------

    def _static(self, path: str) -> tuple[int, str, bytes]:
        name = "index.html" if path == "/" else unquote(path[1:])
        text = "text/plain; charset=utf-8"
        if self.static_dir is None:
            return 404, text, b"nothing is served here but RPCs\n"
        if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            return 404, text, b"not found\n"
        file = (self.static_dir / name).resolve()
        if file.parent != self.static_dir or not file.is_file():
            return 404, text, b"not found\n"
        return 200, CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream"), \
            file.read_bytes()

    # --- RPCs ---------------------------------------------------------------------------

    async def _rpc(self, request: Request, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, cors: dict[str, str]) -> bool:
        protocol = protocol_of(request.headers.get("content-type", ""))
        if protocol is None:
            await self._read_or_refuse_body(request, reader, writer, None)
            await self._plain(writer, 415, "send Content-Type one of: "
                              + ", ".join(SUPPORTED_CONTENT_TYPES), keep_alive=False,
                              extra={"accept-post": ", ".join(SUPPORTED_CONTENT_TYPES), **cors})
            return False
        body = await self._read_or_refuse_body(request, reader, writer, protocol, cors)
        if body is None:
            return False
        responder = _Responder(self, writer, protocol, cors, request.keep_alive)
        try:
            if not self.gateway.method_exists(request.path):
                raise ProtocolError(CallStatus(
                    grpc.StatusCode.UNIMPLEMENTED, f"this server has no method {request.path}"))
            timeout_s = parse_timeout_s(request.headers)
            if protocol.text:
                body = _base64_body(body)
            if protocol.enveloped:
                encoding = request.headers.get("connect-content-encoding" if protocol.name ==
                                               "connect" else "grpc-encoding", "identity")
                messages = split_envelopes(body, encoding.lower(), self.max_body_bytes)
            else:
                messages = [decompress(body, request.headers.get(
                    "content-encoding", "identity").lower(), self.max_body_bytes)]
            metadata = tuple((name, value) for name, value in request.headers.items()
                             if name not in _NOT_METADATA)
            status = await self.gateway.call(request.path, protocol, messages, metadata,
                                             _peer_of(writer), timeout_s, responder.send)
        except ProtocolError as exc:
            status = exc.status
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # bad input (InvalidInputError), or a bug: the one table
            status = CallStatus.of_exception(exc)
        await responder.finish(status)
        return request.keep_alive

    async def _read_or_refuse_body(self, request: Request, reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter, protocol: Protocol | None,
                                   cors: dict[str, str] | None = None) -> bytes | None:
        """The request body, or None after refusing it (too big; the connection closes)."""
        chunked = request.headers.get("transfer-encoding", "").lower()
        if chunked not in ("", "chunked"):
            raise _BadRequest(501, f"Transfer-Encoding {chunked!r} is not supported")
        text = request.headers.get("content-length", "0")
        if not text.isdigit() or len(text) > 15 or (chunked and "content-length" in
                                                     request.headers):
            raise _BadRequest(400, f"Content-Length must be a number, got {text!r}")
        length = int(text)
        if length > self.max_body_bytes:
            return await self._refuse_body(reader, writer, protocol, cors, f"{length} bytes")
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not chunked:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                return await reader.readexactly(length)
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await self._read_chunks(reader)
        if body is None:
            return await self._refuse_body(reader, writer, protocol, cors,
                                           f"over {self.max_body_bytes} bytes")
        return body

    async def _read_chunks(self, reader: asyncio.StreamReader) -> bytes | None:
        """A chunked body (what streaming clients send); None once it passes the limit."""
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = (await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip()
            if not size_line or len(size_line) > 8 or not all(
                    c in b"0123456789abcdefABCDEF" for c in size_line):
                raise _BadRequest(400, "malformed chunk size")
            size = int(size_line, 16)
            if size == 0:
                break
            total += size
            if total > self.max_body_bytes:
                return None
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise _BadRequest(400, "a chunk does not end with CRLF")
        for _ in range(MAX_HEADERS + 1):  # trailers, ignored, up to the blank line
            if await reader.readuntil(b"\r\n") == b"\r\n":
                return b"".join(parts)
        raise _BadRequest(431, f"more than {MAX_HEADERS} trailers")

    async def _refuse_body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           protocol: Protocol | None, cors: dict[str, str] | None,
                           size: str) -> None:
        """Answer MESSAGE_TOO_LARGE in the request's protocol (the connection then closes)."""
        if protocol is None:
            return None
        error = ResourceExhaustedError(
            f"the request body is {size}, more than the {self.max_body_bytes} bytes this "
            "server accepts (--max-message-mb)", reason="MESSAGE_TOO_LARGE",
            limit=str(self.max_body_bytes))
        await _Responder(self, writer, protocol, cors or {}, False).finish(
            CallStatus.of_exception(error))
        await _linger(reader, writer)
        return None

    # --- writing ------------------------------------------------------------------------

    async def _respond(self, writer: asyncio.StreamWriter, status: int,
                       content_type: str | None, body: bytes, headers: dict[str, str],
                       keep_alive: bool, *, content_length: int | None = None,
                       chunked: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        if content_type:
            lines.append(f"content-type: {content_type}")
        if chunked:
            lines.append("transfer-encoding: chunked")
        else:
            length = len(body) if content_length is None else content_length
            lines.append(f"content-length: {length}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append("x-content-type-options: nosniff")
        if not keep_alive:
            lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _plain(self, writer: asyncio.StreamWriter, status: int, message: str, *,
                     keep_alive: bool, extra: dict[str, str] | None = None) -> None:
        await self._respond(writer, status, "text/plain; charset=utf-8",
                            (message + "\n").encode(), extra or {}, keep_alive)


def _base64_body(body: bytes) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("the gRPC-Web-text body is not base64",
                                reason="INVALID_REQUEST_BODY") from None


class _Responder:
    """Writes one RPC's answer in its protocol: a buffered Connect unary response, or a
    chunked stream of envelopes ending with Connect's end-of-stream or gRPC-Web trailers."""

    def __init__(self, server: HttpServer, writer: asyncio.StreamWriter, protocol: Protocol,
                 cors: dict[str, str], keep_alive: bool) -> None:
        self.server = server
        self.writer = writer
        self.protocol = protocol
        self.cors = cors
        self.keep_alive = keep_alive
        self._unary_body: bytes | None = None
        self._started = False

    async def send(self, data: bytes) -> None:
        if not self.protocol.enveloped:
            self._unary_body = data
            return
        if not self._started:
            self._started = True
            await self.server._respond(self.writer, 200, self.protocol.response_content_type,
                                       b"", self.cors, self.keep_alive, chunked=True)
        await self._chunk(envelope(0, data))

    async def _chunk(self, frame: bytes) -> None:
        if self.protocol.text:
            frame = base64.b64encode(frame)
        self.writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        await self.writer.drain()

    async def finish(self, status: CallStatus) -> None:
        protocol = self.protocol
        if not protocol.enveloped:
            if status.code is grpc.StatusCode.OK and self._unary_body is not None:
                await self.server._respond(self.writer, 200, protocol.response_content_type,
                                           self._unary_body, self.cors, self.keep_alive)
            else:
                body = json.dumps(status.connect_error()).encode()
                await self.server._respond(self.writer, CONNECT_HTTP_STATUS.get(status.code, 500),
                                           "application/json", body, self.cors, self.keep_alive)
            return
        if protocol.name == "connect":
            end = {"error": status.connect_error()} if status.code is not grpc.StatusCode.OK else {}
            final = envelope(0x02, json.dumps(end).encode())
        else:
            final = envelope(0x80, status.grpc_web_trailers())
        if not self._started:
            frame = base64.b64encode(final) if protocol.text else final
            await self.server._respond(self.writer, 200, protocol.response_content_type, frame,
                                       self.cors, self.keep_alive)
            return
        await self._chunk(final)
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read and drop what the client still sends, for up to ``LINGER_S``
    (constant memory). Closing with its body unread would reset the connection, and a client
    still sending would lose the answer before reading it."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(1 << 16):
                pass
    except (ConnectionError, TimeoutError):
        pass
