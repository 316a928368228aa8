"""Client retries with exponential backoff and full jitter, for idempotent calls only.

Retried: ``UNAVAILABLE`` (server restarting, store down, connection lost) and
``RESOURCE_EXHAUSTED`` (queue full, too many sessions). Never retried: everything else
(a bad request stays bad; ``DEADLINE_EXCEEDED`` means the caller's time is up).

The wait before attempt ``n + 1`` is ``uniform(0, min(max_backoff, initial * multiplier**n))``
("full jitter", so that a fleet of clients does not retry in lock-step), but never less than
the server's hint: ``google.rpc.RetryInfo.retry_delay`` in the rich status, else the
``retry_delay_s`` entry of the ``ErrorInfo`` metadata (both are set by
``sam2_shared.wire.status``). No attempt starts when the hint would overrun the overall deadline.

The idempotent calls of this API: ``EmbedImages`` (content-addressed: re-embedding stores the
same entry), ``Segment`` (no server state but a fresh logits handle), ``GetEmbedding``,
``PutEmbedding`` (checksummed, same key). ``SegmentStream`` is a session and is not retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

ResultT = TypeVar("ResultT")

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    Attributes:
        max_attempts: attempts in all (1 = no retry).
        initial_backoff_s: cap of the first wait.
        max_backoff_s: cap of any wait, hints included.
        multiplier: growth of the cap per attempt.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff_s(self, attempt: int, hint_s: float | None, rng: random.Random) -> float:
        """Wait after failed attempt number ``attempt`` (0-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)
        wait = rng.uniform(0.0, cap)
        if hint_s is not None:
            wait = max(wait, min(hint_s, self.max_backoff_s))
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_POLICY = RetryPolicy()


def retry_hint_s(error: grpc.RpcError) -> float | None:
    """The server's retry delay for a failed call, from ``RetryInfo`` or ErrorInfo metadata."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            try:
                return float(info.metadata["retry_delay_s"])
            except (KeyError, ValueError):
                return None
    return None


def is_retryable(error: grpc.RpcError) -> bool:
    code = error.code() if hasattr(error, "code") else None  # type: ignore[attr-defined]
    return code in RETRYABLE_CODES


def _next_wait(policy: RetryPolicy, attempt: int, error: grpc.RpcError,
               deadline: float | None, rng: random.Random) -> float | None:
    """Seconds to wait before the next attempt, or None to give up with ``error``."""
    if attempt + 1 >= policy.max_attempts or not is_retryable(error):
        return None
    wait = policy.backoff_s(attempt, retry_hint_s(error), rng)
    if deadline is not None and time.monotonic() + wait >= deadline:
        return None
    return wait


def call_with_retry(call: Callable[[float | None], ResultT], policy: RetryPolicy = DEFAULT_POLICY,
                    *, timeout_s: float | None = None, rng: random.Random | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> ResultT:
    """Run ``call(remaining_timeout_s)`` until it succeeds or may not be retried.

    ``timeout_s`` bounds all attempts and waits together; each attempt gets what is left.
    The last ``grpc.RpcError`` is raised as it is.
    """
    rng = rng or random.Random()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    attempt = 0
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return call(remaining)
        except grpc.RpcError as error:
            wait = _next_wait(policy, attempt, error, deadline, rng)
            if wait is None:
                raise
        sleep(wait)
        attempt += 1


async def async_call_with_retry(call: Callable[[float | None], Awaitable[ResultT]],
                                policy: RetryPolicy = DEFAULT_POLICY, *,
                                timeout_s: float | None = None,
                                rng: random.Random | None = None) -> ResultT:
    """``call_with_retry`` for ``grpc.aio`` calls."""
    rng = rng or random.Random()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    attempt = 0
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await call(remaining)
        except grpc.RpcError as error:
            wait = _next_wait(policy, attempt, error, deadline, rng)
            if wait is None:
                raise
        await asyncio.sleep(wait)
        attempt += 1


__all__ = [
    "DEFAULT_POLICY",
    "NO_RETRY",
    "RETRYABLE_CODES",
    "RetryPolicy",
    "async_call_with_retry",
    "call_with_retry",
    "is_retryable",
    "retry_hint_s",
]
