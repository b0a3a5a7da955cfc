"""Dispatch: one line of JSON-RPC 2.0 in, at most one line out. It only routes.

orjson parses the line; each request object (or batch element) is checked against the JSON-RPC
2.0 rules here, because jsonrpcserver 5.0.9 validates a whole batch with one schema, rejects
`"params": null`, accepts fractional ids and is 4x slower with its default validator. Valid
requests then go to jsonrpcserver, which binds params to the method's signature, calls it, and
turns its `Result` (or a raised `RpcError`) into a response. Batch elements run concurrently.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import anyio
import orjson
from jsonrpcserver.async_main import dispatch_to_response
from jsonrpcserver.exceptions import JsonRpcError
from jsonrpcserver.response import to_serializable

from rlm_server.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
)

log = logging.getLogger(__name__)

RequestId = str | int | None
Json = dict[str, Any]
Method = Callable[..., Awaitable[Any]]
ContextFactory = Callable[[RequestId], object]


class _Rejected(Exception):
    """A request object broke the JSON-RPC rules; answer `error` under `request_id`."""

    def __init__(self, error: RpcError, request_id: RequestId, notification: bool) -> None:
        self.error, self.request_id, self.notification = error, request_id, notification


def decode(line: bytes) -> Any:
    """Parse one line; raise ParseError (-32700) if it is not JSON (or nests over 1024 deep)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ParseError() from None


def error_response(error: RpcError, request_id: RequestId) -> Json:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_wire()}


def encode(message: Json | list[Json]) -> bytes:
    """One compact JSON line; lone surrogates (which orjson refuses) become U+FFFD."""
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        return orjson.dumps(_replace_surrogates(message))


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _replace_surrogates(v) for k, v in value.items()}
    return value


def _guard(name: str, method: Method) -> Method:
    """Unexpected exceptions become a bare -32603: their text stays in our log, off the wire."""

    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except JsonRpcError:
            raise
        except Exception:
            log.exception("internal error in %s", name)
            raise InternalError() from None

    return guarded


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
    def __init__(self, methods: Mapping[str, Method]) -> None:
        self._methods = {name: _guard(name, method) for name, method in methods.items()}

    async def handle(self, message: Any, make_context: ContextFactory) -> bytes | None:
        """The response line for one parsed message, or None when nothing is owed.

        `make_context` gives each request its jsonrpcserver context from its id.
        """
        if not isinstance(message, list):
            response = await self.handle_one(message, make_context)
            return None if response is None else encode(response)
        if not message:
            return encode(error_response(InvalidRequest(reason="empty batch"), None))
        responses = await self._handle_batch(message, make_context)
        return encode(responses) if responses else None

    async def _handle_batch(self, batch: list[Any], make_context: ContextFactory) -> list[Json]:
        results: list[Json | None] = [None] * len(batch)

        async def run(index: int, element: Any) -> None:
            results[index] = await self.handle_one(element, make_context)

        async with anyio.create_task_group() as group:
            for index, element in enumerate(batch):
                group.start_soon(run, index, element)
        return [r for r in results if r is not None]

    async def handle_one(self, obj: Any, make_context: ContextFactory) -> Json | None:
        try:
            request_id, notification, method, params = _check(obj)
        except _Rejected as rejected:
            if rejected.notification:
                return None
            return error_response(rejected.error, rejected.request_id)
        if method not in self._methods:
            return (
                None if notification else error_response(MethodNotFound(method=method), request_id)
            )
        request: Json = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notification:
            request["id"] = request_id
        response = await dispatch_to_response(
            "",
            self._methods,
            context=make_context(request_id),
            deserializer=lambda _: request,
            validator=lambda parsed: parsed,
            post_process=to_serializable,
        )
        return cast(Json | None, response)
