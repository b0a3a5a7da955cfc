"""Runs every task two ways through the server's own engine (`--jobs` tasks at a time):

- `rlm`: the task's input as the context, its question as the query (the engine's `infer`);
- `base`: the input and the question in one prompt to the same model (the engine's
  `ask_model`, through the same broker), the input cut to the window when it is longer.

Each finished run is one row, handed to `on_row` at once, so an interrupted or budget-stopped
evaluation keeps what it did. The engine is only ever called in `ask_rlm` and `ask_base`, which
answer an `Answer` whatever the engine's own result type is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TextIO

import anyio

from rlm_server.engine.engine import Engine, InferRequest
from rlm_server.errors import BudgetExceeded, InvalidParams, RpcError, first_of
from rlm_server.tools.eval.scoring import score
from rlm_server.tools.eval.tasks import Task, generate

Json = dict[str, Any]
METHODS = ("rlm", "base")
ANSWER_KEPT = 2000  # characters of an answer a row keeps
BASE_PROMPT = (
    "Read the text below, then answer the question after it.\n\n{text}\n\nQuestion: {question}"
)


class Plan(NamedTuple):
    tasks: tuple[str, ...]
    sizes: tuple[int, ...]  # characters
    seeds: int
    window: int  # characters of input the base model is given at most
    jobs: int = 1  # tasks run at once

    def runs(self) -> Iterator[tuple[str, int, int]]:
        for name in self.tasks:
            for size in self.sizes:
                for seed in range(self.seeds):
                    yield name, size, seed

    @property
    def total(self) -> int:
        return len(self.tasks) * len(self.sizes) * self.seeds * len(METHODS)


# -- the engine (its call signatures change here only) --------------------------------------


class Answer(NamedTuple):
    text: str
    usage: Json  # the wire's `usage`: calls, input_tokens, output_tokens, cost_usd


async def ask_rlm(engine: Engine, context: str, question: str, number: int) -> Answer:
    """The RLM: the engine's `infer`, as the server calls it for request `number`."""
    request = InferRequest(context=context, query=question)
    result = await engine.infer(request, f"eval-{number}", _no_notifications, number)
    return Answer(str(result["text"]), result["usage"])


async def ask_base(engine: Engine, prompt: str) -> Answer:
    """The base model: one prompt, through the engine's broker."""
    result = await engine.ask_model(prompt)
    return Answer(str(result["text"]), result["usage"])


def _no_notifications(_notification: Json) -> None:
    """infer's progress notifications: not asked for."""


# -- runs -------------------------------------------------------------------------------------


def base_prompt(task: Task, window: int) -> tuple[str, bool]:
    """The base model's prompt, at most `window` characters with its instructions and the
    question, and whether the input had to be cut for that (its start is kept)."""
    room = max(0, window - len(BASE_PROMPT.format(text="", question=task.question)))
    cut = len(task.context) > room
    return BASE_PROMPT.format(text=task.context[:room], question=task.question), cut


async def run_once(engine: Engine, task: Task, method: str, window: int, number: int) -> Json:
    """One run's row. A failed run scores 0 and names its error; a run the budget stopped
    has no score. A request the configuration makes impossible stops the evaluation."""
    started = time.monotonic()
    cut = False
    error: str | None = None
    try:
        if method == "rlm":
            answer, usage = await ask_rlm(engine, task.context, task.question, number)
        else:
            prompt, cut = base_prompt(task, window)
            answer, usage = await ask_base(engine, prompt)
    except InvalidParams:  # the configuration's fault (a cost limit without a price): stop
        raise
    except RpcError as failed:
        answer, usage, error = "", failed.data.get("usage") or {}, str(failed.data["type"])
        stopped = isinstance(failed, BudgetExceeded) and failed.data.get("scope") == "server"
    else:
        stopped = False
    return {
        "task": task.name,
        "size": task.size,
        "seed": task.seed,
        "method": method,
        "score": None if stopped else score(task, answer) if error is None else 0.0,
        "calls": usage.get("calls", 0),
        "tokens": usage.get("input_tokens", 0) + usage.get("output_tokens", 0),
        "input_tokens": usage.get("input_tokens", 0),
        "output_tokens": usage.get("output_tokens", 0),
        "cost_usd": usage.get("cost_usd"),
        "seconds": round(time.monotonic() - started, 3),
        "input_chars": len(task.context),
        "cut": cut,
        "error": error,
        "answer": answer[:ANSWER_KEPT],
        "expected": task.expected,
    }


async def evaluate(
    engine: Engine, plan: Plan, on_row: Callable[[Json], None], progress: Progress
) -> bool:
    """Every run of the plan, `plan.jobs` tasks at once; False when the budget stopped it."""
    evaluation = _Evaluation(engine, plan, on_row, progress)
    refused: RpcError | None = None
    try:
        async with anyio.create_task_group() as group:
            for index, (name, size, seed) in enumerate(plan.runs()):
                group.start_soon(evaluation.task, name, size, seed, index * len(METHODS))
    except* InvalidParams as failed:
        refused = first_of(failed, InvalidParams)
    if refused is not None:
        raise refused
    ending = "stopped: the budget is spent" if evaluation.stopped else "done"
    progress.done(evaluation.finished, ending)
    return not evaluation.stopped


class _Evaluation:
    """The runs of one plan: a task's input is made when a slot is free (a 4M-character input
    is not held longer than its runs), and its two runs go one after the other."""

    def __init__(
        self, engine: Engine, plan: Plan, on_row: Callable[[Json], None], progress: Progress
    ) -> None:
        self._engine, self._plan, self._on_row, self._progress = engine, plan, on_row, progress
        self._slots = anyio.CapacityLimiter(plan.jobs)
        self.finished = 0
        self.stopped = False

    async def task(self, name: str, size: int, seed: int, numbered: int) -> None:
        async with self._slots:
            if self.stopped:
                return
            task = generate(name, size, seed)
            for offset, method in enumerate(METHODS):
                if self.stopped:
                    return
                number = numbered + offset + 1
                row = await run_once(self._engine, task, method, self._plan.window, number)
                self._on_row(row)
                self.finished += 1
                self.stopped = self.stopped or row["score"] is None
                self._progress.show(self.finished, f"{name} {size:,} chars seed {seed} {method}")


class Progress:
    """A progress bar on stderr, redrawn in place on a terminal and one line per run
    elsewhere (stdout stays for the report)."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self._total, self._stream = max(total, 1), stream
        self._in_place = stream.isatty()

    def show(self, finished: int, label: str) -> None:
        filled = self.WIDTH * finished // self._total
        line = f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {finished}/{self._total} {label}"
        self._stream.write(f"\r{line:<100}" if self._in_place else f"{line}\n")
        self._stream.flush()

    def done(self, finished: int, label: str) -> None:
        self.show(finished, label)
        if self._in_place:
            self._stream.write("\n")
            self._stream.flush()
