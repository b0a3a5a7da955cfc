"""What runs inside a worker process: one real `rlm.RLM` completion, reported as frames.

Imported by the zygote (so `rlm` is imported once, before any fork), never by the server.

A worker holds no key and calls no provider: every client the library builds in it (for the root
model, sub-calls, and child RLMs at any depth, through `rlm.core.rlm.get_client`) is a
`RelayLM`, which sends the call to the server's broker as a frame on the worker's own socket and
waits for the reply. The worker knows model names only; the server decides the endpoint.

The library builds a new LM handler for every completion and stops it at the end, which waits
out socketserver's 0.5 s poll interval: ~535 ms for an instant model. `WorkerRLM` uses the
library's seam for this, the `_spawn_completion_context` context manager, to hand each completion
an LM handler that is never stopped, because the worker process ends with the completion.
tests/test_library_seam.py fails loudly if an upgrade moves either seam.

The host tools a job declares are Python functions in the REPL (`HostTool`, given to the
library as `custom_tools`, so the root prompt lists them): a call is a frame to the server and
waits for its reply, as a model call does; a refused or failed one raises `ToolError`.

A stored context is not sent: its holder (zygote.py) read it before it forked the worker, and
hands it down as an argument (`Inherited`), so the worker has it already, shared with the holder
copy-on-write. A session's worker serves one job
after another; its REPL environment (`SessionState`) lives from one turn to the next, built with
the library's `persistent=True`, so each turn's input becomes the next `context_N` and each
turn's message history the next `history_N`, as the library's own multi-turn mode does it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import orjson
import rlm.core.rlm
from rlm import RLM
from rlm.clients import BaseLM
from rlm.core.lm_handler import LMHandler
from rlm.core.types import (
    ModelUsageSummary,
    QueryMetadata,
    RLMChatCompletion,
    RLMIteration,
    UsageSummary,
)
from rlm.environments import get_environment
from rlm.logger import RLMLogger

from rlm_server import Json
from rlm_server.worker import frames
from rlm_server.worker.answers import AnswerCheck, AnswerRefused
from rlm_server.worker.trajectory import bounded, seconds

log = logging.getLogger(__name__)

Emit = Callable[..., None]


class ContextUnavailable:
    """What a worker inherits when the zygote could not read the stored context it named."""


class Inherited(NamedTuple):
    """A stored context as a worker inherits it from its holder."""

    value: Any  # a str, a list, or ContextUnavailable
    length: int | None  # a list's length as the library counts it, measured once by the holder


class _Sized:
    """Stands for a list context's items in the library's description of it (see below)."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


def context_length(context: Any) -> int:
    """The total length the library's prompt gives a context (items without one, such as
    numbers, by their JSON): for a list, what the zygote measures once, so that no worker walks
    every item (and copies its page, writing its reference count) to describe it again."""
    try:
        return int(QueryMetadata(context).context_total_length)
    except (TypeError, AttributeError):  # len(5); {"content": ...} then "doc": "doc".get
        return int(QueryMetadata(_as_json(context)).context_total_length)


def _as_json(items: Any) -> list[str]:
    return [orjson.dumps(item, default=str).decode() for item in items]


# ---------------------------------------------------------------------------------------------
# The worker's socket to the server


class Channel:
    """Our end of the socket: one job frame in, event frames and one final frame out."""

    def __init__(self, sock: socket.socket, inherited: Inherited | None) -> None:
        self._sock = sock
        self._inherited = inherited
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

    def receive_frame(self) -> bytearray:
        return self._receive_exactly(frames.length_of(self._receive_exactly(frames.HEADER_BYTES)))

    def receive_job(self) -> tuple[Json, Any]:
        """The job, and its context."""
        job: Json = orjson.loads(self.receive_frame())
        return job, self.receive_context(job)

    def receive_context(self, job: Json) -> Any:
        """A job's context: sent after it (raw UTF-8 text, or JSON), inherited from the zygote
        (a stored context), or None (a session turn that brings no new input)."""
        kind = job["context_type"]
        if kind == "inherited":
            return None if self._inherited is None else self._inherited.value
        if kind == "none":
            return None
        raw = self.receive_frame()
        context = raw.decode() if kind == "text" else orjson.loads(raw)
        del raw  # halve the worker's peak: the text is all we keep
        return context

    def send(self, frame: Json) -> None:
        packed = frames.pack(frame)
        with self._lock:
            self._sock.sendall(packed)


# ---------------------------------------------------------------------------------------------
# Clients, built once per (backend, kwargs) and per process


class BrokerCallFailed(Exception):
    """The broker could not make a call (the server knows why and will say so)."""


class BrokerLink:
    """The worker's calls to the broker: a frame out per call, its reply in, matched by number.

    Many calls may wait at once (the library's LM handler serves sub-calls on threads), so one
    reader thread hands each reply to the caller waiting for it. Any other frame is the next job
    of a session's worker, with its context: it waits in `jobs`.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._numbers = itertools.count(1)
        self._waiting: dict[int, list[Json]] = {}
        self._arrived = threading.Condition()
        self._closed = False
        self.jobs: queue.Queue[tuple[Json, Any] | None] = queue.Queue()  # None: no more

    def start(self) -> None:
        threading.Thread(target=self._read_replies, daemon=True, name="broker-replies").start()

    def _read_replies(self) -> None:
        try:
            while True:
                frame = orjson.loads(self._channel.receive_frame())
                if "reply" not in frame:
                    self.jobs.put((frame, self._channel.receive_context(frame)))
                    continue
                with self._arrived:
                    slot = self._waiting.get(frame["reply"])
                    if slot is not None:
                        slot.append(frame)
                        self._arrived.notify_all()
        except (EOFError, OSError, orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            self.jobs.put(None)
            with self._arrived:
                self._closed = True
                self._arrived.notify_all()

    def wait_closed(self) -> None:
        """Until the server closes the channel (it kills our process group first)."""
        with self._arrived:
            self._arrived.wait_for(lambda: self._closed)

    def call(self, model: str, prompt: Any) -> Json:
        """A model call: the broker's reply (text and usage, or an error)."""
        return self._exchange("call", {"model": model, "prompt": prompt})

    def call_tool(self, name: str, arguments: Json) -> Json:
        """A host tool call: the server's reply (the value, or an error with a message)."""
        return self._exchange("tool", {"name": name, "arguments": arguments})

    def _exchange(self, kind: str, fields: Json) -> Json:
        """Send one numbered frame and wait for the reply that names its number."""
        number = next(self._numbers)
        slot: list[Json] = []
        with self._arrived:
            self._waiting[number] = slot
        try:
            self._channel.send({kind: number, **fields})
            with self._arrived:
                self._arrived.wait_for(lambda: bool(slot) or self._closed)
        finally:
            with self._arrived:
                del self._waiting[number]
        if not slot:
            raise BrokerCallFailed("the server closed the worker's channel")
        return slot[0]


class RelayLM(BaseLM):  # type: ignore[misc]
    """A model client that asks the broker: no key, no endpoint, no SDK in the worker."""

    def __init__(self, model_name: str, link: BrokerLink) -> None:
        super().__init__(model_name=model_name)
        self._link = link
        self._usage: dict[str, ModelUsageSummary] = {}
        self._last = threading.local()  # the handler serves calls on threads: each its own

    def completion(self, prompt: Any, model: str | None = None) -> str:
        name = model or self.model_name
        reply = self._link.call(name, prompt)
        if "error" in reply:
            raise BrokerCallFailed(str(reply["error"].get("type", "error")))
        usage = reply["usage"]
        last = ModelUsageSummary(
            total_calls=1,
            total_input_tokens=usage["input_tokens"],
            total_output_tokens=usage["output_tokens"],
            total_cost=usage["cost_usd"],
        )
        self._last.usage = last
        self._add(name, last)
        return str(reply["text"])

    async def acompletion(self, prompt: Any, model: str | None = None) -> str:
        return await asyncio.to_thread(self.completion, prompt, model)

    def _add(self, name: str, last: ModelUsageSummary) -> None:
        total = self._usage.setdefault(name, ModelUsageSummary(0, 0, 0, None))
        total.total_calls += 1
        total.total_input_tokens += last.total_input_tokens
        total.total_output_tokens += last.total_output_tokens
        if last.total_cost is not None:
            total.total_cost = (total.total_cost or 0.0) + last.total_cost

    def get_usage_summary(self) -> UsageSummary:
        return UsageSummary(model_usage_summaries=dict(self._usage))

    def get_last_usage(self) -> ModelUsageSummary:
        return getattr(self._last, "usage", ModelUsageSummary(0, 0, 0, None))


def relay_clients(link: BrokerLink) -> None:
    """Make every client the library builds in this worker a relay to the broker."""

    def get_client(backend: str, backend_kwargs: Json) -> BaseLM:
        return RelayLM(str(backend_kwargs.get("model_name") or "default"), link)

    rlm.core.rlm.get_client = get_client


# ---------------------------------------------------------------------------------------------
# Host tools: functions the client provides, called from model code


class ToolError(Exception):
    """A host tool failed: the client's handler raised, the call timed out, or the server
    refused it (arguments that do not match the tool's schema). Its text is the reason."""


class ToolLog:
    """The tool calls made since the last iteration was logged (model code may use threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Json] = []

    def add(self, call: Json) -> None:
        with self._lock:
            self._calls.append(call)

    def drain(self) -> list[Json]:
        with self._lock:
            calls, self._calls = self._calls, []
        return calls


TOOL_NAME_CHARS = 200


class HostTool:
    """One tool the client declared, as a Python function of keyword arguments in the REPL.

    A call leaves the worker as a frame and blocks until the server answers it: the value the
    client's handler returned, or a ToolError. The server checks every call again (model code
    can change `name` or write frames of its own): nothing here is trusted.
    """

    def __init__(self, name: str, link: BrokerLink, log: ToolLog) -> None:
        self.name = name
        self._link = link
        self._log = log

    def __call__(self, **arguments: Any) -> Any:
        started = time.monotonic()
        reply = self._link.call_tool(self.name, arguments)
        error = reply.get("error")
        self._log.add(
            {
                "name": str(self.name)[:TOOL_NAME_CHARS],
                "arguments_bytes": len(orjson.dumps(arguments, default=str)),
                "result_bytes": len(orjson.dumps(reply.get("value"), default=str)),
                "error": None if error is None else bounded(str(error.get("message", ""))),
                "time_s": round(time.monotonic() - started, 6),
            }
        )
        if error is not None:
            raise ToolError(str(error.get("message", "the tool call failed")))
        return reply.get("value")


TOOL_ERROR_DESCRIPTION = (
    "the exception a host tool raises when it fails; str(error) says why (catch it to go on)"
)


def tool_description(tool: Json) -> str:
    """What the root model's prompt says of a tool: its description and how to call it."""
    schema = orjson.dumps(tool.get("input_schema", {})).decode()
    return (
        f"{tool.get('description', '')} Call it with keyword arguments, as "
        f"`{tool['name']}(name=value, ...)`; its arguments, as a JSON Schema: {schema}. "
        "It returns JSON values (dict, list, str, int, float, bool, None) or raises ToolError."
    )


def host_tools(tools: list[Json], link: BrokerLink, log: ToolLog) -> Json | None:
    """The library's `custom_tools` for the declared tools (None when there are none)."""
    if not tools:
        return None
    custom: Json = {
        tool["name"]: {
            "tool": HostTool(tool["name"], link, log),
            "description": tool_description(tool),
        }
        for tool in tools
    }
    custom["ToolError"] = {"tool": ToolError, "description": TOOL_ERROR_DESCRIPTION}
    return custom


# ---------------------------------------------------------------------------------------------
# Warming the zygote
#
# rlm imports its REPL on the first completion: a worker forked from a zygote that has never done
# it pays it on every request, so the zygote does it once, with no network and no threads (it must
# stay single-threaded to fork safely).

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


def _warm_rlm() -> None:
    handler = EventLMHandler(_CannedLM(), on_subcall=lambda model: None)  # never started
    logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
    rlm = WorkerRLM(lm_handler=handler, logger=logger, backend="openai", max_iterations=1)
    rlm.completion("warm-up context", root_prompt="warm up")


def warm_up() -> None:
    """What a worker would otherwise do for the first time on every request: rlm imports its
    REPL and builds its prompts on the first completion."""
    try:
        _warm_rlm()
    except Exception as exc:  # warming is an optimisation; never fail start-up for it
        log.warning("warming the REPL failed: %s", exc)


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

    def __init__(
        self,
        on_iteration: Callable[[int], None],
        keep_trajectory: bool,
    ) -> None:
        super().__init__()
        self._on_iteration = on_iteration
        self._keep = keep_trajectory
        self.tool_log = ToolLog()
        self.completed = 0
        self.steps: list[Json] = []

    def clear_iterations(self) -> None:
        super().clear_iterations()
        self.completed = 0
        self.steps = []

    def log(self, iteration: RLMIteration) -> None:
        self.completed += 1
        tool_calls = self.tool_log.drain()
        if self._keep:
            self.steps.append(trajectory_step(self.completed, iteration, tool_calls))
        self._on_iteration(self.completed)


# ---------------------------------------------------------------------------------------------
# Trajectories: what the model did, bounded (trajectory.py; the server trims them again)


def _sub_call(call: RLMChatCompletion) -> Json:
    usage = usage_to_wire(call.usage_summary)
    return {
        "model": str(call.root_model),
        "prompt": bounded(call.prompt),
        "response": bounded(call.response),
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "execution_time_s": seconds(call.execution_time),
    }


def trajectory_step(
    number: int, iteration: RLMIteration, tool_calls: list[Json] | None = None
) -> Json:
    """One iteration: the model's reply, each code block with its output and sub-calls, and
    the host tool calls its code made (name, sizes, time, and the error if one was raised)."""
    return {
        "iteration": number,
        "response": bounded(iteration.response),
        "code_blocks": [
            {
                "code": bounded(block.code),
                "stdout": bounded(block.result.stdout),
                "stderr": bounded(block.result.stderr),
                "execution_time_s": seconds(block.result.execution_time),
                "sub_calls": [_sub_call(call) for call in block.result.rlm_calls],
            }
            for block in iteration.code_blocks
        ],
        "final_answer": None if iteration.final_answer is None else bounded(iteration.final_answer),
        "iteration_time_s": seconds(iteration.iteration_time),
        "tool_calls": tool_calls or [],
    }


def _content_of(environment: Any, final_answer: str) -> Any:
    """What the model set as `answer["content"]`: the value itself in the local REPL, else
    the text the library made of it."""
    answer = getattr(environment, "locals", {}).get("answer")
    return answer.get("content", final_answer) if isinstance(answer, dict) else final_answer


def _reopen(environment: Any) -> None:
    """The answer was refused: `answer["ready"]` is False again, as before it was set."""
    answer = getattr(environment, "locals", {}).get("answer")
    if isinstance(answer, dict):
        dict.__setitem__(answer, "ready", False)


class SessionState:
    """A session's REPL environment, kept from one turn to the next, and what the next turn adds.

    The first turn's environment gets the session's stored context (if it was opened on one) as
    `context_0`, then the turn's own input, if any; every later turn's input becomes the next
    `context_N`. A session with neither has `context` = "" until a turn brings one.
    """

    def __init__(self, base: Any) -> None:
        self.base = base  # the stored context the session was opened on, or None
        self.environment: Any = None
        self.first: Any = None  # context_0
        self.pending: list[Any] = []  # the contexts this turn adds, in order

    def begin_turn(self, prompt: Any) -> Any:
        """Queue this turn's additions; return what the root model's metadata describes: the
        turn's input, or the session's first context when the turn brings none."""
        if self.environment is None:
            self.pending = [c for c in (self.base, prompt) if c is not None] or [""]
            self.first = self.pending[0]
        else:
            self.pending = [] if prompt is None else [prompt]
        return self.first if prompt is None else prompt


class WorkerRLM(RLM):  # type: ignore[misc]
    """An RLM whose completions use the worker's LM handler instead of building their own.

    With the local REPL it also hands the context to the REPL as the very object it is given:
    the library would write it to a temporary file and read it back, which for a 200 MB context
    costs 200 MB of disk and twice that in memory. With a `SessionState` (and the library's
    `persistent=True`, so that each turn's history is stored) it keeps the environment for the
    session's next turn instead of cleaning it up.
    """

    def __init__(
        self,
        lm_handler: LMHandler,
        session: SessionState | None = None,
        inherited: Inherited | None = None,
        answer: AnswerCheck | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(persistent=session is not None, **kwargs)
        self._worker_lm_handler = lm_handler
        self._session = session
        self._inherited = inherited
        self._answer = answer

    def completion(self, prompt: Any, root_prompt: str | None = None) -> RLMChatCompletion:
        """A session's turn may bring no input (`prompt` None): the metadata then describes
        the session's first context."""
        if self._session is not None:
            prompt = self._session.begin_turn(prompt)
        return cast(RLMChatCompletion, super().completion(prompt, root_prompt=root_prompt))

    @contextmanager
    def _spawn_completion_context(
        self, prompt: str | dict[str, Any]
    ) -> Iterator[tuple[LMHandler, Any]]:
        session = self._session
        if session is not None and session.environment is not None:
            yield self._worker_lm_handler, self._next_turn(session)
            return
        contexts = session.pending if session is not None else [prompt]
        in_process = self.environment_type == "local"
        env_kwargs = dict(self.environment_kwargs)
        env_kwargs["lm_handler_address"] = self._worker_lm_handler.address
        env_kwargs["context_payload"] = None if in_process else contexts[0]
        env_kwargs["depth"] = self.depth + 1
        if self.environment_type in ("local", "ipython", "docker") and self.max_depth > 1:
            env_kwargs["subcall_fn"] = self._subcall
        env_kwargs["max_concurrent_subcalls"] = self.max_concurrent_subcalls
        if self.custom_tools is not None:
            env_kwargs["custom_tools"] = self.custom_tools
            env_kwargs["custom_sub_tools"] = self.custom_sub_tools
        environment = get_environment(self.environment_type, env_kwargs)
        for context in contexts if in_process else contexts[1:]:
            self._add_context(environment, context)
        if session is not None:
            session.environment, session.pending = environment, []
        try:
            yield self._worker_lm_handler, environment
        finally:
            if session is None and hasattr(environment, "cleanup"):
                environment.cleanup()

    def _next_turn(self, session: SessionState) -> Any:
        """The session's environment, pointed at this turn's handler, with its new input."""
        environment = session.environment
        environment.update_handler_address(self._worker_lm_handler.address)
        if hasattr(environment, "subcall_fn") and self.max_depth > 1:
            environment.subcall_fn = self._subcall  # this turn's models and limits
        for context in session.pending:
            self._add_context(environment, context)
        session.pending = []
        if self.custom_tools is not None and hasattr(environment, "globals"):
            for name, entry in self.custom_tools.items():  # this turn's, logged with this turn
                environment.globals[name] = entry["tool"]
        return environment

    def _add_context(self, environment: Any, context: Any) -> None:
        """The next `context_N` (and `context` for the first), as `LocalREPL.add_context`
        leaves it, without its round trip through a file; other REPLs load it their way."""
        if self.environment_type != "local":
            environment.add_context(context)
            return
        index = environment.get_context_count()
        environment.locals[f"context_{index}"] = context
        if index == 0:
            environment.locals["context"] = context
        environment._context_count = index + 1

    def _setup_prompt(self, prompt: Any, root_prompt: str | None = None) -> list[dict[str, Any]]:
        """The library describes a list context by the lengths of its items, and fails on items
        without one (a list of numbers, say): those are described by their JSON instead. An
        inherited list whose length the zygote measured is described by that length alone: its
        type and total are all the prompt says of it."""
        measured = self._inherited
        if measured is not None and prompt is measured.value and measured.length is not None:
            prompt = [_Sized(measured.length)]
        try:
            messages = cast(list[dict[str, Any]], super()._setup_prompt(prompt, root_prompt))
        except (TypeError, AttributeError):  # as in context_length
            described = _as_json(prompt)
            messages = cast(list[dict[str, Any]], super()._setup_prompt(described, root_prompt))
        if self._answer is not None:
            messages[0]["content"] += self._answer.prompt()
        return messages

    def _completion_turn(
        self, prompt: Any, lm_handler: LMHandler, environment: Any
    ) -> RLMIteration:
        """With an answer schema, an answer the model sets is checked before the library sees
        it: a valid one becomes its compact JSON; an invalid one is withdrawn, and the reason
        added to the REPL's output for the next iteration (or AnswerRefused, when no repair is
        left)."""
        iteration = cast(RLMIteration, super()._completion_turn(prompt, lm_handler, environment))
        answer = self._answer
        answered = [b.result for b in iteration.code_blocks if b.result.final_answer is not None]
        if answer is None or not answered:
            return iteration
        error = answer.accept(_content_of(environment, answered[0].final_answer))
        if error is None:
            answered[0].final_answer = orjson.dumps(answer.value).decode()
            return iteration
        for result in answered:
            result.final_answer = None
        _reopen(environment)
        try:
            answered[-1].stderr += answer.refuse(error)
        except AnswerRefused:
            if self.logger:  # the trajectory shows the last answer too
                self.logger.log(iteration)
            raise
        return iteration

    def _default_answer(self, message_history: list[dict[str, Any]], lm_handler: LMHandler) -> str:
        """Out of iterations, the library asks for an answer as text: with a schema, it must
        be the JSON of a valid value (no repair is left to spend on it)."""
        text = str(super()._default_answer(message_history, lm_handler))
        if self._answer is None:
            return text
        error = self._answer.accept(text)
        if error is not None:
            raise AnswerRefused(error)
        return orjson.dumps(self._answer.value).decode()

    def retire_handler(self) -> None:
        """Stop this turn's LM handler, off the turn's path (stopping waits out a 0.5 s poll):
        a session's next turn gets a handler of its own."""
        handler = self._worker_lm_handler

        def stop() -> None:
            server = handler._server
            handler.stop()
            if server is not None:
                server.server_close()

        threading.Thread(target=stop, daemon=True, name="retire-lm-handler").start()


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


def _build_rlm(
    job: Json,
    link: BrokerLink,
    emit: Emit,
    logger: ProgressLogger,
    session: SessionState | None,
    inherited: Inherited | None,
    answer: AnswerCheck | None,
) -> WorkerRLM:
    spec: Json = job["rlm"]
    root = RelayLM(spec["backend_kwargs"]["model_name"], link)
    sub_kwargs = (spec.get("other_backend_kwargs") or [None])[0]
    sub = RelayLM(sub_kwargs["model_name"], link) if sub_kwargs else None
    handler = EventLMHandler(
        root,
        on_subcall=lambda model: emit("subcall", message=model),
        other_backend_client=sub,
    )
    if sub is not None:
        handler.register_client(sub.model_name, sub)
    handler.start()
    return WorkerRLM(
        lm_handler=handler,
        session=session,
        inherited=inherited,
        answer=answer,
        logger=logger,
        on_subcall_start=lambda depth, model, preview: emit("subcall", message=str(model)),
        custom_tools=host_tools(job.get("tools") or [], link, logger.tool_log),
        **spec,
    )


def _complete(
    job: Json, context: Any, rlm: WorkerRLM, session: SessionState | None
) -> RLMChatCompletion:
    try:
        return rlm.completion(context, root_prompt=job.get("query"))
    finally:
        if session is not None:
            rlm.retire_handler()


def run_job(
    job: Json,
    context: Any,
    link: BrokerLink,
    emit: Emit,
    session: SessionState | None = None,
    inherited: Inherited | None = None,
) -> Json:
    """The final frame for one job: {"result": ...} or {"failure": ...} (the server knows what
    its broker saw; the worker only says what ended the completion, and what it did before)."""
    keep = bool(job.get("trajectory"))
    logger = ProgressLogger(
        on_iteration=lambda n: emit(
            "iteration", iteration=n, max_iterations=job["rlm"]["max_iterations"]
        ),
        keep_trajectory=keep,
    )
    if any(isinstance(c, ContextUnavailable) for c in (context, session and session.base)):
        return {"failure": {"kind": frames.CONTEXT_UNAVAILABLE}}
    answer = AnswerCheck(**job["answer"]) if job.get("answer") else None
    try:
        rlm = _build_rlm(job, link, emit, logger, session, inherited, answer)
        completion = _complete(job, context, rlm, session)
    except Exception as exc:
        log.info("completion failed: %s: %s", type(exc).__name__, exc)
        failure: Json = {"kind": type(exc).__name__}
        if isinstance(exc, AnswerRefused):
            failure = {"kind": frames.INVALID_ANSWER, "validation_error": exc.validation_error}
        if keep:
            failure["trajectory"] = logger.steps
        return {"failure": failure}
    result: Json = {"text": str(completion.response), "iterations": logger.completed}
    if answer is not None:
        result["value"] = answer.value
    if keep:
        result["trajectory"] = logger.steps
    return {"result": result}


def _emitter(channel: Channel, job: Json) -> Emit:
    progress = bool(job.get("progress"))

    def emit(event: str, **fields: Any) -> None:
        if progress:
            channel.send({"event": event, **fields})

    return emit


def serve_job(sock: socket.socket, inherited: Inherited | None) -> None:
    """Read one job from the server, run it, send its events and final frame, and wait until
    the server closes the channel: the server always kills a living process group. A session's
    worker (its job says `session`) then reads the next job, and so on, keeping its REPL.
    `inherited` is the stored context its holder forked it with."""
    channel = Channel(sock, inherited)
    job, context = channel.receive_job()
    link = BrokerLink(channel)
    link.start()
    relay_clients(link)
    base = None if inherited is None else inherited.value
    session = SessionState(base) if job.get("session") else None
    while True:
        emit = _emitter(channel, job)
        channel.send(run_job(job, context, link, emit, session, inherited))
        if session is None or (following := link.jobs.get()) is None:
            break
        job, context = following
    link.wait_closed()
