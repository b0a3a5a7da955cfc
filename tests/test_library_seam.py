"""The seams into the `rlm` library that workers depend on. If an upgrade moves one, these fail.

`WorkerRLM` overrides `RLM._spawn_completion_context` to hand completions a long-lived LM
handler, and `_completion_turn` and `_default_answer` to check answers against a schema.
Workers replace `rlm.core.rlm.get_client`, through which the library builds every model client
(root, child RLMs, max-depth fallbacks), with one that relays to the broker. None of these is
public API, so: the version is pinned, each must still exist with the same shape, and a
completion through `WorkerRLM` must send the model exactly what the stock `RLM` sends.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any

import pytest
import rlm.core.rlm
from fixtures.openai_fixture import FixtureServer
from harness import answer_with, repl
from rlm import RLM
from rlm.clients import get_client

from rlm_server.worker import completion
from rlm_server.worker.completion import EventLMHandler, ProgressLogger, SessionState, WorkerRLM

ROOT = repl(
    "n = len(context)",
    "s = llm_query('sub question')",
    "answer['content'] = str(n) + ':' + s",
    "answer['ready'] = True",
)


def test_the_library_version_is_the_pinned_one() -> None:
    assert importlib.metadata.version("rlms") == "0.1.3"


def test_the_overridden_method_still_has_its_shape() -> None:
    method = RLM._spawn_completion_context
    assert inspect.isgeneratorfunction(inspect.unwrap(method))
    assert list(inspect.signature(method).parameters) == ["self", "prompt"]
    source = inspect.getsource(RLM._spawn_completion_context)
    for key in (
        "lm_handler_address",
        "context_payload",
        "depth",
        "subcall_fn",
        "max_concurrent_subcalls",
    ):
        assert f'env_kwargs["{key}"]' in source, key


def test_the_answer_check_seams_still_have_their_shape() -> None:
    """`options.answer_schema`: `WorkerRLM` checks each iteration's answer in
    `_completion_turn` (the loop reads `final_answer` off each block's result after it) and the
    closing one in `_default_answer`; the local REPL keeps the value itself in
    `locals["answer"]`."""
    turn = inspect.signature(RLM._completion_turn).parameters
    assert list(turn) == ["self", "prompt", "lm_handler", "environment"]
    assert list(inspect.signature(RLM._default_answer).parameters) == [
        "self",
        "message_history",
        "lm_handler",
    ]
    loop = inspect.getsource(RLM.completion)
    assert loop.index("self._completion_turn(") < loop.index("block.result.final_answer")
    assert "self._default_answer(" in loop
    from rlm.environments.local_repl import LocalREPL

    assert 'self.locals["answer"]' in inspect.getsource(LocalREPL.setup)


def _kwargs(llm: FixtureServer) -> dict[str, Any]:
    backend_kwargs = {
        "model_name": "scripted",
        "base_url": llm.base_url,
        "api_key": "k",
        "max_retries": 0,
    }
    return {
        "backend": "openai",
        "backend_kwargs": backend_kwargs,
        "max_iterations": 3,
        "max_depth": 1,
    }


CONTEXTS = {
    "text": "some context",
    "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"}],
}


@pytest.mark.parametrize("kind", CONTEXTS)
def test_worker_rlm_sends_the_model_what_the_stock_rlm_sends(llm: FixtureServer, kind: str) -> None:
    context = CONTEXTS[kind]
    rules = [{"when": "root", "reply": ROOT}, {"when": "sub", "reply": "sub answer"}]
    llm.script.replace(rules)
    stock = RLM(**_kwargs(llm)).completion(context, root_prompt="the question")
    stock_bodies = list(llm.script.bodies)

    llm.script.replace(rules)
    kwargs = _kwargs(llm)
    client = get_client("openai", dict(kwargs["backend_kwargs"]))
    subcalls: list[str] = []
    iterations: list[int] = []
    handler = EventLMHandler(client, on_subcall=subcalls.append)
    handler.start()
    logger = ProgressLogger(on_iteration=iterations.append, keep_trajectory=False)
    ours = WorkerRLM(lm_handler=handler, logger=logger, **kwargs).completion(
        context, root_prompt="the question"
    )

    assert ours.response == stock.response == f"{len(context)}:sub answer"
    assert list(llm.script.bodies) == stock_bodies
    assert ours.usage_summary.to_dict() == stock.usage_summary.to_dict()
    assert (subcalls, iterations, logger.completed) == (["scripted"], [1], 1)
    assert handler._server is not None, "the worker's handler must outlive the completion"
    handler.stop()


def test_the_repl_gets_the_very_context_object(llm: FixtureServer) -> None:
    """No copy of a long context: the REPL's `context` and `context_0` are the object given."""
    context = "x" * 1000
    reply = repl(
        "answer['content'] = str(id(context)) + ' ' + str(id(context_0))",
        "answer['ready'] = True",
    )
    llm.script.replace([{"when": "root", "reply": reply}])
    kwargs = _kwargs(llm)
    client = get_client("openai", dict(kwargs["backend_kwargs"]))
    handler = EventLMHandler(client, on_subcall=lambda model: None)
    handler.start()
    logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
    result = WorkerRLM(lm_handler=handler, logger=logger, **kwargs).completion(context)
    assert result.response == f"{id(context)} {id(context)}"
    handler.stop()


def test_every_client_the_library_builds_comes_from_one_name() -> None:
    """Workers replace `rlm.core.rlm.get_client`: every place that builds a client must call it
    by that name, or a worker would build a real one (with no key, to a real endpoint)."""
    assert callable(rlm.core.rlm.get_client)
    for method in (
        RLM._spawn_completion_context,
        RLM._subcall,
        RLM._fallback_answer,
    ):
        source = inspect.getsource(method)
        assert "get_client(" in source, method.__name__
    module_source = inspect.getsource(rlm.core.rlm)
    assert "from rlm.clients import BaseLM, get_client" in module_source
    assert module_source.count("get_client(") == 6  # nowhere else: all of them are relayed


TURN_1 = repl(
    "kept = len(context_0)", "answer['content'] = 'kept ' + str(kept)", "answer['ready'] = True"
)
TURN_2 = repl(
    "answer['content'] = str(kept) + ' ' + context_1 + ' ' + str(len(history))",
    "answer['ready'] = True",
)


def _ignore(model: str) -> None:
    """No sub-call happens in these tests."""


MULTI_TURN_RULES = [
    {"when": "root", "contains": "prior conversation history", "reply": TURN_2},
    {"when": "root", "reply": TURN_1},
]


def test_a_session_sends_the_model_what_the_stock_persistent_rlm_sends(
    llm: FixtureServer,
) -> None:
    """The library's multi-turn mode (`persistent=True`): turn 2 sees turn 1's variables, its
    input as `context_1` and turn 1's history; a session in a worker must do exactly that."""
    llm.script.replace(MULTI_TURN_RULES)
    with RLM(persistent=True, **_kwargs(llm)) as stock:
        stock_answers = [
            stock.completion("first input", root_prompt="turn one").response,
            stock.completion("second", root_prompt="turn two").response,
        ]
    stock_bodies = list(llm.script.bodies)

    llm.script.replace(MULTI_TURN_RULES)
    kwargs = _kwargs(llm)
    session = SessionState(base=None)
    ours = []
    for prompt, query in (("first input", "turn one"), ("second", "turn two")):
        handler = EventLMHandler(get_client("openai", dict(kwargs["backend_kwargs"])), _ignore)
        handler.start()  # a handler per turn, as a session's worker makes them
        logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
        rlm = WorkerRLM(lm_handler=handler, session=session, logger=logger, **kwargs)
        ours.append(rlm.completion(prompt, root_prompt=query).response)
        handler.stop()

    assert ours == stock_answers == ["kept 11", "11 second 3"]
    assert list(llm.script.bodies) == stock_bodies


def test_a_session_on_a_stored_context_keeps_it_as_context_0(llm: FixtureServer) -> None:
    """Opened on a stored context, a session's first turn has it as `context`; a turn without
    input adds nothing, a turn with input adds the next `context_N`."""
    show = repl(
        "answer['content'] = str(len(context)) + ' ' + str(len(context_0)) + ' '"
        " + str(sorted(k for k in SHOW_VARS().split(\"'\") if k.startswith('context_')))",
        "answer['ready'] = True",
    )
    llm.script.replace([{"when": "root", "reply": show}])
    kwargs = _kwargs(llm)
    session = SessionState(base="stored context")
    answers = []
    for prompt in (None, None, "new"):
        handler = EventLMHandler(get_client("openai", dict(kwargs["backend_kwargs"])), _ignore)
        handler.start()
        logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
        rlm = WorkerRLM(lm_handler=handler, session=session, logger=logger, **kwargs)
        answers.append(rlm.completion(prompt, root_prompt="q").response)
        handler.stop()
    assert answers == [
        "14 14 ['context_0']",
        "14 14 ['context_0']",
        "14 14 ['context_0', 'context_1']",
    ]


def test_a_list_of_values_without_lengths_is_described_not_refused(llm: FixtureServer) -> None:
    """The library describes a list context by its items' lengths; numbers have none."""
    llm.script.replace([{"when": "root", "reply": answer_with("str(sum(context))")}])
    kwargs = _kwargs(llm)
    handler = EventLMHandler(get_client("openai", dict(kwargs["backend_kwargs"])), _ignore)
    handler.start()
    logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
    result = WorkerRLM(lm_handler=handler, logger=logger, **kwargs).completion([1, 2, 3])
    assert result.response == "6"
    assert "list of 3 total characters" in llm.script.bodies[0]["messages"][1]["content"]
    handler.stop()


def test_the_persistence_seams_still_have_their_shape() -> None:
    """Sessions add contexts as `LocalREPL.add_context` does (without its file) and rely on
    the library storing each turn's history when `persistent` is set."""
    from rlm.environments.local_repl import LocalREPL

    add_context = inspect.getsource(LocalREPL.add_context)
    assert "self._context_count = max(self._context_count, context_index + 1)" in add_context
    assert 'var_name = f"context_{context_index}"' in add_context
    assert LocalREPL.get_context_count.__doc__
    completion = inspect.getsource(RLM.completion)
    assert "environment.add_history(message_history)" in completion
    assert "get_context_count()" in completion


@pytest.mark.parametrize(
    "context",
    [
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"}],
        ["document one", "document two"],
        [{"n": 1, "text": "x"}, {"n": 2}],
        [1, 2.5, None, "mixed"],
        [{"role": "user", "content": "a message"}, "then a document"],
        [],
    ],
)
def test_a_measured_list_is_described_as_the_library_describes_it(
    llm: FixtureServer, monkeypatch: pytest.MonkeyPatch, context: list[Any]
) -> None:
    """The zygote measures a list context once and a worker describes it by that length, so
    that no worker walks (and copies) every item: the root model's prompt must not change."""
    kwargs = _kwargs(llm)
    handler = EventLMHandler(get_client("openai", dict(kwargs["backend_kwargs"])), _ignore)
    logger = ProgressLogger(on_iteration=lambda n: None, keep_trajectory=False)
    rlm = WorkerRLM(lm_handler=handler, logger=logger, **kwargs)
    walked = rlm._setup_prompt(context, "q")
    monkeypatch.setattr(completion, "inherited", context)
    monkeypatch.setattr(completion, "inherited_length", completion.context_length(context))
    assert rlm._setup_prompt(context, "q") == walked
    assert rlm._setup_prompt(list(context), "q") == walked  # another list: walked as usual
