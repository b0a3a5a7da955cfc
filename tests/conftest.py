"""Shared fixtures: the scripted model server (in-process) and real rlm-server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, fixture_env

Spawn = Callable[..., ServerProcess]


@pytest.fixture
def llm() -> Iterator[FixtureServer]:
    server = FixtureServer()
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def spawn(llm: FixtureServer) -> Iterator[Spawn]:
    """Start rlm-server against the fixture: spawn(rules, env={...}, args=[...])."""
    started: list[ServerProcess] = []

    def start(
        rules: list[dict[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        raw_env: Mapping[str, str] | None = None,
        new_session: bool = False,
    ) -> ServerProcess:
        llm.script.replace(rules or [])
        environment = dict(raw_env) if raw_env is not None else fixture_env(llm.base_url)
        environment.update(env or {})
        server = ServerProcess(environment, args, new_session)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
