"""What runs inside a worker process: one real `rlm.RLM` completion, reported as frames.

Imported by the zygote (so `rlm` is imported once, before any fork), never by the server.

The library builds a new model client (two TLS contexts, ~32 ms) and a new LM handler for every
completion and stops the handler at the end, which waits out socketserver's 0.5 s poll interval:
~535 ms for an instant model. `WorkerRLM` uses the library's seam for this, the
`_spawn_completion_context` context manager, to hand each completion the worker's clients
(prebuilt in the zygote) and an LM handler that is never stopped, because the worker process ends
with the completion. tests/test_library_seam.py fails loudly if an upgrade moves that seam.
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from rlm import RLM
from rlm.clients import BaseLM, get_client
from rlm.core.lm_handler import LMHandler
from rlm.core.types import RLMChatCompletion, RLMIteration, UsageSummary
from rlm.environments import get_environment
from rlm.logger import RLMLogger

from rlm_server import frames

log = logging.getLogger(__name__)

Json = dict[str, Any]
Emit = Callable[..., None]
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


# ---------------------------------------------------------------------------------------------
# The worker's socket to the server


class Channel:
    """Our end of the socket: one job frame in, event frames and one final frame out."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()  # events come from the LM handler's threads too

    def _receive_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        while view:
            received = self._sock.recv_into(view)
            if received == 0:
                raise EOFError("the server closed the worker socket")
            view = view[received:]
        return buffer

    def _receive_frame(self) -> bytearray:
        return self._receive_exactly(frames.length_of(self._receive_exactly(frames.HEADER_BYTES)))

    def receive_job(self) -> tuple[Json, str | list[Any]]:
        """The job, and its context (sent after it: raw UTF-8 text, or JSON)."""
        job: Json = orjson.loads(self._receive_frame())
        raw = self._receive_frame()
        context = raw.decode() if job["context_type"] == "text" else orjson.loads(raw)
        del raw  # halve the worker's peak: the text is all we keep
        return job, context

    def send(self, frame: Json) -> None:
        payload = orjson.dumps(frame, default=str)
        with self._lock:
            self._sock.sendall(frames.header(len(payload)))
            self._sock.sendall(payload)


# ---------------------------------------------------------------------------------------------
# Clients, built once per (backend, kwargs) and per process


def without_sdk_retries(lm: BaseLM) -> BaseLM:
    """Turn the provider SDK's own silent retries off (OpenAI, Azure, Anthropic and Portkey
    retry twice by default; google-genai only when asked): ours are counted and reported, and
    two layers of retries multiply."""
    for name in ("client", "async_client"):
        with_options = getattr(getattr(lm, name, None), "with_options", None)
        if callable(with_options):
            setattr(lm, name, with_options(max_retries=0))
    return lm


def _client_key(backend: str, backend_kwargs: Json) -> bytes:
    return orjson.dumps([backend, backend_kwargs], option=orjson.OPT_SORT_KEYS)


class ClientCache:
    """Model clients by configuration. The zygote fills it; forked workers inherit it."""

    def __init__(self) -> None:
        self._clients: dict[bytes, BaseLM] = {}

    def get(self, backend: str, backend_kwargs: Json) -> BaseLM:
        key = _client_key(backend, backend_kwargs)
        if key not in self._clients:
            self._clients[key] = without_sdk_retries(get_client(backend, dict(backend_kwargs)))
        return self._clients[key]

    def prewarm(self, spec: Json) -> None:
        """Build the clients of the server's default configuration, if they can be built."""
        for client in spec.get("clients", []):
            try:
                self.get(client["backend"], client["backend_kwargs"])
            except Exception as exc:  # a bad default only fails the requests that use it
                log.warning("could not prebuild the %s client: %s", client["backend"], exc)


# ---------------------------------------------------------------------------------------------
# Warming the zygote
#
# Constructing a client is not enough: the OpenAI SDK imports its chat resources on first use and
# pydantic builds its request and response schemas on the first call (~115 ms together), and rlm
# imports its REPL on the first completion. A worker forked from a zygote that has never done
# these pays them on every request, so the zygote does each once, with no network and no threads
# (it must stay single-threaded to fork safely).

WARM_UP_ANSWER = "```repl\nanswer['content'] = context[:4]\nanswer['ready'] = True\n```"


class _CannedLM(BaseLM):  # type: ignore[misc]
    """A model that answers every prompt with the same REPL block, in-process."""

    def __init__(self) -> None:
        super().__init__(model_name="warm-up")

    def completion(self, prompt: Any) -> str:
        return WARM_UP_ANSWER

    async def acompletion(self, prompt: Any) -> str:
        return WARM_UP_ANSWER

    def get_usage_summary(self) -> UsageSummary:
        return UsageSummary(model_usage_summaries={})

    def get_last_usage(self) -> Any:
        return None


def _warm_openai_sdk() -> None:
    import openai

    http = _openai_http_module()

    body = {
        "id": "warm-up",
        "object": "chat.completion",
        "created": 0,
        "model": "warm-up",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
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


def _warm_rlm() -> None:
    handler = EventLMHandler(_CannedLM(), on_subcall=lambda model: None)  # never started
    logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
    rlm = WorkerRLM(lm_handler=handler, logger=logger, backend="openai", max_iterations=1)
    rlm.completion("warm-up context", root_prompt="warm up")


def warm_up(spec: Json) -> ClientCache:
    """Everything a worker would otherwise do for the first time on every request."""
    clients = ClientCache()
    clients.prewarm(spec)
    for step in (_warm_openai_sdk, _warm_rlm):
        try:
            step()
        except Exception as exc:  # warming is an optimisation; never fail start-up for it
            log.warning("warm-up step %s failed: %s", step.__name__, exc)
    return clients


# ---------------------------------------------------------------------------------------------
# The library seams


class EventLMHandler(LMHandler):  # type: ignore[misc]
    """An LM handler that reports each sub-call (a request from model code at depth >= 1)."""

    def __init__(self, client: BaseLM, on_subcall: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._on_subcall = on_subcall

    def get_client(self, model: str | None = None, depth: int = 0) -> BaseLM:
        client: BaseLM = super().get_client(model, depth)
        if depth >= 1:
            self._on_subcall(str(model or client.model_name))
        return client


class ProgressLogger(RLMLogger):  # type: ignore[misc]
    """Counts finished iterations and reports each; keeps a bounded trajectory when asked.

    The library stores `on_iteration_*` callbacks but never calls them; its logger is called.
    The library's own trajectory carries every prompt and the REPL's variables, the context
    among them (a 1 MB context over two iterations made a 4 MB answer), so each iteration is
    summarised as it is logged and nothing else is kept.
    """

    def __init__(self, on_iteration: Callable[[int], None], keep_trajectory: bool) -> None:
        super().__init__()
        self._on_iteration = on_iteration
        self._keep = keep_trajectory
        self.completed = 0
        self.steps: list[Json] = []

    def clear_iterations(self) -> None:
        super().clear_iterations()
        self.completed = 0
        self.steps = []

    def log(self, iteration: RLMIteration) -> None:
        self.completed += 1
        if self._keep:
            self.steps.append(trajectory_step(self.completed, iteration))
        self._on_iteration(self.completed)


# ---------------------------------------------------------------------------------------------
# Trajectories: what the model did, bounded

TRAJECTORY_CHARS = 4096


def bounded(value: Any) -> str:
    """At most TRAJECTORY_CHARS characters of `value` as text, saying how much was left out."""
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    if len(text) <= TRAJECTORY_CHARS:
        return text
    marker = f"…[truncated {len(text)} chars]"  # a bound on the count, fixed before cutting
    keep = TRAJECTORY_CHARS - len(marker)
    return text[:keep] + f"…[truncated {len(text) - keep} chars]"


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _sub_call(call: RLMChatCompletion) -> Json:
    usage = usage_to_wire(call.usage_summary)
    return {
        "model": str(call.root_model),
        "prompt": bounded(call.prompt),
        "response": bounded(call.response),
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "execution_time_s": _seconds(call.execution_time),
    }


def trajectory_step(number: int, iteration: RLMIteration) -> Json:
    """One iteration: the model's reply, each code block with its output and sub-calls."""
    return {
        "iteration": number,
        "response": bounded(iteration.response),
        "code_blocks": [
            {
                "code": bounded(block.code),
                "stdout": bounded(block.result.stdout),
                "stderr": bounded(block.result.stderr),
                "execution_time_s": _seconds(block.result.execution_time),
                "sub_calls": [_sub_call(call) for call in block.result.rlm_calls],
            }
            for block in iteration.code_blocks
        ],
        "final_answer": None if iteration.final_answer is None else bounded(iteration.final_answer),
        "iteration_time_s": _seconds(iteration.iteration_time),
    }


class WorkerRLM(RLM):  # type: ignore[misc]
    """An RLM whose completions use the worker's LM handler instead of building their own.

    With the local REPL it also hands the context to the REPL as the very object it is given:
    the library would write it to a temporary file and read it back, which for a 200 MB context
    costs 200 MB of disk and twice that in memory.
    """

    def __init__(self, lm_handler: LMHandler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._worker_lm_handler = lm_handler

    @contextmanager
    def _spawn_completion_context(
        self, prompt: str | dict[str, Any]
    ) -> Iterator[tuple[LMHandler, Any]]:
        in_process = self.environment_type == "local"
        env_kwargs = dict(self.environment_kwargs)
        env_kwargs["lm_handler_address"] = self._worker_lm_handler.address
        env_kwargs["context_payload"] = None if in_process else prompt
        env_kwargs["depth"] = self.depth + 1
        if self.environment_type in ("local", "ipython", "docker") and self.max_depth > 1:
            env_kwargs["subcall_fn"] = self._subcall
        env_kwargs["max_concurrent_subcalls"] = self.max_concurrent_subcalls
        environment = get_environment(self.environment_type, env_kwargs)
        if in_process:
            # what LocalREPL.load_context leaves behind, without the round trip through a file
            environment.locals["context_0"] = environment.locals["context"] = prompt
        try:
            yield self._worker_lm_handler, environment
        finally:
            if hasattr(environment, "cleanup"):
                environment.cleanup()


# ---------------------------------------------------------------------------------------------
# One job


def usage_to_wire(summary: UsageSummary) -> Json:
    models = {
        name: {
            "calls": usage.total_calls or 0,
            "input_tokens": usage.total_input_tokens or 0,
            "output_tokens": usage.total_output_tokens or 0,
            "cost_usd": usage.total_cost,
        }
        for name, usage in summary.model_usage_summaries.items()
    }
    costs = [m["cost_usd"] for m in models.values() if m["cost_usd"] is not None]
    return {
        "calls": sum(m["calls"] for m in models.values()),
        "input_tokens": sum(m["input_tokens"] for m in models.values()),
        "output_tokens": sum(m["output_tokens"] for m in models.values()),
        "cost_usd": sum(costs) if costs else None,
        "models": models,
    }


def classify_failure(exc: BaseException) -> Json:
    """Retryable or not, by exception type and HTTP status code (never by message text)."""
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        code = getattr(exc, "code", None)  # google-genai's APIError
        status = code if isinstance(code, int) and 100 <= code < 600 else None
    if status is not None:
        retryable = status in RETRYABLE_STATUS
    else:
        retryable = isinstance(exc, (TimeoutError, ConnectionError)) or _is_transport_error(exc)
    failure: Json = {"retryable": retryable, "kind": type(exc).__name__}
    if status is not None:
        failure["status"] = status
    return {"failure": failure}


def _openai_http_module() -> Any:
    """The HTTP library the installed OpenAI SDK is built on (httpx, or its fork httpx2)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


def _is_transport_error(exc: BaseException) -> bool:
    """Connection and timeout errors of the providers' SDKs and their HTTP libraries."""
    transient: list[type[BaseException]] = []
    for module, name in (
        ("httpx", "TransportError"),
        ("httpx2", "TransportError"),
        ("openai", "APIConnectionError"),
        ("anthropic", "APIConnectionError"),
    ):
        try:
            transient.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return isinstance(exc, tuple(transient))


def _build_rlm(job: Json, clients: ClientCache, emit: Emit) -> tuple[WorkerRLM, ProgressLogger]:
    spec: Json = job["rlm"]
    root = clients.get(spec["backend"], spec["backend_kwargs"])
    sub_kwargs = (spec.get("other_backend_kwargs") or [None])[0]
    sub = clients.get(spec["backend"], sub_kwargs) if sub_kwargs else None
    handler = EventLMHandler(
        root,
        on_subcall=lambda model: emit("subcall", message=model),
        other_backend_client=sub,
    )
    if sub is not None:
        handler.register_client(sub.model_name, sub)
    handler.start()
    logger = ProgressLogger(
        on_iteration=lambda n: emit(
            "iteration", iteration=n, max_iterations=spec["max_iterations"]
        ),
        keep_trajectory=bool(job.get("trajectory")),
    )
    rlm = WorkerRLM(
        lm_handler=handler,
        logger=logger,
        on_subcall_start=lambda depth, model, preview: emit("subcall", message=str(model)),
        **spec,
    )
    return rlm, logger


def run_job(job: Json, context: str | list[Any], clients: ClientCache, emit: Emit) -> Json:
    """The final frame for one job: {"result": ...} or {"failure": ...}."""
    try:
        rlm, logger = _build_rlm(job, clients, emit)
        completion = rlm.completion(context, root_prompt=job.get("query"))
    except Exception as exc:
        log.info("completion failed: %s: %s", type(exc).__name__, exc)
        return classify_failure(exc)
    result: Json = {
        "text": str(completion.response),
        "usage": usage_to_wire(completion.usage_summary),
        "iterations": logger.completed,
    }
    if job.get("trajectory"):
        result["trajectory"] = logger.steps
    return {"result": result}


def serve_job(sock: socket.socket, clients: ClientCache) -> None:
    """Read one job from the server, run it, and send its events and final frame."""
    channel = Channel(sock)
    job, context = channel.receive_job()
    progress = bool(job.get("progress"))

    def emit(event: str, **fields: Any) -> None:
        if progress:
            channel.send({"event": event, **fields})

    channel.send(run_job(job, context, clients, emit))
