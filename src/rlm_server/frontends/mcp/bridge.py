"""Every call from the MCP front end into the engine, each in one small function, so that a
change of the engine's API is a change here and nowhere else in this package."""

from __future__ import annotations

from collections.abc import Mapping

from rlm_server import Json
from rlm_server.config import Config
from rlm_server.engine.api import (
    InferOptions,
    InferRequest,
    InferResult,
    Observer,
    StoredContextInfo,
)
from rlm_server.engine.engine import Engine
from rlm_server.errors import ShuttingDown


class Bridge:
    """The engine, and the admission of the calls it sees (a call after a stop is refused)."""

    def __init__(self, config: Config, environ: Mapping[str, str]) -> None:
        self.engine = Engine(config, environ)
        self._accepting = True
        self._calls = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def refuse_new(self) -> None:
        """Every call from now on is refused (shutting_down); those running go on."""
        self._accepting = False
        self.engine.close_admission()

    def cancel_all(self) -> None:
        self.engine.cancel_all()

    def stop(self) -> None:
        self.engine.close()

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
        observer: Observer | None,
    ) -> InferResult:
        """One RLM completion. Budgets are the server's (--max-cost-usd, --spend-limit-usd);
        `options` may shorten the deadline and the number of iterations."""
        self._calls += 1
        request = InferRequest(
            context=text,
            query=question,
            options=InferOptions(
                max_iterations=options.get("max_iterations"),
                timeout_s=options.get("timeout_s"),
                trajectory=bool(options.get("trajectory")),
            ),
            context_id=context_id,
            label=f"mcp-{self._calls}",
        )
        return await self.engine.infer(request, self.engine.ticket(), observer)

    async def load(self, text: str) -> StoredContextInfo:
        if not self._accepting:
            raise ShuttingDown()
        return await self.engine.load_text(text)

    async def drop(self, context_id: str) -> bool:
        return await self.engine.drop_context(context_id)

    def stored(self) -> list[StoredContextInfo]:
        return self.engine.stored_contexts().contexts

    def find(self, context_id: str) -> StoredContextInfo | None:
        return next((c for c in self.stored() if c.id == context_id), None)
