"""One exception class per JSON-RPC error code of the wire contract.

Like pygls' exceptions: an error code, its message and its stable `data.type` are chosen here and
nowhere else. Methods raise them; the dispatcher turns them into error responses. `message` is
always a fixed string: causes go in `data`, and no exception text from model code or from our
internals ever reaches the wire. Nothing here imports jsonrpcserver, so the engine and the
transport load without it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RpcError(Exception):
    CODE: ClassVar[int] = -32603
    MESSAGE: ClassVar[str] = "Internal error"
    TYPE: ClassVar[str] = "internal_error"

    def __init__(self, **data: Any) -> None:
        super().__init__(self.MESSAGE)
        self.code = self.CODE
        self.message = self.MESSAGE
        self.data: dict[str, Any] = {"type": self.TYPE, **data}

    def to_wire(self) -> dict[str, Any]:
        """The JSON-RPC `error` member."""
        return {"code": self.code, "message": self.message, "data": self.data}


class ParseError(RpcError):
    CODE = -32700
    MESSAGE = "Parse error"
    TYPE = "parse_error"


class InvalidRequest(RpcError):
    CODE = -32600
    MESSAGE = "Invalid request"
    TYPE = "invalid_request"


class LineTooLong(InvalidRequest):
    MESSAGE = "Message too large"
    TYPE = "line_too_long"


class MethodNotFound(RpcError):
    CODE = -32601
    MESSAGE = "Method not found"
    TYPE = "method_not_found"


class InvalidParams(RpcError):
    CODE = -32602
    MESSAGE = "Invalid params"
    TYPE = "invalid_params"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field=field, reason=reason)


class InternalError(RpcError):
    pass


class WorkerCrashed(InternalError):
    MESSAGE = "Worker crashed"
    TYPE = "worker_crashed"


class AnswerTooLarge(InternalError):
    """A worker's answer is longer than --max-answer-bytes: it is not passed on."""

    MESSAGE = "Answer too large"
    TYPE = "answer_too_large"


class BackendError(RpcError):
    CODE = -32000
    MESSAGE = "LLM backend failed"
    TYPE = "backend_error"


class ReplayMiss(BackendError):
    """--replay has no recorded answer for a model call; it never calls a provider instead."""

    MESSAGE = "No recorded answer for a model call"
    TYPE = "replay_miss"


class DeadlineExceeded(RpcError):
    CODE = -32001
    MESSAGE = "Deadline exceeded"
    TYPE = "deadline_exceeded"


class ShuttingDown(RpcError):
    CODE = -32002
    MESSAGE = "Server shutting down"
    TYPE = "shutting_down"


class QueueFull(ShuttingDown):
    MESSAGE = "Server busy: admission queue full"
    TYPE = "queue_full"


class BackendUnavailable(RpcError):
    CODE = -32003
    MESSAGE = "LLM backend unavailable"
    TYPE = "backend_unavailable"


class BudgetExceeded(RpcError):
    CODE = -32004
    MESSAGE = "Budget exceeded"
    TYPE = "budget_exceeded"


class ContextStoreFull(RpcError):
    """A context would not fit in --context-store-bytes even after evicting every stored context
    that no request or session uses. Not -32002 queue_full, which clients retry on their own:
    this one only clears when the client drops something, or never (a context over the limit)."""

    CODE = -32005
    MESSAGE = "Context store full"
    TYPE = "context_store_full"


class InvalidAnswer(RpcError):
    """The root model's answer did not match `options.answer_schema`, and its repairs are spent:
    `validation_error` is the last failure, bounded (the worker words it)."""

    CODE = -32006
    MESSAGE = "Answer does not match the schema"
    TYPE = "invalid_answer"

    def __init__(self, validation_error: str) -> None:
        super().__init__(validation_error=validation_error)


class RequestCancelled(RpcError):
    CODE = -32800
    MESSAGE = "Request cancelled"
    TYPE = "cancelled"


def first_of(group: BaseExceptionGroup[Any], kind: type[RpcError]) -> RpcError | None:
    """The first `kind` in a task group's exception group, however deeply nested. Re-raising
    a leaf inside `except*` can leave it wrapped in a group of its own (when the leaf is
    nested), so callers raise what this returns after the `except*` block instead."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found = first_of(error, kind)
            if found is not None:
                return found
        elif isinstance(error, kind):
            return error
    return None
