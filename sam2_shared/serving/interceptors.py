"""The server interceptor that applies the one error table (``sam2_shared.wire.status``)
to every RPC: an exception raised by a servicer becomes a rich ``google.rpc.Status``."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from sam2_shared.wire.status import abort_with_error


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies the table to every RPC: a raised exception becomes a rich status.

    Wraps all four RPC kinds. ``context.abort`` calls inside servicers pass through
    untouched.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_streaming(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_streaming(handler.stream_stream))
        return handler


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(request_or_iterator, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the one place that maps them
            await abort_with_error(context, exc)

    return wrapped


def _wrap_streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A coroutine that writes with context.write (like the health Watch): keep it a
        # coroutine, since grpc.aio refuses writes from inside an async generator.
        return _wrap_unary(behavior)

    async def wrapped(
        request_or_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with_error(context, exc)

    return wrapped
