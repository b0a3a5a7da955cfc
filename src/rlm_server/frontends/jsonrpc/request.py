"""What a method knows about the request it serves, and about the server around it."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from rlm_server.engine.engine import Engine
from rlm_server.engine.tools import ToolHost
from rlm_server.frontends.jsonrpc.wire import RequestId

Json = dict[str, Any]


class Session(Protocol):
    """What methods need from the server around them."""

    engine: Engine

    def notify(self, method: str, params: Json) -> None: ...

    async def shutdown(self, grace_s: float | None, sequence: int) -> None: ...

    def cancel(self, request_id: RequestId) -> None: ...

    def tool_host(self, request_id: RequestId) -> ToolHost: ...


class RequestContext(NamedTuple):
    """jsonrpcserver's `context` argument: which request this is, and the session."""

    request_id: RequestId
    sequence: int  # which input line carried the request: shutdown admits those before it
    session: Session
