"""The one shared RLM engine: admission, per-request options, deadlines, cancellation, metrics
and stub mode, behind the API of api.py that every front end calls. The work itself happens in
worker processes (executors/local/pool.py), and every model call a worker makes is made by the
broker (broker.py), which retries each call, counts it and charges it to the request's account.

An infer's long input is its `prompt`, a context stored with `context/load` (store.py: the
request holds it while it runs, and its worker inherits it from the zygote), or, for a turn of a
session (sessions.py), the session's REPL with an optional new input; a turn runs on the
session's own worker, after the session's earlier turns.

Per-request options are merged into a fresh `RunSpec` for that request only; the shared `Config`
is frozen and is what `status` reports. A RunSpec has two halves: what the worker is told (model
names and loop settings, never a key or an endpoint) and the `Route` that only the broker sees.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import orjson

from rlm_server import PROTOCOL_VERSION, SERVER_NAME, Json, __version__
from rlm_server.config import BACKEND_INFO, Config, api_key, backend_unavailable_reason
from rlm_server.engine.api import (
    Event,
    EventKind,
    InferOptions,
    InferRequest,
    InferResult,
    Metadata,
    Observer,
    Status,
    StoredContextInfo,
    StoreReport,
    StructuredAnswer,
    Ticket,
)
from rlm_server.engine.broker import Account, Broker, Budget, OnRetry, RetryPolicy, Route
from rlm_server.engine.metrics import Metrics, Outcome
from rlm_server.engine.sessions import Session, Sessions
from rlm_server.engine.store import ContextStore, StoredContext
from rlm_server.engine.tools import DEFAULT_TOOL_TIMEOUT_S, ToolGate, ToolHost, ToolSpec
from rlm_server.errors import (
    AnswerTooLarge,
    BackendError,
    BackendUnavailable,
    BudgetExceeded,
    DeadlineExceeded,
    InvalidAnswer,
    InvalidParams,
    QueueFull,
    RequestCancelled,
    RpcError,
    ShuttingDown,
    first_of,
)
from rlm_server.executors.base import Executor, make_executor
from rlm_server.executors.local.pool import CallHandler, Job, JobInput, ToolHandler
from rlm_server.worker import frames
from rlm_server.worker.trajectory import trimmed

STUB_TEXT = "[RLM STUB] RLM backend not available"


def _endpoint(config: Config, options: InferOptions, same_backend: bool) -> str:
    """The base URL a request may use. A configured key goes only to the configured endpoint
    (or one allowed with --allow-base-url): any other URL a caller names is refused, rather
    than sent the key, or sent the context without one."""
    configured = config.base_url if same_backend else ""
    wanted = options.base_url
    if not wanted or wanted.rstrip("/") == configured.rstrip("/"):
        return configured
    if wanted.rstrip("/") in config.allow_base_url:
        return wanted
    raise InvalidParams(
        "options.base_url", "not an allowed endpoint (the server allows it with --allow-base-url)"
    )


def _allowed_models(config: Config, models: tuple[str, ...], same_backend: bool) -> frozenset[str]:
    """The models a request's model code may name: the request's own, the configured root and
    sub models, and --allow-model. A name from model code is steered by content nobody vetted,
    and every new one would cost a provider call at the least."""
    configured = (config.effective_model, config.sub_model) if same_backend else ()
    return frozenset(name for name in (*models, *configured, *config.allow_model) if name)


class RunSpec(NamedTuple):
    """Everything one request runs with: the configuration with its options applied."""

    backend: str
    model: str
    max_iterations: int
    max_depth: int
    timeout_s: float
    unavailable_reason: str | None
    rlm_kwargs: Json  # what the worker is told: model names and loop settings only
    route: Route  # what the broker may call for it, keys included: never leaves the server
    budget: Budget

    @classmethod
    def resolve(cls, config: Config, options: InferOptions, environ: Mapping[str, str]) -> RunSpec:
        backend = options.backend or config.backend
        same_backend = backend == config.backend
        info = BACKEND_INFO[backend]
        base_url = _endpoint(config, options, same_backend)
        model = options.model or (config.model if same_backend else "") or info.default_model
        sub_model = options.sub_model or (config.sub_model if same_backend else "")
        client: Json = {"model_name": model}
        if base_url or info.default_base_url:
            client["base_url"] = base_url or info.default_base_url
        key = api_key(backend, environ)
        if key:
            client["api_key"] = key
        elif info.openai_compatible and base_url:
            client["api_key"] = "not-needed"  # local servers ignore it; the SDK wants one
        sampling = {"temperature": options.temperature, "max_tokens": options.max_tokens}
        if any(v is not None for v in sampling.values()):
            client["sampling_args"] = {k: v for k, v in sampling.items() if v is not None}
        max_iterations = options.max_iterations or config.max_iterations
        max_depth = options.max_depth or config.max_depth
        rlm_kwargs: Json = {
            "backend": info.library_backend,
            "backend_kwargs": {"model_name": model},
            "environment": config.environment,
            "max_iterations": max_iterations,
            "max_depth": max_depth,
            "verbose": config.verbose,
        }
        models = (model, sub_model) if sub_model else (model,)
        if sub_model:
            rlm_kwargs["other_backends"] = [info.library_backend]
            rlm_kwargs["other_backend_kwargs"] = [{"model_name": sub_model}]
        budget = options.budget.within(Budget(max_cost_usd=config.max_cost_usd))
        return cls(
            backend=backend,
            model=model,
            max_iterations=max_iterations,
            max_depth=max_depth,
            timeout_s=options.timeout_s or config.timeout_s,
            unavailable_reason=backend_unavailable_reason(
                backend, base_url, environ, replaying=config.replay is not None
            ),
            rlm_kwargs=rlm_kwargs,
            route=Route(
                info.library_backend,
                client,
                models,
                _allowed_models(config, models, same_backend),
                info.price_provider,
            ),
            budget=budget,
        )


class _Progress:
    """Reports a request's events to its observer, if it has one."""

    def __init__(self, observer: Observer | None, started: float, max_iterations: int) -> None:
        self._observer, self._started = observer, started
        self._max_iterations = max_iterations

    @property
    def wanted(self) -> bool:
        return self._observer is not None

    def __call__(self, kind: EventKind, **fields: Any) -> None:
        if self._observer is None:
            return
        elapsed_ms = round((time.monotonic() - self._started) * 1000, 3)
        self._observer(Event(kind, elapsed_ms, **fields))

    def forward(self, frame: Json) -> None:
        """An event frame from the worker (the pool kept its known fields only), its iteration
        never past the request's max_iterations, which the server states, not the worker."""
        fields = {k: v for k, v in frame.items() if k != "event"}
        if "iteration" in fields:
            fields["iteration"] = min(fields["iteration"], self._max_iterations)
        if "max_iterations" in fields:
            fields["max_iterations"] = self._max_iterations
        self(frame["event"], **fields)


_OUTCOMES = {
    DeadlineExceeded: Outcome.TIMED_OUT,
    RequestCancelled: Outcome.CANCELLED,
}


def _iterations(spec: RunSpec, account: Account, result: Json) -> int:
    """The iterations the worker claims, never more than the server saw: each one is a call
    to the root model, and there are at most max_iterations."""
    claimed: int = result["iterations"]
    return min(claimed, account.calls_to(spec.model), spec.max_iterations)


def _checked_answer(schema: Json | None, result: Json) -> StructuredAnswer | None:
    """The worker's structured answer, checked once more here: the worker runs model code, so
    without a schema any value it sends is dropped, and with one the value must match."""
    if schema is None:
        return None
    from rlm_server.worker.answers import AnswerCheck  # jsonschema: only with a schema

    if "value" not in result:
        raise InvalidAnswer("the worker returned no value")
    problem = AnswerCheck(schema, repairs=0).error_of(result["value"])
    if problem is not None:
        raise InvalidAnswer(problem)
    return StructuredAnswer(result["value"])


def _unreported(message: str) -> None:
    """A retry note nobody asked to hear."""


def _failure(account: Account, failure: Json | None = None) -> RpcError:
    """The error for a call or a completion that ended without an answer: an answer the schema
    refused to the end (the worker's `failure` frame says so), else what the broker saw."""
    if failure is not None and failure["kind"] == frames.INVALID_ANSWER:
        return InvalidAnswer(str(failure.get("validation_error"))[: frames.VALIDATION_ERROR_CHARS])
    if account.exceeded is not None:
        return account.exceeded
    if account.failure is None:  # the completion itself failed (no model call did)
        return BackendError(retryable=False, attempts=1 + account.retries)
    return account.failure.error()


@dataclass
class _Running:
    """One admitted request: what it runs with, and what it has done so far."""

    spec: RunSpec
    request: InferRequest
    job_input: JobInput  # the prompt, or a stored context's file
    session: Session | None
    progress: _Progress
    started: float
    account: Account
    host: ToolHost | None  # the front end that runs this request's host tools
    label: str  # names the request in our log (its worker's output)
    steps: list[Json] = field(default_factory=list)  # the trajectory, as far as it got
    failed_calls: int = 0  # model calls that failed and reached model code ("model")
    ending: RpcError | None = None  # a refused or failed call that ends the request

    @property
    def tools(self) -> tuple[ToolSpec, ...]:
        """The request's host tools: its own, or its session's."""
        return self.request.tools if self.session is None else self.session.tools


class Engine:
    """What every front end calls: `infer`, stored contexts, sessions, `status`, and the
    admission and cancellation that stopping needs. Everything else stays inside."""

    def __init__(self, config: Config, environ: Mapping[str, str]) -> None:
        self.config = config
        self._metrics = Metrics()
        self._environ = environ
        self._default = RunSpec.resolve(config, InferOptions(), environ)
        self._workers: Executor = make_executor(config, environ)
        self._contexts = ContextStore(
            config.context_store_bytes, lambda: self._workers.root, self._workers.forget
        )
        self._sessions = Sessions(config.session_idle_s, self._workers, self._contexts)
        self._broker = Broker(
            RetryPolicy(config.max_retries, config.retry_delay_ms, config.retry_max_delay_ms),
            lifetime=Budget(max_cost_usd=config.spend_limit_usd),
            record=config.record,
            replay=config.replay,
        )
        self._slots = anyio.CapacityLimiter(config.max_concurrency)
        self._queued = 0
        self._queued_bytes = 0
        self._tickets = 0  # tickets taken so far: the last one's serial
        self._admit_through = math.inf  # the last ticket admitted
        self._cancelling_all = False
        self._running: set[Ticket] = set()
        self._started_at = time.monotonic()
        self._static_status = self._status_of_configuration()

    # -- start and stop -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the zygote now, so its import of `rlm` overlaps with the first request."""
        self._workers.start()

    async def run_background(self) -> None:
        """What the engine does on its own (idle sessions expire); runs until cancelled."""
        await self._sessions.expire_idle()

    async def release_models(self) -> None:
        """Close the provider clients, for an engine that ends inside a running program
        (`rlm-server eval`) rather than at the server's exit."""
        await self._broker.close_clients()

    def close(self) -> None:
        """At exit: every session's worker, the zygote and the private directory go now."""
        self._sessions.kill_all()
        self._workers.stop()

    # -- what status and ready report ------------------------------------------------------

    @property
    def unavailable_reason(self) -> str | None:
        return self._default.unavailable_reason

    @property
    def stub(self) -> bool:
        return self.unavailable_reason is not None and not self.config.strict

    def describe(self) -> Json:
        """Who we are and what we run: the part that `ready` and `status` share."""
        return {
            "server": SERVER_NAME,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "available": self.unavailable_reason is None,
            "stub": self.stub,
            "backend": self.config.backend,
            "model": self.config.effective_model,
            "environment": self.config.environment,
            "sandbox": self.config.sandbox,
            "protections": list(self.config.protections),
        }

    def status(self) -> Status:
        return Status(
            configuration=self._static_status,
            in_flight=self._slots.borrowed_tokens,
            queued=self._queued,
            uptime_s=round(time.monotonic() - self._started_at, 3),
            metrics={**self._metrics.snapshot(), **self._broker.ledger.totals()},
            stored_contexts=self._contexts.sealed_count,
            stored_bytes=self._contexts.bytes_total,
            sessions=len(self._sessions),
            executor=self._workers.status(),
        )

    def _status_of_configuration(self) -> Json:
        """The part of `status` that never changes: computed once."""
        status = self.describe()
        if self.unavailable_reason is not None:
            status["reason"] = self.unavailable_reason
        status["max_iterations"] = self.config.max_iterations
        status["max_depth"] = self.config.max_depth
        status["max_concurrency"] = self.config.max_concurrency
        status["max_calls_in_flight"] = self.config.max_calls_in_flight
        status["max_answer_bytes"] = self.config.max_answer_bytes
        return status

    # -- stored contexts and sessions ---------------------------------------------------------

    async def load_text(self, text: str) -> StoredContextInfo:
        return _info(await self._contexts.load_text(text))

    async def load_list(self, value: list[object]) -> StoredContextInfo:
        return _info(await self._contexts.load_json(value))

    async def load_chunk(
        self, context_id: str | None, chunk: str, final: bool
    ) -> StoredContextInfo:
        """A new chunked load without `context_id`, else the next chunk of that one."""
        return _info(await self._contexts.append(context_id, chunk, final))

    async def drop_context(self, context_id: str) -> bool:
        return await self._contexts.drop(context_id)

    def stored_contexts(self) -> StoreReport:
        contexts = [_info(entry) for entry in self._contexts.sealed()]
        return StoreReport(contexts, self._contexts.bytes_total, self._contexts.limit_bytes)

    def open_session(self, context_id: str | None, tools: tuple[ToolSpec, ...] = ()) -> str:
        """A new session (on a stored context, with host tools every turn may call)."""
        self.check_tools(tools)
        return self._sessions.open(context_id, tools).id

    async def close_session(self, session_id: str) -> bool:
        return await self._sessions.close(session_id)

    # -- infer ------------------------------------------------------------------------------

    def ticket(self) -> Ticket:
        """A request's ticket, taken when it is read (see api.Ticket)."""
        self._tickets += 1
        return Ticket(self._tickets)

    async def infer(
        self,
        request: InferRequest,
        ticket: Ticket,
        observer: Observer | None = None,
        host: ToolHost | None = None,
    ) -> InferResult:
        """Run one request; its events go to `observer` (None: nobody wants them), its host
        tools to `host`, the front end that runs them (None: it declares none)."""
        self._admit_or_refuse(ticket, request.size)
        self.check_tools(request.tools)
        session = None if request.session_id is None else self._sessions.get(request.session_id)
        spec = RunSpec.resolve(self.config, request.options, self._environ)
        await self._check_prices(spec, request.options)
        async with self._job_input(request) as job_input:
            with contextlib.nullcontext() if session is None else self._sessions.active(session):
                return await self._admitted(
                    request, spec, job_input, session, ticket, observer, host
                )

    def check_tools(self, tools: tuple[ToolSpec, ...]) -> None:
        """Host tools are functions in the worker's own REPL: a remote REPL (docker, modal...)
        could not call back through the worker's channel, so they are refused there."""
        if tools and self.config.environment != "local":
            raise InvalidParams("tools", "host tools need the local REPL (--environment local)")

    async def ask_model(self, prompt: str, options: InferOptions | None = None) -> InferResult:
        """One plain call to the request's root model, with no REPL: `prompt` is the whole
        input. It goes through the broker like every model call (keys, retries, usage, budgets,
        record and replay), so `rlm-server eval` compares the RLM with the bare model on equal
        terms. Answers as `infer` does (no trajectory); raises as `infer` does (with the usage
        spent, when there was some)."""
        options = options or InferOptions()
        spec = RunSpec.resolve(self.config, options, self._environ)
        if spec.unavailable_reason is not None:
            raise BackendUnavailable(reason=spec.unavailable_reason)
        await self._check_prices(spec, options)
        account = self._broker.account(spec.budget)
        started = time.monotonic()
        reply: Json | None = None
        error: RpcError
        try:
            with anyio.move_on_after(spec.timeout_s):
                reply = await self._broker.call(
                    spec.route, account, spec.model, prompt, _unreported
                )
        except (BackendError, BudgetExceeded) as failed:  # a call the broker ended
            error = failed
        else:
            if reply is not None:  # the root model is always allowed: no error reply here
                metadata = _metadata(spec, 0, started, 1 + account.retries)
                return InferResult(reply["text"], False, account.usage(), metadata, None)
            error = DeadlineExceeded(timeout_s=spec.timeout_s)
        if account.made_calls:
            error.data["usage"] = account.usage()
        raise error

    async def load_prices(self) -> None:
        """Read the price table now (it is otherwise read when a cost limit first needs it)."""
        await self._broker.prices.load()

    @asynccontextmanager
    async def _job_input(self, request: InferRequest) -> AsyncIterator[JobInput]:
        """The request's input: a stored context is held (not evicted, its file kept) until
        the request ends."""
        if request.context_id is None:
            yield request.context
            return
        async with self._contexts.lease(request.context_id) as held:
            yield held

    async def _admitted(
        self,
        request: InferRequest,
        spec: RunSpec,
        job_input: JobInput,
        session: Session | None,
        ticket: Ticket,
        observer: Observer | None,
        host: ToolHost | None,
    ) -> InferResult:
        started = time.monotonic()
        account = self._broker.account(spec.budget)
        progress = _Progress(observer, started, spec.max_iterations)
        label = f"worker of request {request.label!r}"
        run = _Running(spec, request, job_input, session, progress, started, account, host, label)
        self._metrics.started()
        outcome = Outcome.FAILURE
        ending: Json = {}
        try:
            if spec.unavailable_reason is not None:
                outcome, result = self._stub(spec, started)
                return result
            with self._cancellable(ticket):
                result = await self._within_deadline(run)
                ending = _ending(result)
                outcome = Outcome.SUCCESS
                return result
            raise RequestCancelled()  # only a cancelled scope gets here
        except RpcError as error:
            outcome = _OUTCOMES.get(type(error), Outcome.FAILURE)
            if account.made_calls:  # a request that spent anything says what it spent
                error.data["usage"] = account.usage()
            ending = {"error": error.to_wire()}
            raise
        finally:
            self._metrics.retried(account.retries)
            self._metrics.record(outcome, (time.monotonic() - started) * 1000)
            await self._log(run, ending)

    async def _log(self, run: _Running, ending: Json) -> None:
        """--log-dir: the request's trajectory file, written however it ended."""
        if self.config.log_dir is None or run.spec.unavailable_reason is not None:
            return
        from rlm_server.tools import logdir  # only with --log-dir

        request = run.request
        entry = logdir.Entry(request.label, request.query, run.spec.rlm_kwargs, run.steps)
        with anyio.CancelScope(shield=True):  # a cancelled request is logged too
            await logdir.write(self.config.log_dir, entry, ending, run.account.usage())

    async def _check_prices(self, spec: RunSpec, options: InferOptions) -> None:
        """A cost limit on a model without a known price is refused up front: it could not be
        kept, and ignoring it silently would be worse."""
        if not self._broker.ledger.limits_cost(spec.budget) or spec.unavailable_reason is not None:
            return
        await self._broker.prices.load()
        for model in spec.route.models:
            if not self._broker.prices.known(spec.route.price_provider, model):
                field = (
                    "options.budget.max_cost_usd"
                    if options.budget.max_cost_usd is not None
                    else "options.model"
                )
                raise InvalidParams(
                    field, f"no price is known for model {model!r}, and a cost limit applies"
                )

    def _admit_or_refuse(self, ticket: Ticket, size: int) -> None:
        if ticket.serial > self._admit_through:
            raise ShuttingDown()
        if self._slots.available_tokens > 0:
            return
        if self._queued >= self.config.max_queue:
            raise QueueFull(limit=self.config.max_queue)
        if self._queued_bytes + size > self.config.max_queue_bytes:
            raise QueueFull(limit_bytes=self.config.max_queue_bytes)

    def _stub(self, spec: RunSpec, started: float) -> tuple[Outcome, InferResult]:
        if self.config.strict:
            raise BackendUnavailable(reason=spec.unavailable_reason)
        usage: Json = {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": None}
        usage["models"] = {}
        metadata = _metadata(spec, 0, started, attempts=0)
        return Outcome.STUB, InferResult(STUB_TEXT, True, usage, metadata, None)

    @contextmanager
    def _cancellable(self, ticket: Ticket) -> Iterator[None]:
        """While the request runs, its ticket (and `cancel_all`) can cancel it."""
        if self._cancelling_all:
            ticket.cancel()
        scope = ticket.scope()
        self._running.add(ticket)
        try:
            with scope:
                yield
        finally:
            self._running.discard(ticket)
            ticket.release(scope)

    async def _within_deadline(self, run: _Running) -> InferResult:
        with anyio.move_on_after(run.spec.timeout_s):
            async with self._turn(run.session), self._slot(run.request.size):
                return await self._run(run)
        raise DeadlineExceeded(timeout_s=run.spec.timeout_s)

    @asynccontextmanager
    async def _turn(self, session: Session | None) -> AsyncIterator[None]:
        """A session's turn waits for the turns before it (before it takes a slot)."""
        if session is None:
            yield
            return
        async with self._sessions.turn(session):
            yield

    @asynccontextmanager
    async def _slot(self, size: int) -> AsyncIterator[None]:
        self._queued += 1
        self._queued_bytes += size
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
            self._queued_bytes -= size
        try:
            yield
        finally:
            self._slots.release()

    async def _run(self, run: _Running) -> InferResult:
        """One completion in one worker; its model calls go through the broker, which retries
        each on its own (so a flaky call costs one call more, not a whole completion)."""
        spec, request, account = run.spec, run.request, run.account
        run.progress("started")
        frame = {
            "query": request.query,
            "rlm": spec.rlm_kwargs,
            "progress": run.progress.wanted,
            "trajectory": request.options.trajectory or self.config.log_dir is not None,
            "tools": [tool.to_job() for tool in run.tools],
        }
        if request.options.answer_schema is not None:
            frame["answer"] = {
                "schema": request.options.answer_schema,
                "repairs": request.options.answer_repairs,
            }

        def on_retry(message: str) -> None:
            run.progress("retry", message=message)

        async def on_call(model: str, prompt: Any) -> Json:
            return await self._call(run, model, prompt, on_retry)

        failure: RpcError | None = None
        try:
            async with anyio.create_task_group() as starting:
                starting.start_soon(self._broker.prepare, spec.route)  # while the worker starts
                final = await self._execute(run, frame, on_call, self._tool_gate(run).call)
        except* RpcError as failed:  # raised inside the task group
            failure = first_of(failed, RpcError)
        if failure is not None:
            raise failure
        outcome: Json = final.get("result") or final["failure"]
        run.steps += trimmed(outcome.get("trajectory"), spec.max_iterations)
        if run.ending is not None:
            raise run.ending
        if "result" not in final:
            raise _failure(account, final["failure"])
        result: Json = final["result"]
        self._check_answer_size(result)
        answer = _checked_answer(request.options.answer_schema, result)
        iterations = _iterations(spec, account, result)
        return InferResult(
            text=result["text"] if answer is None else orjson.dumps(answer.value).decode(),
            stub=False,
            usage=account.usage(),  # the broker's count: the whole call tree, every depth
            metadata=_metadata(
                spec, iterations, run.started, 1 + account.retries, run.failed_calls
            ),
            trajectory=run.steps if request.options.trajectory else None,
            answer=answer,
        )

    def _check_answer_size(self, result: Json) -> None:
        """AnswerTooLarge when the worker's answer (its text, or its value as JSON) is longer
        than --max-answer-bytes: the worker runs model code, and its sizes are not trusted."""
        limit = self.config.max_answer_bytes
        text: str = result["text"]
        if len(text) > limit or (not text.isascii() and len(text.encode()) > limit):
            raise AnswerTooLarge(limit_bytes=limit)
        if "value" in result and len(orjson.dumps(result["value"])) > limit:
            raise AnswerTooLarge(limit_bytes=limit)

    async def _call(self, run: _Running, model: str, prompt: Any, on_retry: OnRetry) -> Json:
        """One model call of a worker, through the broker. A refusal by a budget ends the
        request, and so does a call that failed after the retries unless the request asked for
        `subcall_errors: "model"`. Once ended, the request makes no further model call: a fresh
        worker is stopped at once (raised here); a session's worker is told, as the library
        would be, so that it unwinds and keeps its REPL, and its turn then fails."""
        if run.ending is not None:
            return {"error": {"type": run.ending.TYPE}}
        try:
            return await self._broker.call(run.spec.route, run.account, model, prompt, on_retry)
        except BackendError as failed:
            if run.request.options.subcall_errors == "model":
                run.failed_calls += 1
                return {"error": {"type": failed.TYPE}}
            run.ending = failed
        except BudgetExceeded as exceeded:
            run.ending = exceeded
        if run.session is None:
            raise run.ending
        return {"error": {"type": run.ending.TYPE}}

    def _tool_gate(self, run: _Running) -> ToolGate:
        options = run.request.options
        return ToolGate(
            run.tools,
            run.host,
            options.tool_timeout_s or DEFAULT_TOOL_TIMEOUT_S,
            run.spec.budget.max_tool_calls,
            record=self._broker.recording,
            replay=self._broker.replaying,
        )

    async def _execute(
        self, run: _Running, frame: Json, on_call: CallHandler, on_tool: ToolHandler
    ) -> Json:
        """The completion's final frame: from the session's worker, or from a fresh one."""
        job = Job(frame, run.job_input, run.progress.forward, on_call, on_tool, run.label)
        if run.session is not None:
            return await self._sessions.run_turn(run.session, job)
        return await self._workers.run(job)

    # -- stopping -----------------------------------------------------------------------------

    def close_admission(self, last: Ticket | None = None) -> None:
        """Refuse (ShuttingDown) every request whose ticket was taken after `last` (None: after
        the last one taken so far)."""
        serial = self._tickets if last is None else last.serial
        self._admit_through = min(self._admit_through, serial)

    def cancel_all(self) -> None:
        """Cancel every request, including any that has not reached the engine yet."""
        self._cancelling_all = True
        for ticket in list(self._running):
            ticket.cancel()


def _metadata(
    spec: RunSpec, iterations: int, started: float, attempts: int, failed_calls: int = 0
) -> Metadata:
    elapsed_ms = round((time.monotonic() - started) * 1000, 3)
    return Metadata(
        spec.backend, spec.model, iterations, spec.max_depth, elapsed_ms, attempts, failed_calls
    )


def _ending(result: InferResult) -> Json:
    """How --log-dir's result line reads a result."""
    return {"text": result.text, "usage": result.usage, "metadata": result.metadata._asdict()}


def _info(entry: StoredContext) -> StoredContextInfo:
    return StoredContextInfo(
        entry.id, entry.size, entry.sha256, entry.sealed, entry.uses, entry.last_used_ms
    )
