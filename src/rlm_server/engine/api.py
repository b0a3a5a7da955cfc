"""The engine's API: what a front end hands the engine and what it gets back. No wire in it.

A front end decodes its own wire, validates what it reads into these types (naming bad fields
as its wire spells them), takes a `Ticket` for each request when it reads it, and calls
`Engine.infer(request, ticket, observer)`. The engine reports progress to the observer as
`Event`s, returns an `InferResult` or raises one of the classes in errors.py; the front end
encodes either. Where the engine itself refuses a value (an endpoint not allowed, a model
without a price, a stored context or session that does not exist), `InvalidParams.data.field`
is the attribute path in these types (`options.base_url`, `context_id`, `session_id`), which
each front end maps onto its own names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import anyio

from rlm_server import Json
from rlm_server.engine.broker import Budget
from rlm_server.engine.tools import ToolSpec

Prompt = str | list[dict[str, str]]  # the long input: a text, or messages
ANSWER_REPAIRS = 2  # the default of InferOptions.answer_repairs
# InferOptions.subcall_errors: a model call that fails after the broker's retries ends its
# request ("fail"), or reaches model code as the library's error string and is counted ("model").
SUBCALL_ERRORS = ("fail", "model")


class InferOptions(NamedTuple):
    """Settings for one request only. None means: use the configuration."""

    backend: str | None = None
    model: str | None = None
    sub_model: str | None = None
    base_url: str | None = None
    max_iterations: int | None = None
    max_depth: int | None = None
    timeout_s: float | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    trajectory: bool = False  # the result carries the trajectory
    budget: Budget = Budget()  # frozen: one default serves all
    subcall_errors: str = SUBCALL_ERRORS[0]
    tool_timeout_s: float | None = None  # None: DEFAULT_TOOL_TIMEOUT_S
    answer_schema: Json | None = None  # a checked JSON Schema: the answer must match it
    answer_repairs: int = ANSWER_REPAIRS  # invalid answers the model may still fix


class InferRequest(NamedTuple):
    """One completion. Its input is `context` (the prompt), a stored context (`context_id`),
    or, for a turn of a session (`session_id`), the session's REPL and an optional `context`."""

    context: Prompt | None
    query: str | None = None
    options: InferOptions = InferOptions()
    context_id: str | None = None
    session_id: str | None = None
    tools: tuple[ToolSpec, ...] = ()  # host tools model code may call (a session has its own)
    label: str | None = None  # how --log-dir names the request (the front end's id, as text)

    @property
    def size(self) -> int:
        """What the request holds while it waits: the length of its long input."""
        if self.context is None:
            return 0
        if isinstance(self.context, str):
            return len(self.context)
        return sum(len(message["content"]) for message in self.context)


EventKind = Literal["started", "iteration", "subcall", "retry"]


class Event(NamedTuple):
    """Something a running request did; `elapsed_ms` counts from its admission."""

    kind: EventKind
    elapsed_ms: float
    iteration: int | None = None
    max_iterations: int | None = None
    message: str | None = None


Observer = Callable[[Event], None]


class Metadata(NamedTuple):
    """How a request ran."""

    backend: str
    model: str
    iterations: int  # root-model iterations that finished (0 for a stub answer)
    depth: int
    elapsed_ms: float  # from admission to the answer, queue included
    attempts: int  # 1 plus the model calls retried (0 for a stub answer)
    failed_calls: int = 0  # model calls that failed and reached model code ("model")


class StructuredAnswer(NamedTuple):
    """An answer checked against `options.answer_schema`."""

    value: Any  # the JSON value (null included)


class InferResult(NamedTuple):
    text: str  # with an answer schema, the compact JSON of the answer's value
    stub: bool
    usage: Json  # the broker's count over the whole call tree: calls, tokens, cost, per model
    metadata: Metadata
    trajectory: list[Json] | None  # when options.trajectory asked for it and the request ran
    answer: StructuredAnswer | None = None  # with options.answer_schema, when the request ran


class Status(NamedTuple):
    """What the engine is and what it is doing now."""

    configuration: Json  # describe(), with the reason the backend is unavailable and the limits
    in_flight: int  # requests holding a slot
    queued: int  # requests waiting for one
    uptime_s: float
    metrics: Json  # outcome counters, latencies, and the broker's totals (calls, tokens, cost)
    stored_contexts: int
    stored_bytes: int
    sessions: int
    executor: Json | None = None  # what the executor reports (a cluster's nodes), if anything


class StoreReport(NamedTuple):
    """The stored contexts that questions may be asked about, and the store's bytes."""

    contexts: list[StoredContextInfo]
    bytes_total: int
    bytes_limit: int


class StoredContextInfo(NamedTuple):
    id: str
    bytes: int
    sha256: str | None  # once sealed
    sealed: bool
    uses: int  # requests and sessions holding it
    last_used_ms: int  # epoch milliseconds


class Ticket:
    """One request's place in line and its cancellation, held by the front end.

    Taken (`Engine.ticket`) when the request is read, before it is decoded: a stop admits the
    tickets taken before it and refuses the rest (ShuttingDown, raised by `infer`), whenever
    they reach the engine. `cancel` ends the request (RequestCancelled), also before it starts.
    """

    __slots__ = ("_scopes", "cancelled", "serial")

    def __init__(self, serial: int) -> None:
        self.serial = serial  # the order of reading: what admission goes by
        self.cancelled = False
        self._scopes: list[anyio.CancelScope] = []

    def sibling(self) -> Ticket:
        """A ticket for another request read with this one (in the same batch): admitted
        alike, cancelled apart."""
        return Ticket(self.serial)

    def cancel(self) -> None:
        self.cancelled = True
        for scope in self._scopes:
            scope.cancel()

    def scope(self) -> anyio.CancelScope:
        """A cancel scope for the request's work, cancelled with the ticket."""
        scope = anyio.CancelScope()
        if self.cancelled:
            scope.cancel()
        self._scopes.append(scope)
        return scope

    def release(self, scope: anyio.CancelScope) -> None:
        self._scopes.remove(scope)
