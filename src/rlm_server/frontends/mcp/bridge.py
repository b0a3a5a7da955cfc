"""Every call from the MCP front end into the engine, each in one small function, so that a
change of the engine's API is a change here and nowhere else in this package."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

from rlm_server.config import Config
from rlm_server.engine.engine import Engine, InferOptions, InferRequest
from rlm_server.engine.store import StoredContext
from rlm_server.errors import ShuttingDown

Json = dict[str, Any]
OnEvent = Callable[[Json], None]


class Bridge:
    """The engine, and the numbering of the calls the engine sees (its request ids and its
    admission sequence: a call numbered after a stop is refused)."""

    def __init__(self, config: Config, environ: Mapping[str, str]) -> None:
        self.engine = Engine(config, environ)
        self._numbers = itertools.count(1)
        self._last = 0
        self._accepting = True

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.workers.start()

    def refuse_new(self) -> None:
        """Every call from now on is refused (shutting_down); those running go on."""
        self._accepting = False
        self.engine.admit_through(self._last)

    def cancel_all(self) -> None:
        self.engine.cancel_all()

    def stop(self) -> None:
        self.engine.workers.stop()

    @property
    def stub(self) -> bool:
        return self.engine.stub

    # -- work -------------------------------------------------------------------------------

    async def ask(
        self,
        question: str,
        text: str | None,
        context_id: str | None,
        options: Json,
        on_event: OnEvent | None,
    ) -> Json:
        """One RLM completion: its result as the JSON-RPC `infer` returns it. Budgets are the
        server's (--max-cost-usd, --spend-limit-usd); `options` may shorten the deadline and
        the number of iterations."""
        request = InferRequest(
            context=text,
            query=question,
            options=InferOptions(
                max_iterations=options.get("max_iterations"),
                timeout_s=options.get("timeout_s"),
                progress=on_event is not None,
                trajectory=bool(options.get("trajectory")),
            ),
            context_id=context_id,
        )
        number = self._last = next(self._numbers)
        notify = on_event if on_event is not None else _ignore
        return await self.engine.infer(request, f"mcp-{number}", notify, number)

    async def load(self, text: str) -> StoredContext:
        if not self._accepting:
            raise ShuttingDown()
        return await self.engine.contexts.load_text(text)

    async def drop(self, context_id: str) -> bool:
        return await self.engine.contexts.drop(context_id)

    def stored(self) -> list[StoredContext]:
        return self.engine.contexts.sealed()

    def find(self, context_id: str) -> StoredContext | None:
        return next((c for c in self.stored() if c.id == context_id), None)


def _ignore(params: Json) -> None:
    """No progress was asked for."""
