"""The broker: the only door to the models.

Every model call of every completion (the root model, `llm_query` sub-calls, child RLMs at any
depth) leaves its worker as a frame that names a model and a prompt, and is made here, in the
server, which alone holds the keys. Here each call is retried on its own when it fails
transiently, counted as it returns, and charged to its request's `Account`, whose budget is
reserved before the call and settled after it, so that concurrent requests cannot overspend
together. A `Route` is all a request may call: the endpoint and key its configuration chose,
and the models it may name there. A worker can name another model, never another endpoint, and
never sees a key; a model name that the route does not allow is refused before any client
exists, and under a cost limit so is a model without a known price.

Clients are per endpoint, not per model name (one client serves every model at its endpoint),
and at most MAX_CLIENTS idle ones are kept. Each client's connection pool is shared by every
request; the workers' side (executors/local/pool.py) lets one request have at most
`--max-calls-in-flight` calls here at once, so a neighbour's call always finds a connection.

With `--record DIR` every exchange is also stored (the request as sent and the answer, under a
hash of the request); with `--replay DIR` calls are answered from there, with no network and no
key, and a call that was never recorded fails its request, naming its hash, instead of reaching
a provider.

The calls are made with the `rlm` library's own clients (its prompt formats and usage extraction
for every provider), imported on first use in a thread: the provider SDKs cost about a second to
import and must neither delay `ready` nor block the event loop. Each client records a call's
usage synchronously right after its awaited SDK call, so `get_last_usage()` read as soon as
`acompletion()` returns is that call's own, however many calls are in flight on the loop.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import anyio
import orjson

from rlm_server import Json
from rlm_server.errors import BackendError, BudgetExceeded, ReplayMiss
from rlm_server.worker import library

log = logging.getLogger(__name__)

OnRetry = Callable[[str], None]
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
OUTPUT_ESTIMATE_TOKENS = 4096  # reserved for a call's answer when max_tokens does not bound it
MAX_CLIENTS = 32  # idle provider clients kept (one per endpoint and sampling arguments)
MODEL_NOT_ALLOWED = "model_not_allowed"  # what model code is told when it names another model


# ---------------------------------------------------------------------------------------------
# Importing the library (never reading .env)


def import_rlm_clients() -> Any:
    """`rlm.clients`, imported without reading `.env` (library.py says why)."""
    library.without_dotenv()
    return importlib.import_module("rlm.clients")


def warm_openai_sdk() -> None:
    """The OpenAI SDK imports its chat resources and builds its pydantic models on its first
    call (~100 ms): make that call once, against a mock transport (no network, no key)."""
    try:
        import openai
    except ImportError:
        return
    try:
        http: Any = importlib.import_module("httpx2")  # the SDK's fork of httpx, when it has one
    except ImportError:
        http = importlib.import_module("httpx")
    choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}}
    body = {
        "id": "warm-up",
        "object": "chat.completion",
        "created": 0,
        "model": "warm-up",
        "choices": [{**choice, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    transport = http.MockTransport(lambda request: http.Response(200, json=body))
    client = openai.OpenAI(
        api_key="warm-up",
        base_url="http://warm-up.invalid/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=transport),
    )
    client.chat.completions.create(model="warm-up", messages=[{"role": "user", "content": "hi"}])
    client.close()


# ---------------------------------------------------------------------------------------------
# What a request may call, and what it may spend


class Route(NamedTuple):
    """The endpoint one request may call, and the model names it may ask for there."""

    backend: str  # the library's backend name
    kwargs: Json  # the endpoint's client arguments, key included: never leaves the server
    models: tuple[str, ...]  # the request's root model, then its sub model when it has one
    allowed: frozenset[str]  # every model name its worker may pass; any other is refused
    price_provider: str | None  # genai-prices' provider id for this endpoint

    @property
    def sampling(self) -> Json:
        sampling: Json = self.kwargs.get("sampling_args") or {}
        return sampling

    @property
    def endpoint(self) -> bytes:
        """Which client serves it: its arguments but the model name, which each call names."""
        arguments = {name: v for name, v in self.kwargs.items() if name != "model_name"}
        return orjson.dumps([self.backend, arguments], option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Budget:
    """Limits over one request's whole call tree (or the server's lifetime); None: no limit."""

    max_calls: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_cost_usd: float | None = None
    max_tool_calls: int | None = None  # host tool calls (tools.py), not model calls

    def within(self, other: Budget) -> Budget:
        """The tighter of the two, limit by limit."""
        tighter = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            tighter[f.name] = (
                theirs if mine is None else mine if theirs is None else min(mine, theirs)
            )
        return Budget(**tighter)


@dataclass
class Spend:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None

    def add(self, other: Spend, sign: int = 1) -> None:
        self.calls += sign * other.calls
        self.input_tokens += sign * other.input_tokens
        self.output_tokens += sign * other.output_tokens
        if other.cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + sign * other.cost_usd

    def to_wire(self) -> Json:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.rounded_cost(),
        }

    def rounded_cost(self) -> float | None:
        return None if self.cost_usd is None else round(self.cost_usd, 10)


def _over(budget: Budget, spent: Spend, reserved: Spend, estimate: Spend) -> str | None:
    """The first limit that spent + reserved + estimate would pass, or None."""
    for name, used in (
        ("max_calls", spent.calls + reserved.calls + estimate.calls),
        ("max_input_tokens", spent.input_tokens + reserved.input_tokens + estimate.input_tokens),
        (
            "max_output_tokens",
            spent.output_tokens + reserved.output_tokens + estimate.output_tokens,
        ),
        (
            "max_cost_usd",
            (spent.cost_usd or 0) + (reserved.cost_usd or 0) + (estimate.cost_usd or 0),
        ),
    ):
        limit = getattr(budget, name)
        if limit is not None and used > limit:
            return name
    return None


class Ledger:
    """The server's lifetime spend, its lifetime limit, and every reservation not yet settled."""

    def __init__(self, limit: Budget) -> None:
        self.limit = limit
        self.spent = Spend()
        self.reserved = Spend()

    def limits_cost(self, budget: Budget) -> bool:
        """Whether a cost limit applies to a request under `budget`: its own or the server's
        (then every model it calls must have a known price)."""
        return budget.max_cost_usd is not None or self.limit.max_cost_usd is not None

    def totals(self) -> Json:
        """The lifetime spend as `status` reports it among its metrics."""
        spent = self.spent
        return {
            "total_calls": spent.calls,
            "total_input_tokens": spent.input_tokens,
            "total_output_tokens": spent.output_tokens,
            "total_cost_usd": spent.rounded_cost(),
        }


@dataclass
class CallFailure:
    """Why a call failed for good: what the error that ends its request says."""

    kind: str
    attempts: int
    status: int | None = None
    missing: str | None = None  # --replay: the hash of the request nothing was recorded for

    def error(self) -> BackendError:
        if self.missing is not None:
            return ReplayMiss(retryable=False, attempts=self.attempts, hash=self.missing)
        extra = {} if self.status is None else {"status": self.status}
        return BackendError(retryable=False, attempts=self.attempts, **extra)


class Account:
    """One request's spend, per model, against its budget and the server's."""

    def __init__(self, budget: Budget, ledger: Ledger) -> None:
        self.budget = budget
        self._ledger = ledger
        self._by_model: dict[str, Spend] = {}
        self._spent = Spend()
        self._reserved = Spend()
        self.retries = 0
        self.failure: CallFailure | None = None
        self.exceeded: BudgetExceeded | None = None

    @property
    def cost_limited(self) -> bool:
        return self._ledger.limits_cost(self.budget)

    def refuse_unpriced(self) -> None:
        """A cost limit cannot be kept on a model without a price: BudgetExceeded."""
        scope, budget = (
            ("request", self.budget)
            if self.budget.max_cost_usd is not None
            else ("server", self._ledger.limit)
        )
        self.exceeded = BudgetExceeded(
            limit="max_cost_usd", max=budget.max_cost_usd, scope=scope, usage=self.usage()
        )
        raise self.exceeded

    def calls_to(self, model: str) -> int:
        """The calls to `model` that the broker made for this request."""
        spend = self._by_model.get(model)
        return 0 if spend is None else spend.calls

    def reserve(self, estimate: Spend) -> None:
        """Hold `estimate` against both budgets, or raise BudgetExceeded (and remember it)."""
        limit = _over(self.budget, self._spent, self._reserved, estimate)
        scope = "request"
        if limit is None:
            limit = _over(self._ledger.limit, self._ledger.spent, self._ledger.reserved, estimate)
            scope = "server"
        if limit is not None:
            budget = self.budget if scope == "request" else self._ledger.limit
            self.exceeded = BudgetExceeded(
                limit=limit, max=getattr(budget, limit), scope=scope, usage=self.usage()
            )
            raise self.exceeded
        self._reserved.add(estimate)
        self._ledger.reserved.add(estimate)

    def release(self, estimate: Spend) -> None:
        self._reserved.add(estimate, -1)
        self._ledger.reserved.add(estimate, -1)

    def settle(self, estimate: Spend, model: str, actual: Spend) -> None:
        self.release(estimate)
        self._spent.add(actual)
        self._ledger.spent.add(actual)
        self._by_model.setdefault(model, Spend()).add(actual)

    @property
    def made_calls(self) -> bool:
        return self._spent.calls > 0 or self.retries > 0 or self.failure is not None

    def usage(self) -> Json:
        """The wire's `usage`: the whole call tree, and per model."""
        return {
            **self._spent.to_wire(),
            "models": {model: spend.to_wire() for model, spend in self._by_model.items()},
        }


# ---------------------------------------------------------------------------------------------
# Record and replay


class Tape:
    """Model exchanges on disk, one file per request as sent, named by its hash.

    The hash covers what decides the answer (backend, model, prompt, sampling arguments), not
    the key or the endpoint, so a tape recorded against one provider account replays anywhere.
    """

    def __init__(self, directory: str) -> None:
        from pathlib import Path  # only for --record and --replay: not before `ready`

        self._directory = Path(directory)

    @staticmethod
    def request(route: Route, model: str, prompt: Any) -> Json:
        sampling = route.sampling
        return {"backend": route.backend, "model": model, "prompt": prompt, "sampling": sampling}

    @staticmethod
    def key(request: Json) -> str:
        import hashlib  # only for --record and --replay: not before `ready`

        return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()

    async def play(self, key: str) -> Json | None:
        path = self._directory / f"{key}.json"
        try:
            raw = await anyio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            return None
        answer: Json = orjson.loads(raw)["answer"]
        return answer

    async def record(self, key: str, request: Json, answer: Json) -> None:
        entry = orjson.dumps({"hash": key, "request": request, "answer": answer})
        await anyio.to_thread.run_sync((self._directory / f"{key}.json").write_bytes, entry)


# ---------------------------------------------------------------------------------------------
# Prices


class Prices:
    """USD per call from genai-prices' bundled table (never fetched at run time)."""

    def __init__(self) -> None:
        self._module: Any = None

    async def load(self) -> None:
        if self._module is None:
            self._module = await anyio.to_thread.run_sync(importlib.import_module, "genai_prices")

    def cost(self, provider: str | None, model: str, spent: Spend) -> float | None:
        """What the call cost, or None when the table does not know the model (a price the
        provider reports itself, as OpenRouter does, takes precedence: see `Broker`)."""
        if self._module is None or provider is None:
            return None
        usage = self._module.Usage(
            input_tokens=spent.input_tokens, output_tokens=spent.output_tokens
        )
        try:
            price = self._module.calc_price(usage, model_ref=model, provider_id=provider)
        except LookupError:
            return None
        return float(price.total_price)

    def known(self, provider: str | None, model: str) -> bool:
        return self.cost(provider, model, Spend(input_tokens=1, output_tokens=1)) is not None


# ---------------------------------------------------------------------------------------------
# Failures


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    code = getattr(exc, "code", None)  # google-genai's APIError
    return code if isinstance(code, int) and 100 <= code < 600 else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the providers' SDKs and their HTTP libraries."""
    found: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for module, name in (
        ("httpx", "TransportError"),
        ("httpx2", "TransportError"),
        ("openai", "APIConnectionError"),
        ("anthropic", "APIConnectionError"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def retryable(exc: BaseException) -> tuple[bool, int | None]:
    """Whether a failed call may succeed if tried again, by exception type and HTTP status
    (never by message text), and the status when there is one."""
    status = _status_of(exc)
    if status is not None:
        return status in RETRYABLE_STATUS, status
    return isinstance(exc, _transport_errors()), None


def retry_after_s(exc: BaseException) -> float | None:
    """The provider's `Retry-After` (seconds or an HTTP date), when it sent one."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    raw = headers.get("retry-after") if headers is not None else None
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        import email.utils  # only for a Retry-After date: not before `ready`

        when = email.utils.parsedate_to_datetime(raw)
        return max(0.0, when.timestamp() - time.time()) if when else None


def backoff_s(attempt: int, base_ms: float, cap_ms: float) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, scaled by [0.5, 1)."""
    import random  # a retry is the first use: not before `ready`

    ceiling = min(cap_ms, base_ms * 2 ** (attempt - 1))
    return float(ceiling * (0.5 + random.random() / 2) / 1000)


# ---------------------------------------------------------------------------------------------
# The broker


class RetryPolicy(NamedTuple):
    max_retries: int
    delay_ms: float
    max_delay_ms: float


@dataclass
class _Client:
    """One of the library's client objects, and the calls it is making now."""

    lm: Any
    calls: int = 0


@dataclass
class _Clients:
    """The library's clients, one per endpoint, least recently used first."""

    module: Any = None
    built: dict[bytes, _Client] = field(default_factory=dict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def evict_idle(self) -> list[Any]:
        """Make room for one more: the least recently used clients that make no call."""
        evicted = []
        for key in [key for key, client in self.built.items() if not client.calls]:
            if len(self.built) < MAX_CLIENTS:
                break
            evicted.append(self.built.pop(key).lm)
        return evicted


def estimate(prompt: Any, max_tokens: int | None) -> Spend:
    """An upper bound of what a call can spend: a token is at least a byte of its prompt."""
    size = len(prompt.encode()) if isinstance(prompt, str) else len(orjson.dumps(prompt))
    return Spend(calls=1, input_tokens=size, output_tokens=max_tokens or OUTPUT_ESTIMATE_TOKENS)


class Broker:
    def __init__(
        self,
        retry: RetryPolicy,
        lifetime: Budget,
        record: str | None = None,
        replay: str | None = None,
    ) -> None:
        self._retry = retry
        self._clients = _Clients()
        self.prices = Prices()
        self.ledger = Ledger(lifetime)
        self._recording = Tape(record) if record else None
        self._replaying = Tape(replay) if replay else None

    async def close_clients(self) -> None:
        """Close every provider client now, in the event loop they were made in: left to the
        garbage collector, an async client schedules its closing in whatever loop then runs."""
        built, self._clients.built = self._clients.built, {}
        for client in built.values():
            await _close_client(client.lm)

    @property
    def recording(self) -> Tape | None:
        """--record: where host tool answers are stored too (tools.py)."""
        return self._recording

    @property
    def replaying(self) -> Tape | None:
        """--replay: where host tool answers are played from too (tools.py)."""
        return self._replaying

    def account(self, budget: Budget) -> Account:
        return Account(budget, self.ledger)

    async def call(
        self, route: Route, account: Account, model: str, prompt: Any, on_retry: OnRetry
    ) -> Json:
        """Make one model call for a worker: its reply frame (text and usage). A model the
        route does not allow is refused to model code before any client exists (an error
        reply). A call over a budget raises BudgetExceeded (a model without a known price under
        a cost limit too), and one that failed for good (after the retries) a BackendError,
        each with what it says on the wire: the engine decides how it ends."""
        if model not in route.allowed:
            log.info("refused a call to model %r: not an allowed model", model)
            return {"error": {"type": MODEL_NOT_ALLOWED}}
        await self._check_price(route, account, model)
        if self._replaying is not None:
            return await self._replay(self._replaying, route, account, model, prompt)
        async with self._client(route) as client:
            reply = await self._attempts(route, account, client, model, prompt, on_retry)
        if self._recording is not None:
            request = Tape.request(route, model, prompt)
            await self._recording.record(Tape.key(request), request, reply)
        return reply

    async def _check_price(self, route: Route, account: Account, model: str) -> None:
        """Under a cost limit, a model without a known price is refused, whoever names it."""
        if not account.cost_limited:
            return
        await self.prices.load()
        if not self.prices.known(route.price_provider, model):
            log.info("refused a call to model %r: no known price, and a cost limit applies", model)
            account.refuse_unpriced()

    async def _replay(
        self, tape: Tape, route: Route, account: Account, model: str, prompt: Any
    ) -> Json:
        """The recorded answer, charged like a real call; a miss ends the request."""
        request = Tape.request(route, model, prompt)
        key = Tape.key(request)
        hold = estimate(prompt, request["sampling"].get("max_tokens"))
        account.reserve(hold)
        try:
            answer = await tape.play(key)
        except BaseException:  # cancelled while reading: nothing was spent
            account.release(hold)
            raise
        if answer is None:
            account.release(hold)
            account.failure = CallFailure("replay_miss", 1, missing=key)
            log.warning("--replay: nothing recorded for model call %s", key)
            raise ReplayMiss(retryable=False, attempts=1, hash=key)
        usage = answer["usage"]
        spend = Spend(1, usage["input_tokens"], usage["output_tokens"], usage["cost_usd"])
        account.settle(hold, model, spend)
        return answer

    async def prepare(self, route: Route) -> None:
        """Build the clients a request will call while its worker starts: the first request
        would otherwise pay the provider SDK's import (about a second) after its worker asks."""
        if self._replaying is not None:
            return
        try:
            await self._built(route)
        except Exception as exc:  # the call itself will fail and say why
            log.warning("could not prepare the %s client: %s", route.backend, exc)

    @asynccontextmanager
    async def _client(self, route: Route) -> AsyncIterator[Any]:
        """The endpoint's client, counted as busy (never evicted) while the call uses it."""
        client = await self._built(route)
        client.calls += 1
        try:
            yield client.lm
        finally:
            client.calls -= 1

    async def _built(self, route: Route) -> _Client:
        key = route.endpoint
        clients = self._clients
        found = clients.built.pop(key, None)
        if found is not None:
            clients.built[key] = found  # now the most recently used
            return found
        async with clients.lock:
            # abandoned on cancel: a server that stops must not wait for an import
            if clients.module is None:
                clients.module = await _in_thread(import_rlm_clients)
                await _in_thread(warm_openai_sdk)
            found = clients.built.get(key)
            if found is None:
                lm = await _in_thread(_build_client, clients.module, route.backend, route.kwargs)
                evicted = clients.evict_idle()
                found = clients.built[key] = _Client(lm)
                for old in evicted:
                    await _close_client(old)
        return found

    async def _attempts(
        self,
        route: Route,
        account: Account,
        client: Any,
        model: str,
        prompt: Any,
        on_retry: OnRetry,
    ) -> Json:
        hold = self._estimate(route, model, prompt, client)
        attempt = 1
        while True:
            account.reserve(hold)
            try:
                text = await client.acompletion(prompt, model)
                spend = self._spend(route, model, client.get_last_usage(), client)  # same turn
            except Exception as exc:
                account.release(hold)
                may_retry, status = retryable(exc)
                log.info("model call failed: %s (status %s)", type(exc).__name__, status)
                if not may_retry or attempt > self._retry.max_retries:
                    account.failure = CallFailure(type(exc).__name__, attempt, status)
                    raise account.failure.error() from None
                delay = self._delay(attempt, exc)
                account.retries += 1
                on_retry(
                    f"attempt {attempt} failed ({type(exc).__name__}); "
                    f"retrying in {delay * 1000:.0f} ms"
                )
                await anyio.sleep(delay)
                attempt += 1
                continue
            except BaseException:
                account.release(hold)
                raise
            account.settle(hold, model, spend)
            return {"text": "" if text is None else str(text), "usage": spend.to_wire()}

    def _delay(self, attempt: int, exc: BaseException) -> float:
        wait = backoff_s(attempt, self._retry.delay_ms, self._retry.max_delay_ms)
        asked = retry_after_s(exc)
        cap = self._retry.max_delay_ms / 1000
        return min(cap, max(wait, asked)) if asked is not None else wait

    def _estimate(self, route: Route, model: str, prompt: Any, client: Any) -> Spend:
        sampling = getattr(client, "sampling_args", None) or {}
        hold = estimate(prompt, sampling.get("max_tokens"))
        hold.cost_usd = self.prices.cost(route.price_provider, model, hold)
        return hold

    def _spend(self, route: Route, model: str, usage: Any, client: Any) -> Spend:
        spend = Spend(
            calls=1,
            input_tokens=int(getattr(usage, "total_input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "total_output_tokens", 0) or 0),
        )
        reported = getattr(client, "last_cost", None)  # OpenRouter and others report a price
        spend.cost_usd = (
            float(reported)
            if isinstance(reported, int | float) and math.isfinite(reported)
            else self.prices.cost(route.price_provider, model, spend)
        )
        return spend


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(function, *args, abandon_on_cancel=True)


def _build_client(module: Any, backend: str, kwargs: Json) -> Any:
    """One of the library's clients, with the provider SDK's own retries off: ours are the
    only ones (OpenAI, Azure, Anthropic and Portkey retry twice by default), counted and
    reported; two layers would multiply."""
    client = module.get_client(backend, dict(kwargs))
    for name in ("client", "async_client"):
        with_options = getattr(getattr(client, name, None), "with_options", None)
        if callable(with_options):
            setattr(client, name, with_options(max_retries=0))
    return client


async def _close_client(lm: Any) -> None:
    """Close an evicted client's connection pools (its sockets), sync and async alike."""
    for name in ("async_client", "client"):
        close = getattr(getattr(lm, name, None), "close", None)
        if not callable(close):
            continue
        try:
            closing = close()
            if inspect.isawaitable(closing):
                await closing
        except Exception as exc:  # a client that will not close is garbage all the same
            log.info("closing an evicted %s client failed: %s", name, type(exc).__name__)


def budget_from(raw: Mapping[str, Any] | None) -> Budget:
    """A Budget from validated `options.budget` (frontends/params.py checks the values)."""
    return replace(Budget(), **(raw or {}))
