"""Every call from the MCP front end into the engine, each in one small function, so that a
change of the engine's API is a change here and nowhere else in this package."""

from __future__ import annotations

from rlm_server import Json
from rlm_server.engine.api import (
    InferOptions,
    InferRequest,
    InferResult,
    Observer,
    StoredContextInfo,
)
from rlm_server.errors import ShuttingDown
from rlm_server.frontends.lifecycle import Lifecycle


class Bridge:
    """The engine, as the lifecycle runs it: a call after a stop is refused (the engine refuses
    its infers; a load is refused here)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self.engine = lifecycle.engine
        self._calls = 0

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
        if self._lifecycle.stopping:
            raise ShuttingDown()
        return await self.engine.load_text(text)

    async def drop(self, context_id: str) -> bool:
        return await self.engine.drop_context(context_id)

    def stored(self) -> list[StoredContextInfo]:
        return self.engine.stored_contexts().contexts

    def find(self, context_id: str) -> StoredContextInfo | None:
        return next((c for c in self.stored() if c.id == context_id), None)
