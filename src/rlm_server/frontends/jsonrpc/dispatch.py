"""Dispatch: one parsed JSON-RPC 2.0 message in, its response (if one is owed) out. It only routes.

Each request object (or batch element) is checked against the JSON-RPC 2.0 rules here, because
jsonrpcserver 5.0.9 validates a whole batch with one schema, rejects `"params": null`, accepts
fractional ids and is 4x slower with its default validator. Valid requests then go to
jsonrpcserver, which binds params to the method's signature, calls it and turns its `Result`
into a response.

Two kinds of method: *inline* ones never wait (`status`, the protocol's own introspection) and
are answered on the spot: called here with the checked params, their JSON result or `RpcError`
made into the response here, without a task or jsonrpcserver (whose compose chain, params
binding and validation cost 20 µs of a 25 µs `status`, more than the method itself).
*Task* ones (`infer`, `shutdown`, `$/cancelRequest`), the methods that do work or must keep their
place in line, go through jsonrpcserver in a task of their own per request, started through the
lifecycle's `spawn` (counted in flight), in the order their lines arrived. A batch is no
exception: each of its elements is its own task, started as the batch is read, so a cancel read
after a batch always finds the batch's requests; the batch's answer goes out when its last
element is done.

Whatever arrives, the answer is a JSON-RPC response or nothing: any exception a method raises
becomes an error response here (an `RpcError` as itself, anything else a bare -32603 whose text
stays in our log), and jsonrpcserver's own errors are rewritten so that `data` is always an
object with a `type`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, cast

from rlm_server import Json
from rlm_server.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RpcError,
)
from rlm_server.frontends.wire import RequestId, error_response

if TYPE_CHECKING:
    from jsonrpcserver.result import Result

log = logging.getLogger(__name__)

InlineMethod = Callable[..., Json]
TaskMethod = Callable[..., Awaitable["Result"]]
ContextFactory = Callable[[RequestId], object]
Response = Json | list[Json]
Send = Callable[[Response | None], None]  # None: nothing is owed (a notification)
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], object]  # starts a request's task


def result_response(result: Any, request_id: RequestId) -> Json:
    return {"jsonrpc": "2.0", "result": result, "id": request_id}


def _as_rpc_error(name: str, error: Exception) -> RpcError:
    """An `RpcError` as itself; anything else a bare -32603 whose text stays in our log."""
    if isinstance(error, RpcError):
        return error
    log.error("internal error in %s", name, exc_info=error)
    return InternalError()


def _as_result(name: str, error: Exception) -> Result:
    from jsonrpcserver import Error  # imported by the first task: see _run_task

    error = _as_rpc_error(name, error)
    return Error(error.code, error.message, error.data)


def _with_signature(guarded: Any, method: Callable[..., Any]) -> Any:
    """jsonrpcserver binds params with inspect.signature on every call; a precomputed
    `__signature__` is where inspect stops, which saves a third of an inline call."""
    functools.update_wrapper(guarded, method)
    guarded.__signature__ = inspect.signature(method)
    return guarded


class _Inline:
    """An inline method, called without jsonrpcserver.

    A method that takes `**unknown` names unknown params itself (-32602 with the field), so
    params always bind; for any other, a mismatch is checked before the call and answered as
    jsonrpcserver's binder would be (see `_with_object_data`).
    """

    __slots__ = ("_method", "_name", "_signature")

    def __init__(self, name: str, method: InlineMethod) -> None:
        self._name, self._method = name, method
        signature = inspect.signature(method)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        self._signature = None if takes_any else signature

    def answer(self, context: object, request_id: RequestId, params: Json) -> Json:
        """The response to one request."""
        try:
            if self._signature is not None:
                self._check_params(context, params)
            return result_response(self._method(context, **params), request_id)
        except Exception as error:
            return error_response(_as_rpc_error(self._name, error), request_id)

    def _check_params(self, context: object, params: Json) -> None:
        assert self._signature is not None
        try:
            self._signature.bind(context, **params)
        except TypeError:
            raise InvalidParams("params", "do not match the method's parameters") from None


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


def _with_object_data(response: Json | None) -> Json | None:
    """jsonrpcserver answers a params/signature mismatch with its binder's text as `data`
    (naming our internal arguments); the wire only ever carries `data` objects."""
    if response is None or "error" not in response:
        return response
    if isinstance(response["error"].get("data"), dict):
        return response
    error = InvalidParams("params", "do not match the method's parameters")
    return error_response(error, response.get("id"))


class _Batch:
    """The answers of one batch, sent together once every element is done."""

    def __init__(self, size: int, send: Send) -> None:
        self._responses: list[Json | None] = [None] * size
        self._waiting = size
        self._send = send

    def done(self, index: int, response: Response | None) -> None:
        assert not isinstance(response, list)  # batches do not nest
        self._responses[index] = response
        self._waiting -= 1
        if self._waiting == 0:
            answered = [r for r in self._responses if r is not None]
            if answered:
                self._send(answered)


class Dispatcher:
    """Routes messages to methods. `no_notifications` names methods that only run as requests:
    sent as a notification, nobody could receive or cancel them, so they are not run."""

    def __init__(
        self,
        inline: Mapping[str, InlineMethod],
        tasks: Mapping[str, TaskMethod],
        no_notifications: Collection[str] = (),
    ) -> None:
        self._inline = {name: _Inline(name, m) for name, m in inline.items()}
        self._tasks = {name: _guard_task(name, m) for name, m in tasks.items()}
        self._no_notifications = frozenset(no_notifications)

    def dispatch(
        self, message: Any, make_context: ContextFactory, spawn: Spawn, send: Send
    ) -> None:
        """Answer `message` through `send`, now or from tasks started with `spawn`.

        `make_context` gives each request its jsonrpcserver context from its id.
        """
        if not isinstance(message, list):
            self._route(message, make_context, spawn, send)
            return
        if not message:
            send(error_response(InvalidRequest(reason="empty batch"), None))
            return
        batch = _Batch(len(message), send)
        for index, element in enumerate(message):
            self._route(element, make_context, spawn, functools.partial(batch.done, index))

    def _route(self, obj: Any, make_context: ContextFactory, spawn: Spawn, send: Send) -> None:
        prepared = self._prepare(obj)
        if not isinstance(prepared, _Prepared):
            send(prepared)
        elif prepared.method in self._inline:
            send(self._call_inline(prepared, make_context))
        else:
            spawn(functools.partial(self._run_task, prepared, make_context, send))

    async def _run_task(
        self, prepared: _Prepared, make_context: ContextFactory, send: Send
    ) -> None:
        """jsonrpcserver is imported here, by the first task, not with this module: its import
        (jsonschema with it) costs as much as everything the server imports before `ready`,
        and `status` never needs it. A first `infer` waits for the zygote's import of `rlm`
        anyway."""
        from jsonrpcserver import async_main as async_jsonrpc

        response = await async_jsonrpc.dispatch_to_response(
            "", self._tasks, **prepared.dispatch_options(make_context)
        )
        send(_with_object_data(cast("Json | None", response)))

    def _call_inline(self, prepared: _Prepared, make_context: ContextFactory) -> Json | None:
        """Inline methods only report: sent as a notification, there is nothing to do."""
        if prepared.notification:
            return None
        context = make_context(prepared.request_id)
        return self._inline[prepared.method].answer(context, prepared.request_id, prepared.params)

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
        if notification and method in self._no_notifications:
            log.warning("%s sent as a notification (no id) is not run: nobody could get it", method)
            return None
        return _Prepared(method, request_id, notification, params)


class _Prepared:
    """A request that passed our checks."""

    __slots__ = ("method", "notification", "params", "request_id")

    def __init__(self, method: str, request_id: RequestId, notification: bool, params: Json):
        self.method, self.request_id, self.notification = method, request_id, notification
        self.params = params

    def dispatch_options(self, make_context: ContextFactory) -> dict[str, Any]:
        """jsonrpcserver's dispatch_to_response options: our parsed, checked request as is."""
        from jsonrpcserver.response import to_serializable

        request: Json = {"jsonrpc": "2.0", "method": self.method, "params": self.params}
        if not self.notification:
            request["id"] = self.request_id
        return {
            "context": make_context(self.request_id),
            "deserializer": lambda _: request,
            "validator": lambda parsed: parsed,
            "post_process": to_serializable,
        }
