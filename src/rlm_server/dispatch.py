"""Dispatch: one parsed JSON-RPC 2.0 message in, at most one response line out. It only routes.

Each request object (or batch element) is checked against the JSON-RPC 2.0 rules here, because
jsonrpcserver 5.0.9 validates a whole batch with one schema, rejects `"params": null`, accepts
fractional ids and is 4x slower with its default validator. Valid requests then go to
jsonrpcserver, which binds params to the method's signature, calls it and turns its `Result`
into a response.

Two kinds of method: *inline* ones never wait (`status`) and are answered on the spot by
jsonrpcserver's synchronous dispatcher, which costs no task and no scheduling; *task* ones
(`infer`, `shutdown`, `$/cancelRequest`) get a task of their own per message, and tasks start in
the order their lines arrived. Batch elements run concurrently. Any exception a method raises
becomes an error response here: an `RpcError` as itself, anything else as a bare -32603 whose
text stays in our log.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import anyio
from jsonrpcserver import Error
from jsonrpcserver import async_main as async_jsonrpc
from jsonrpcserver import main as sync_jsonrpc
from jsonrpcserver.response import to_serializable
from jsonrpcserver.result import Result

from rlm_server.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RpcError,
)
from rlm_server.wire import Json, RequestId, encode, error_response

log = logging.getLogger(__name__)

InlineMethod = Callable[..., Result]
TaskMethod = Callable[..., Awaitable[Result]]
ContextFactory = Callable[[RequestId], object]


def _as_result(name: str, error: Exception) -> Result:
    if not isinstance(error, RpcError):
        log.error("internal error in %s", name, exc_info=error)
        error = InternalError()
    return Error(error.code, error.message, error.data)


def _with_signature(guarded: Any, method: Callable[..., Any]) -> Any:
    """jsonrpcserver binds params with inspect.signature on every call; a precomputed
    `__signature__` is where inspect stops, which saves a third of an inline call."""
    functools.update_wrapper(guarded, method)
    guarded.__signature__ = inspect.signature(method)
    return guarded


def _guard_inline(name: str, method: InlineMethod) -> InlineMethod:
    def guarded(*args: Any, **kwargs: Any) -> Result:
        try:
            return method(*args, **kwargs)
        except Exception as error:
            return _as_result(name, error)

    return cast(InlineMethod, _with_signature(guarded, method))


def _guard_task(name: str, method: TaskMethod) -> TaskMethod:
    async def guarded(*args: Any, **kwargs: Any) -> Result:
        try:
            return await method(*args, **kwargs)
        except Exception as error:
            return _as_result(name, error)

    return cast(TaskMethod, _with_signature(guarded, method))


class _Rejected(Exception):
    """A request object broke the JSON-RPC rules; answer `error` under `request_id`."""

    def __init__(self, error: RpcError, request_id: RequestId, notification: bool) -> None:
        self.error, self.request_id, self.notification = error, request_id, notification


def _request_id(obj: Json) -> RequestId:
    request_id = obj.get("id")
    if request_id is None or isinstance(request_id, str):
        return request_id
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        return request_id
    raise _Rejected(InvalidRequest(reason="id must be a string, an integer or null"), None, False)


def _check(obj: Any) -> tuple[RequestId, bool, str, Json]:
    """Apply the JSON-RPC 2.0 request rules: (id, is_notification, method, params)."""
    if not isinstance(obj, dict):
        raise _Rejected(InvalidRequest(reason="a request must be an object"), None, False)
    request_id = _request_id(obj)
    notification = "id" not in obj
    if obj.get("jsonrpc") != "2.0":
        raise _Rejected(InvalidRequest(reason='jsonrpc must be "2.0"'), request_id, False)
    method = obj.get("method")
    if not isinstance(method, str):
        raise _Rejected(InvalidRequest(reason="method must be a string"), request_id, False)
    params = obj.get("params")
    if params is None:
        return request_id, notification, method, {}
    if isinstance(params, list):
        error = InvalidParams("params", "params are passed by name, as an object")
        raise _Rejected(error, request_id, notification)
    if not isinstance(params, dict):
        raise _Rejected(InvalidRequest(reason="params must be an object"), request_id, False)
    return request_id, notification, method, params


class Dispatcher:
    def __init__(self, inline: Mapping[str, InlineMethod], tasks: Mapping[str, TaskMethod]) -> None:
        self._inline = {name: _guard_inline(name, m) for name, m in inline.items()}
        self._tasks = {name: _guard_task(name, m) for name, m in tasks.items()}

    def is_inline(self, message: Any) -> bool:
        """Whether `handle_inline` can answer this message without waiting."""
        return isinstance(message, dict) and message.get("method") not in self._tasks

    def handle_inline(self, message: Json, make_context: ContextFactory) -> bytes | None:
        prepared = self._prepare(message)
        if isinstance(prepared, _Prepared):
            prepared = self._call_inline(prepared, make_context)
        return None if prepared is None else encode(prepared)

    def _call_inline(self, prepared: _Prepared, make_context: ContextFactory) -> Json | None:
        response = sync_jsonrpc.dispatch_to_response(
            "", self._inline, **prepared.dispatch_options(make_context)
        )
        return cast("Json | None", response)

    async def handle(self, message: Any, make_context: ContextFactory) -> bytes | None:
        """The response line for one parsed message, or None when nothing is owed.

        `make_context` gives each request its jsonrpcserver context from its id.
        """
        if not isinstance(message, list):
            response = await self._handle_one(message, make_context)
            return None if response is None else encode(response)
        if not message:
            return encode(error_response(InvalidRequest(reason="empty batch"), None))
        results: list[Json | None] = [None] * len(message)

        async def run(index: int, element: Any) -> None:
            results[index] = await self._handle_one(element, make_context)

        async with anyio.create_task_group() as group:
            for index, element in enumerate(message):
                group.start_soon(run, index, element)
        responses = [r for r in results if r is not None]
        return encode(responses) if responses else None

    def _prepare(self, obj: Any) -> _Prepared | Json | None:
        """A request ready for jsonrpcserver, or the error response (None: owe nothing)."""
        try:
            request_id, notification, method, params = _check(obj)
        except _Rejected as rejected:
            if rejected.notification:
                return None
            return error_response(rejected.error, rejected.request_id)
        if method not in self._inline and method not in self._tasks:
            return (
                None if notification else error_response(MethodNotFound(method=method), request_id)
            )
        request: Json = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notification:
            request["id"] = request_id
        return _Prepared(request, request_id)

    async def _handle_one(self, obj: Any, make_context: ContextFactory) -> Json | None:
        prepared = self._prepare(obj)
        if not isinstance(prepared, _Prepared):
            return prepared
        if prepared.request["method"] in self._inline:
            return self._call_inline(prepared, make_context)
        response = await async_jsonrpc.dispatch_to_response(
            "", self._tasks, **prepared.dispatch_options(make_context)
        )
        return cast("Json | None", response)


class _Prepared:
    """A request that passed our checks, ready for jsonrpcserver."""

    __slots__ = ("request", "request_id")

    def __init__(self, request: Json, request_id: RequestId) -> None:
        self.request, self.request_id = request, request_id

    def dispatch_options(self, make_context: ContextFactory) -> dict[str, Any]:
        """jsonrpcserver's dispatch_to_response options: our parsed, checked request as is."""
        return {
            "context": make_context(self.request_id),
            "deserializer": lambda _: self.request,
            "validator": lambda parsed: parsed,
            "post_process": to_serializable,
        }
