"""Who may call a tier, and under which tenant.

API keys
    Sent by clients as gRPC metadata, ``authorization: Bearer <key>`` or ``x-api-key: <key>``,
    and compared in constant time (``hmac.compare_digest``) against every configured key.
    Keys come from ``--api-keys-file`` / ``SAM2_API_KEYS_FILE``:

    - a file, one key per line, optionally ``<key> <namespace>``; ``#`` starts a comment;
    - or a directory (a Kubernetes Secret mounted as a volume): every regular file whose
      name does not start with ``.`` holds one key (first line) and optionally a namespace
      (``<key> <namespace>``). Several files or lines = several valid keys, for rotation:
      add the new key, roll the clients, remove the old one.

    The key set is reloaded when the file's (or the directory's) modification time
    changes, checked at most every ``reload_interval_s``; Kubernetes updates a mounted
    Secret by swapping a ``..data`` symlink, which changes the directory's mtime. A file that
    is emptied, deleted or unreadable revokes every key (each call gets UNAUTHENTICATED)
    until it holds valid keys again: removing keys never leaves old ones working, nor turns
    authentication off.

    Keys must look random: at least ``MIN_KEY_LENGTH`` characters, at least
    ``MIN_KEY_BITS`` bits by their character frequencies (``aaaa...`` is refused), and not a
    placeholder (``k8s/base/secret.yaml``'s, or one with a word like ``change-me``). Make one
    with ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.

    Health checking and server reflection stay open (probes, grpcurl). Anything else
    without a valid key gets ``UNAUTHENTICATED`` with ``ErrorInfo.reason`` ``API_KEY_MISSING``
    or ``API_KEY_INVALID``; ``AuthInterceptor.stats`` counts them for the metrics layer.

Closed by default
    Without keys a tier may listen only on a loopback address, unless
    ``--allow-unauthenticated`` says so (``check_listener_auth``, run before the port opens).

Tenancy
    A key may carry a namespace. Embedding ids and logits handles made for a namespaced
    caller are ``"<namespace>:<hex>"`` (the hex hashed with the namespace too, see
    ``sam2_shared.embedding.content_id``); a caller may only use ids of its own namespace,
    anything else is answered like an unknown id (NOT_FOUND; ``sam2_shared.embedding``).
    Callers without a namespace (or with auth off) use plain hex ids.

    The interceptor puts the caller (key, namespace, deadline) in a context variable for the
    duration of the call; servicers read it with ``current_caller()`` and pass the namespace
    to the tier logic. ``serving.encoder_client.AsyncEncoderClient`` reads it too, to forward
    the caller's key and the remaining deadline to the encoder.

Sessions per client
    ``max_streams_per_key`` bounds the concurrent streaming calls of one key (of one client
    address, whatever its port and connection, when auth is off): client-streaming
    (``StartSessionFromFrames``, ``PutEmbedding``), server-streaming (``Propagate``) and
    bidirectional (``SegmentStream``) calls share the one budget; one more gets
    ``RESOURCE_EXHAUSTED`` reason ``TOO_MANY_SESSIONS`` with a retry hint. A slot is held
    until the call ends (over HTTP, which reads a request stream whole first, while the
    call runs).
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
from grpc_status import rpc_status

from sam2_shared.client.channels import API_KEY_HEADER, AUTHORIZATION_HEADER
from sam2_shared.errors import ResourceExhaustedError, UnauthenticatedError
from sam2_shared.wire.status import to_rpc_status

logger = logging.getLogger(__name__)

# Always open: Kubernetes probes and grpcurl must work without a key.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

DEFAULT_RELOAD_INTERVAL_S = 5.0

SESSION_RETRY_DELAY_S = 5.0

MIN_KEY_LENGTH = 16
# Estimated from character frequencies (random keys score well above: 32 hex digits about
# 115 bits, token_urlsafe(32) about 208): refuses "aaaa...", "1234123412341234".
MIN_KEY_BITS = 40.0
# Shipped placeholders (k8s/base/secret.yaml) and words that mark one: refused as keys.
PLACEHOLDER_KEYS = frozenset({"change-me-long-random-api-key"})
PLACEHOLDER_WORDS = ("change-me", "changeme", "change_me", "replace-me", "replaceme",
                     "placeholder", "your-api-key", "example")
MAKE_A_KEY = 'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'

ALLOW_UNAUTHENTICATED_FLAG = "--allow-unauthenticated / SAM2_ALLOW_UNAUTHENTICATED"


# --- keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """One accepted key and the tenant namespace it stands for ("" = none)."""

    key: str = field(repr=False)
    namespace: str = ""
    source: str = ""  # file (and line) it came from, for logs; never the key itself


def _parse_line(line: str, source: str) -> ApiKey | None:
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) > 2:
        raise ValueError(f"{source}: expected '<key> [namespace]', got {len(parts)} fields")
    namespace = parts[1] if len(parts) == 2 else ""
    if namespace and not NAMESPACE_PATTERN.fullmatch(namespace):
        raise ValueError(f"{source}: namespace {namespace!r} must match "
                         f"{NAMESPACE_PATTERN.pattern}")
    problem = weak_key_problem(parts[0])
    if problem:
        raise ValueError(f"{source}: {problem}; {MAKE_A_KEY}")
    return ApiKey(parts[0], namespace, source)


def estimated_key_bits(key: str) -> float:
    """``len(key)`` times the Shannon entropy of its character frequencies, in bits."""
    counts, length = Counter(key), len(key)
    return -sum(n * math.log2(n / length) for n in counts.values())


def weak_key_problem(key: str) -> str | None:
    """Why ``key`` is refused as an API key (too short, too regular, a placeholder), or None."""
    lowered = key.lower()
    if key in PLACEHOLDER_KEYS or any(word in lowered for word in PLACEHOLDER_WORDS):
        return "this API key is a placeholder, not a secret"
    if len(key) < MIN_KEY_LENGTH:
        return f"API keys must be at least {MIN_KEY_LENGTH} characters"
    if estimated_key_bits(key) < MIN_KEY_BITS:
        return "this API key is too regular to be secret (repeated characters)"
    return None


def load_api_keys(path: str | os.PathLike[str]) -> list[ApiKey]:
    """Keys from a file (one per line) or a directory (one per file); see the module doc."""
    root = Path(path)
    keys: list[ApiKey] = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue  # Kubernetes' ..data / ..2024_... bookkeeping entries
            lines = entry.read_text().splitlines()
            key = _parse_line(lines[0] if lines else "", str(entry))
            if key is not None:
                keys.append(key)
    else:
        for number, line in enumerate(root.read_text().splitlines(), 1):
            key = _parse_line(line, f"{root}:{number}")
            if key is not None:
                keys.append(key)
    if not keys:
        raise ValueError(f"no API keys in {root}")
    return keys


_NO_MTIME = -1.0  # the key file is missing or unusable: any file that appears is read


def _mtime_of(path: Path) -> float:
    """The newest mtime of ``path`` and (for a directory) its entries."""
    stamps = [path.stat().st_mtime]
    if path.is_dir():
        stamps += [entry.stat().st_mtime for entry in path.iterdir() if entry.exists()]
    return max(stamps)


class ApiKeyRing:
    """The accepted keys, reloaded from ``path`` when it changes.

    Arguments:
        keys: fixed keys (tests, embedding a tier); or
        path: file or directory to load them from (see the module docstring).
        reload_interval_s: how often at most the path's mtime is looked at.
    """

    def __init__(self, keys: Iterable[ApiKey] = (), *, path: str | os.PathLike[str] | None = None,
                 reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S) -> None:
        self.path = Path(path) if path is not None else None
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._keys: tuple[ApiKey, ...] = tuple(keys)
        self._mtime = 0.0
        self._checked_at = 0.0
        if self.path is not None:
            self._mtime = _mtime_of(self.path)
            self._keys = tuple(load_api_keys(self.path))
            self._checked_at = time.monotonic()
        if not self._keys:
            raise ValueError("an ApiKeyRing needs at least one key")
        self.reloads = 0  # key set changes after start-up (revocations included)

    def _maybe_reload(self) -> None:
        if self.path is None or time.monotonic() - self._checked_at < self.reload_interval_s:
            return
        with self._lock:
            if time.monotonic() - self._checked_at < self.reload_interval_s:
                return
            self._checked_at = time.monotonic()
            mtime = _NO_MTIME
            try:
                mtime = _mtime_of(self.path)
                if mtime == self._mtime:
                    return
                keys = tuple(load_api_keys(self.path))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                # Emptied, deleted or broken: revoke everything (fail closed) until the file
                # holds valid keys again. Keeping the old set would keep removed keys working.
                if self._keys:
                    logger.error("API keys at %s unusable, every key revoked until fixed: %s",
                                 self.path, exc)
                    self.reloads += 1
                self._keys, self._mtime = (), mtime
                return
            self._keys, self._mtime = keys, mtime
            self.reloads += 1
            logger.info("reloaded %d API keys from %s", len(keys), self.path)

    def match(self, presented: str) -> ApiKey | None:
        """The configured key equal to ``presented`` (constant time per key), else None.

        Every key is compared, so the time taken does not tell which one (nearly) matched.
        """
        self._maybe_reload()
        candidate = presented.encode()
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.key.encode(), candidate):
                found = key
        return found

    def __len__(self) -> int:
        return len(self._keys)



# --- the caller of the current RPC -----------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who is calling, as established by ``AuthInterceptor``.

    ``deadline`` is a ``time.monotonic()`` instant (None: the call has no deadline).
    """

    api_key: str | None = field(default=None, repr=False)
    namespace: str = ""
    deadline: float | None = None

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


_ANONYMOUS = Caller()


_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "sam2_caller", default=_ANONYMOUS
)


def current_caller() -> Caller:
    """The caller of the RPC being served (anonymous outside of one or with auth off)."""
    return _current_caller.get()


def outlive_the_call() -> None:
    """In a task an RPC started that runs on after it (a video's frames embedded in the
    background): keep the caller's key and namespace, drop the call's deadline. Sets the
    task's own copy of the context, not the RPC's."""
    caller = _current_caller.get()
    _current_caller.set(Caller(caller.api_key, caller.namespace, None))


def current_namespace() -> str:
    return _current_caller.get().namespace


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key in ``x-api-key`` or ``authorization: Bearer``, if any."""
    for name, value in metadata or ():
        name = name.lower()
        if isinstance(value, bytes):
            continue  # keys are text; binary headers end in -bin
        if name == API_KEY_HEADER and value.strip():
            return value.strip()
        if name == AUTHORIZATION_HEADER:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None



# --- the interceptor ------------------------------------------------------------------


@dataclass
class AuthStats:
    """Counters for the metrics layer: rejected calls by reason, accepted calls."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    sessions_refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())



def _status(exc: Exception) -> Any:
    """The rich status of ``exc`` from the one error table (auth runs before the servicer
    and the error-mapping interceptor, so it aborts with that status itself)."""
    return rpc_status.to_status(to_rpc_status(exc))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """API-key authentication, tenant context and per-key session limits for ``grpc.aio``.

    Arguments:
        keys: the accepted keys; None turns authentication off (the caller context, deadline
            and session limit still apply).
        max_streams_per_key: most concurrent streaming calls per key (per client address
            without auth, see ``peer_address``); 0 for no limit.
    """

    def __init__(self, keys: ApiKeyRing | None, *, max_streams_per_key: int = 0) -> None:
        self.keys = keys
        self.max_streams_per_key = max_streams_per_key
        self.stats = AuthStats()
        self._streams: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        caller: Caller | None = None
        error: UnauthenticatedError | None = None
        presented = presented_key(handler_call_details.invocation_metadata)
        if self.keys is None:
            caller = Caller(api_key=presented)
        elif presented is None:
            error = UnauthenticatedError(
                "this server needs an API key: send metadata 'authorization: Bearer <key>' "
                "or 'x-api-key: <key>'", reason="API_KEY_MISSING")
        else:
            key = self.keys.match(presented)
            if key is None:
                error = UnauthenticatedError("the API key is not valid (revoked or mistyped)")
            else:
                caller = Caller(api_key=key.key, namespace=key.namespace)
        if error is not None:
            self.stats.reject(error.reason)
            return _replace_behaviour(handler, _refuse(error))
        assert caller is not None
        with self.stats._lock:
            self.stats.accepted += 1
        # Every kind of stream counts: a client-streaming upload holds server resources
        # (a video's frames being received) for as long as the client keeps it open.
        streaming = bool(handler.request_streaming or handler.response_streaming)
        limit_key = caller.api_key if self.keys is not None else None
        return _replace_behaviour(
            handler, lambda behaviour: self._with_caller(
                behaviour, caller, streaming and self.max_streams_per_key > 0, limit_key))

    # The wrapped behaviours run inside the RPC's own task, so the context variable set there
    # is what the servicer (and the threads it starts with asyncio.to_thread) sees.
    def _with_caller(self, behaviour: Callable[..., Any], caller: Caller, limited: bool,
                     limit_key: str | None) -> Callable[..., Any]:
        def enter(context: grpc.aio.ServicerContext) -> str | None:
            remaining = context.time_remaining()
            _current_caller.set(Caller(
                caller.api_key, caller.namespace,
                None if remaining is None else time.monotonic() + remaining))
            if not limited:
                return None
            session = limit_key or f"peer:{peer_address(context.peer())}"
            if self._streams.get(session, 0) >= self.max_streams_per_key:
                self.stats.sessions_refused += 1
                raise ResourceExhaustedError(
                    f"this client already has {self.max_streams_per_key} open sessions "
                    "(streams), the most allowed; close one first",
                    reason="TOO_MANY_SESSIONS", limit=str(self.max_streams_per_key),
                    retry_delay_s=str(SESSION_RETRY_DELAY_S))
            self._streams[session] = self._streams.get(session, 0) + 1
            return session

        def leave(session: str | None) -> None:
            if session is not None:
                left = self._streams.get(session, 1) - 1
                if left > 0:
                    self._streams[session] = left
                else:
                    self._streams.pop(session, None)

        if inspect.isasyncgenfunction(behaviour):
            async def streaming(request: Any, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
                try:
                    session = enter(context)
                except ResourceExhaustedError as exc:
                    await context.abort_with_status(
                        _status(exc))
                    return
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    leave(session)

            return streaming

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                session = enter(context)
            except ResourceExhaustedError as exc:
                await context.abort_with_status(
                    _status(exc))
                return None
            try:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                leave(session)

        return unary


def peer_address(peer: str) -> str:
    """A gRPC peer without its port: ``ipv4:10.0.0.7:54321`` -> ``ipv4:10.0.0.7``,
    ``ipv6:[::1]:54321`` (or gRPC's escaped ``ipv6:%5B::1%5D:54321``) -> ``ipv6:[::1]``;
    anything else (``unix:...``) as it is."""
    scheme, _, rest = unquote(peer).partition(":")
    if scheme == "ipv4":
        return f"ipv4:{rest.rpartition(':')[0] or rest}"
    if scheme == "ipv6" and rest.startswith("["):
        return f"ipv6:{rest.partition(']')[0]}]"
    return peer


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable from outside
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def check_listener_auth(host: str, api_keys_file: str | None,
                        allow_unauthenticated: bool) -> None:
    """Closed by default: without API keys, listen on a loopback address only, unless the
    operator said ``--allow-unauthenticated``. Raises ValueError naming both ways out."""
    if api_keys_file or allow_unauthenticated or is_loopback(host):
        return
    raise ValueError(
        f"refusing to serve without API keys on --host {host} (reachable from other "
        "machines): give --api-keys-file / SAM2_API_KEYS_FILE, listen on 127.0.0.1, or, "
        f"if something in front authenticates callers, say {ALLOW_UNAUTHENTICATED_FLAG}")


def auth_interceptor(api_keys_file: str | None, *, max_streams_per_key: int = 0
                     ) -> AuthInterceptor:
    """The interceptor of a tier's settings: keys from ``api_keys_file`` (None: auth off)."""
    keys = ApiKeyRing(path=api_keys_file) if api_keys_file else None
    if keys is not None:
        logger.info("API keys: %d loaded from %s", len(keys), api_keys_file)
    else:
        logger.warning("no --api-keys-file: every caller is accepted, without a namespace; "
                       "sessions are limited per client address")
    return AuthInterceptor(keys, max_streams_per_key=max_streams_per_key)


def _refuse(error: UnauthenticatedError) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    status = _status(error)

    def make(_behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)

        return refuse

    return make


def _replace_behaviour(handler: grpc.RpcMethodHandler,
                       wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
                       ) -> grpc.RpcMethodHandler:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return handler._replace(**{kind: wrap(behaviour)})
    return handler
